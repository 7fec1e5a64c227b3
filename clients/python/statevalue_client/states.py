"""Hista's representations computed where the hidden states already are: in the trainer.

Hista needs, per rollout, the EMA-smoothed hidden states of its prompt+response kept every
``stride`` positions (docs/design.md, "Hista"). A trainer's own log-probability pass
computes the last-layer hidden states anyway; this module turns them into exactly the
representation the server would compute, optionally projects it to fewer dimensions and
packs it for the request, so the server runs no forward pass (``statevalue serve
--backend none`` runs no model at all).

    capture = FinalNormCapture(model)           # a forward hook on the final norm
    with capture:
        logits = model(input_ids, attention_mask=attention_mask).logits
    states = batch_states(capture.hidden, attention_mask, prompt_lengths, group_sizes, fmt)
    groups = [dataclasses.replace(g, hista_states=s) for g, s in zip(groups, states)]

This module is also the server's representation code (the server imports
:func:`ema_smooth` and :func:`smoothed_representations` from here), so both sides follow
one rule. torch is imported only by the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from statevalue_client.arrays import VECTOR_DTYPES, pack_vectors

if TYPE_CHECKING:
    import torch

# The seeded random projection's name: Gaussian entries of variance 1/dimension, so that
# distances keep their scale in expectation (Johnson–Lindenstrauss).
GAUSSIAN_PROJECTION = "gaussian"
PROJECTIONS = ("", GAUSSIAN_PROJECTION)
# Kernel terms below this relative weight are dropped from the EMA.
_EMA_CUTOFF = 1e-9
# The fields of StatesFormat that must equal the request's Hista settings.
HISTA_FIELDS = ("ema_alpha", "ema_start", "stride", "downsample")


@dataclass(frozen=True)
class StatesFormat:
    """How a request's Hista representations were made and packed (one per request).

    ``ema_alpha``, ``ema_start``, ``stride`` and ``downsample`` are Hista's settings (the
    server refuses a request whose Hista settings differ); ``layer`` is the hidden-state
    layer (-1 = the last, after the final norm), checked against the server's. ``dtype``:
    "float32", "float16" or "bfloat16" on the wire. ``dimension``: the length of each
    vector (the hidden size, or the projection's). ``projection``: "" (none) or
    "gaussian", a random projection fixed by ``projection_seed`` and ``dimension``.
    """

    dimension: int
    ema_alpha: float = 0.7
    ema_start: str = "first"
    stride: int = 5
    downsample: str = "inclusive"
    layer: int = -1
    dtype: str = "float32"
    projection: str = ""
    projection_seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in VECTOR_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(VECTOR_DTYPES)}, not {self.dtype!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be '' or {GAUSSIAN_PROJECTION!r}")
        if self.dimension < 1 or self.stride < 1:
            raise ValueError("dimension and stride must be at least 1")

    def as_dict(self) -> dict[str, Any]:
        """The fields by name, as the wire carries them."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def for_hista(
        cls,
        hidden_size: int,
        hista: dict[str, Any] | None = None,
        *,
        dimension: int | None = None,
        dtype: str = "float32",
        seed: int = 0,
        layer: int = -1,
    ) -> StatesFormat:
        """The format for Hista settings ``hista`` (the request's ``hista`` params, the
        server's defaults where unset), projected to ``dimension`` if it is given and
        smaller than ``hidden_size``."""
        settings = {name: value for name, value in (hista or {}).items() if name in HISTA_FIELDS}
        projected = dimension is not None and dimension < hidden_size
        return cls(
            dimension=dimension if projected and dimension else hidden_size,
            dtype=dtype,
            layer=layer,
            projection=GAUSSIAN_PROJECTION if projected else "",
            projection_seed=seed if projected else 0,
            **settings,
        )


@dataclass
class GroupStates:
    """One group's representations: the vectors kept inside the prompt (the same for every
    rollout, sent once) and, per rollout, the vectors after them. Each is
    ``(count, format.dimension)`` float32 until packed."""

    format: StatesFormat
    prompt: np.ndarray
    rollouts: list[np.ndarray] = field(default_factory=list)


def kept_count(length: int, stride: int, downsample: str) -> int:
    """How many smoothed positions of a ``length``-token sequence the stride keeps.

    ``"inclusive"`` keeps 0, w, 2w, …; ``"causal"`` keeps w − 1, 2w − 1, … (a sequence
    shorter than w is then represented by its last position alone: see
    :func:`representation_counts`).
    """
    offset = 0 if downsample == "inclusive" else stride - 1
    return max((length - offset + stride - 1) // stride, 0)


def representation_counts(
    prompt_length: int, response_length: int, stride: int, downsample: str
) -> tuple[int, int]:
    """Vectors in the prompt part (shared by the group) and in the rollout's own part."""
    shared = kept_count(prompt_length, stride, downsample)
    total = max(kept_count(prompt_length + response_length, stride, downsample), 1)
    return shared, total - shared


def ema_smooth(x: torch.Tensor, alpha: float, start: str = "zero") -> torch.Tensor:
    """Bias-corrected EMA along the sequence axis of (L, H) or (B, L, H), in float32.

    Output at position k (0-based) is e_k / (1 − alpha^(k+1)) with
    e_k = alpha·e_(k−1) + (1 − alpha)·x_k. ``start = "zero"``: e_(−1) = 0, the textbook
    bias-corrected mean. ``start = "first"`` (the reference): e_0 = x_0, which gives x_0 a
    weight alpha^k instead of (1 − alpha)·alpha^k, i.e. adds x_0·alpha^(k+1)/(1 − alpha^(k+1)).
    The exponential kernel is truncated where alpha^n < 1e-9 and applied as two
    block-Toeplitz matrix products (current and previous block): no loop over the sequence.
    """
    import torch
    import torch.nn.functional as F

    batched = x.dim() == 3
    x = (x if batched else x[None]).float()
    length = x.shape[1]
    if length == 0:
        return x if batched else x[0]
    taps = 1 if alpha == 0 else math.ceil(math.log(_EMA_CUTOFF) / math.log(alpha))
    block = max(1, min(taps, length))
    n_blocks = -(-length // block)
    blocks = F.pad(x, (0, 0, 0, n_blocks * block - length)).unflatten(1, (n_blocks, block))
    previous = F.pad(blocks, (0, 0, 0, 0, 1, 0))[:, :-1]
    lag = torch.arange(block, device=x.device)
    lag = (lag[:, None] - lag[None, :]).double()
    decay = torch.tensor(alpha, dtype=torch.float64, device=x.device)
    # Lag 0 .. block-1 inside the block; block .. 2·block-1 from the previous block.
    within = torch.where(lag >= 0, (1 - alpha) * decay.pow(lag.clamp_min(0)), 0.0).float()
    across = ((1 - alpha) * decay.pow(lag + block)).float()
    smoothed = (within @ blocks + across @ previous).flatten(1, 2)[:, :length]
    steps = torch.arange(1, length + 1, dtype=torch.float64, device=x.device)
    remaining = decay.pow(steps)  # alpha^(k+1)
    smoothed = smoothed / (1 - remaining).float()[:, None]
    if start == "first":
        smoothed = smoothed + (remaining / (1 - remaining)).float()[:, None] * x[:, :1]
    elif start != "zero":
        raise ValueError(f"unknown EMA start {start!r}")
    return smoothed if batched else smoothed[0]


def smoothed_representations(
    hidden: Sequence[torch.Tensor], alpha: float, start: str, stride: int, downsample: str
) -> tuple[torch.Tensor, np.ndarray]:
    """Smoothed, downsampled states of every sequence, zero-padded to (G, M, H), and each m_i.

    ``downsample = "inclusive"`` keeps positions 0, w, 2w, …; ``"causal"`` keeps w − 1,
    2w − 1, … (a sequence shorter than w keeps its last position).
    """
    from torch.nn.utils.rnn import pad_sequence

    seq_lengths = np.array([len(h) for h in hidden])
    padded = pad_sequence([h.float() for h in hidden], batch_first=True)
    smoothed = ema_smooth(padded, alpha, start)
    offset = 0 if downsample == "inclusive" else stride - 1
    counts = np.array([kept_count(n, stride, downsample) for n in seq_lengths], dtype=np.int64)
    longest = int(counts.max())
    reps = smoothed.new_zeros(len(hidden), max(1, longest), smoothed.shape[2])
    reps[:, :longest] = smoothed[:, offset : offset + longest * stride : stride]
    short = np.flatnonzero(counts == 0)
    if short.size:
        import torch

        rows = torch.from_numpy(short).to(smoothed.device)
        ends = torch.from_numpy(seq_lengths[short] - 1).to(smoothed.device)
        reps[rows, 0] = smoothed[rows, ends]
        counts[short] = 1
    return reps, counts


@lru_cache(maxsize=8)
def projection_matrix(seed: int, source_dimension: int, dimension: int) -> np.ndarray:
    """The seeded Gaussian projection (source_dimension, dimension), entries N(0, 1/dimension).

    numpy's PCG64 stream, so the same seed gives the same matrix on every machine.
    """
    generator = np.random.Generator(np.random.PCG64(seed))
    matrix = generator.standard_normal((source_dimension, dimension), dtype=np.float64)
    return (matrix / math.sqrt(dimension)).astype(np.float32)


def project(vectors: torch.Tensor, format: StatesFormat) -> torch.Tensor:
    """``vectors`` (…, H) in float32, projected as ``format`` says (unchanged without one)."""
    import torch

    vectors = vectors.float()
    if not format.projection:
        if vectors.shape[-1] != format.dimension:
            raise ValueError(
                f"vectors have {vectors.shape[-1]} dimensions, the format says {format.dimension}"
            )
        return vectors
    matrix = projection_matrix(format.projection_seed, vectors.shape[-1], format.dimension)
    return vectors @ torch.from_numpy(matrix).to(vectors.device)


def rollout_representations(
    hidden: Sequence[torch.Tensor], format: StatesFormat
) -> list[np.ndarray]:
    """Each sequence's whole representation (m_i, format.dimension) as float32, projected.

    ``hidden[i]`` is one prompt+response's (length, H) hidden states of ``format.layer``
    (any dtype; the smoothing is float32, as on the server).
    """
    reps, counts = smoothed_representations(
        hidden, format.ema_alpha, format.ema_start, format.stride, format.downsample
    )
    projected = project(reps, format).cpu().numpy()
    return [projected[i, :count] for i, count in enumerate(counts)]


def split_group(
    representations: Sequence[np.ndarray], prompt_length: int, format: StatesFormat
) -> GroupStates:
    """A group's states from its rollouts' whole representations: the prompt part once
    (the same in every rollout: the EMA is causal) and each rollout's rest."""
    shared = kept_count(prompt_length, format.stride, format.downsample)
    return GroupStates(
        format=format,
        prompt=representations[0][:shared],
        rollouts=[r[shared:] for r in representations],
    )


def group_states(
    hidden: Sequence[torch.Tensor], prompt_length: int, format: StatesFormat
) -> GroupStates:
    """One group's representations from its rollouts' hidden states: ``hidden[i]`` is
    rollout i's (prompt_length + response_length_i, H) states of ``format.layer``."""
    return split_group(rollout_representations(hidden, format), prompt_length, format)


def batch_states(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: Sequence[int],
    group_sizes: Sequence[int],
    format: StatesFormat,
) -> list[GroupStates]:
    """Every group's representations from a padded batch's hidden states.

    ``hidden`` (B, L, H) and ``attention_mask`` (B, L) as the trainer ran them (left- or
    right-padded: each row's real tokens are those under the mask, in order); rows are the
    groups' rollouts one group after another (``group_sizes``), each row's prompt
    ``prompt_lengths[g]`` tokens long.
    """
    if sum(group_sizes) != hidden.shape[0] or len(prompt_lengths) != len(group_sizes):
        raise ValueError("group_sizes must sum to the batch size, one prompt length per group")
    mask = attention_mask.bool()
    out, row = [], 0
    for size, prompt_length in zip(group_sizes, prompt_lengths, strict=True):
        rows = [hidden[r][mask[r]] for r in range(row, row + size)]
        out.append(group_states(rows, int(prompt_length), format))
        row += size
    return out


class FinalNormCapture:
    """A forward hook on a Hugging Face causal LM's final norm: the last-layer hidden states
    of the forward pass run inside ``with capture:`` (the server's layer -1), in ``hidden``.

    The hook keeps a reference only: the trainer's pass costs no extra compute or memory
    beyond holding the tensor until the states are computed.
    """

    def __init__(self, model: Any) -> None:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        norm = getattr(decoder, "norm", None)
        if norm is None:
            raise ValueError("the model's decoder has no final 'norm' module to hook")
        self._norm = norm
        self._handle: Any = None
        self.hidden: torch.Tensor | None = None

    def _keep(self, module: Any, inputs: Any, output: torch.Tensor) -> None:
        self.hidden = output.detach()

    def __enter__(self) -> FinalNormCapture:
        self.hidden = None
        self._handle = self._norm.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self._handle = None


def encode_states(states: GroupStates) -> tuple[bytes, list[bytes]]:
    """The packed prompt part and rollout parts, little-endian in ``states.format.dtype``."""
    dtype = states.format.dtype
    return pack_vectors(states.prompt, dtype), [pack_vectors(r, dtype) for r in states.rollouts]


def add_states_to_request(request: Any, groups: Sequence[Any]) -> None:
    """Put the groups' Hista representations into the protobuf request ``build_request``
    made of them (groups without ``hista_states`` add nothing).

    Raises:
        ValueError: only some groups carry states, or two groups use different formats
            (one format per request).
    """
    carried = [getattr(g, "hista_states", None) for g in groups]
    sent = [s for s in carried if s is not None]
    if not sent:
        return
    if len(sent) != len(carried):
        raise ValueError("every group of a request carries hista_states, or none does")
    format = sent[0].format
    if any(s.format != format for s in sent):
        raise ValueError("every group of a request must use the same StatesFormat")
    request.hista_states.CopyFrom(type(request.hista_states)(**format.as_dict()))
    for message, states in zip(request.groups, sent, strict=True):
        if len(states.rollouts) != len(message.rollouts):
            raise ValueError(
                f"group {message.group_id or '?'}: {len(states.rollouts)} rollout states for "
                f"{len(message.rollouts)} rollouts"
            )
        prompt, rollouts = encode_states(states)
        message.prompt_hista_states = prompt
        message.prompt_num_hista_states = len(states.prompt)
        for item, data, vectors in zip(message.rollouts, rollouts, states.rollouts, strict=True):
            item.hista_states = data
            item.num_hista_states = len(vectors)
