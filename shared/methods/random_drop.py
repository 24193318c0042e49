"""Random pruning: the explicit, seeded baseline (Fast3D runs it implicitly as FastV with K = 0).

Rule: from layer K (0-based; 0 = before the first layer) keep all text tokens and R visual tokens
drawn uniformly without replacement, per sample, from a generator seeded by sha256(seed, sample key)
(the host's sample key, else a digest of the sample's visual embeddings), so a sample's draw does
not depend on the batch it is in. Kept tokens keep their original positions. ``group`` > 1 draws
whole consecutive groups (Chat-Scene's object triplets) instead of single tokens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..engine.plan import FixedSelectionPlan, Plan, PruningRequest
from .base import LayerMethod, as_fraction, as_int, register


def keyed_generator(seed: int, key: object) -> torch.Generator:
    """A CPU generator seeded from sha256(seed, key)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@register("random")
@dataclass
class RandomDrop(LayerMethod):
    """layer: K (first pruned layer, >= 0); keep: R visual tokens or keep_ratio: R/N; seed; group: draw
    whole groups of this many consecutive visual tokens (R must then be a multiple of it)."""

    layer: int = 0
    keep: Optional[int] = None
    keep_ratio: Optional[float] = None
    seed: int = 0
    group: int = 1

    uses_query = False

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError("keep/keep_ratio: give exactly one of them (R tokens, or R/N in (0, 1])")
        self.layer = as_int("layer", self.layer, low=0, meaning="an int K (0-based first pruned layer)")
        self.seed = as_int("seed", self.seed, meaning="an int seed")
        self.group = as_int("group", self.group, low=1, meaning="a group size >= 1")
        if self.keep is not None:
            self.keep = as_int("keep", self.keep, low=1, meaning="a positive number of visual tokens R")
        if self.keep_ratio is not None:
            self.keep_ratio = as_fraction("keep_ratio", self.keep_ratio, meaning="a fraction R/N")

    def validate_for(self, num_layers: int) -> None:
        if not 0 <= self.layer < num_layers:
            raise ValueError(f"layer: {self.layer} is outside the decoder; expected 0 <= layer < {num_layers}")

    def keep_count(self, visual_tokens: int) -> int:
        if visual_tokens == 0:
            return 0
        r = self.keep if self.keep is not None else int(visual_tokens * float(self.keep_ratio))
        if r == 0:
            raise ValueError(f"keep_ratio: {self.keep_ratio} of {visual_tokens} visual tokens keeps none")
        if r > visual_tokens:
            raise ValueError(f"keep: R={r} exceeds the {visual_tokens} visual tokens of the sample")
        if visual_tokens % self.group or r % self.group:
            raise ValueError(
                f"group: R={r} and the {visual_tokens} visual tokens must both be multiples of group={self.group}"
            )
        return r

    def draw(self, visual_tokens: int, key: object) -> torch.Tensor:
        """Sorted indices into the sample's visual tokens (R of them, whole groups)."""
        r = self.keep_count(visual_tokens)
        g = self.group
        groups = torch.randperm(visual_tokens // g, generator=keyed_generator(self.seed, key))[: r // g]
        return torch.sort((groups[:, None] * g + torch.arange(g)[None, :]).flatten()).values

    def schedule(self, visual_tokens: int, num_layers: int) -> List[int]:
        self.validate_for(num_layers)
        return [visual_tokens] * self.layer + [self.keep_count(visual_tokens)] * (num_layers - self.layer)

    def make_plan(self, request: PruningRequest, num_layers: int) -> Plan:
        self.validate_for(num_layers)
        picks = []
        for b, n in enumerate(request.visual_counts().tolist()):
            picks.append(self.draw(int(n), request.sample_key(b)) if n else torch.zeros(0, dtype=torch.long))
        return FixedSelectionPlan(self.layer, picks, request)


__all__ = ["RandomDrop", "keyed_generator"]
