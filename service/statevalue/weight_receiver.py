"""A replica's end of in-memory weight updates from the trainer.

Through the distributed transport, the replica joins the trainer's process group (set up
on the first update, reused after) and receives the broadcast buckets into a staged copy
of its model; through shared memory, it copies the tensors from the trainer's segment on
the same host. The server swaps the staged copy in only once every byte arrived.
``statevalue_client.weights`` describes the exchange; both ends lay the tensors out with
its :func:`plan_buckets`.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from statevalue.schema import InvalidRequest
from statevalue_client.weights import (
    ABORT,
    SHARED_MEMORY_DIR,
    TensorSpec,
    bucket_device,
    decision_key,
    group_store,
    host_identity,
    local_address_towards,
    open_process_group,
    plan_buckets,
    ready_key,
    segment_layout,
)

log = logging.getLogger(__name__)


class WeightTransferFailed(Exception):
    """The update did not complete on this replica; its old weights keep serving."""


class NotOnTrainerHost(Exception):
    """A shared-memory update reached a replica that cannot see the trainer's segment
    (another host, or a container with a /dev/shm of its own); nothing was mapped."""


@dataclass(frozen=True)
class UpdateOrder:
    """One ``UpdateWeights`` call: which tensors the trainer sends (the transport is the
    subclass's)."""

    TRANSPORT: ClassVar[str]

    group: str
    update: int
    version: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)

    def check_device(self, device: torch.device) -> None:
        """Refuse a transport that cannot reach the model's device (any can, here)."""


@dataclass(frozen=True)
class ProcessGroupOrder(UpdateOrder):
    """An update broadcast through the trainer's process group, which meets here."""

    TRANSPORT: ClassVar[str] = "distributed"

    host: str
    port: int
    world_size: int
    rank: int
    backend: str
    bucket_bytes: int

    def check_device(self, device: torch.device) -> None:
        """Refuse NCCL for a model that is not on a CUDA device."""
        if self.backend == "nccl" and device.type != "cuda":
            raise InvalidRequest(
                "backend", f"nccl needs the model on a CUDA device; this replica's is on {device}"
            )


@dataclass(frozen=True)
class SharedMemoryOrder(UpdateOrder):
    """An update in a shared-memory segment of the trainer's host."""

    TRANSPORT: ClassVar[str] = "shared_memory"

    segment: str
    trainer_host: str


def read_segment(
    order: SharedMemoryOrder, dtypes: Mapping[str, torch.dtype], device: torch.device
) -> dict[str, torch.Tensor]:
    """The tensors of ``order``'s segment, copied in the model's ``dtypes`` to its
    ``device``: a staged copy of the weights, ready to swap in.

    Raises:
        NotOnTrainerHost: this replica runs on another host, or cannot see the segment.
        WeightTransferFailed: the segment is shorter than the tensors, or unreadable.
    """
    if order.trainer_host != host_identity():
        raise NotOnTrainerHost(
            "this replica runs on another host than the trainer; "
            "send the weights with transport='distributed'"
        )
    path = SHARED_MEMORY_DIR / order.segment
    layout = segment_layout(order.tensors)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise NotOnTrainerHost(
            f"segment {order.segment} is not in this replica's shared memory ({exc.strerror}): "
            "a container with a /dev/shm of its own (share the host's: --ipc=host), or the "
            "trainer removed it; send the weights with transport='distributed'"
        ) from exc
    if size < layout.nbytes:
        raise WeightTransferFailed(
            f"segment {order.segment} holds {size} bytes, the tensors take {layout.nbytes}"
        )
    try:
        # A private, read-only mapping: the pages are the trainer's, nothing is copied
        # until each tensor is copied into its staged place.
        segment = torch.from_file(str(path), shared=False, size=layout.nbytes, dtype=torch.uint8)
    except RuntimeError as exc:
        raise WeightTransferFailed(f"cannot map segment {order.segment}: {exc}") from exc
    return {
        placed.spec.name: segment[placed.offset : placed.offset + placed.spec.nbytes]
        .view(placed.spec.dtype)
        .view(placed.spec.shape)
        .to(device=device, dtype=dtypes[placed.spec.name], copy=True)
        for placed in layout.tensors
    }


@dataclass
class _Membership:
    """This replica's place in one trainer's group: the store, and the process group."""

    key: tuple[str, str, int, int, int]
    store: dist.Store
    address: str
    generation: int = 0
    process_group: dist.ProcessGroup | None = None


class WeightReceiver:
    """Receives weight updates, one at a time, on a thread of its own."""

    def __init__(self) -> None:
        self._membership: _Membership | None = None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="statevalue-weights")

    def receive(
        self,
        order: UpdateOrder,
        dtypes: Mapping[str, torch.dtype],
        device: torch.device,
        timeout: float,
    ) -> dict[str, torch.Tensor]:
        """The tensors ``order`` announces, received (blocking) in the model's ``dtypes`` on
        its ``device``: a staged copy of the weights, ready to swap in.

        Raises:
            WeightTransferFailed: the trainer called the update off (another replica
                refused it) or the transfer broke.
            NotOnTrainerHost: a shared-memory update from another host.
        """
        if isinstance(order, SharedMemoryOrder):
            return read_segment(order, dtypes, device)
        assert isinstance(order, ProcessGroupOrder)
        return self._broadcast_in(order, dtypes, device, timeout)

    def _broadcast_in(
        self,
        order: ProcessGroupOrder,
        dtypes: Mapping[str, torch.dtype],
        device: torch.device,
        timeout: float,
    ) -> dict[str, torch.Tensor]:
        """Buckets arrive one at a time into one buffer; each tensor is copied from there
        into its staged place, cast to the model's dtype."""
        wait = datetime.timedelta(seconds=timeout)
        try:
            membership = self._member(order, wait)
            store = membership.store
            store.set(ready_key(order.update, order.rank), str(membership.generation))
            store.wait([decision_key(order.update)], wait)
            decision = store.get(decision_key(order.update)).decode()
        except Exception as exc:  # a store error: the trainer is gone or unreachable
            self.close()
            raise WeightTransferFailed(
                f"no answer from the trainer's store at {order.host}:{order.port}: {exc}"
            ) from exc
        if decision == ABORT:
            raise WeightTransferFailed(
                "the trainer called the update off before sending anything "
                "(another replica refused it or did not answer)"
            )
        received = 0
        try:
            group = self._join(membership, int(decision.split()[1]), order, device, wait)
            staged = {
                spec.name: torch.empty(spec.shape, dtype=dtypes[spec.name], device=device)
                for spec in order.tensors
            }
            buckets = plan_buckets(order.tensors, order.bucket_bytes)
            buffer = torch.empty(
                max(b.nbytes for b in buckets),
                dtype=torch.uint8,
                device=bucket_device(order.backend, device),
            )
            for bucket in buckets:
                payload = buffer[: bucket.nbytes]
                group.broadcast(payload, 0, wait).wait()
                for placed in bucket.tensors:
                    spec = placed.spec
                    data = payload[placed.offset : placed.offset + spec.nbytes]
                    staged[spec.name].copy_(data.view(spec.dtype).view(spec.shape))
                received += bucket.nbytes
        except Exception as exc:  # a broken connection, a timeout: the update is lost
            self.close()
            raise WeightTransferFailed(
                f"the transfer broke after {received} of {order.nbytes} bytes ({exc}); "
                "the old weights keep serving"
            ) from exc
        return staged

    def close(self) -> None:
        """Leave the trainer's group (a later update joins again)."""
        membership, self._membership = self._membership, None
        if membership is not None and membership.process_group is not None:
            membership.process_group.abort()

    def _member(self, order: ProcessGroupOrder, timeout: datetime.timedelta) -> _Membership:
        key = (order.group, order.host, order.port, order.rank, order.world_size)
        if self._membership is None or self._membership.key != key:
            self.close()
            log.info("joining the trainer's weight group at %s:%d", order.host, order.port)
            store = dist.TCPStore(order.host, order.port, None, False, timeout)
            self._membership = _Membership(
                key=key,
                store=group_store(store, order.group),
                address=local_address_towards(order.host, order.port),
            )
        return self._membership

    @staticmethod
    def _join(
        membership: _Membership,
        generation: int,
        order: ProcessGroupOrder,
        device: torch.device,
        timeout: datetime.timedelta,
    ) -> dist.ProcessGroup:
        if membership.process_group is None or membership.generation != generation:
            if membership.process_group is not None:
                membership.process_group.abort()
            if order.backend == "nccl":
                torch.cuda.set_device(device)
            membership.process_group = open_process_group(
                membership.store,
                generation,
                rank=order.rank,
                world_size=order.world_size,
                backend=order.backend,
                address=membership.address,
                timeout=timeout,
            )
            membership.generation = generation
        return membership.process_group
