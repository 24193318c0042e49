"""AdaToken-3D calibration: span-block attention sums of an unpruned prefill, without attention maps.

For each decoder layer i (engine layer i − 1) the head-averaged softmax attention Ā⁽ⁱ⁾[query, key] of the
unpruned prefill is summed over three blocks (``shared/notes/hosts-and-methods/LLaVA-3D-AdaToken-3D.md`` §6.2–6.3,
rows = queries, columns = keys):

- SPA→SPA: q ∈ SPA, k ∈ SPA, k < q (strict lower triangle, self excluded)  → ``SpanBlockSums.spa_spa`` (Eq.1)
- PRM→SPA: q ∈ PRM, k ∈ SPA                                               → ``prm_spa`` (λ_s-p, Eq.3)
- SPA→SYS: q ∈ SPA, k ∈ SYS                                               → ``spa_sys`` (λ_s-s, Eq.3)

The layers run one at a time and the attention rows of the SPA and PRM queries are recomputed from each
layer's own q/k in chunks (``shared.engine.llm_attention.prefill_attention_chunks``), so memory stays at one
layer's activations plus (heads × chunk × n) and eager, SDPA and flash attention give the same sums. Run it on
K calibration prompts and add the results with ``accumulate``; ``adatoken.information_flow`` turns the total
into Eq.1–4.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..engine.adapters import DecoderAdapter
from ..engine.llm_attention import prefill_attention_chunks
from .adatoken import SpanBlockSums

Span = Union[Tuple[int, int], Sequence[Sequence[int]], torch.Tensor]


def _spans(name: str, value: Span, batch: int, length: int) -> torch.Tensor:
    """``value`` as (B, 2) long [start, end): one (start, end) pair for all samples or one per sample."""
    t = torch.as_tensor(value)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected a (start, end) pair of ints or ({batch}, 2) such pairs, got dtype {t.dtype}")
    if t.dim() == 1 and t.shape[0] == 2:
        t = t[None].expand(batch, 2)
    if tuple(t.shape) != (batch, 2):
        raise ValueError(f"{name}: expected a (start, end) pair or ({batch}, 2) pairs, got shape {tuple(t.shape)}")
    t = t.long()
    for b in range(batch):
        s, e = int(t[b, 0]), int(t[b, 1])
        if not 0 <= s < e <= length:
            raise ValueError(f"{name}: sample {b}: expected 0 <= start < end <= L = {length}, got [{s}, {e})")
    return t


@torch.no_grad()
def span_block_sums(
    decoder: nn.Module,
    inputs_embeds: torch.Tensor,
    sys_span: Span,
    spa_span: Span,
    prm_span: Span,
    attention_mask: Optional[torch.Tensor] = None,
    chunk: int = 64,
) -> SpanBlockSums:
    """SPA→SPA (k < q), PRM→SPA and SPA→SYS sums of the head-averaged prefill attention, per layer.

    decoder: a LLaMA/Qwen2 decoder (``LlamaModel``; PEFT-wrapped projections allowed), transformers 4.31–5.x;
    inputs_embeds: (B, n, d) the unpruned prefill; sys_span / spa_span / prm_span: [start, end) slot ranges,
    a (start, end) pair for every sample or (B, 2) pairs, non-empty, in the order SYS ≤ SPA ≤ PRM without
    overlap (LLaVA-3D: (0, s), (s, s + N), (s + N, n)); attention_mask: (B, n) padding mask (1 = token), the
    spans must be tokens; positions are 0..n−1 (the stock forward). chunk: query rows scored at once per layer.

    Returns ``SpanBlockSums`` with (L,) float64 sums over the B samples and spa_rows = Σ_b N_b,
    prm_rows = Σ_b |PRM_b|.
    """
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
        raise ValueError("inputs_embeds: expected a (B, n, d) tensor")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    ad = DecoderAdapter(decoder)
    batch, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    sys_, spa, prm = (_spans(n, v, batch, length).to(device)
                      for n, v in (("sys_span", sys_span), ("spa_span", spa_span), ("prm_span", prm_span)))
    if attention_mask is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask: expected shape ({batch}, {length}), got {tuple(attention_mask.shape)}")
        valid = attention_mask.to(device).bool()
    for b in range(batch):
        if int(sys_[b, 1]) > int(spa[b, 0]) or int(spa[b, 1]) > int(prm[b, 0]):
            raise ValueError(
                f"spa_span: sample {b}: expected SYS {sys_[b].tolist()} ≤ SPA {spa[b].tolist()} ≤ PRM "
                f"{prm[b].tolist()} without overlap (a query only sees earlier keys)")
        for name, sp in (("sys_span", sys_), ("spa_span", spa), ("prm_span", prm)):
            if not bool(valid[b, int(sp[b, 0]):int(sp[b, 1])].all()):
                raise ValueError(f"attention_mask: sample {b}: padding inside {name} {sp[b].tolist()}")

    # query rows per sample: the SPA rows, then the PRM rows; short samples repeat their last row with weight 0
    n_spa, n_prm = spa[:, 1] - spa[:, 0], prm[:, 1] - prm[:, 0]  # (B,)
    n_rows = n_spa + n_prm
    offs = torch.arange(int(n_rows.max()), device=device)[None, :]  # (1, R)
    offs = torch.minimum(offs.expand(batch, -1), n_rows[:, None] - 1)
    is_spa_row = offs < n_spa[:, None]  # (B, R)
    slots = torch.where(is_spa_row, spa[:, :1] + offs, prm[:, :1] + offs - n_spa[:, None])
    live = torch.arange(offs.shape[1], device=device)[None, :] < n_rows[:, None]
    w_spa, w_prm = (is_spa_row & live).float(), (~is_spa_row & live).float()
    key = torch.arange(length, device=device)
    spa_col = (key >= spa[:, :1]) & (key < spa[:, 1:])  # (B, n)
    sys_col = (key >= sys_[:, :1]) & (key < sys_[:, 1:])

    sums = torch.zeros(3, ad.num_layers, dtype=torch.float64, device=device)  # spa_spa, prm_spa, spa_sys
    for j, r0, probs in prefill_attention_chunks(ad, inputs_embeds, torch.arange(length, device=device).expand(
            batch, length), valid, slots, chunk):  # probs (B, c, n)
        c = probs.shape[1]
        q = slots[:, r0:r0 + c]
        to_spa = (probs * spa_col[:, None, :]).sum(-1)  # (B, c)
        below = spa_col[:, None, :] & (key[None, None, :] < q[..., None])
        to_spa_below = (probs * below).sum(-1)
        to_sys = (probs * sys_col[:, None, :]).sum(-1)
        ws, wp = w_spa[:, r0:r0 + c], w_prm[:, r0:r0 + c]
        sums[0, j] += (to_spa_below * ws).sum().double()
        sums[1, j] += (to_spa * wp).sum().double()
        sums[2, j] += (to_sys * ws).sum().double()
    out = sums.cpu().numpy()
    return SpanBlockSums(spa_spa=out[0], prm_spa=out[1], spa_sys=out[2], spa_rows=int(n_spa.sum()),
                         prm_rows=int(n_prm.sum()))


def accumulate(a: SpanBlockSums, b: SpanBlockSums) -> SpanBlockSums:
    """The block sums and row counts of two calibration results added (same layer count)."""
    for name, v in (("a", a), ("b", b)):
        if not isinstance(v, SpanBlockSums):
            raise ValueError(f"{name}: expected a SpanBlockSums, got {type(v).__name__}")
    if a.num_layers != b.num_layers:
        raise ValueError(f"b: expected sums over {a.num_layers} layers like a, got {b.num_layers}")
    return SpanBlockSums(
        spa_spa=np.add(a.spa_spa, b.spa_spa),
        prm_spa=np.add(a.prm_spa, b.prm_spa),
        spa_sys=np.add(a.spa_sys, b.spa_sys),
        spa_rows=a.spa_rows + b.spa_rows,
        prm_rows=a.prm_rows + b.prm_rows,
    )
