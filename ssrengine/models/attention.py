"""Attention implementations of the models: which one a run uses, and ``sdpa_varlen``.

`pick_attn_implementation` resolves ``model.attn_implementation = "auto"``:
FlashAttention-2 (varlen for packed batches) needs a CUDA device, the flash-attn package and
16-bit compute — 16-bit weights, or fp32 weights under bf16/fp16 autocast, where transformers
casts q/k/v to the autocast dtype (integrations/flash_attention.py, get_target_dtype); flash-attn
itself rejects fp32 ("FlashAttention only support fp16 and bf16 data type"). Everything else
gets ``sdpa_varlen``: packed rows as one SDPA call per example (no T×T mask), padded batches
and generation as transformers' plain sdpa. Both apply a layer's sliding window (Gemma-3,
Mistral): sdpa_varlen as a per-example causal band, FlashAttention-2 through transformers'
``window_size``. `auto` reads the model's config so that it never picks a path that cannot run
the model: attention logit softcapping (Gemma-2) runs in FlashAttention-2 where the installed
flash-attn takes ``softcap``, else in ``eager`` (SDPA has no softcap); a model class without
SDPA support gets ``eager`` too.

`compute_dtype` resolves ``train.dtype = "auto"``: bf16 autocast over fp32 master weights on
CUDA GPUs with bf16 (Ampere and newer), fp32 on older GPUs and the CPU (bf16 matmuls are slow
on CPUs without AMX); generation and scoring use the same (`ssrengine.models.precision`).
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
from ssrengine.models import precision

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


def compute_dtype(train_dtype: str, device: torch.device, cap: Any = "device") -> str:
    """``train.dtype`` for `device`: "auto" is "bfloat16" (autocast) on a CUDA GPU with bf16
    (compute capability ``cap``, read from the device by default), else "float32"."""
    if train_dtype != "auto":
        return train_dtype
    if device.type != "cuda":
        return "float32"
    cap = precision.capability(device) if cap == "device" else cap
    return "bfloat16" if precision.has_bf16(cap) else "float32"


def _flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_varlen_params() -> frozenset[str]:
    """The keyword arguments of the installed ``flash_attn.flash_attn_varlen_func``: transformers
    passes ``window_size`` and ``softcap`` only where they are in it and silently drops the
    window otherwise (modeling_flash_attention_utils._lazy_define_process_function and
    _process_flash_attention_kwargs), so a model that needs them must not get FA2 without."""
    import inspect

    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(flash_attn_varlen_func).parameters)


def attention_softcap(config: Any) -> float | None:
    """The model's attention logit softcapping (Gemma-2: 50.0), or None."""
    cap = getattr(config, "attn_logit_softcapping", None)
    return float(cap) if cap else None


def sliding_window(config: Any) -> int | None:
    """The sliding window of the model's local-attention layers, or None when no layer has one
    (``layer_types`` without "sliding_attention", Qwen2's ``use_sliding_window = False``)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def _model_class(config: Any) -> Any:
    """The transformers class AutoModelForCausalLM builds for ``config`` (None for remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def _flash_cannot_run(config: Any) -> str | None:
    """Why FlashAttention-2 cannot run this model (None: it can, as far as the config tells)."""
    if config is None:
        return None
    cls = _model_class(config)
    if cls is not None and not getattr(cls, "_supports_flash_attn", False):
        return f"{cls.__name__} has no FlashAttention-2 path in transformers"
    heads = getattr(config, "num_attention_heads", 0) or 1
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    # flash-attn 2 (csrc/flash_attn/flash_api.cpp): "FlashAttention forward only supports head
    # dimension at most 256"
    if head_dim > 256:
        return f"head_dim {head_dim} > 256, FlashAttention-2's largest"
    needs = {"window_size": sliding_window(config), "softcap": attention_softcap(config)}
    missing = [k for k, v in needs.items() if v is not None and k not in _flash_varlen_params()]
    if missing:
        return f"the installed flash-attn takes no {' or '.join(missing)}, which this model needs"
    return None


def pick_attn_implementation(
    requested: str,
    device: torch.device,
    *,
    weights: str = "float32",
    autocast: str = "float32",
    config: Any = None,
) -> str:
    """The attention implementation for a model with `weights` dtype on `device`, run under
    `autocast` ("bfloat16"/"float16", or "float32" for none); ``config`` (the model's
    transformers config) tells what the model needs. ``auto``: FlashAttention-2 where it can
    run (see the module doc), else ``sdpa_varlen``, or ``eager`` for attention softcapping and
    models without SDPA. An explicit choice that cannot run the model is refused in one line
    rather than failing inside transformers or flash-attn."""
    sixteen = weights in SIXTEEN_BIT or autocast in SIXTEEN_BIT
    softcap = attention_softcap(config)
    if requested in (SDPA_VARLEN, "sdpa") and softcap is not None:
        raise InputError(
            f"{requested} cannot run this model: it caps its attention logits "
            f"(attn_logit_softcapping = {softcap:g}) and SDPA has no softcap; use 'auto' "
            "(FlashAttention-2 where flash-attn takes softcap, else eager) or 'eager'",
            field="model.attn_implementation",
        )
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
    if requested == FLASH and (why := _flash_cannot_run(config)) is not None:
        raise InputError(
            f"flash_attention_2 cannot run this model: {why}; use 'auto'",
            field="model.attn_implementation",
        )
    if requested != "auto":
        return requested
    flash_ok = device.type == "cuda" and sixteen and _flash_attn_installed()
    if flash_ok and _flash_cannot_run(config) is None:
        return FLASH
    cls = _model_class(config) if config is not None else None
    if softcap is not None or (cls is not None and not getattr(cls, "_supports_sdpa", True)):
        return "eager"
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
    device sync per layer on CUDA). A layer's ``sliding_window`` (transformers passes it per
    layer: None on full-attention layers) restricts each example to a causal band
    (`causal_band`) wherever the example is longer than the window.
    Anything else (padded batches, a KV cache) is transformers' sdpa, mask included (its
    mask functions carry the window there).
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
    if kwargs.get("softcap") is not None:  # pick_attn_implementation never picks it then
        raise NotImplementedError("sdpa_varlen has no attention softcapping: use eager")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise NotImplementedError("sdpa_varlen is causal attention only")
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    if gqa and expands_gqa(query.dtype, query.device.type, masked=window is not None):
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        gqa = False
    # split, not a slice per example: each slice's backward zero-fills a full-size gradient
    # and adds it up (n examples x 3 tensors per layer); split's backward is one cat. Same
    # gradients bit for bit; SmolLM2 fp32, 9 examples of 180 tokens: 34 vs 51 ms per layer.
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    parts = zip(*(t.split(sizes, dim=2) for t in (query, key, value)), strict=True)
    bands: dict[int, torch.Tensor] = {}  # one band per example length, shared within the call
    out = []
    for q, k, v in parts:
        n = q.shape[2]
        if window is None or n <= window:  # the window covers the whole example: plain causal
            o = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
            )
        else:
            if n not in bands:
                bands[n] = causal_band(n, window, q.device)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bands[n], dropout_p=dropout, scale=scaling, enable_gqa=gqa
            )
        out.append(o)
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def expands_gqa(dtype: torch.dtype, device_type: str, masked: bool = False) -> bool:
    """Whether `sdpa_varlen` repeats the key/value heads itself instead of passing SDPA
    ``enable_gqa``: on CUDA, torch's fused kernels take enable_gqa only in 16-bit and without
    an attention mask (flash and cuDNN; memory-efficient attention has no GQA), and fall back
    to the math kernel otherwise: an (L, L) fp32 score matrix per head, no fused kernel."""
    return device_type == "cuda" and (dtype == torch.float32 or masked)


def causal_band(n: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, n) bool mask of sliding-window causal attention, True where query i sees key j:
    ``j <= i`` and ``j > i - window``, so each token sees itself and the ``window - 1`` before
    it. This is transformers' definition (masking_utils.sliding_window_causal_mask_function:
    causal_mask_function ``kv_idx <= q_idx`` and sliding_window_overlay ``kv_idx > q_idx -
    sliding_window``), the one its sdpa and eager paths mask with; flash-attn says the same as
    ``window_size = (window - 1, 0)`` (keys ``[i - window_size[0], i + window_size[1]]``
    inclusive, flash_attn_interface.flash_attn_varlen_func; transformers passes
    ``(window - 1, window - 1)`` with ``causal=True``, modeling_flash_attention_utils.
    _process_flash_attention_kwargs)."""
    i = torch.arange(n, device=device)
    offset = i[:, None] - i[None, :]  # query - key
    return (offset >= 0) & (offset < window)


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
