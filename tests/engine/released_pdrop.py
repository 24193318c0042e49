"""A transcription of the released PyramidDrop prefill (``Cooperx521/PyramidDrop``,
``llava/model/modeling_llama_pdrop.py``: ``LlamaModel.pdrop_forward`` + ``pdrop_rank_drop``, inference,
batch 1, no padding), written against the stock decoder layers of the installed transformers.

After running 0-based layer ``l``, if ``l + 1`` is in ``layer_list`` (stage s): the next layer's
``input_layernorm`` + ``q_proj``/``k_proj`` + RoPE at the current ``position_ids`` are applied to the
hidden states; the last prompt token's row of softmax(q·kᵀ/√d + causal mask) (float32, cast back to the
model dtype), mean over heads, restricted to the current image span, ``topk(int(N·ratio[s+1]))``, sorted;
the sequence is rebuilt as [before image | kept image | after image] and ``position_ids`` becomes
``arange(0, len)`` (``renumber=False`` keeps each token's position instead: the engine's default rule).
RoPE tables are computed here from ``rope_theta`` (no scaling), independently of the engine. Needs as many
KV heads as query heads (the released matmul has no ``repeat_kv``).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import List, Sequence, Tuple

import torch

from .reference import _call, _mask


def _rope(positions: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


@contextmanager
def _long_rope_tables(model, need: int):
    """transformers 4.31/4.37 rotary modules slice their table to the layer's KV length before indexing
    it with position_ids; gapped positions (``renumber=False``) need ``need`` rows."""
    patched = []
    for layer in model.model.layers:
        rot = getattr(layer.self_attn, "rotary_emb", None)
        if rot is None or "seq_len" not in inspect.signature(rot.forward).parameters:
            continue
        orig = rot.forward
        rot.forward = lambda x, seq_len=None, _o=orig, **kw: _o(x, seq_len=max(seq_len or 0, need), **kw)
        patched.append(rot)
    try:
        yield
    finally:
        for rot in patched:
            del rot.forward


def _theta(config) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


@torch.no_grad()
def prefill(model, embeds: torch.Tensor, image_index: int, image_tokens: int, layer_list: Sequence[int],
            ratio_list: Sequence[float], renumber: bool = True):
    """embeds (1, L, d); the image occupies [image_index, image_index + image_tokens); the query is the last
    token. ratio_list: [1, λ, λ², …] (the eval script prepends 1.0). Returns (final normed hidden of the kept
    sequence (1, n, d), original positions of the kept sequence (n,), kept image positions per stage)."""
    cfg = model.config
    layers = model.model.layers
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    assert (getattr(cfg, "num_key_value_heads", None) or heads) == heads, "the released ranking has no GQA"
    hidden = embeds
    original = torch.arange(embeds.shape[1])
    position_ids = original[None].clone()
    stages: List[List[int]] = []
    for layer_idx in range(len(layers)):
        alive = torch.ones(hidden.shape[1], dtype=torch.bool)
        with _long_rope_tables(model, int(position_ids.max()) + 1):
            hidden, _ = _call(model, layer_idx, hidden, _mask(alive, hidden.dtype), position_ids)
        rank_layer = layer_idx + 1
        if rank_layer not in layer_list:
            continue
        stage = list(layer_list).index(rank_layer)
        cur = int(image_tokens * ratio_list[stage])
        keep = int(image_tokens * ratio_list[stage + 1])
        attn = layers[rank_layer].self_attn
        x = layers[rank_layer].input_layernorm(hidden.clone())
        q_len = x.shape[1]
        q = attn.q_proj(x).view(1, q_len, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, q_len, heads, head_dim).transpose(1, 2)
        cos, sin = _rope(position_ids, head_dim, _theta(cfg))
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        mask = _mask(torch.ones(q_len, dtype=torch.bool), q.dtype)[0]  # (1, L, L)
        row = q[0, :, q_len - 1 : q_len]  # (H, 1, hd): the last instruction token
        w = torch.matmul(row, k[0].transpose(1, 2)) / head_dim ** 0.5 + mask[:, q_len - 1 : q_len]
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        score = w.mean(dim=0)[:, image_index : image_index + cur].mean(dim=0)
        top = score.topk(keep).indices + image_index
        top = top.sort().values
        end = image_index + cur
        sel = torch.cat([torch.arange(image_index), top, torch.arange(end, q_len)])
        hidden = hidden[:, sel]
        original = original[sel]
        stages.append(original[image_index : image_index + keep].tolist())
        position_ids = torch.arange(hidden.shape[1])[None] if renumber else original[None].clone()
    return model.model.norm(hidden), original, stages
