"""FastV (Chen et al., ECCV 2024): one-shot drop of visual tokens inside the LLM.

Rule (canonical, prefill only): at the input of layer K-1 take the attention of the last
instruction token over the active tokens, averaged over heads; from layer K on keep all text
tokens and the R visual tokens with the highest attention (ties: earlier position). K is the
0-based index of the first pruned layer, so the scores are those of 1-based "layer K".
Tokens are physically removed and keep their original RoPE positions. A sample without visual
tokens (a text-only row of a batch) is left unpruned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..engine.plan import LayerView, Plan, PruningRequest
from .base import LayerMethod, as_fraction, as_int, check_layer_index, register


@register("fastv")
@dataclass
class FastV(LayerMethod):
    """layer: K (0-based first pruned layer, K >= 1); keep: R visual tokens kept, or keep_ratio: R/N."""

    layer: int = 2
    keep: Optional[int] = None
    keep_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError("keep/keep_ratio: give exactly one of them (R tokens, or R/N in (0, 1])")
        self.layer = as_int(
            "layer", self.layer, low=1,
            meaning="an int K (scores come from layer K-1; selection before the first layer is a pre-LLM method)",
        )
        if self.keep is not None:
            self.keep = as_int("keep", self.keep, low=1, meaning="a positive number of visual tokens R")
        if self.keep_ratio is not None:
            self.keep_ratio = as_fraction("keep_ratio", self.keep_ratio, meaning="a fraction R/N")

    def validate_for(self, num_layers: int) -> None:
        check_layer_index("layer", self.layer, num_layers)

    def keep_count(self, visual_tokens: int) -> int:
        """R for a sample with N = ``visual_tokens`` visual tokens (0 for a sample without any: it is
        left unpruned)."""
        if visual_tokens == 0:
            return 0
        if self.keep is not None:
            r = self.keep
        else:
            r = int(visual_tokens * float(self.keep_ratio))
            if r == 0:
                raise ValueError(f"keep_ratio: {self.keep_ratio} of {visual_tokens} visual tokens keeps none")
        if r > visual_tokens:
            raise ValueError(f"keep: R={r} exceeds the {visual_tokens} visual tokens of the sample")
        return r

    def schedule(self, visual_tokens: int, num_layers: int) -> List[int]:
        self.validate_for(num_layers)
        r = self.keep_count(visual_tokens)
        return [visual_tokens] * self.layer + [r] * (num_layers - self.layer)

    def make_plan(self, request: PruningRequest, num_layers: int) -> Plan:
        keeps = [self.keep_count(int(n)) for n in request.visual_counts()]
        return _FastVPlan(self.layer, keeps)


class _FastVPlan(Plan):
    def __init__(self, layer: int, keeps: List[int]) -> None:
        self.layer = layer
        self.keeps = keeps
        self.kept: Optional[List[torch.Tensor]] = None

    def before_layer(self, view: LayerView):
        if view.layer == self.layer - 1:
            self.kept = view.keep_top_visual(view.attention(), self.keeps)
        if view.layer == self.layer:
            return self.kept
        return None
