"""SeGPruner (intcomp/SegPruner): saliency-aware token selector + geometry-aware token diversifier.

A pre-LLM selector over the P vision tokens of each of V views (before the projector). It keeps T tokens
(per view, or per scene) by

1. **Important tokens.** Sort by saliency (``shared.scoring.received_attention``: attention received in the
   tower's last layer, column mean over queries, then over heads), descending; the first K = ⌊T·r⌋ are kept.
   K is computed as ``int(T * r)``, the released expression (so T=100, r=0.29 gives 28, not 29).
2. **Diverse tokens.** The remaining tokens, still in descending saliency, go to farthest-point sampling
   (``shared.methods.segpruner_fps.fused_fps``) for M = T − K picks, starting at the most salient one, under the fused distance
   λ·d/dx + (1 − λ)·(1 − cos(F̂_i, F̂_j)): d is the Euclidean distance of the patches' mean 3D points (metres),
   F̂ the L2-normalised pre-projector features, dx the normaliser (``"first_centroid"``, released: the largest
   distance from the first pick; ``"diameter"``: the largest distance between two candidates).

Modes:

- ``"per_view"`` is the released ``farthest_point_sample`` exactly, each view alone with its own budget T
  (every view keeps T tokens; poses cancel out). Saliency ties go to the lower token index (a stable
  descending sort; the released ``argsort(descending=True)`` is not stable, so its order among exactly equal
  scores is backend-defined). FPS ties go to the more salient token (first arg-max in residual order, as in
  the released loop). The rule is evaluated in float64 (``shared.methods.segpruner_fps``: float32 BLAS with a rigorous error
  bound, near-ties resolved with float64 reference values, so the kept set is the float64 one). The
  released code runs in the tower's dtype: in float32 it decides near-ties below float32 resolution by
  rounding (the benchmark's random features: 0, 0 and 1 of 768, 2,352 and 4,716 kept tokens differ at
  T = 64, 196, 393), and in bfloat16, whose cosines carry ~4e-3 of rounding, 205, 568 and 657 differ.
- ``"per_scene"`` is the paper's description: ``tokens`` = T is the budget of the whole scene. The K most
  salient tokens of the scene are kept, then one FPS runs over all remaining tokens of all views in the
  shared world frame (distances in metres across views, dx over the scene), so a surface seen by two views
  is paid for once. Per-view counts vary. Saliency is compared across views after dividing each view's
  scores by their sum: ``received_attention`` is a distribution over the view's P tokens (rows sum to 1), so
  this is a no-op for it and makes any other non-negative score scale-free per view. Ties: lower view, then
  lower token index. Needs centroids of all views in one consistent world frame.

Geometry validity: ``geo_valid[v, k] = False`` marks a patch without valid depth. Such tokens are never picked
by the diversifier (their centroids are not read and may be NaN) and do not enter dx; saliency does not
depend on depth, so they can still be important tokens. The diversifier needs M candidates with valid
geometry outside the important set, else ``select`` raises naming ``tokens``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar, FrozenSet, Optional

import torch

from .segpruner_fps import NORMALIZERS, all_finite, fused_fps
from .base import register

MODES = ("per_view", "per_scene")


def _fraction(name: str, value: object, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected {meaning} in [0, 1], got {value!r}")
    return float(value)


def _shape(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


@register("segpruner")
@dataclass
class SeGPruner:
    """tokens: T (per view in ``per_view``, per scene in ``per_scene``); important_ratio: r (K = int(T·r)
    important tokens); lam: λ, weight of the geometric term; mode: ``"per_view"`` | ``"per_scene"``;
    normalizer: ``"first_centroid"`` (released) | ``"diameter"``."""

    tokens: int = 64
    important_ratio: float = 0.0
    lam: float = 0.5
    mode: str = "per_view"
    normalizer: str = "first_centroid"

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, numbers.Integral) or self.tokens < 1:
            raise ValueError(f"tokens: expected an int >= 1 (tokens kept), got {self.tokens!r}")
        self.tokens = int(self.tokens)
        self.important_ratio = _fraction("important_ratio", self.important_ratio, "a fraction r")
        self.lam = _fraction("lam", self.lam, "a weight λ")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer: expected one of {', '.join(NORMALIZERS)}, got {self.normalizer!r}")

    stage: ClassVar[str] = "pre_llm"

    def needs(self) -> FrozenSet[str]:
        """Tower features and last-layer attention; 3D geometry unless every token is picked by saliency."""
        base = {"vision_features", "token_subset"}
        return frozenset(base | ({"geometry"} if self.diverse_count > 0 else set()))

    @property
    def important_count(self) -> int:
        """K = int(T · r), the released expression."""
        return int(self.tokens * self.important_ratio)

    @property
    def diverse_count(self) -> int:
        """M = T − K, the farthest-point picks."""
        return self.tokens - self.important_count

    @torch.no_grad()
    def select(
        self,
        saliency: torch.Tensor,
        features: torch.Tensor,
        centroids: torch.Tensor,
        geo_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Keep mask of the visual tokens.

        saliency: (V, P) scores (e.g. ``received_attention``); features: (V, P, C) pre-projector features;
        centroids: (V, P, 3) mean world point of each patch in metres (only read where ``geo_valid``);
        geo_valid: optional (V, P) bool, patches with valid depth (default: all).
        Returns (V, P) bool on the inputs' device: T per view (``per_view``) or T in all (``per_scene``).
        """
        valid = self._check(saliency, features, centroids, geo_valid)
        if self.mode == "per_view":
            return self._per_view(saliency, features, centroids, valid)
        return self._per_scene(saliency, features, centroids, valid)

    # -- validation -------------------------------------------------------------------------------------

    def _check(self, saliency, features, centroids, geo_valid) -> torch.Tensor:
        if not isinstance(saliency, torch.Tensor) or saliency.dim() != 2 or not saliency.is_floating_point():
            raise ValueError(f"saliency: expected a (V, P) floating tensor, got {_shape(saliency)}")
        v, p = saliency.shape
        if v < 1 or p < 1:
            raise ValueError(f"saliency: expected at least one view and one token, got {tuple(saliency.shape)}")
        if (not isinstance(features, torch.Tensor) or features.dim() != 3 or tuple(features.shape[:2]) != (v, p)
                or features.shape[2] < 1 or not features.is_floating_point()):
            raise ValueError(f"features: expected a ({v}, {p}, C) floating tensor, got {_shape(features)}")
        if (not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != (v, p, 3)
                or not centroids.is_floating_point()):
            raise ValueError(f"centroids: expected a ({v}, {p}, 3) floating tensor in metres, got {_shape(centroids)}")
        device = saliency.device
        for name, t in (("features", features), ("centroids", centroids)):
            if t.device != device:
                raise ValueError(f"{name}: expected the device of saliency ({device}), got {t.device}")
        if geo_valid is None:
            valid = torch.ones(v, p, dtype=torch.bool, device=device)
        elif not isinstance(geo_valid, torch.Tensor) or geo_valid.dtype != torch.bool or tuple(geo_valid.shape) != (v, p):
            raise ValueError(f"geo_valid: expected a ({v}, {p}) bool tensor or None, got {_shape(geo_valid)}")
        else:
            valid = geo_valid.to(device)
        if not all_finite(saliency):
            raise ValueError("saliency: contains NaN or infinite values")
        if not all_finite(features):
            raise ValueError("features: contains NaN or infinite values")
        if not all_finite(centroids[valid]):
            raise ValueError("centroids: NaN or infinite coordinates on tokens marked valid "
                             "(set geo_valid False for patches without depth)")
        limit = p if self.mode == "per_view" else v * p
        if self.tokens > limit:
            where = "tokens per view" if self.mode == "per_view" else f"tokens in the scene ({v} views × {p})"
            raise ValueError(f"tokens: expected an int in [1, {limit}] ({where}), got {self.tokens}")
        return valid

    def _too_few(self, where: str, have: int) -> ValueError:
        k, m = self.important_count, self.diverse_count
        return ValueError(
            f"tokens: {where} has {have} tokens with valid geometry outside its {k} important ones, but the "
            f"diversifier needs {m} (tokens={self.tokens}, important_ratio={self.important_ratio}); lower "
            f"tokens or raise important_ratio"
        )

    # -- modes ------------------------------------------------------------------------------------------

    def _per_view(self, saliency, features, centroids, valid) -> torch.Tensor:
        v, p = saliency.shape
        k, m = self.important_count, self.diverse_count
        order = torch.sort(saliency, dim=1, descending=True, stable=True).indices       # (V, P)
        important, residual = order[:, :k], order[:, k:]
        mask = torch.zeros(v, p, dtype=torch.bool, device=saliency.device)
        mask.scatter_(1, important, True)
        if m == 0:
            return mask
        cand = valid.gather(1, residual)                                               # (V, R)
        counts = cand.sum(dim=1)
        if bool((counts < m).any()):
            bad = int(torch.nonzero(counts < m)[0, 0])
            raise self._too_few(f"view {bad}", int(counts[bad]))
        picks = fused_fps(centroids, features, m, self.lam, order=residual, candidates=cand,
                          normalizer=self.normalizer)
        mask.scatter_(1, picks, True)
        return mask

    def _per_scene(self, saliency, features, centroids, valid) -> torch.Tensor:
        v, p = saliency.shape
        k, m = self.important_count, self.diverse_count
        s = saliency.detach().to(torch.float64)
        if bool((s < 0).any()):
            raise ValueError("saliency: per_scene compares views after normalising each view's scores to sum 1; "
                             "expected non-negative scores")
        sums = s.sum(dim=1, keepdim=True)
        if bool((sums <= 0).any()):
            raise ValueError(f"saliency: view {int(torch.nonzero(sums.squeeze(1) <= 0)[0, 0])} has all-zero scores; "
                             f"per_scene needs a positive sum per view")
        order = torch.sort((s / sums).reshape(-1), descending=True, stable=True).indices  # view-major flat index
        important, residual = order[:k], order[k:]
        mask = torch.zeros(v * p, dtype=torch.bool, device=saliency.device)
        mask[important] = True
        if m > 0:
            cand = valid.reshape(-1)[residual]
            have = int(cand.sum())
            if have < m:
                raise self._too_few("the scene", have)
            picks = fused_fps(centroids.reshape(1, v * p, 3), features.reshape(1, v * p, -1), m, self.lam,
                              order=residual.unsqueeze(0), candidates=cand.unsqueeze(0), normalizer=self.normalizer)
            mask[picks[0]] = True
        return mask.view(v, p)


__all__ = ["MODES", "SeGPruner"]
