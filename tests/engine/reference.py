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


def layer_positions(alive: torch.Tensor, compact: bool) -> torch.Tensor:
    """(1, L) position ids of one layer: original 0..L-1, or the rank among the alive tokens."""
    length = alive.shape[0]
    if not compact:
        return torch.arange(length).unsqueeze(0)
    return (alive.long().cumsum(0) - 1).clamp(min=0).unsqueeze(0)


@torch.no_grad()
def run(
    model,
    embeds: torch.Tensor,
    visual: Tuple[int, int],
    query: int,
    events: Dict[int, Tuple[str, int]],
    positions: str = "original",
):
    """One sample (1, L, d). ``events[j] = (when, k)``: before layer j keep the top-k visual tokens
    ranked by the query row of the attention of layer j-1 (``when='prev'``, FastV) or of layer j on
    the current state (``when='self'``, PyramidDrop). ``positions="compact"``: every layer numbers
    the alive tokens 0..n-1 (a dropped token's position is irrelevant: it is masked).

    Returns (final normed hidden (1, L, d), kept visual positions per layer, alive (L,) at the end,
    alive (L,) per layer).
    """
    length = embeds.shape[1]
    compact = positions == "compact"
    alive = torch.ones(length, dtype=torch.bool)
    hidden = embeds
    last_w = None
    kept_per_layer: List[List[int]] = []
    alive_layers: List[torch.Tensor] = []
    for j in range(len(model.model.layers)):
        if j in events:
            when, k = events[j]
            if when == "self":
                _, w = _call(model, j, hidden, _mask(alive, hidden.dtype), layer_positions(alive, compact))
            else:
                w = last_w
            scores = w[0].mean(dim=0)[query]
            cand = [i for i in range(*visual) if alive[i]]
            keep = set(_top(scores, cand, k))
            for i in range(*visual):
                if i not in keep:
                    alive[i] = False
        kept_per_layer.append([i for i in range(*visual) if alive[i]])
        alive_layers.append(alive.clone())
        hidden, last_w = _call(model, j, hidden, _mask(alive, hidden.dtype), layer_positions(alive, compact))
    return model.model.norm(hidden), kept_per_layer, alive, alive_layers


@torch.no_grad()
def run_schedule(model, embeds: torch.Tensor, alive_layers: List[torch.Tensor], positions: str = "original"):
    """Masking forward of one sample (1, L', d) under a fixed schedule decided on its first L tokens:
    ``alive_layers[j]`` (L,) says which of them layer j sees; tokens L..L'-1 (generated) are always
    alive. A token alive again after being dropped re-enters with its layer-0 embedding (LVLM_CSP's
    scattering). Returns the final normed hidden states (1, L', d)."""
    length = embeds.shape[1]
    compact = positions == "compact"
    hidden = embeds.clone()
    prev = None
    for j in range(len(model.model.layers)):
        alive = torch.ones(length, dtype=torch.bool)
        alive[: alive_layers[j].shape[0]] = alive_layers[j]
        if prev is not None:
            back = alive & ~prev
            hidden[0, back] = embeds[0, back]
        hidden, _ = _call(model, j, hidden, _mask(alive, hidden.dtype), layer_positions(alive, compact))
        prev = alive
    return model.model.norm(hidden)


class ScheduleDecoder:
    """A decoder ``forward`` for ``generate(use_cache=False)`` that recomputes every step with the masking
    reference under per-row schedules (rows of a beam group share their sample's schedule)."""

    def __init__(self, model, schedules: List[List[torch.Tensor]], positions: str = "original") -> None:
        self.model = model
        self.schedules = schedules
        self.positions = positions

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        if inputs_embeds is None:
            inputs_embeds = self.model.model.embed_tokens(input_ids)
        k = inputs_embeds.shape[0] // len(self.schedules)
        rows = [run_schedule(self.model, inputs_embeds[b : b + 1], self.schedules[b // k], self.positions)
                for b in range(inputs_embeds.shape[0])]
        return BaseModelOutputWithPast(last_hidden_state=torch.cat(rows), past_key_values=None)


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
    alive_layers: List[torch.Tensor] = []
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
        alive_layers.append(alive.clone())
        hidden, last_w = _call(model, j, hidden, _mask(alive, hidden.dtype), pos)
    return model.model.norm(hidden), kept, alive, alive_layers
