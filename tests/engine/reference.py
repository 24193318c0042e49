"""Slow reference for in-decoder pruning, independent of the engine.

It never shortens the sequence: every layer runs on all L tokens at their own positions, and a
dropped token is only removed as a *key* (masked) from its drop layer on. Rankings come from the
stock eager attention weights returned by the layer itself. For the tokens that stay, this is
mathematically what physical dropping with original RoPE positions must produce.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Sequence, Tuple

import torch


def _call(model, j: int, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor):
    """Run stock layer j; return (hidden_out, attention weights (B, H, L, L))."""
    layer = model.model.layers[j]
    params = inspect.signature(layer.forward).parameters
    captured = {}

    def hook(_m, _inp, out):
        captured["w"] = out[1]

    h = layer.self_attn.register_forward_hook(hook)
    try:
        kwargs = dict(attention_mask=mask, position_ids=pos)
        if "position_embeddings" in params:
            kwargs["position_embeddings"] = model.model.rotary_emb(hidden, pos)
        if "output_attentions" in params:
            kwargs["output_attentions"] = True
        out = layer(hidden, **kwargs)
    finally:
        h.remove()
    out = out[0] if isinstance(out, tuple) else out
    return out, captured["w"]


def _mask(alive: torch.Tensor, dtype) -> torch.Tensor:
    length = alive.shape[0]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    vis = causal & alive.unsqueeze(0)
    m = torch.zeros(1, 1, length, length, dtype=dtype)
    return m.masked_fill(~vis, torch.finfo(dtype).min)


def _top(scores: torch.Tensor, candidates: List[int], k: int) -> List[int]:
    return sorted(sorted(candidates, key=lambda i: (-float(scores[i]), i))[:k])


@torch.no_grad()
def run(
    model,
    embeds: torch.Tensor,
    visual: Tuple[int, int],
    query: int,
    events: Dict[int, Tuple[str, int]],
) -> Tuple[torch.Tensor, List[List[int]], torch.Tensor]:
    """One sample (1, L, d). ``events[j] = (when, k)``: before layer j keep the top-k visual tokens
    ranked by the query row of the attention of layer j-1 (``when='prev'``, FastV) or of layer j on
    the current state (``when='self'``, PyramidDrop).

    Returns (final normed hidden (1, L, d), kept visual positions per layer, alive (L,) at the end).
    """
    length = embeds.shape[1]
    pos = torch.arange(length).unsqueeze(0)
    alive = torch.ones(length, dtype=torch.bool)
    hidden = embeds
    last_w = None
    kept_per_layer: List[List[int]] = []
    for j in range(len(model.model.layers)):
        if j in events:
            when, k = events[j]
            if when == "self":
                _, w = _call(model, j, hidden, _mask(alive, hidden.dtype), pos)
            else:
                w = last_w
            scores = w[0].mean(dim=0)[query]
            cand = [i for i in range(*visual) if alive[i]]
            keep = set(_top(scores, cand, k))
            for i in range(*visual):
                if i not in keep:
                    alive[i] = False
        kept_per_layer.append([i for i in range(*visual) if alive[i]])
        hidden, last_w = _call(model, j, hidden, _mask(alive, hidden.dtype), pos)
    return model.model.norm(hidden), kept_per_layer, alive


def fastv_events(k_layer: int, keep: int):
    return {k_layer: ("prev", keep)}


def pdrop_events(layers: Sequence[int], keeps: Sequence[int]):
    return {l: ("self", k) for l, k in zip(layers, keeps)}


@torch.no_grad()
def run_csp(
    model,
    embeds: torch.Tensor,
    visual: Tuple[int, int],
    guidance: int,
    selected: Sequence[int],
    lc: int,
    ls: int,
    np_: int,
) -> Tuple[torch.Tensor, List[List[int]], torch.Tensor]:
    """LVLM_CSP on one sample (1, L, d), by masking only.

    Layers < lc: visual tokens outside ``selected`` (absolute positions) are masked as keys. Before
    layer lc their hidden states are reset to the layer-0 embeddings and they are unmasked. Before
    layer lc+ls all but the top-np visual tokens by the guidance row of layer lc+ls-1's stock eager
    attention (head mean) are masked again. Returns (final normed hidden, kept visual positions per
    layer, alive at the end).
    """
    length = embeds.shape[1]
    pos = torch.arange(length).unsqueeze(0)
    vis = list(range(*visual))
    alive = torch.ones(length, dtype=torch.bool)
    if lc > 0:
        for i in vis:
            alive[i] = i in set(selected)
    hidden = embeds.clone()
    last_w = None
    kept: List[List[int]] = []
    for j in range(len(model.model.layers)):
        if j == lc and lc > 0:
            absent = ~alive
            hidden[0, absent] = embeds[0, absent]
            alive[:] = True
        if j == lc + ls and j < len(model.model.layers):
            scores = last_w[0].mean(dim=0)[guidance]
            keep = set(_top(scores, vis, np_))
            for i in vis:
                alive[i] = i in keep
        kept.append([i for i in vis if alive[i]])
        hidden, last_w = _call(model, j, hidden, _mask(alive, hidden.dtype), pos)
    return model.model.norm(hidden), kept, alive
