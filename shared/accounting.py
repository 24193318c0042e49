"""Efficiency accounting: tokens per layer, N_avg, pruning ratios and prefill FLOPs.

The papers count prefill FLOPs per decoder layer from the number of tokens n the layer sees, the
hidden size d and the FFN size m:

    f(n) = c · (4·n·d² + 2·n²·d + k·n·d·m)

- ``k = 2`` (FastV, PyramidDrop, AdaToken-3D) or ``k = 3`` (SwiGLU's three FFN matrices; LVLM_CSP);
- ``c = 1`` counts a multiply-add once (FastV/PDrop/AdaToken-3D), ``c = 2`` counts it as two FLOPs
  (LVLM_CSP's TFLOPs are 2 × its Eq. 11).

``4nd²`` assumes as many KV heads as query heads; ``gqa=True`` replaces it with the exact
``2nd² + 2n·d·d_kv`` of grouped-query attention (Qwen2-7B: d_kv = 512). Only the decoder layers are
counted (no vision tower, projector, LM head or decode steps), as in the papers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence


@dataclass(frozen=True)
class DecoderDims:
    """Decoder sizes: hidden d, FFN m, layers L, query heads, KV heads."""

    hidden: int
    intermediate: int
    layers: int
    heads: int = 32
    kv_heads: Optional[int] = None

    @property
    def kv_dim(self) -> int:
        kv = self.kv_heads or self.heads
        return self.hidden * kv // self.heads

    @classmethod
    def from_config(cls, config) -> "DecoderDims":
        """From a transformers ``LlamaConfig``/``Qwen2Config`` (or any object with those fields)."""
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None),
        )


#: Decoders of the four hosts (LLaMA-1/2 7B = Vicuna-7B, LLaMA 13B, Qwen2-7B).
DIMS: Dict[str, DecoderDims] = {
    "llama-7b": DecoderDims(4096, 11008, 32, 32, 32),
    "llama-13b": DecoderDims(5120, 13824, 40, 40, 40),
    "qwen2-7b": DecoderDims(3584, 18944, 28, 28, 4),
}


@dataclass(frozen=True)
class FlopsConvention:
    """How a paper counts: FFN matrices k (2 or 3), FLOPs per multiply-add c (1 or 2), GQA-exact."""

    ffn_matrices: int = 2
    flops_per_mac: int = 1
    gqa: bool = False

    def __post_init__(self) -> None:
        if self.ffn_matrices not in (2, 3):
            raise ValueError(f"ffn_matrices: expected 2 (2ndm) or 3 (3ndm), got {self.ffn_matrices}")
        if self.flops_per_mac not in (1, 2):
            raise ValueError(f"flops_per_mac: expected 1 or 2, got {self.flops_per_mac}")


CONVENTIONS: Dict[str, FlopsConvention] = {
    "fastv": FlopsConvention(2, 1),  # FastV, PyramidDrop, AdaToken-3D, Fast3D
    "lvlm_csp": FlopsConvention(3, 2),  # LVLM_CSP Eq. 10-11 as its tables print them
    "swiglu": FlopsConvention(3, 1),
    "exact": FlopsConvention(3, 2, gqa=True),  # true FLOPs of a LLaMA/Qwen2 layer's matmuls
}


def layer_flops(n: float, dims: DecoderDims, conv: FlopsConvention) -> float:
    """FLOPs of one decoder layer over n tokens at prefill."""
    d, m = dims.hidden, dims.intermediate
    proj = (2 * n * d * d + 2 * n * d * dims.kv_dim) if conv.gqa else 4 * n * d * d
    return conv.flops_per_mac * (proj + 2 * n * n * d + conv.ffn_matrices * n * d * m)


def prefill_flops(tokens_per_layer: Sequence[float], dims: DecoderDims, conv: FlopsConvention) -> float:
    """Σ_l f(n_l); ``tokens_per_layer`` must have one entry per decoder layer."""
    if len(tokens_per_layer) != dims.layers:
        raise ValueError(
            f"tokens_per_layer: expected {dims.layers} entries (one per decoder layer), got {len(tokens_per_layer)}"
        )
    return float(sum(layer_flops(n, dims, conv) for n in tokens_per_layer))


def ranking_flops(tokens_at_rank: Sequence[float], dims: DecoderDims, conv: FlopsConvention, query_rows: int = 1) -> float:
    """Extra cost of ranking from a layer's q/k (PDrop/FastV/LVLM_CSP scores, ``shared.engine.llm_attention``), per
    scoring point over n tokens: the K projection of the n tokens (n·d·d_kv), the Q projection of the
    query rows (q·d²) and their logits against the n keys (q·n·d)."""
    d = dims.hidden
    kv = dims.kv_dim if conv.gqa else d
    return float(sum(conv.flops_per_mac * (n * d * kv + query_rows * d * d + query_rows * n * d) for n in tokens_at_rank))


def n_avg(visual_per_layer: Sequence[float]) -> float:
    """N_avg: visual tokens averaged over layers (LVLM_CSP Eq. 9; "equivalent tokens")."""
    if len(visual_per_layer) == 0:
        raise ValueError("visual_per_layer: empty")
    return float(sum(visual_per_layer)) / len(visual_per_layer)


def pruning_ratio(visual_per_layer: Sequence[float], visual_tokens: int) -> float:
    """Layer-averaged fraction of the visual tokens removed: 1 − N_avg / N (Fast3D's ratio)."""
    if visual_tokens <= 0:
        raise ValueError(f"visual_tokens: expected a positive count, got {visual_tokens}")
    return 1.0 - n_avg(visual_per_layer) / visual_tokens


def stage_schedule(stages: Sequence[Sequence[int]], layers: int) -> List[int]:
    """[(count, n_layers), …] → visual tokens per layer; the stages must cover exactly ``layers``."""
    out: List[int] = []
    for count, span in stages:
        if span < 0 or count < 0:
            raise ValueError(f"stages: negative entry in {tuple(stages)}")
        out += [int(count)] * int(span)
    if len(out) != layers:
        raise ValueError(f"stages: cover {len(out)} layers, expected {layers}")
    return out


@dataclass
class Efficiency:
    """Accounting of one prefill: per-layer counts and the derived figures."""

    visual_per_layer: List[int]
    text_tokens: int
    dims: DecoderDims
    conv: FlopsConvention
    visual_tokens: int = field(default=0)

    def __post_init__(self) -> None:
        if len(self.visual_per_layer) != self.dims.layers:
            raise ValueError(
                f"visual_per_layer: expected {self.dims.layers} entries, got {len(self.visual_per_layer)}"
            )
        if self.text_tokens < 0:
            raise ValueError(f"text_tokens: expected >= 0, got {self.text_tokens}")
        if not self.visual_tokens:
            self.visual_tokens = int(self.visual_per_layer[0])

    @property
    def tokens_per_layer(self) -> List[int]:
        return [v + self.text_tokens for v in self.visual_per_layer]

    @property
    def n_avg(self) -> float:
        return n_avg(self.visual_per_layer)

    @property
    def n_avg_printed(self) -> int:
        """floor(N_avg), as the LVLM_CSP tables print it."""
        return int(math.floor(self.n_avg + 1e-9))

    @property
    def pruning_ratio(self) -> float:
        return pruning_ratio(self.visual_per_layer, self.visual_tokens)

    @property
    def flops(self) -> float:
        return prefill_flops(self.tokens_per_layer, self.dims, self.conv)

    @property
    def tflops(self) -> float:
        return self.flops / 1e12


def from_stats(stats, dims: DecoderDims, conv: FlopsConvention) -> List[Efficiency]:
    """Per-sample accounting of an engine prefill (``runner.last_stats``) at the given dims."""
    out = []
    for b in range(stats.tokens.shape[0]):
        vis = [int(v) for v in stats.visual[b]]
        text = int(stats.tokens[b, 0]) - vis[0]
        if len(vis) != dims.layers:
            raise ValueError(f"dims: the prefill ran {len(vis)} layers but dims has {dims.layers}")
        out.append(Efficiency(vis, text, dims, conv, visual_tokens=int(stats.visual_tokens[b])))
    return out
