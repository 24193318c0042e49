"""Attention masks over compact (pruned) sequences.

Queries are the last ``q`` slots of the key sequence (prefill: q = n; decode: new tokens after the
cached ones). Causality is in slot order, which equals original order (see ``state.py``).
"""
from __future__ import annotations

from typing import Optional

import torch


def additive_mask(key_valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, k) additive mask for eager/SDPA attention: 0 where visible, ``finfo.min`` where not.

    key_valid: (B, k) bool. Query i (0-based among the last q slots) sees keys 0 … k-q+i that are valid.
    """
    batch, k_len = key_valid.shape
    device = key_valid.device
    q_slot = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)  # (q, 1)
    k_slot = torch.arange(k_len, device=device).unsqueeze(0)  # (1, k)
    visible = (k_slot <= q_slot).unsqueeze(0) & key_valid.unsqueeze(1)  # (B, q, k)
    mask = torch.zeros(batch, 1, q_len, k_len, dtype=dtype, device=device)
    return mask.masked_fill(~visible.unsqueeze(1), torch.finfo(dtype).min)


def padding_mask_2d(key_valid: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, k) long padding mask for flash-attention backends (causal handled by the kernel,
    bottom-right aligned); None when every key is valid."""
    if bool(key_valid.all()):
        return None
    return key_valid.long()
