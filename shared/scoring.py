"""Attention-derived token scores in vision towers, computed from one layer's own q/k.

The towers (CLIP in LLaVA/LISA, SigLIP in LLaVA-OneVision) are never asked for attention maps:
``output_attentions`` keeps every layer's (B, H, N, N) map (~5 GB for 12 SigLIP views) and is
refused outright by SDPA/flash backends on recent transformers. Instead ``capture_input`` records
the hidden states entering one attention module (already layer-normed) and the functions below
recompute that layer's softmax(q·kᵀ·scale) in float32.

Module attributes used (same names in HF CLIPAttention/SiglipAttention on 4.31 → 5.x and in
LLaVA-NeXT's vendored SigLipAttention): ``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


class CapturedInput:
    """Holds the hidden states (B, N, C) that last entered the hooked module."""

    def __init__(self) -> None:
        self.hidden: Optional[torch.Tensor] = None

    def get(self) -> torch.Tensor:
        if self.hidden is None:
            raise RuntimeError("capture_input: the hooked module has not run inside the block")
        return self.hidden


@contextmanager
def capture_input(module: nn.Module) -> Iterator[CapturedInput]:
    """Record the ``hidden_states`` input of ``module`` for the duration of the block (hook removed on exit)."""
    box = CapturedInput()

    def hook(_m, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            raise TypeError(f"module: expected (B, N, C) hidden_states as input, got {type(h).__name__}")
        box.hidden = h.detach()

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def tower_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a HF CLIP or SigLIP vision tower.

    Accepts ``CLIPVisionModel``/``SiglipVisionModel`` (layers at ``.vision_model.encoder.layers`` on
    transformers 4.x, ``.encoder.layers`` on 5.x) and the bare ``*VisionTransformer``
    (``.encoder.layers``). LLaVA/LISA/LLaVA-NeXT wrap the model in a tower class whose
    ``.vision_tower`` is the model to pass here.
    """
    for path in (("vision_model", "encoder", "layers"), ("encoder", "layers")):
        m = tower
        for attr in path:
            m = getattr(m, attr, None)
            if m is None:
                break
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            return m
    raise TypeError(
        f"tower: expected a HF CLIP/SigLIP vision tower with .vision_model.encoder.layers or .encoder.layers, "
        f"got {type(tower).__name__} (for the hosts' tower wrappers pass their .vision_tower)"
    )


def _heads(attn: nn.Module) -> tuple:
    num_heads = getattr(attn, "num_heads", None)
    if num_heads is None:  # transformers 5.x keeps it on the config
        num_heads = attn.config.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or attn.q_proj.out_features // num_heads
    return int(num_heads), int(head_dim)


def _check_hidden(hidden: torch.Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected (B, N, C) hidden states, got shape {tuple(hidden.shape)}")


def attention_probs(attn: nn.Module, hidden: torch.Tensor, query_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head attention probabilities of ``attn`` on input ``hidden`` (B, N, C).

    query_rows: optional (Q,) indices of the query tokens (default: all N).
    Returns (B, H, Q, N) float32, softmax over the N keys with scale head_dim**-0.5.
    """
    _check_hidden(hidden)
    h, dh = _heads(attn)
    b, n, _ = hidden.shape
    x = hidden if query_rows is None else hidden[:, query_rows]
    q = attn.q_proj(x).float().view(b, x.shape[1], h, dh).transpose(1, 2)
    k = attn.k_proj(hidden).float().view(b, n, h, dh).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) * dh**-0.5, dim=-1)


def received_attention(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Attention each token receives: mean over all N queries, then over heads (SeGPruner saliency).

    hidden: (B, N, C). Returns (B, N) float32; each row sums to 1. Computed one head at a time, so
    the peak extra memory is one (B, N, N) float32 map.
    """
    _check_hidden(hidden)
    h, dh = _heads(attn)
    b, n, _ = hidden.shape
    q = attn.q_proj(hidden).float().view(b, n, h, dh)
    k = attn.k_proj(hidden).float().view(b, n, h, dh)
    total = torch.zeros(b, n, dtype=torch.float32, device=hidden.device)
    for i in range(h):
        p = torch.softmax(q[:, :, i] @ k[:, :, i].transpose(-1, -2) * dh**-0.5, dim=-1)
        total += p.mean(dim=1)
    return total / h


def cls_attention(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[CLS] query's attention over the patch tokens, as PruMerge and LVLM_CSP's CLS sampler score them.

    One full-width product (not per head): softmax(q_cls · Kᵀ / sqrt(C)) over all N keys
    ([CLS] included), then the [CLS] column is dropped. hidden: (B, 1 + P, C) with [CLS] first.
    Returns (B, P) float32.
    """
    _check_hidden(hidden)
    if hidden.shape[1] < 2:
        raise ValueError(f"hidden: expected [CLS] plus at least one patch token, got {hidden.shape[1]} tokens")
    q = attn.q_proj(hidden[:, :1]).float()
    k = attn.k_proj(hidden).float()
    p = torch.softmax(q @ k.transpose(-1, -2) * k.shape[-1] ** -0.5, dim=-1)
    return p[:, 0, 1:]


__all__ = ["CapturedInput", "attention_probs", "capture_input", "cls_attention", "received_attention", "tower_layers"]
