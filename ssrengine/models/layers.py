"""The repeated decoder blocks of a transformers model: what FSDP2 shards, what gradient
checkpointing and `train.compile` wrap, and where a packed forward switches off mask building."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def _blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes) in
    module order, also once FSDP2 has sharded them: ``fully_shard`` swaps each one's class for
    a subclass named ``FSDP<Class>``, so a block is matched by any class in its MRO."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return (m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__))


def _no_blocks(model: nn.Module) -> ValueError:
    return ValueError(f"{type(model).__name__}: cannot find decoder layers to shard")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every repeated block of a transformers model (see `_blocks`)."""
    layers = list(_blocks(model))
    if not layers:
        raise _no_blocks(model)
    return layers


def first_decoder_layer(model: nn.Module) -> nn.Module:
    """The first block, found without walking the rest of the model (per forward)."""
    layer = next(_blocks(model), None)
    if layer is None:
        raise _no_blocks(model)
    return layer
