"""Padding-free sequence packing: best-fit-decreasing bins and varlen attention inputs.

    sequences ── pack() ──▶ [PackedBatch] ── model_inputs(batch, attn_impl) ──▶ hidden_and_head

A PackedBatch holds whole examples back to back in one row of T <= max_tokens tokens, with no
padding. Attention must not cross example boundaries; `model_inputs` makes sure of that for
each attention implementation:

- ``flash_attention_*`` (CUDA + flash-attn): the precomputed ``cu_seqlens`` go straight to
  flash-attn's varlen kernel (transformers' ``cu_seq_lens_q/k`` + ``max_length_q/k``).
- ``sdpa_varlen`` (`ssrengine.models.attention`): the same boundaries as host ints (``bounds``, built
  on the CPU with the batch, so no layer reads them back from the device), one SDPA call per
  example on its own causal block, so no (T, T) mask is built or computed.
- ``sdpa`` / ``eager``: ``position_ids`` restarting at 0 per example, and no attention mask;
  transformers then derives a block-diagonal causal mask from the restarts. It does so only
  when there is no KV cache: `ssrengine.models.loading.hidden_and_head` passes ``use_cache=False``
  (with a cache, tokens silently attend across examples). With
  ``block_mask=True`` an explicit block-diagonal mask is passed instead.

Label convention: ``PackedBatch.labels[t]`` is the target of position t, i.e. labels are already
shifted *within* each example (the last token of every example has IGNORE_INDEX), so the loss
is ``cross_entropy(logits[t], labels[t])`` with no further shift and no label ever predicts
across a boundary. This is what `ssrengine.kernels.fused_linear_cross_entropy` expects.

Loss normalization: sum the token losses of every micro-batch of an optimizer step and divide
by `step_targets(micro_batches)`, the supervised-token count of the whole step; then any packing
of the same examples gives the same gradient.

The planner exists twice with identical output: a C++ one (kernels/csrc, optional extension
``ssrengine.kernels._packer``) and the pure-Python fallback below.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ssrengine.data.records import IGNORE_INDEX
from ssrengine.models.attention import HOST_BOUNDS, SDPA_VARLEN

log = logging.getLogger(__name__)

OVERLONG = ("error", "skip")


# ---------------------------------------------------------------------------------------------
# Planner: which examples go into which bin


@functools.cache
def _load_native() -> ModuleType | None:
    """The C++ planner, or None when the extension was not built (no compiler at install)."""
    try:
        return importlib.import_module("ssrengine.kernels._packer")
    except ImportError as e:
        log.info("native packer unavailable (%s); using the Python planner", e)
        return None


def native_available() -> bool:
    return _load_native() is not None


def plan_bins(
    lengths: Sequence[int] | np.ndarray, max_tokens: int, *, impl: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic best-fit-decreasing packing of ``lengths`` into bins of ``max_tokens``.

    Returns ``(order, offsets)``, int64 arrays in CSR form: bin b holds the items
    ``order[offsets[b]:offsets[b + 1]]`` (indices into ``lengths``) in placement order; bins come
    in opening order. Every length must lie in [1, max_tokens].

    Rule (kernels/csrc/packer.hpp has the same text): visit items by decreasing length, equal
    lengths by increasing index; put each into the open bin with the least remaining space that
    still fits it, the most recent such bin on ties; open a new bin when none fits.
    ``impl``: ``auto`` (native when built), ``native`` or ``python`` — identical bins.
    """
    if impl not in ("auto", "native", "python"):
        raise ValueError(f"impl must be auto, native or python, got {impl!r}")
    native = _load_native() if impl != "python" else None
    if impl == "native" and native is None:
        raise RuntimeError("the native packer (ssrengine.kernels._packer) is not built")
    if native is not None:
        return native.plan_bins(np.asarray(lengths, dtype=np.int64), int(max_tokens))
    return _plan_bins_python(lengths, int(max_tokens))


def _plan_bins_python(
    lengths: Sequence[int] | np.ndarray, max_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pure-Python planner: the fallback, and the oracle of the C++ one.

    Bins with equal remaining space r share a LIFO stack ``stacks[r]``; bit r of the integer
    ``open_mask`` says that stack is non-empty, so the best fit for length L is the lowest set
    bit of ``open_mask >> L`` (capacities are bounded integers: no sorted container needed).
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.ndim != 1:
        raise ValueError("lengths must be one-dimensional")
    bad = np.flatnonzero((lens < 1) | (lens > max_tokens))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"item {i} has length {int(lens[i])}, outside [1, {max_tokens}]")
    visit = np.argsort(-lens, kind="stable").tolist()
    lens_list = lens.tolist()
    stacks: list[list[int]] = [[] for _ in range(max_tokens + 1)]
    open_mask = 0
    bins: list[list[int]] = []
    for i in visit:
        length = lens_list[i]
        fits = open_mask >> length
        if fits:
            r = length + (fits & -fits).bit_length() - 1  # least remaining space >= length
            stack = stacks[r]
            b = stack.pop()
            if not stack:
                open_mask ^= 1 << r
        else:
            b, r = len(bins), max_tokens
            bins.append([])
        bins[b].append(i)
        r -= length
        if r:
            if not stacks[r]:
                open_mask |= 1 << r
            stacks[r].append(b)
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in bins], out=offsets[1:])
    order = np.fromiter(itertools.chain.from_iterable(bins), dtype=np.int64, count=len(visit))
    return order, offsets


# ---------------------------------------------------------------------------------------------
# The packed representation


def cu_seqlens(lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Cumulative example boundaries of a packed row — the only place they are built.

    ::

        lengths           3       2        4
        input_ids     [ a a a | b b | c c c c ]      T = 9, no padding
        position_ids    0 1 2   0 1   0 1 2 3
        cu_seqlens    [ 0,      3,    5,        9 ]  (n + 1,) int32
        attention       a sees a, b sees b, c sees c (causal within each example)

    Example k occupies tokens ``cu_seqlens[k]:cu_seqlens[k + 1]``; int32 because that is what
    flash-attn's varlen kernels take.
    """
    lens = torch.as_tensor(lengths, dtype=torch.int32)
    out = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    torch.cumsum(lens, 0, out=out[1:])
    return out


@dataclass(frozen=True)
class PackedBatch:
    """Whole examples back to back in one row; see the module docstring for the conventions."""

    input_ids: torch.Tensor  # (T,) int64
    labels: torch.Tensor  # (T,) int64, labels[t] = target of position t; IGNORE_INDEX at ends
    position_ids: torch.Tensor  # (T,) int64, restarting at 0 per example
    cu_seqlens: torch.Tensor  # (n + 1,) int32, from cu_seqlens()
    max_seqlen: int  # longest example, a host int (no device sync in the attention call)
    ids: list[str]  # example ids, in packed order
    num_targets: int = 0  # supervised tokens (labels != IGNORE_INDEX), counted on the host
    bounds: tuple[int, ...] = ()  # cu_seqlens as host ints: sdpa_varlen reads them, no sync

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        move = functools.partial(torch.Tensor.to, device=device, non_blocking=non_blocking)
        return PackedBatch(
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            ids=self.ids,
            num_targets=self.num_targets,
            bounds=self.bounds,
        )


def _flat(parts: Any) -> list[int]:
    """Concatenate lists, tuples, 1-D tensors or arrays of ints into one list."""
    return list(
        itertools.chain.from_iterable(p.tolist() if hasattr(p, "tolist") else p for p in parts)
    )


def shift_labels(labels: Sequence[int]) -> list[int]:
    """The one label shift: position t predicts token t+1 of the same example; the last
    position predicts nothing (never the next example's first token)."""
    return [*labels[1:], IGNORE_INDEX]


def pack_one(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], ids: Sequence[str]
) -> PackedBatch:
    """Concatenate (input_ids, labels) pairs, labels unshifted as `ssrengine.data.records.encode` returns
    them (labels[t] = token t or IGNORE_INDEX), into one PackedBatch with shifted labels."""
    lengths = [len(x) for x, _ in sequences]
    for (x, y), i in zip(sequences, ids):
        if len(x) != len(y) or not len(x):
            raise ValueError(
                f"example {i!r}: input_ids ({len(x)}) and labels ({len(y)}) must have the same, non-zero length"
            )
    cu = cu_seqlens(lengths)
    starts = cu[:-1].long()
    input_ids = torch.tensor(_flat(x for x, _ in sequences), dtype=torch.long)
    labels = torch.tensor(_flat(shift_labels(_flat([y])) for _, y in sequences), dtype=torch.long)
    lens = torch.tensor(lengths)
    position_ids = torch.arange(len(input_ids)) - torch.repeat_interleave(starts, lens)
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        ids=[str(i) for i in ids],
        num_targets=int((labels != IGNORE_INDEX).sum()),
        bounds=tuple(itertools.accumulate(lengths, initial=0)),
    )


def pack(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_tokens: int,
    *,
    ids: Sequence[str] | None = None,
    on_overlong: str = "error",
    dropped: list[str] | None = None,
    impl: str = "auto",
) -> list[PackedBatch]:
    """Pack (input_ids, labels) pairs into PackedBatches of at most ``max_tokens`` tokens.

    ``labels`` are unshifted, as `ssrengine.data.records.encode` returns them; the batches carry them
    shifted within each example. ``ids`` name the sequences (default: their index). A sequence
    longer than ``max_tokens`` raises (``on_overlong="error"``) or is skipped, counted in a
    warning and its id appended to ``dropped`` (``"skip"``); it is never cut. Trimming documents
    to make an example fit happens before this, in the data layer (``data.on_overlong``).
    Deterministic: the same inputs give the same bins, with the native or the Python planner.
    """
    if on_overlong not in OVERLONG:
        raise ValueError(f"on_overlong must be one of {OVERLONG}, got {on_overlong!r}")
    names = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(sequences))]
    if len(names) != len(sequences):
        raise ValueError(f"{len(names)} ids for {len(sequences)} sequences")
    lengths = np.fromiter((len(x) for x, _ in sequences), dtype=np.int64, count=len(sequences))
    if (lengths == 0).any():
        raise ValueError(f"empty sequence {names[int(np.flatnonzero(lengths == 0)[0])]!r}")
    keep = np.flatnonzero(lengths <= max_tokens)
    if keep.size < len(sequences):
        over = np.flatnonzero(lengths > max_tokens)
        first = int(over[0])
        if on_overlong == "error":
            raise ValueError(
                f"example {names[first]!r} has {int(lengths[first])} tokens > max_tokens={max_tokens} "
                f"({over.size} such example(s)); raise train.max_tokens, trim documents in the data "
                "layer, or skip them (on_overlong='skip')"
            )
        skipped = [names[i] for i in over.tolist()]
        log.warning(
            "skipped %d example(s) longer than max_tokens=%d: %s%s",
            len(skipped),
            max_tokens,
            ", ".join(skipped[:5]),
            " ..." if len(skipped) > 5 else "",
        )
        if dropped is not None:
            dropped.extend(skipped)
    order, offsets = plan_bins(lengths[keep], max_tokens, impl=impl)
    members = keep[order].tolist()
    bounds = offsets.tolist()
    return [
        pack_one([sequences[i] for i in idx], [names[i] for i in idx])
        for idx in (members[a:b] for a, b in itertools.pairwise(bounds))
    ]


def step_targets(batches: Sequence[PackedBatch]) -> int:
    """Supervised tokens of an optimizer step (all its micro-batches): the loss divisor."""
    return sum(b.num_targets for b in batches)


# ---------------------------------------------------------------------------------------------
# Attention inputs of a packed batch


def block_causal_mask(batch: PackedBatch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Explicit (1, 1, T, T) additive mask: 0 where query t may see key s (same example, s <= t),
    the dtype's minimum elsewhere. Works for sdpa and eager alike; O(T^2) memory."""
    cu = batch.cu_seqlens.to(batch.input_ids.device)
    segment = torch.repeat_interleave(
        torch.arange(cu.numel() - 1, device=cu.device), (cu[1:] - cu[:-1]).long()
    )
    t = torch.arange(segment.numel(), device=cu.device)
    allowed = (segment[:, None] == segment[None, :]) & (t[None, :] <= t[:, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=cu.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def model_inputs(
    batch: PackedBatch,
    attn_impl: str | None,
    *,
    block_mask: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Forward kwargs for a packed batch under ``attn_impl`` (the model's
    ``config._attn_implementation``), for ``hidden_and_head(model, **model_inputs(...))``.

    Every implementation gets ``position_ids`` (RoPE restarts per example). flash-attn variants
    and ``sdpa_varlen`` also get the precomputed varlen boundaries; sdpa/eager rely on transformers deriving the
    block-diagonal mask from the position restarts, which requires ``use_cache=False`` (as
    `hidden_and_head` passes), or get an explicit mask in ``dtype`` with ``block_mask=True``.
    ``attn_impl=None`` (not known yet, e.g. when micro-batches are built before the model):
    position_ids and the varlen boundaries, right for every implementation, since sdpa and
    eager take the boundary kwargs and ignore them (tested). Tensors stay on the batch's
    device: move the batch first with ``batch.to(device)``.
    """
    kwargs: dict[str, Any] = {
        "input_ids": batch.input_ids[None],  # (1, T)
        "position_ids": batch.position_ids[None],  # (1, T)
    }
    varlen = attn_impl is None or attn_impl == SDPA_VARLEN or "flash" in attn_impl
    if block_mask:
        if varlen:
            raise ValueError("block_mask needs a non-flash attn_impl (sdpa or eager)")
        kwargs["attention_mask"] = block_causal_mask(batch, dtype)
    if varlen:
        cu = batch.cu_seqlens  # (n + 1,) int32 already
        kwargs.update(
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
        )
        if batch.bounds:
            # The same boundaries as host ints, for sdpa_varlen (flash-attn takes the device
            # tensor; transformers hands unknown kwargs to every attention function unchanged).
            kwargs[HOST_BOUNDS] = batch.bounds
    return kwargs
