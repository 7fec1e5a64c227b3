"""Hidden states from vLLM's pooling runner (``--backend vllm``).

vLLM runs the decoder as an embedding model that returns every token's last-layer hidden
state (``token_embed`` pooling, no activation). It packs sequences of mixed lengths
without padding, and its prefix cache lets a group's shared prompt run once:

- a request that may read the prefix cache returns only the states of the tokens it did
  not find there, which begin at a cache-block boundary;
- so each group's first member runs alone with the cache closed to reads (all of its
  states), then the other members run with it open, and the states of their cached
  positions come from the first member, which has the same ids there.

A member whose cached part reaches past its group's prompt (two responses sharing a long
beginning) runs again without the cache. docs/design.md gives the measured agreement with
the torch backend.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from statevalue.backends.base import (
    CheckpointRefused,
    LoadedModelInfo,
    LoadedWeights,
    ModelIdentity,
    WeightLoadFailed,
    read_safetensors,
)
from statevalue.backends.embedded import (
    EMBEDDED_MODEL,
    EMBEDDED_NAME,
    cached_embedded_checkpoint,
    file_digest,
)
from statevalue.backends.layout import group_shared_prefixes
from statevalue.backends.location import locate_model
from statevalue.backends.torch_backend import (
    directory_stamp,
    resolve_device,
    resolve_dtype,
)
from statevalue.backends.vllm_worker import StagedTensor, StagedWeightLoading
from statevalue_client.weights import DEFAULT_BUCKET_BYTES, Bucket, TensorSpec, plan_buckets

log = logging.getLogger(__name__)

VLLM_FORWARD_PATHS = ("packed", "prompt_once")
# vLLM's share of the accelerator's memory (of RAM on a CPU) when none is given: on a CPU
# its KV cache is carved out of RAM, where the GPU default would take nearly all of it.
_DEFAULT_MEMORY_SHARE = {"cuda": 0.85, "cpu": 0.15}
# An output embedding tied to the input embedding (one tensor under two names).
_TIED_EMBEDDING, _TIED_OUTPUT = "model.embed_tokens.weight", "lm_head.weight"
# The worker extension that takes weights sent from memory (its methods are RPC names).
_WORKER_EXTENSION = f"{StagedWeightLoading.__module__}.{StagedWeightLoading.__qualname__}"
# Where a bucket of weights sent from memory waits for the workers: shared memory where
# the host has it (None: the temporary directory).
_STAGING_DIRECTORY = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _checkpoint_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a directory's safetensors files, read from their headers."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with read_safetensors(file, partial(safe_open, framework="pt")) as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_vllm_forward_path(path: str) -> str:
    """The forward path ``path`` names for vLLM; ``auto`` is ``prompt_once``."""
    if path == "auto":
        return "prompt_once"
    if path not in VLLM_FORWARD_PATHS:
        raise ValueError(
            "the vllm backend packs sequences itself: forward path must be auto, "
            f"packed or prompt_once, not {path!r}"
        )
    return path


class VllmBackend(LoadedModelInfo):
    """Per-token last-layer hidden states from ``vllm.LLM`` with the pooling runner.

    Args:
        model: ``"embedded"`` (exported once to a plain checkpoint in the user cache) or a
            local Hugging Face model directory with safetensors weights.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; vLLM itself picks the platform its
            build supports, this only says where the returned states live.
        dtype: ``"auto"`` (bf16 on GPU, fp32 on CPU), ``"float32"``, ``"bfloat16"``,
            ``"float16"``.
        layer: only -1 (the last layer, after the final norm) is available from vLLM.
        forward_path: ``"prompt_once"`` (a group's prompt runs once, through the prefix
            cache) or ``"packed"`` (every sequence whole); ``"auto"`` is ``prompt_once``.
        memory_share: share of GPU memory (of RAM on a CPU) vLLM reserves for weights and
            KV cache; None takes 0.85 on CUDA and 0.15 on a CPU.
        enforce_eager: no ``torch.compile`` or CUDA graphs; None: eager on a CPU (compiling
            there takes minutes), compiled on CUDA.
    """

    kind = "vllm"

    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        layer: int = -1,
        forward_path: str = "auto",
        memory_share: float | None = None,
        enforce_eager: bool | None = None,
    ) -> None:
        if layer != -1:
            raise ValueError(f"the vllm backend serves the last layer only (-1), not {layer}")
        forward_path = check_vllm_forward_path(forward_path)
        # A service must not report usage to a third party unasked.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM
        from vllm.config import PoolerConfig

        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._forward_path = forward_path
        self._lock = threading.Lock()
        location = locate_model(model, backend="vllm")
        if location.kind == "embedded":
            self._directory = cached_embedded_checkpoint()
            name = EMBEDDED_NAME
            version = f"q4_1-{file_digest(location.path)}"
        else:
            self._directory = location.path
            name, version = self._directory.name, directory_stamp(self._directory)
        config = AutoConfig.from_pretrained(self._directory)
        self._describe_model(name, version, AutoTokenizer.from_pretrained(self._directory), config)
        self._shapes = _checkpoint_shapes(self._directory)
        # A trainer's state dict also names a tied output embedding, which checkpoints
        # leave out: accepted (its shape checked), not sent on, as vLLM ties it itself.
        self._tied_shapes = dict(self._shapes)
        if getattr(config, "tie_word_embeddings", False) and _TIED_EMBEDDING in self._shapes:
            self._tied_shapes.setdefault(_TIED_OUTPUT, self._shapes[_TIED_EMBEDDING])
        kind = self._device.type
        log.info("loading %s (%s) in vLLM as %s", name, version, self._dtype)
        self._llm = LLM(
            str(self._directory),
            runner="pooling",
            convert="embed",
            pooler_config=PoolerConfig(task="token_embed", use_activation=False),
            dtype=str(self._dtype).removeprefix("torch."),
            max_model_len=self.max_length,
            enable_prefix_caching=True,
            gpu_memory_utilization=memory_share or _DEFAULT_MEMORY_SHARE.get(kind, 0.85),
            enforce_eager=kind != "cuda" if enforce_eager is None else enforce_eager,
            disable_log_stats=True,
            worker_extension_cls=_WORKER_EXTENSION,
        )
        # The checkpoint directory vLLM read last, and its version: what a failed load of
        # weights sent from memory falls back to.
        self._checkpoint = (self._directory, version)
        self._reused_tokens = 0

    @property
    def forward_path(self) -> str:
        """``prompt_once`` (prefix cache) or ``packed`` (every sequence whole)."""
        return self._forward_path

    @forward_path.setter
    def forward_path(self, path: str) -> None:
        resolved = check_vllm_forward_path(path)
        with self._lock:
            self._forward_path = resolved

    @property
    def reused_prompt_tokens(self) -> int:
        """Positions whose states came from the prefix cache (not recomputed) so far."""
        return self._reused_tokens

    def hidden_states(
        self, sequences: Sequence[np.ndarray], prefix_lengths: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Per-sequence last-layer states (len, hidden) on ``device``, in the model's dtype.

        On the ``prompt_once`` path ``prefix_lengths`` hints which prompts a group shares
        (checked on the ids); the result is the same either way.
        """
        with self._lock:
            if self._forward_path == "packed" or prefix_lengths is None:
                return self._encode(sequences, read_cache=False)
            return self._prompt_once(sequences, prefix_lengths)

    def _prompt_once(
        self, sequences: Sequence[np.ndarray], prefix_lengths: Sequence[int]
    ) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(sequences)
        leader_of: dict[int, int] = {}
        first: list[int] = []
        for group in group_shared_prefixes(sequences, prefix_lengths):
            if group.prefix_length == 0:
                first.extend(group.members)
                continue
            first.append(group.members[0])
            leader_of.update(dict.fromkeys(group.members[1:], group.members[0]))
        for index, states in zip(
            first, self._encode([sequences[i] for i in first], read_cache=False), strict=True
        ):
            out[index] = states
        followers = list(leader_of)
        rerun: list[int] = []
        tails = self._encode([sequences[i] for i in followers], read_cache=True)
        for index, tail in zip(followers, tails, strict=True):
            cached = len(sequences[index]) - len(tail)
            leader = leader_of[index]
            shared = min(len(sequences[leader]), len(sequences[index]))
            same = np.array_equal(sequences[index][:cached], sequences[leader][:cached])
            if cached == 0:
                out[index] = tail
            elif cached <= shared and same:
                out[index] = torch.cat([out[leader][:cached], tail])  # type: ignore[index]
                self._reused_tokens += cached
            else:
                rerun.append(index)
        if rerun:
            rerun_states = self._encode([sequences[i] for i in rerun], read_cache=False)
            for index, states in zip(rerun, rerun_states, strict=True):
                out[index] = states
        return out  # type: ignore[return-value]

    def _encode(self, sequences: Sequence[np.ndarray], *, read_cache: bool) -> list[torch.Tensor]:
        """vLLM's token_embed pooling for whole sequences; with ``read_cache`` the states of
        cached leading blocks are left out of each result."""
        if not sequences:
            return []
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        outputs = self._llm.encode(
            [TokensPrompt(prompt_token_ids=np.asarray(s).tolist()) for s in sequences],
            pooling_task="token_embed",
            pooling_params=PoolingParams(
                use_activation=False, skip_reading_prefix_cache=not read_cache
            ),
            use_tqdm=False,
        )
        return [
            output.outputs.data.to(device=self._device, dtype=self._dtype) for output in outputs
        ]

    def read_checkpoint(self, checkpoint: str) -> LoadedWeights:
        """Check a checkpoint directory against the served model; vLLM reads the files itself.

        Raises:
            CheckpointRefused: no safetensors files, unreadable or corrupt ones, or names
                or shapes that do not fit this model.
        """
        directory = Path(checkpoint)
        shapes = _checkpoint_shapes(directory) if directory.is_dir() else {}
        if not shapes:
            raise CheckpointRefused(f"{checkpoint}: not a directory with .safetensors files")
        try:
            # A checkpoint may hold part of the weights; vLLM keeps the others.
            self._check_fit(shapes, complete=False)
        except ValueError as exc:
            raise CheckpointRefused(f"{checkpoint}: {exc}") from None
        return LoadedWeights(tensors={}, version=directory_stamp(directory), source=directory)

    def weight_dtypes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.dtype]:
        """The model's dtype for each weight the trainer will send from memory, once their
        names and shapes are checked against the served checkpoint.

        Raises:
            ValueError: names or shapes that do not fit this model, or a weight left out
                (vLLM would load the rest of its layer around stale values).
        """
        self._check_fit(shapes, complete=True)
        return dict.fromkeys(shapes, self._dtype)

    def _check_fit(self, shapes: Mapping[str, tuple[int, ...]], *, complete: bool) -> None:
        """Raise ValueError, naming the tensor, unless ``shapes`` are this model's weights
        (every one of them if ``complete``)."""
        unknown = sorted(set(shapes) - set(self._tied_shapes))
        if unknown:
            raise ValueError(f"weights this model does not have: {unknown[:3]}")
        missing = sorted(set(self._shapes) - set(shapes))
        if complete and missing:
            raise ValueError(f"missing weights: {missing[:3]}")
        for name, shape in shapes.items():
            if tuple(shape) != self._tied_shapes[name]:
                raise ValueError(
                    f"{name} has shape {tuple(shape)}, the model {self._tied_shapes[name]}"
                )

    def apply_weights(self, weights: LoadedWeights, version: str | None = None) -> ModelIdentity:
        """Swap in new weights in vLLM's workers, in place, then drop the prefix cache (its
        keys and values belong to the old weights).

        Weights from a checkpoint directory are reloaded from it. Weights sent from memory
        (checked by ``weight_dtypes``) are staged in the workers bucket by bucket and loaded
        only once all have arrived, so a transfer that breaks leaves the old weights.

        Raises:
            WeightLoadFailed: vLLM failed while loading sent weights; the workers reloaded
                the last checkpoint directory, whose identity the backend now reports.
        """
        with self._lock:
            if weights.source is not None:
                self._reload(weights.source)
                self._checkpoint = (weights.source, version or weights.version)
            else:
                self._load_sent(weights.tensors)
            self._llm.reset_prefix_cache()
            return self._next_revision(version or weights.version)

    def _reload(self, directory: Path) -> None:
        self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(directory)})

    def _load_sent(self, tensors: Mapping[str, torch.Tensor]) -> None:
        specs = [
            TensorSpec(name, tuple(tensor.shape), tensor.dtype)
            for name, tensor in tensors.items()
            if name in self._shapes
        ]
        try:
            for bucket in plan_buckets(specs, DEFAULT_BUCKET_BYTES):
                self._stage(bucket, tensors)
        except Exception as exc:
            self._llm.collective_rpc("drop_staged_weights")
            raise WeightLoadFailed(
                f"the weights did not reach vLLM's workers ({exc}); the old weights keep serving"
            ) from exc
        try:
            self._llm.collective_rpc("load_staged_weights")
        except Exception as exc:
            # vLLM's loader may have replaced some layers before it failed.
            directory, version = self._checkpoint
            log.exception("vLLM failed loading sent weights; reloading %s", directory)
            self._reload(directory)
            self._llm.reset_prefix_cache()
            identity = self._next_revision(version)
            raise WeightLoadFailed(
                f"vLLM failed while loading the weights ({exc}); it serves the checkpoint "
                f"{directory} again (version {identity.version}, revision {identity.revision})"
            ) from exc

    def _stage(self, bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> None:
        """One bucket into the workers' staged copy, through a file in shared memory."""
        layout: list[StagedTensor] = []
        with tempfile.NamedTemporaryFile(dir=_STAGING_DIRECTORY, prefix="statevalue-") as file:
            for placed in bucket.tensors:
                tensor = tensors[placed.spec.name]
                flat = tensor.detach().to("cpu").contiguous().view(-1)
                file.write(flat.view(torch.uint8).numpy().data)
                dtype = str(tensor.dtype).removeprefix("torch.")
                layout.append((placed.spec.name, dtype, list(tensor.shape)))
            file.flush()
            self._llm.collective_rpc("stage_sent_weights", args=(file.name, layout))

    def close(self) -> None:
        """Stop vLLM's engine process."""
        with self._lock:
            self._llm.llm_engine.engine_core.shutdown()
