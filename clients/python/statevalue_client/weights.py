"""Weight updates from the trainer's memory to every replica, through torch.distributed.

The trainer is rank 0 of a process group whose other ranks are the replicas. The group is
set up on the first update and reused by the next ones:

1. the trainer opens a TCP store at its rendezvous address and sends every replica an
   ``UpdateWeights`` call naming the store, the replica's rank and the tensors (names,
   shapes, dtypes) it will send;
2. each replica checks the names and shapes against its model (refusing at once, naming
   the tensor) and, when they fit, writes "ready" in the store, then waits for the
   trainer's decision;
3. once every replica is ready the trainer writes "go" (and which process group to use:
   the one they share, or a new one when a replica is new), otherwise "abort": no byte of
   the weights moves unless every replica accepted them;
4. the trainer broadcasts the tensors packed into buckets of at most ``bucket_bytes``
   (a larger tensor goes alone); each replica copies every bucket into a staged copy of
   its model and swaps it in only once the last bucket arrived.

Neither side holds more than one bucket besides its weights (the replica: its served and
its staged weights). Both sides derive the buckets from the same list of tensors with
:func:`plan_buckets`; the service imports this module for that.

A replica on the trainer's own host can take the ``shared_memory`` transport instead: the
trainer copies every tensor once into a POSIX shared-memory segment (laid out by
:func:`segment_layout`), sends every replica an ``UpdateWeights`` call naming the segment
and its host, and removes the segment once every call has answered. Each replica checks
names and shapes, then that it runs on that host, before it maps the segment and copies
the tensors into its staged model; no byte goes through the network stack, and one copy
serves every replica of the host. The replicas decide one by one (as ``reload_weights``):
each one takes the whole update or keeps its old weights.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_all
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from statevalue_client.proto import statevalue_pb2 as pb

DEFAULT_BUCKET_BYTES = 128 << 20
# Tensors start at multiples of this many bytes in a bucket, so each can be viewed in its
# own dtype where it lies.
_ALIGNMENT = 64
# How often the trainer looks at the store and the calls while it waits for the replicas.
_POLL_S = 0.01

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}
BACKENDS = ("gloo", "nccl")
TRANSPORTS = ("distributed", "shared_memory")
ABORT = "abort"
# Where POSIX shared memory lives (Linux): a segment is a file of this tmpfs.
SHARED_MEMORY_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "statevalue-"

_T = TypeVar("_T")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an update: its parameter name, shape and dtype on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, shape=self.shape, dtype=_DTYPE_NAMES[self.dtype])


@dataclass(frozen=True)
class PlacedTensor:
    """Where one tensor lies in its bucket (a byte offset)."""

    spec: TensorSpec
    offset: int


@dataclass(frozen=True)
class Bucket:
    """Tensors sent by one broadcast, packed into ``nbytes`` bytes."""

    tensors: tuple[PlacedTensor, ...]
    nbytes: int


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """The broadcasts of an update: ``specs`` in order, packed up to ``bucket_bytes`` each.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be at least 1, not {bucket_bytes}")
    buckets: list[Bucket] = []
    placed: list[PlacedTensor] = []
    used = 0
    for spec in specs:
        offset = -(-used // _ALIGNMENT) * _ALIGNMENT
        if placed and offset + spec.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(placed), used))
            placed, offset = [], 0
        placed.append(PlacedTensor(spec, offset))
        used = offset + spec.nbytes
    if placed:
        buckets.append(Bucket(tuple(placed), used))
    return buckets


def segment_layout(specs: Sequence[TensorSpec]) -> Bucket:
    """Where each tensor of a shared-memory update lies in its segment: all of them in
    one bucket, in order."""
    return plan_buckets(specs, sys.maxsize)[0]


@functools.cache
def host_identity() -> str:
    """This machine's identity, the same for every process on it: the kernel's boot id
    (every container on a host shares it), or the host name where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def on_this_host(address: str) -> bool:
    """Whether ``host:port`` is this machine: a loopback address, or one this machine
    would send from itself (no packet sent)."""
    host, port = split_address(address)
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0]
    except (socket.gaierror, IndexError):
        return False
    ip = str(resolved).split("%")[0]
    if ipaddress.ip_address(ip).is_loopback:
        return True
    try:
        return local_address_towards(ip, port) == ip
    except OSError:  # no route there
        return False


def choose_transport(transport: str, addresses: Sequence[str], nbytes: int) -> str:
    """``transport`` itself, or for ``"auto"``: shared memory when every replica runs on
    this machine and its shared memory has room for ``nbytes``, the process group
    otherwise."""
    if transport not in ("auto", *TRANSPORTS):
        raise ValueError(f"transport must be auto, {', '.join(TRANSPORTS)}, not {transport!r}")
    if transport != "auto":
        return transport
    if (
        SHARED_MEMORY_DIR.is_dir()
        and shutil.disk_usage(SHARED_MEMORY_DIR).free >= nbytes
        and all(on_this_host(a) for a in addresses)
    ):
        return "shared_memory"
    return "distributed"


def create_segment(path: Path, nbytes: int) -> torch.Tensor:
    """A new shared-memory segment of ``nbytes`` at ``path`` (readable by this user only),
    mapped as bytes.

    Its memory is reserved first: a shared memory too small for it (a container's is
    64 MiB unless told otherwise) raises here instead of killing the process with SIGBUS
    when a write finds no page.

    Raises:
        OSError: the segment cannot be made, or shared memory has no room for it.
    """
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(descriptor, 0, nbytes)
    except OSError as exc:
        path.unlink()
        free = shutil.disk_usage(SHARED_MEMORY_DIR).free
        raise OSError(
            exc.errno,
            f"{SHARED_MEMORY_DIR} has {free} bytes free, the update takes {nbytes} "
            "(give it more, e.g. docker --shm-size, or use transport='distributed')",
        ) from exc
    finally:
        os.close(descriptor)
    return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)


def pack(
    buffer: torch.Tensor, placed: Sequence[PlacedTensor], tensors: Sequence[torch.Tensor]
) -> None:
    """Copy each of ``tensors`` to its place in the bytes of ``buffer``."""
    for where, tensor in zip(placed, tensors, strict=True):
        end = where.offset + where.spec.nbytes
        buffer[where.offset : end].copy_(tensor.reshape(-1).contiguous().view(torch.uint8))


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire dtype name; ValueError for any other name."""
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise ValueError(f"must be one of {', '.join(WIRE_DTYPES)}, not {name!r}") from None


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as its host and port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, not {address!r}")
    return host.strip("[]"), int(port)


def local_address_towards(host: str, port: int) -> str:
    """This machine's address on the interface that routes to ``host`` (no packet sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return str(probe.getsockname()[0])


def group_store(store: dist.Store, group: str) -> dist.Store:
    """The part of the TCP store that belongs to one trainer's group."""
    return dist.PrefixStore(f"statevalue/{group}", store)


def ready_key(update: int, rank: int) -> str:
    """Where replica ``rank`` says it accepted update ``update`` (the value: the generation
    of the process group it holds, 0 for none)."""
    return f"update/{update}/ready/{rank}"


def decision_key(update: int) -> str:
    """Where the trainer writes ``go <generation>`` or ``abort`` for update ``update``."""
    return f"update/{update}/decision"


def open_process_group(
    store: dist.Store,
    generation: int,
    *,
    rank: int,
    world_size: int,
    backend: str,
    address: str,
    timeout: datetime.timedelta,
) -> dist.ProcessGroup:
    """Join generation ``generation`` of a group's process group (blocks until all ranks do).

    ``address`` is this rank's own address on the network the others reach it by (gloo
    listens there; NCCL finds its own way).
    """
    scoped = dist.PrefixStore(f"pg/{generation}", store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(scoped, rank, world_size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
    return dist.ProcessGroupGloo(scoped, rank, world_size, options)


def bucket_device(backend: str, device: torch.device) -> torch.device:
    """Where a bucket lies in transit: CUDA memory for NCCL, CPU memory for gloo."""
    return device if backend == "nccl" else torch.device("cpu")


def named_tensor_list(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a state dict or ``named_parameters()``, aliases dropped.

    A tied parameter (an output embedding sharing the input embedding's storage) is sent
    once, under its first name; the replica accepts either name for the pair.
    """
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    named: list[tuple[str, torch.Tensor]] = []
    for name, tensor in pairs:
        tensor = tensor.detach()
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"{name}: dtype {tensor.dtype} cannot be sent; "
                f"floating point only ({', '.join(WIRE_DTYPES)})"
            )
        named.append((name, tensor))
    return named


@dataclass
class _Group:
    """The trainer's process group: its generation, and the replicas (in rank order) and
    backend it was built for."""

    generation: int
    members: tuple[tuple[str, ...], str]
    group: dist.ProcessGroup


class WeightSender:
    """The trainer's end of weight updates: a TCP store and a process group, both set up
    on the first update and reused by the next ones.

    Args:
        rendezvous: ``host:port`` where the trainer's TCP store listens; the replicas must
            reach it. Default: this machine's address towards the first replica, any free
            port.
    """

    def __init__(self, rendezvous: str | None = None) -> None:
        self.requested_rendezvous = rendezvous
        self.group_id = uuid.uuid4().hex
        self._store: dist.TCPStore | None = None
        self._address = ""
        self._group: _Group | None = None
        self._generation = 0
        self._update = 0
        #: Bytes the last update broadcast or put in shared memory (0 when it was called
        #: off before).
        self.bytes_sent = 0

    @property
    def rendezvous(self) -> str:
        """The store's ``host:port`` once the first update opened it."""
        if self._store is None:
            return ""
        host = f"[{self._address}]" if ":" in self._address else self._address
        return f"{host}:{self._store.port}"

    def update(
        self,
        tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        addresses: Sequence[str],
        version: str,
        send: Callable[[str, pb.UpdateWeightsRequest], Future[_T]],
        transport: str = "auto",
        backend: str = "auto",
        bucket_bytes: int | None = None,
        timeout: float = 300.0,
    ) -> dict[str, Future[_T]]:
        """Send ``tensors`` to the replicas at ``addresses``; returns each one's call.

        ``send(address, request)`` starts the ``UpdateWeights`` call to one replica and
        returns its future; every call has finished when this returns. ``transport`` is
        ``"distributed"``, ``"shared_memory"`` or ``"auto"`` (:func:`choose_transport`).
        For the distributed transport, ``backend`` is ``"gloo"``, ``"nccl"`` or
        ``"auto"`` (NCCL when the tensors are on CUDA); ``bucket_bytes`` the largest
        broadcast (default 128 MiB); ``timeout`` how long the replicas may take to get
        ready, and each broadcast to arrive.

        Raises:
            ValueError: no tensors, a tensor that is not floating point, or an unknown
                transport or backend.
            Exception: the transfer failed on this side while every replica says it
                succeeded (otherwise the failed calls tell).
        """
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be auto, gloo or nccl, not {backend!r}")
        named = named_tensor_list(tensors)
        if not named:
            raise ValueError("no tensors to send")
        specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in named]
        transport = choose_transport(transport, addresses, segment_layout(specs).nbytes)
        self._update += 1
        self.bytes_sent = 0
        if transport == "shared_memory":
            return self._share(named, specs, addresses, version, send)
        bucket_bytes = bucket_bytes or DEFAULT_BUCKET_BYTES
        buckets = plan_buckets(specs, bucket_bytes)
        if backend == "auto":
            backend = "nccl" if named[0][1].is_cuda else "gloo"
        store = self._open_store(addresses[0], timeout)
        calls = {
            address: send(
                address,
                self._request(
                    specs,
                    version,
                    rendezvous=self.rendezvous,
                    world_size=len(addresses) + 1,
                    rank=rank,
                    backend=backend,
                    bucket_bytes=bucket_bytes,
                ),
            )
            for rank, address in enumerate(addresses, start=1)
        }
        error: Exception | None = None
        try:
            generation = self._decide(store, calls, backend, timeout)
            if generation is not None:
                device = named[0][1].device
                group = self._join(store, generation, (tuple(calls), backend), device, timeout)
                self._broadcast(group, named, buckets, bucket_device(backend, device), timeout)
        except Exception as exc:  # the replicas' calls say what they saw; this is ours
            self._close_group()
            error = exc
        failed = [call for call in calls.values() if call.exception() is not None]
        if error is not None and not failed:
            raise error
        return calls

    def close(self) -> None:
        """Leave the process group and stop the store (the replicas drop theirs)."""
        self._close_group()
        self._store = None

    def _request(
        self, specs: list[TensorSpec], version: str, **transport: Any
    ) -> pb.UpdateWeightsRequest:
        """The call announcing this update; ``transport`` the fields of how it travels."""
        return pb.UpdateWeightsRequest(
            group=self.group_id,
            tensors=[spec.to_proto() for spec in specs],
            update=self._update,
            version=version,
            **transport,
        )

    def _share(
        self,
        named: list[tuple[str, torch.Tensor]],
        specs: list[TensorSpec],
        addresses: Sequence[str],
        version: str,
        send: Callable[[str, pb.UpdateWeightsRequest], Future[_T]],
    ) -> dict[str, Future[_T]]:
        """Copy the tensors into a fresh shared-memory segment, let every replica read it,
        and remove it once all have answered.

        A fresh segment per update: a replica still reading the last one (its caller gave
        up waiting) never sees it change under it.
        """
        layout = segment_layout(specs)
        name = f"{SEGMENT_PREFIX}{self.group_id}-{self._update}"
        path = SHARED_MEMORY_DIR / name
        segment = create_segment(path, layout.nbytes)
        try:
            pack(segment, layout.tensors, [tensor for _, tensor in named])
            del segment
            self.bytes_sent = layout.nbytes
            shared = pb.SharedMemorySegment(name=name, nbytes=layout.nbytes, host=host_identity())
            calls = {
                address: send(address, self._request(specs, version, shared_memory=shared))
                for address in addresses
            }
            wait_for_all(calls.values())
        finally:
            path.unlink(missing_ok=True)
        return calls

    def _open_store(self, first_replica: str, timeout: float) -> dist.Store:
        if self._store is None:
            if self.requested_rendezvous is None:
                host, port = split_address(first_replica)
                self._address, port = local_address_towards(host, port), 0
            else:
                self._address, port = split_address(self.requested_rendezvous)
            self._store = dist.TCPStore(
                self._address,
                port,
                None,
                True,
                datetime.timedelta(seconds=timeout),
                wait_for_workers=False,
            )
        return group_store(self._store, self.group_id)

    def _decide(
        self, store: dist.Store, calls: Mapping[str, Future[Any]], backend: str, timeout: float
    ) -> int | None:
        """Wait until every replica is ready (then write ``go``) or one has answered
        (a refusal: write ``abort``). Returns the process group generation, or None.

        The group is reused when every replica holds the current generation and nothing
        else changed; otherwise everyone builds the next one.
        """
        keys = [ready_key(self._update, rank) for rank in range(1, len(calls) + 1)]
        deadline = time.monotonic() + timeout
        while not store.check(keys):
            if any(call.done() for call in calls.values()) or time.monotonic() > deadline:
                store.set(decision_key(self._update), ABORT)
                return None
            time.sleep(_POLL_S)
        held = {int(store.get(key)) for key in keys}
        current = self._group
        members = (tuple(calls), backend)
        if current is None or held != {current.generation} or current.members != members:
            self._close_group()
            self._generation += 1
        store.set(decision_key(self._update), f"go {self._generation}")
        return self._generation

    def _join(
        self,
        store: dist.Store,
        generation: int,
        members: tuple[tuple[str, ...], str],
        device: torch.device,
        timeout: float,
    ) -> dist.ProcessGroup:
        addresses, backend = members
        if self._group is None:
            if backend == "nccl":
                torch.cuda.set_device(device)
            group = open_process_group(
                store,
                generation,
                rank=0,
                world_size=len(addresses) + 1,
                backend=backend,
                address=self._address,
                timeout=datetime.timedelta(seconds=timeout),
            )
            self._group = _Group(generation, members, group)
        return self._group.group

    def _broadcast(
        self,
        group: dist.ProcessGroup,
        named: list[tuple[str, torch.Tensor]],
        buckets: list[Bucket],
        device: torch.device,
        timeout: float,
    ) -> None:
        """Broadcast the buckets; a bucket of one tensor already where it travels from is
        sent as it lies, the others are packed into one buffer."""
        tensors = iter(tensor for _, tensor in named)
        buffer: torch.Tensor | None = None
        wait = datetime.timedelta(seconds=timeout)
        for bucket in buckets:
            members = [next(tensors).reshape(-1) for _ in bucket.tensors]
            if len(members) == 1 and members[0].device == device:
                payload = members[0].contiguous().view(torch.uint8)
            else:
                if buffer is None:
                    size = max(b.nbytes for b in buckets)
                    buffer = torch.empty(size, dtype=torch.uint8, device=device)
                payload = buffer[: bucket.nbytes]
                pack(payload, bucket.tensors, members)
            group.broadcast(payload, 0, wait).wait()
            self.bytes_sent += bucket.nbytes

    def _close_group(self) -> None:
        if self._group is not None:
            # Closing the connections tells replicas waiting for a bucket at once.
            self._group.group.abort()
            self._group = None


def open_weight_sender(current: WeightSender | None, rendezvous: str | None) -> WeightSender:
    """``current``, unless there is none or the caller names another rendezvous (then a
    new sender; the old one is closed)."""
    if current is not None and rendezvous in (None, current.requested_rendezvous):
        return current
    if current is not None:
        current.close()
    return WeightSender(rendezvous)
