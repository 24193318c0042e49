"""The object-text spatial transformer of Fast3D's GAP network (vil3dref's CMT, spatial decoder).

Objects attend to each other with language-conditioned spatial attention ("cond" fusion over a
5-d pairwise geometry) and to the text tokens with ordinary cross-attention; a location MLP is
added to the object states before every layer. Module names follow the authors' layout
(``layers.{i}.self_attn.w_qs``, ``layers.{i}.multihead_attn.in_proj_weight``, ``loc_layers.0.0``,
...) so their checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: Features of the pairwise geometry: distance / max distance, dz/d, d_xy/d, dy/d_xy, dx/d_xy.
SPATIAL_DIM = 5


@dataclass
class CMTConfig:
    """Sizes of the spatial transformer (defaults: the authors' config)."""

    hidden_size: int = 768
    num_heads: int = 12
    num_layers: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.1
    dim_loc: int = 6

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "num_layers", "ffn_dim", "dim_loc"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.dim_loc < 3:
            raise ValueError(f"dim_loc: expected >= 3 (box centre xyz first), got {self.dim_loc}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")


def pairwise_geometry(centers: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """The 5-d relative geometry of every ordered object pair (i, j).

    centers: (B, n, 3) box centres. Returns (B, n, n, 5): [d / max_b d, dz / d, d_xy / d, dy / d_xy,
    dx / d_xy] of the offset c_i - c_j, with d = sqrt(|offset|² + eps) and d_xy likewise over (x, y);
    max_b d is the largest distance of the scene (self-pairs give d = sqrt(eps) and zero ratios).
    """
    off = centers[:, :, None, :] - centers[:, None, :, :]
    dist = torch.sqrt(off.pow(2).sum(-1) + eps)
    dist_xy = torch.sqrt(off[..., :2].pow(2).sum(-1) + eps)
    scale = dist.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return torch.stack(
        [dist / scale, off[..., 2] / dist, dist_xy / dist, off[..., 1] / dist_xy, off[..., 0] / dist_xy], dim=-1
    )


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention whose weights are multiplied by a text-conditioned spatial gate.

    Per head h: gate = sigmoid(w_h(x_i + t) · g_ij + b_h(x_i + t)) with (w_h, b_h) from
    ``lang_cond_fc``, t the first text token, g_ij the pairwise geometry; attention =
    softmax(q·kᵀ/√d + log max(gate, 1e-6)). Output: LayerNorm(x + dropout(fc(attention · v))).
    """

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.w_qs = nn.Linear(hidden, hidden)
        self.w_ks = nn.Linear(hidden, hidden)
        self.w_vs = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden)
        self.lang_cond_fc = nn.Linear(hidden, heads * (SPATIAL_DIM + 1))

    def forward(self, x: torch.Tensor, geometry: torch.Tensor, text0: torch.Tensor,
                key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, n, D); geometry: (B, n, n, 5); text0: (B, D); key_padding: (B, n) bool, True = ignore."""
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)  # (B, H, n, dh)

        q, k, v = split(self.w_qs(x)), split(self.w_ks(x)), split(self.w_vs(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (B, H, n, n)
        cond = self.lang_cond_fc(x + text0[:, None, :]).view(b, n, h, SPATIAL_DIM + 1).permute(0, 2, 1, 3)
        gate = torch.sigmoid(torch.einsum("bhid,bijd->bhij", cond[..., 1:], geometry) + cond[..., :1])
        if key_padding is not None:
            hide = key_padding[:, None, None, :]
            scores = scores.masked_fill(hide, float("-inf"))
            gate = gate.masked_fill(hide, 0.0)
        weights = torch.softmax(scores + torch.log(gate.clamp(min=1e-6)), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        return self.layer_norm(x + self.dropout(self.fc(out)))


class SpatialDecoderLayer(nn.Module):
    """Pre-norm layer: spatial self-attention over objects, cross-attention to text, GELU FFN."""

    def __init__(self, cfg: CMTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.multihead_attn = nn.MultiheadAttention(d, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.linear1 = nn.Linear(d, cfg.ffn_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.linear2 = nn.Linear(cfg.ffn_dim, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.self_attn = SpatialSelfAttention(d, cfg.num_heads, cfg.dropout)

    def forward(self, obj: torch.Tensor, text: torch.Tensor, geometry: torch.Tensor,
                obj_padding: Optional[torch.Tensor], text_padding: torch.Tensor) -> torch.Tensor:
        """obj: (B, n, D); text: (B, T, D); geometry: (B, n, n, 5); paddings: bool, True = ignore."""
        obj = obj + self.dropout1(self.self_attn(self.norm1(obj), geometry, text[:, 0], obj_padding))
        y = self.norm2(obj)
        y = self.multihead_attn(y, text, text, key_padding_mask=text_padding, need_weights=False)[0]
        obj = obj + self.dropout2(y)
        y = self.linear2(self.dropout(F.gelu(self.linear1(self.norm3(obj)))))
        return obj + self.dropout3(y)


class CMT(nn.Module):
    """Object encoder conditioned on text: ``num_layers`` spatial decoder layers.

    Linear weights and embeddings start N(0, 0.02) with zero biases, LayerNorms at (1, 0).
    """

    def __init__(self, cfg: CMTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(SpatialDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.loc_layers = nn.ModuleList(
            [nn.Sequential(nn.Linear(cfg.dim_loc, cfg.hidden_size), nn.LayerNorm(cfg.hidden_size))]
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, obj: torch.Tensor, locs: torch.Tensor,
                obj_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text: (B, T, D) with text_mask (B, T) (1 = token); obj: (B, n, D); locs: (B, n, dim_loc),
        centre xyz first; obj_mask: (B, n) (1 = object; None: all). Returns (B, n, D)."""
        geometry = pairwise_geometry(locs[..., :3])
        loc_embed = self.loc_layers[0](locs)
        text_padding = ~text_mask.bool()
        obj_padding = None if obj_mask is None else ~obj_mask.bool()
        for layer in self.layers:
            obj = layer(obj + loc_embed, text, geometry, obj_padding, text_padding)
        return obj
