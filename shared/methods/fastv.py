"""FastV (Chen et al., ECCV 2024): one-shot drop of visual tokens inside the LLM.

Rule (canonical, prefill only): at the input of layer K-1 take the attention of the last
instruction token over the active tokens, averaged over heads; from layer K on keep all text
tokens and the R visual tokens with the highest attention (ties: earlier position). K is the
0-based index of the first pruned layer, so the scores are those of 1-based "layer K".
Tokens are physically removed and keep their original RoPE positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..engine.plan import LayerView, Plan, PruningRequest
from .base import LayerMethod, check_layer_index, register


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
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(
                f"layer: expected an int K >= 1 (scores come from layer K-1), got {self.layer!r}; "
                f"selection before the first layer is a pre-LLM method"
            )
        if self.keep is not None and (not isinstance(self.keep, int) or self.keep <= 0):
            raise ValueError(f"keep: expected a positive number of visual tokens, got {self.keep!r}")
        if self.keep_ratio is not None and not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio: expected a fraction in (0, 1], got {self.keep_ratio!r}")

    def validate_for(self, num_layers: int) -> None:
        check_layer_index("layer", self.layer, num_layers)

    def keep_count(self, visual_tokens: int) -> int:
        """R for a sample with N = ``visual_tokens`` visual tokens."""
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
