"""Fast3D (Huang et al., 2025): object-level pruning of a 3D LLM's scene tokens from predicted attention.

Host: Chat-Scene, whose visual span holds ``n`` object slots × ``group`` tokens (identifier, 3D
feature, 2D feature; ``group = 3``, ``n = 100``). Per sample:

1. **Scores** — one logit per object from the GAP network (``shared.methods.fast3d_gap``), run
   online by ``scorer``, or given per sample by the host (``object_scores=``, e.g. a predictions file).
   Scores are indexed by *object*; slot ``i`` carries object ``slot_to_object[i]`` (Chat-Scene's
   ``assigned_ids``), so slot scores are ``scores[slot_to_object]``.
2. **Budget** — a fixed ``keep`` of R tokens (R/group objects; 15/60/90 in the paper), or SAP
   (``alpha``): p = softmax(logits) over the objects, k* = the smallest k whose k largest p sum to
   ≥ α, R = group·k*.
3. **Selection** — the k highest-scoring slots, whole triplets (ties: the lower slot), kept from
   layer ``layer`` (K; 0 for SAP) with their original positions; all system and text tokens stay.
   Decided once at prefill per sample; beams share their sample's decision.

The authors' own semantics (key masking, per-step re-selection, no compute saved) are
``shared.methods.fast3d_compat``.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from ..engine.plan import FixedSelectionPlan, Plan, PruningRequest
from .base import LayerMethod, as_int, register

SCORE_KINDS = ("logits", "attention")


def _check_scores(name: str, scores: Any, n: Optional[int] = None) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{name}: expected a float tensor of per-object scores, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor of per-object scores, got dtype {scores.dtype}")
    if scores.dim() == 0 or scores.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape (..., n_objects) with n_objects >= 1, got {tuple(scores.shape)}")
    if n is not None and (scores.dim() != 1 or scores.shape[0] != n):
        raise ValueError(f"{name}: expected shape ({n},) (one score per object slot), got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name}: scores must be finite, got NaN or inf")
    return scores


def _looks_like_attention(scores: torch.Tensor) -> bool:
    """Non-negative rows with a positive sum of at most 1: an attention map, not logits."""
    total = scores.sum(-1)
    return bool((scores >= 0).all()) and bool(((total > 0) & (total <= 1.0 + 1e-6)).all())


def sap_object_counts(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """SAP's object budget k* per row.

    logits: (..., n) float GAP logits over the n objects; alpha in (0, 1].
    Returns (...,) long: the smallest k such that the k largest softmax(logits) values sum to >= alpha
    (n when rounding keeps the full sum below alpha). The sum is accumulated in float64.
    Refuses inputs that look like attention maps (non-negative, summing to a positive mass <= 1): their softmax is
    nearly uniform and gives a meaningless budget (use logits, or a fixed ``keep``).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a probability mass in (0, 1], got {alpha!r}")
    logits = _check_scores("logits", logits)
    if _looks_like_attention(logits):
        raise ValueError(
            "logits: SAP needs GAP logits, but these scores are non-negative and sum to <= 1 (an attention map, "
            "e.g. extracted a_map targets); softmax over them is nearly uniform. Pass GAP logits, or use a fixed keep"
        )
    p = torch.softmax(logits.double(), dim=-1)
    mass = torch.sort(p, dim=-1, descending=True).values.cumsum(-1)
    n = logits.shape[-1]
    k = (mass < float(alpha)).sum(-1) + 1
    return k.clamp(max=n).long()


def given_or_online_scores(object_scores: Any, scorer: Optional[Callable[..., torch.Tensor]],
                           gap_inputs: Optional[Dict[str, Any]], owner: str) -> Tuple[Any, Dict[str, Any]]:
    """The host's per-object scores, or (None given) ``scorer(**gap_inputs)`` run under no_grad and timed.
    Returns (scores, info): info has scores_from ("given" | "gap"), and for GAP gap_seconds and, when the
    scorer counts them, gap_flops."""
    if object_scores is not None:
        return object_scores, {"scores_from": "given"}
    if scorer is None:
        raise ValueError(
            f"object_scores: {owner} needs per-object scores: give the host option object_scores= (e.g. GAP "
            f"predictions keyed by sample) or {owner}(scorer=...) to run GAP online"
        )
    if gap_inputs is None:
        raise ValueError("gap_inputs: the host gave no GAP inputs for the online scorer")
    t0 = time.perf_counter()
    with torch.no_grad():
        scores = scorer(**gap_inputs)
    info: Dict[str, Any] = {"scores_from": "gap", "gap_seconds": time.perf_counter() - t0}
    flops = getattr(scorer, "last_flops", None)
    if flops is not None:
        info["gap_flops"] = float(flops)
    return scores, info


def slot_scores(object_scores: torch.Tensor, slot_to_object: Any) -> torch.Tensor:
    """Scores in slot order: slot i carries object ``slot_to_object[i]`` (Chat-Scene's assigned_ids).

    object_scores: (n,) per object; slot_to_object: (n,) a permutation of 0..n-1 (None: identity)."""
    n = object_scores.shape[0]
    if slot_to_object is None:
        return object_scores
    perm = torch.as_tensor(slot_to_object)
    if perm.is_floating_point() or perm.dim() != 1 or perm.shape[0] != n:
        raise ValueError(f"slot_to_object: expected ({n},) integer object ids per slot, got {tuple(perm.shape)} {perm.dtype}")
    if not torch.equal(torch.sort(perm.long().cpu()).values, torch.arange(n)):
        raise ValueError(f"slot_to_object: expected a permutation of 0..{n - 1} (one object per slot)")
    return object_scores[perm.long().to(object_scores.device)]


def top_groups(scores: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """Token indices (sorted, long) of the ``k`` highest-scoring slots' whole groups.

    scores: (n,) per slot; ties go to the lower slot. Returns (k·group,) indices into the span."""
    n = scores.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"keep: {k} objects requested but the scene has {n} object slots")
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices[:k]
    slots = torch.sort(order).values
    return (slots[:, None] * group + torch.arange(group)[None, :]).flatten()


@register("fast3d")
@dataclass
class Fast3D(LayerMethod):
    """layer: K, first pruned layer (0 = before the first layer, as SAP); keep: R visual tokens (a multiple
    of the host's group size) or alpha: SAP's mass threshold; scorer: callable returning (n,) GAP logits
    from the host's ``gap_inputs`` (None: the host must give ``object_scores``); score_kind: "logits"
    (GAP output) or "attention" (extracted maps; refused by SAP)."""

    layer: int = 0
    keep: Optional[int] = None
    alpha: Optional[float] = None
    scorer: Optional[Callable[..., torch.Tensor]] = field(default=None, repr=False, compare=False)
    score_kind: str = "logits"

    uses_query = False
    uses_selection = True

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.alpha is None):
            raise ValueError("keep/alpha: give exactly one of them (a fixed R of visual tokens, or SAP's alpha)")
        self.layer = as_int("layer", self.layer, low=0, meaning="an int K (0-based first pruned layer)")
        if self.keep is not None:
            self.keep = as_int("keep", self.keep, low=1, meaning="a positive number of visual tokens R")
        if self.alpha is not None:
            a = self.alpha
            if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0.0 < float(a) <= 1.0:
                raise ValueError(f"alpha: expected a probability mass in (0, 1], got {a!r}")
            self.alpha = float(a)
        if self.score_kind not in SCORE_KINDS:
            raise ValueError(f"score_kind: expected one of {', '.join(SCORE_KINDS)}, got {self.score_kind!r}")
        if self.alpha is not None and self.score_kind != "logits":
            raise ValueError("score_kind: SAP (alpha) needs GAP logits; attention maps give a meaningless budget")
        if self.scorer is not None and not callable(self.scorer):
            raise ValueError(f"scorer: expected a callable returning per-object logits, got {type(self.scorer).__name__}")

    def needs(self) -> FrozenSet[str]:
        return frozenset({"decoder", "object_groups"})

    def validate_for(self, num_layers: int) -> None:
        if not 0 <= self.layer < num_layers:
            raise ValueError(f"layer: {self.layer} is outside the decoder; expected 0 <= layer < {num_layers}")

    # ------------------------------------------------------------ selection
    def object_budget(self, scores: torch.Tensor, group: int) -> int:
        """Objects kept for one sample with per-object ``scores`` (n,)."""
        n = scores.shape[0]
        if self.alpha is not None:
            return int(sap_object_counts(scores, self.alpha))
        if self.keep % group:
            raise ValueError(
                f"keep: R={self.keep} is not a multiple of the object group size {group}; Fast3D keeps whole "
                f"objects (e.g. 15/60/90 for groups of 3)"
            )
        k = self.keep // group
        if k > n:
            raise ValueError(f"keep: R={self.keep} exceeds the {n * group} visual tokens ({n} objects x {group})")
        return k

    def host_selection(
        self,
        visual_tokens: int,
        group: int = 1,
        slot_to_object: Any = None,
        object_scores: Optional[torch.Tensor] = None,
        gap_inputs: Optional[Dict[str, Any]] = None,
        key: Any = None,
    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The kept visual-token indices of one sample (into its span) and what was decided.

        visual_tokens: the span length (n·group); object_scores: (n,) per object, or None to run
        ``scorer(**gap_inputs)``. Returns (indices, info) with info = objects, objects_kept, budget
        (tokens), scores_from, gap_seconds and, when the scorer counts them, gap_flops."""
        group = as_int("group", group, low=1, meaning="the object group size (tokens per object)")
        if visual_tokens % group:
            raise ValueError(f"group: the visual span of {visual_tokens} tokens is not whole groups of {group}")
        n = visual_tokens // group
        object_scores, got = given_or_online_scores(object_scores, self.scorer, gap_inputs, "Fast3D")
        info: Dict[str, Any] = {"objects": n, **got}
        scores = _check_scores("object_scores", object_scores, n).detach().float()
        if self.score_kind == "logits" and self.alpha is not None and _looks_like_attention(scores):
            sap_object_counts(scores, self.alpha)  # raises with the explanation
        per_slot = slot_scores(scores, slot_to_object)
        k = self.object_budget(per_slot, group)
        info.update(objects_kept=k, budget=k * group)
        return top_groups(per_slot, k, group), info

    # ------------------------------------------------------------------ plan
    def schedule(self, visual_tokens: int, num_layers: int, kept: Optional[int] = None) -> List[int]:
        """Visual tokens per layer; ``kept``: the sample's budget (needed with SAP)."""
        self.validate_for(num_layers)
        if kept is None:
            if self.keep is None:
                raise ValueError("kept: SAP's budget depends on the sample; pass the budget it chose")
            kept = self.keep
        return [visual_tokens] * self.layer + [kept] * (num_layers - self.layer)

    def make_plan(self, request: PruningRequest, num_layers: int) -> Plan:
        self.validate_for(num_layers)
        if request.visual_selection is None:
            raise ValueError(
                "visual_selection: Fast3D selects objects from the host's scores; run it on a host that provides "
                "object_groups (shared.prune(..., host='chat_scene'))"
            )
        return FixedSelectionPlan(self.layer, list(request.visual_selection), request)


__all__ = ["Fast3D", "SCORE_KINDS", "given_or_online_scores", "sap_object_counts", "slot_scores", "top_groups"]
