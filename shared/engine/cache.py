"""KV-cache layout of a pruned prefill, in the three cache formats the pinned decoders use.

Each layer caches the tokens it saw, so layers hold different lengths. ``generate`` and callers that
continue from a returned cache read the *sequence* length from layer 0 (transformers 4.36-4.4x read
``get_seq_length()``/``seen_tokens`` or the legacy tuple's layer-0 length at every step; 5.x reads it
when a cache is passed back in). So layer 0 always holds the logical length: when layer 0 ran on a
pruned sequence, its keys/values are scattered back to their positions (pruned slots zero, masked
by the engine). That costs one layer's cache at full length and keeps every reader correct.

Formats: a list of per-layer ``(k, v)`` tuples (4.31), ``DynamicCache`` with ``key_cache``/
``value_cache`` lists (4.36-4.4x, with a ``seen_tokens`` tally), ``DynamicCache`` with ``layers``
(5.x). Tensors are (B, H_kv, n, head_dim).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

#: attribute under which the engine keeps a generation's state on a ``Cache`` object
STATE_ATTR = "_shared_engine_state"


def _scatter(t: torch.Tensor, slots_pos: torch.Tensor, slots_valid: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, n, d) slot layout → (B, H, length, d) position layout; unused positions are zero."""
    b, h, _, d = t.shape
    out = t.new_zeros(b, h, length + 1, d)
    tgt = torch.where(slots_valid, slots_pos, torch.full_like(slots_pos, length))  # invalid slots → scratch
    idx = tgt[:, None, :, None].expand(b, h, tgt.shape[1], d)
    out.scatter_(2, idx, t)
    return out[:, :, :length]


def get_layer(cache: Any, layer_idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(cache, list):
        return cache[layer_idx]
    if hasattr(cache, "layers"):
        layer = cache.layers[layer_idx]
        return layer.keys, layer.values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]


def set_layer(cache: Any, layer_idx: int, k: torch.Tensor, v: torch.Tensor, added: int) -> None:
    """Replace layer ``layer_idx``'s tensors; ``added`` more tokens than before are now cached."""
    if isinstance(cache, list):
        cache[layer_idx] = (k, v)
        return
    if hasattr(cache, "layers"):
        cache.layers[layer_idx].keys = k
        cache.layers[layer_idx].values = v
        return
    cache.key_cache[layer_idx] = k
    cache.value_cache[layer_idx] = v
    if layer_idx == 0:
        for name in ("_seen_tokens", "seen_tokens"):
            if name in vars(cache):
                setattr(cache, name, getattr(cache, name) + added)
                break


def pad_to_positions(cache: Any, layer_idx: int, positions: torch.Tensor, valid: torch.Tensor, length: int) -> None:
    """Lay layer ``layer_idx``'s prefill cache out by position: slot i of row b goes to
    ``positions[b, i]`` (where ``valid``); the layer then caches ``length`` tokens."""
    k, v = get_layer(cache, layer_idx)
    n = k.shape[-2]
    set_layer(cache, layer_idx, _scatter(k, positions, valid, length), _scatter(v, positions, valid, length), length - n)


def attach_state(cache: Any, state: Any) -> None:
    """Keep the engine's generation state on a ``Cache`` object (legacy tuples cannot carry it)."""
    if cache is not None and not isinstance(cache, (list, tuple)):
        try:
            setattr(cache, STATE_ATTR, state)
        except AttributeError:  # pragma: no cover - a cache class with __slots__
            pass


def attached_state(cache: Any) -> Any:
    return getattr(cache, STATE_ATTR, None) if cache is not None else None


__all__ = ["STATE_ATTR", "attach_state", "attached_state", "get_layer", "pad_to_positions", "set_layer"]
