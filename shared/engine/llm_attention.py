"""Attention rows recomputed from a layer's own projections (no attention map is materialised).

The probe reproduces what the layer's eager attention would compute for a few query rows:
``softmax(q·kᵀ · scale + mask)`` with ``q, k`` from ``input_layernorm`` → ``q_proj``/``k_proj`` → RoPE at
the tokens' original positions, grouped-query heads expanded, causal + padding mask applied, softmax
in float32, then averaged over heads. Cost: one K projection of the n active tokens and a
(heads × q_rows × n) product, so it works identically under eager, SDPA and flash attention.

Precision: q and k come out of the model's own projections in the model's dtype; the logits are
formed in that dtype and the softmax is taken in float32. In bf16/fp16 models exact or near ties can
therefore rank differently from a stock eager attention map in bf16 (which rounds the probabilities
to bf16 before any head mean); the kept sets are those of the float32 probabilities.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

from .adapters import DecoderAdapter, rotate_half


def attention_rows(
    adapter: DecoderAdapter,
    layer_idx: int,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor,
    query_slots: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged attention probabilities of selected query rows at the input of a layer.

    hidden: (B, n, d) hidden states entering layer ``layer_idx``; positions: (B, n) original
    positions; key_valid: (B, n) bool; query_slots: (B, q) slot indices of the query rows.
    Returns (B, q, n) float32; each row sums to 1 over the visible keys (slot ≤ query slot, valid).
    """
    layer = adapter.layers[layer_idx]
    attn = layer.self_attn
    batch, n, _ = hidden.shape
    nq = query_slots.shape[1]
    hd, h, hkv = adapter.head_dim, adapter.num_heads, adapter.num_kv_heads

    x = layer.input_layernorm(hidden)
    xq = x.gather(1, query_slots.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(xq).view(batch, nq, h, hd).transpose(1, 2)  # (B, H, q, hd)
    k = attn.k_proj(x).view(batch, n, hkv, hd).transpose(1, 2)  # (B, Hkv, n, hd)

    cos_k, sin_k = adapter.cos_sin(layer_idx, x, positions)  # (B, n, hd)
    q_pos = positions.gather(1, query_slots)
    cos_q, sin_q = adapter.cos_sin(layer_idx, x, q_pos)
    q = q * cos_q.unsqueeze(1) + rotate_half(q) * sin_q.unsqueeze(1)
    k = k * cos_k.unsqueeze(1) + rotate_half(k) * sin_k.unsqueeze(1)
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)

    logits = torch.matmul(q, k.transpose(2, 3)) * adapter.scaling  # (B, H, q, n)
    k_slot = torch.arange(n, device=hidden.device).view(1, 1, n)
    visible = (k_slot <= query_slots.unsqueeze(-1)) & key_valid.unsqueeze(1)  # (B, q, n)
    logits = logits.masked_fill(~visible.unsqueeze(1), torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return probs.mean(dim=1)


@torch.no_grad()
def prefill_attention_chunks(
    adapter: DecoderAdapter,
    inputs_embeds: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor,
    query_slots: torch.Tensor,
    chunk: int,
) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Drive an unpruned prefill layer by layer and yield the attention rows of ``query_slots`` in chunks.

    inputs_embeds: (B, n, d); positions: (B, n); key_valid: (B, n) bool (padding mask);
    query_slots: (B, R) slot indices of the query rows (pad short samples with any valid slot and
    weight those rows 0). Yields ``(layer_idx, r0, probs)`` for every layer and every
    ``r0 = 0, chunk, 2·chunk, …`` with probs = ``attention_rows`` of ``query_slots[:, r0:r0 + chunk]``,
    (B, c, n) float32. Memory: one layer's activations plus (heads × chunk × n).
    """
    hidden = inputs_embeds
    n_rows = query_slots.shape[1]
    mask = adapter.attention_mask(key_valid, hidden.shape[1], hidden.dtype)
    pos_emb = adapter.position_embeddings(hidden, positions)
    with adapter.rope_shim() as shim:
        if shim is not None:
            shim.min_len = int(positions.max()) + 1
        for j in range(adapter.num_layers):
            for r0 in range(0, n_rows, chunk):
                yield j, r0, attention_rows(adapter, j, hidden, positions, key_valid, query_slots[:, r0:r0 + chunk])
            if j + 1 < adapter.num_layers:
                hidden = adapter.call_layer(j, hidden, mask, positions, None, False, pos_emb)
