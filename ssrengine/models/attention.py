"""Attention implementations of the models: which one a run uses, and ``sdpa_varlen``.

`pick_attn_implementation` resolves ``model.attn_implementation = "auto"``:
FlashAttention-2 (varlen for packed batches) needs a CUDA device, the flash-attn package and
16-bit compute — 16-bit weights, or fp32 weights under bf16/fp16 autocast, where transformers
casts q/k/v to the autocast dtype (integrations/flash_attention.py, get_target_dtype); flash-attn
itself rejects fp32 ("FlashAttention only support fp16 and bf16 data type"). Everything else
gets ``sdpa_varlen``: packed rows as one SDPA call per example (no T×T mask), padded batches
and generation as transformers' plain sdpa.

`compute_dtype` resolves ``train.dtype = "auto"``: bf16 autocast over fp32 master weights on
CUDA, fp32 on the CPU (bf16 matmuls are slow on CPUs without AMX).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ssrengine.core.errors import InputError

FLASH = "flash_attention_2"
SDPA_VARLEN = "sdpa_varlen"
# Forward kwarg with a packed row's example boundaries as host ints (packing.model_inputs).
HOST_BOUNDS = "cu_seq_lens_host"
# The boundaries as device tensors and max lengths (flash-attn's varlen kwargs, in
# transformers' names): sdpa_varlen under `packed_bounds` needs none of them.
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# An attention name with no mask function: see `no_mask_building`.
_NO_MASK = "ssrengine_packed_no_mask"
SIXTEEN_BIT = ("bfloat16", "float16")
# The packed row being run: its example boundaries, host ints (see `packed_bounds`).
_ROW_BOUNDS: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "ssrengine_row_bounds", default=None
)


def compute_dtype(train_dtype: str, device: torch.device) -> str:
    """``train.dtype`` for `device`: "bfloat16" (autocast) or "float32"."""
    if train_dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return train_dtype


def _flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def pick_attn_implementation(
    requested: str,
    device: torch.device,
    *,
    weights: str = "float32",
    autocast: str = "float32",
) -> str:
    """The attention implementation for a model with `weights` dtype on `device`, run under
    `autocast` ("bfloat16"/"float16", or "float32" for none). ``auto``: FlashAttention-2 where
    it can run (see the module doc), else ``sdpa_varlen``. An explicit ``flash_attention_2``
    with fp32 compute is refused here rather than failing inside flash-attn."""
    sixteen = weights in SIXTEEN_BIT or autocast in SIXTEEN_BIT
    if requested == SDPA_VARLEN:
        return register_sdpa_varlen()
    if requested == FLASH and not sixteen:
        raise InputError(
            "flash_attention_2 runs in bf16/fp16 only, and this model computes in float32 here "
            "(float32 weights without autocast, as in generation and evaluation): use 'auto' "
            "(FlashAttention-2 where it can run, sdpa_varlen elsewhere) or model.dtype = "
            "'bfloat16'",
            field="model.attn_implementation",
        )
    if requested != "auto":
        return requested
    if device.type == "cuda" and sixteen and _flash_attn_installed():
        return FLASH
    return register_sdpa_varlen()


def _restarts(position_ids: torch.Tensor) -> list[int]:
    """Example boundaries of one packed row from its position_ids, as transformers detects
    them (a new example wherever the position does not grow by 1): [0, ..., T]."""
    pos = position_ids.reshape(-1)
    inner = (torch.nonzero(torch.diff(pos) != 1).flatten() + 1).tolist()
    return [0, *inner, pos.numel()]


def sdpa_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_host: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: varlen causal attention through SDPA.

    query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, T, Hq, D). Each example attends only
    within its own (L, L) causal block, one SDPA call per example: the attention work is
    sum(L^2) instead of the T^2 of a masked SDPA over the whole packed row, and no (T, T) mask
    is built (on CUDA, flash-attn varlen does the same in one kernel). Boundaries come from
    ``cu_seq_lens_host`` (host ints, what packed micro-batches pass: no device sync) or the
    enclosing `packed_bounds`, else
    ``cu_seq_lens_q`` or, like transformers' flash path, restarts in ``position_ids`` (each a
    device sync per layer on CUDA).
    Anything else (padded batches, a KV cache) is transformers' sdpa, mask included.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = None
    host = cu_seq_lens_host if cu_seq_lens_host is not None else _ROW_BOUNDS.get()
    if host is not None and query.shape[2] == host[-1]:
        bounds = host  # host ints from the packing plan: no device sync
    elif cu_seq_lens_q is not None:
        bounds = cu_seq_lens_q.tolist()  # a device sync in every layer: callers should not
    elif (
        attention_mask is None  # see _sdpa_varlen_mask: one full, unpadded row
        and position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
    ):
        bounds = _restarts(position_ids)
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed rows have batch size 1, got {query.shape[0]}")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError("sdpa_varlen supports neither sliding windows nor softcap")
    if kwargs.get("is_causal") is False:
        raise NotImplementedError("sdpa_varlen is causal attention only")
    gqa = query.shape[1] != key.shape[1]
    # split, not a slice per example: each slice's backward zero-fills a full-size gradient
    # and adds it up (n examples x 3 tensors per layer); split's backward is one cat. Same
    # gradients bit for bit; SmolLM2 fp32, 9 examples of 180 tokens: 34 vs 51 ms per layer.
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    parts = zip(*(t.split(sizes, dim=2) for t in (query, key, value)), strict=True)
    out = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for q, k, v in parts
    ]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def _sdpa_varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask function of sdpa_varlen: none for one full unpadded row (packed or not; the
    attention function finds its boundaries), transformers' sdpa mask for everything else."""
    full_row = batch_size == 1 and q_length == kv_length and not q_offset and not kv_offset
    if attention_mask is None and full_row:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


@functools.cache
def register_sdpa_varlen() -> str:
    """Register ``sdpa_varlen`` with transformers' AttentionInterface and AttentionMaskInterface
    (their documented extension points) and return the name, for
    ``from_pretrained(..., attn_implementation=...)`` or ``model.set_attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # An eager island in a compiled decoder layer (train.compile): its per-example split would
    # be guarded on the boundaries, one recompile per packing.
    AttentionInterface.register(SDPA_VARLEN, torch.compiler.disable(sdpa_varlen_attention))
    AttentionMaskInterface.register(SDPA_VARLEN, _sdpa_varlen_mask)
    return SDPA_VARLEN


def _never_called(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(f"{_NO_MASK} names no attention: it is only set while masks are built")


@functools.cache
def _register_no_mask() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_NO_MASK, _never_called)


def skips_mask_building(attn_impl: str | None, kwargs: dict[str, Any]) -> bool:
    """True for a packed row (host boundaries, no padding mask) under a varlen attention
    (sdpa_varlen, flash-attn): its attention takes the boundaries and needs no mask at all."""
    if attn_impl is None or kwargs.get("attention_mask") is not None:
        return False
    varlen = attn_impl == SDPA_VARLEN or "flash" in attn_impl
    return varlen and kwargs.get(HOST_BOUNDS) is not None


@contextlib.contextmanager
def packed_bounds(bounds: tuple[int, ...]) -> Iterator[None]:
    """While active, ``sdpa_varlen`` takes the packed row's example boundaries from here when
    the forward kwargs do not carry them (`HOST_BOUNDS`). `models.hidden_and_head` moves them
    here: a compiled decoder layer (train.compile) would guard on host ints in its kwargs and
    recompile for every packing."""
    token = _ROW_BOUNDS.set(tuple(bounds))
    try:
        yield
    finally:
        _ROW_BOUNDS.reset(token)


def recompute_with_packed_bounds() -> tuple[Any, Any]:
    """``context_fn`` for non-reentrant `torch.utils.checkpoint` (train.gradient_checkpointing):
    called in the forward, it returns (forward context, recompute context); the recompute, run
    in the backward outside the forward's `packed_bounds`, re-enters them."""
    bounds = _ROW_BOUNDS.get()
    again = packed_bounds(bounds) if bounds is not None else contextlib.nullcontext()
    return contextlib.nullcontext(), again


@contextlib.contextmanager
def no_mask_building(model: Any, first_layer: torch.nn.Module) -> Iterator[None]:
    """Within the block, one forward of ``model`` builds no attention mask (call it only when
    `skips_mask_building` says so).

    transformers' ``create_causal_mask`` looks for packed sequences in ``position_ids``
    whenever no padding mask is given (masking_utils.find_packed_sequence_indices), and that
    check reads a device tensor back to the host: a sync per forward on a GPU. It skips mask
    building altogether for an attention without a registered mask function
    (masking_utils._preprocess_mask_arguments: ``config._attn_implementation not in
    ALL_MASK_ATTENTION_FUNCTIONS``). So the config names `_NO_MASK` (registered as an
    attention only) while the mask is built, and the real implementation again from the first
    decoder layer's forward pre-hook on (``first_layer``): the layers run the real attention, which gets the
    packed boundaries as kwargs. The result equals the built mask's (None for a full packed
    row under sdpa_varlen and flash-attn), without the sync."""
    config = model.config
    real = config._attn_implementation
    _register_no_mask()

    def restore(*_: Any) -> None:
        config._attn_implementation = real

    hook = first_layer.register_forward_pre_hook(restore)
    config._attn_implementation = _NO_MASK
    try:
        yield
    finally:
        hook.remove()
        restore()
