"""PyramidDrop (Xing et al., CVPR 2025): staged rank-and-drop of visual tokens inside the LLM.

Rule (Cooperx521/PyramidDrop ``pdrop_rank_drop``): at each stage boundary l (0-based layer index,
default 8/16/24 for 32 layers) the next layer's ``input_layernorm`` + q/k projections + RoPE are
applied to the current hidden states; the last instruction token's softmax row over all keys
(causal mask), averaged over heads, ranks the active visual tokens; the top
``int(N · ratio_s)`` survive (ratio relative to the *original* count N, ratio_s = λ^s by default),
in their original order, from layer l on. The released code then renumbers the survivors
``arange(0, len)`` (``positions="compact"``; decoded tokens continue from each stage's length); the
default keeps each token's position in the LLM input, as FastV does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from ..engine.plan import LayerView, Plan, PruningRequest
from .base import LayerMethod, as_fraction, as_int, check_layer_index, register


@register("pdrop")
@dataclass
class PyramidDrop(LayerMethod):
    """layers: 0-based first layer of each reduced stage; ratio: λ; ratios: explicit per-stage
    retention of the original count (overrides λ), e.g. (0.5, 0.25, 0.125); positions: "original"
    (survivors keep their positions) or "compact" (renumbered 0 … n−1 after each stage, the released
    ``pdrop_rank_drop``; ``PRESETS["paper"]``)."""

    layers: Sequence[int] = field(default_factory=lambda: (8, 16, 24))
    ratio: float = 0.5
    ratios: Optional[Sequence[float]] = None
    positions: str = "original"

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
            raise ValueError(f"layers: expected a sequence of layer indices, got {self.layers!r}")
        self.layers = tuple(as_int("layers", x, meaning="integer layer indices") for x in self.layers)
        if not self.layers or any(b <= a for a, b in zip(self.layers, self.layers[1:])) or self.layers[0] < 1:
            raise ValueError(f"layers: expected strictly increasing layer indices >= 1, got {self.layers}")
        if self.ratios is not None:
            if isinstance(self.ratios, (str, bytes)) or not isinstance(self.ratios, Iterable):
                raise ValueError(f"ratios: expected a sequence of fractions, got {self.ratios!r}")
            self.ratios = tuple(as_fraction("ratios", r, low_open=False, meaning="fractions") for r in self.ratios)
            if len(self.ratios) != len(self.layers):
                raise ValueError(f"ratios: expected {len(self.layers)} values (one per stage), got {len(self.ratios)}")
            if any(b > a for a, b in zip(self.ratios, self.ratios[1:])):
                raise ValueError(f"ratios: expected non-increasing fractions in [0, 1], got {self.ratios}")
        else:
            self.ratio = as_fraction("ratio", self.ratio, meaning="λ")
        if self.positions not in ("original", "compact"):
            raise ValueError(f"positions: expected 'original' or 'compact', got {self.positions!r}")

    def stage_ratios(self) -> List[float]:
        if self.ratios is not None:
            return list(self.ratios)
        return [float(self.ratio) ** (s + 1) for s in range(len(self.layers))]

    def validate_for(self, num_layers: int) -> None:
        for x in self.layers:
            check_layer_index("layers", x, num_layers)

    def keep_counts(self, visual_tokens: int) -> List[int]:
        """Visual tokens kept from each stage boundary on: int(N · ratio_s)."""
        return [int(visual_tokens * r) for r in self.stage_ratios()]

    def schedule(self, visual_tokens: int, num_layers: int) -> List[int]:
        self.validate_for(num_layers)
        out = [visual_tokens] * num_layers
        for start, k in zip(self.layers, self.keep_counts(visual_tokens)):
            for j in range(start, num_layers):
                out[j] = k
        return out

    def make_plan(self, request: PruningRequest, num_layers: int) -> Plan:
        counts = [self.keep_counts(int(n)) for n in request.visual_counts()]
        return _PDropPlan(self.layers, counts)


class _PDropPlan(Plan):
    def __init__(self, layers: Sequence[int], counts: List[List[int]]) -> None:
        self.stage_of = {layer: s for s, layer in enumerate(layers)}
        self.counts = counts

    def before_layer(self, view: LayerView):
        s = self.stage_of.get(view.layer)
        if s is None:
            return None
        return view.keep_top_visual(view.attention(), [c[s] for c in self.counts])


def matched(r: float, layers: Sequence[int] = (8, 16, 24), positions: str = "compact") -> PyramidDrop:
    """PyramidDrop whose last stage keeps the fraction ``r`` of the N visual tokens (AdaToken-3D's "ratio r",
    note §6.5 item 7): λ = r^(1/S) over the S stages, per-stage ratios (λ, λ², …, λ^(S−1), r) with the last
    one exactly ``r``, so the last stage keeps int(N·r) = ⌊r·N⌋ (for r = 0.1, 0.2, 0.4 the double nearest r lies
    above r, so int() never falls one short)."""
    r = as_fraction("r", r, meaning="the last stage's retention")
    layers = tuple(layers)
    lam = r ** (1.0 / len(layers))
    ratios = tuple(lam ** (s + 1) for s in range(len(layers) - 1)) + (r,)
    return PyramidDrop(layers=layers, ratio=lam, ratios=ratios, positions=positions)


#: Presets (``--method pdrop --method-args preset=NAME``), all with the released rule (compact positions):
#:
#: - ``paper``: the released configuration, λ = 0.5 at layers 8/16/24 of 32 (stages keep 50/25/12.5 %);
#: - ``matched_r10`` / ``matched_r20`` / ``matched_r40``: AdaToken-3D's comparison at ratio r = 10/20/40 %,
#:   λ = r^(1/3) ≈ 0.464 / 0.585 / 0.737 at layers 8/16/24, the last stage keeping ⌊r·N⌋ (``matched``).
PRESETS: Dict[str, PyramidDrop] = {
    "paper": PyramidDrop(layers=(8, 16, 24), ratio=0.5, positions="compact"),
    **{f"matched_r{round(r * 100)}": matched(r) for r in (0.1, 0.2, 0.4)},
}
