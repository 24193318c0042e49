"""AdaToken-3D (reconstructed): information-flow curve → fitted retention schedule → PDrop-ranked drops.

Notation and interpretations: ``shared/notes/hosts-and-methods/LLaVA-3D-AdaToken-3D.md`` §6.2–6.5. Layers are
1-indexed in the equations (i = 1..L) and 0-indexed in the engine (layer l = i − 1). O(i) is the fraction of the
original N spatial tokens present in layer i's input.

- Eq.1 S_self(i) = Σ_{q∈SPA, k∈SPA, k<q} Ā⁽ⁱ⁾[q, k]                       (per-row mean: / N)
- Eq.2 F(i)      = σ·S_self(i) + γ·F(i−1), F(0) = 0                      (σ = 0.73, γ = 1 − σ = 0.27)
- Eq.3 S_cross(i) = a₁·λ_sp(i) + a₂·λ_ss(i); λ_sp = Σ PRM→SPA (/ |PRM|), λ_ss = Σ SPA→SYS (/ N)   (a₁ = 0.3, a₂ = 0.7)
- Eq.4 INF(i)    = exp(S_cross(i)/ε) + α_i·F(i) + log(1 + S_self(i))     (α_i = 0.3, ε = 1)
  ``code_linear``: 0.4·S_self + 0.3·S_cross + 0.3·F with γ = 1 (the unofficial ``calculate_EMA_information``)
- Eq.5 O(i)      = α·exp(−β(i − L_c)) + M
- Eq.6 I(i)      = (INF(i) − min INF)/(max INF − min INF)
- Eq.7 𝐋(θ)      = Σ (O(i) − I(i))² + λ·Σ (O'(i) − I'(i))², central differences (``np.gradient``), λ = 1
- SLSQP on θ = (α, β, L_c, M) with O(1) = 1, O(L) = r; α ∈ [0.5, 1.2], β ∈ [1e-3, 5], L_c ∈ [1, L], M ∈ [0, 1];
  initial guess (0.8, 0.1, 1, 0).
- Budgets k_i = max(1, ⌊O(i)·N_b⌋) per sample (N_b: that sample's spatial tokens; LLaVA-3D's voxel count varies by
  scene), made non-increasing; the engine ranks as the released PyramidDrop does (the consuming layer's q/k, last
  prompt token, compact positions) at every layer where some sample's budget drops.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..engine.plan import Plan, PruningRequest
from .base import LayerMethod, as_int, check_layer_index, register
from .pyramid_drop import _PDropPlan

#: Eq.2–4 constants (§6.5 item 3)
SIGMA, GAMMA, A1, A2, ALPHA_I, EPS = 0.73, 0.27, 0.3, 0.7, 0.3, 1.0
#: the unofficial code's linear combination (``calculate_EMA_information``): weights on S_self, S_cross, F; γ = 1
CODE_LINEAR_WEIGHTS = (0.4, 0.3, 0.3)
#: Eq.5 bounds and initial guess for (α, β, L_c, M); L_c's upper bound is the layer count L
BOUNDS = ((0.5, 1.2), (1e-3, 5.0), (1.0, None), (0.0, 1.0))
INITIAL = (0.8, 0.1, 1.0, 0.0)
#: largest accepted violation of the boundary equalities after SLSQP
CONSTRAINT_TOL = 1e-8
VARIANTS = ("paper", "code_linear")
SCALES = ("row_mean", "raw")


def _curve(param: str, values: object, length: Optional[int] = None) -> np.ndarray:
    """``values`` as a finite 1-D float64 array (of ``length`` if given)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{param}: expected a 1-D sequence of per-layer numbers, got shape {arr.shape}")
    if length is not None and arr.size != length:
        raise ValueError(f"{param}: expected {length} values (one per layer), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{param}: expected finite numbers, got {arr.tolist()}")
    return arr


@dataclass
class SpanBlockSums:
    """Per-layer sums of the head-averaged prefill attention Ā⁽ⁱ⁾[query, key] over span blocks (§6.2).

    spa_spa: (L,) Σ over SPA queries q and SPA keys k < q (strict lower triangle, self excluded).
    prm_spa: (L,) Σ over PRM queries and SPA keys.
    spa_sys: (L,) Σ over SPA queries and SYS keys.
    spa_rows / prm_rows: number of SPA / PRM query rows summed (N and |PRM|, summed over samples when the
    sums are accumulated over several prompts); the per-row means divide by them.
    """

    spa_spa: Sequence[float]
    prm_spa: Sequence[float]
    spa_sys: Sequence[float]
    spa_rows: int
    prm_rows: int

    def __post_init__(self) -> None:
        self.spa_spa = _curve("spa_spa", self.spa_spa)
        n = self.spa_spa.size
        self.prm_spa = _curve("prm_spa", self.prm_spa, n)
        self.spa_sys = _curve("spa_sys", self.spa_sys, n)
        for name in ("spa_spa", "prm_spa", "spa_sys"):
            if np.any(getattr(self, name) < 0):
                raise ValueError(f"{name}: expected non-negative attention sums, got {getattr(self, name).tolist()}")
        self.spa_rows = as_int("spa_rows", self.spa_rows, low=1, meaning="the number of SPA query rows")
        self.prm_rows = as_int("prm_rows", self.prm_rows, low=1, meaning="the number of PRM query rows")

    @property
    def num_layers(self) -> int:
        return int(self.spa_spa.size)


@dataclass
class InformationTerms:
    """Eq.1–4 per layer (each (L,)): s_self, f (Eq.2), s_cross, inf."""

    s_self: np.ndarray
    f: np.ndarray
    s_cross: np.ndarray
    inf: np.ndarray


def information_flow(sums: SpanBlockSums, variant: str = "paper", scale: str = "row_mean") -> InformationTerms:
    """Eq.1–4 from span-block sums. variant: "paper" (Eq.4, γ = 0.27) or "code_linear" (0.4·S_self +
    0.3·S_cross + 0.3·F, γ = 1); scale: "row_mean" (§6.5 item 2: S_self/N, λ_sp/|PRM|, λ_ss/N) or "raw" sums."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "row_mean":
        s_self = sums.spa_spa / sums.spa_rows
        lam_sp, lam_ss = sums.prm_spa / sums.prm_rows, sums.spa_sys / sums.spa_rows
    else:
        s_self, lam_sp, lam_ss = sums.spa_spa.copy(), sums.prm_spa.copy(), sums.spa_sys.copy()
    gamma = GAMMA if variant == "paper" else 1.0
    f = np.zeros_like(s_self)
    prev = 0.0
    for i, s in enumerate(s_self):
        prev = SIGMA * s + gamma * prev
        f[i] = prev
    s_cross = A1 * lam_sp + A2 * lam_ss
    if variant == "paper":
        with np.errstate(over="raise"):
            try:
                inf = np.exp(s_cross / EPS) + ALPHA_I * f + np.log1p(s_self)
            except FloatingPointError:
                raise ValueError(f"scale: exp(S_cross/ε) overflows with scale={scale!r} (max S_cross "
                                 f"{float(s_cross.max()):.4g}); use scale='row_mean'") from None
    else:
        w_self, w_cross, w_f = CODE_LINEAR_WEIGHTS
        inf = w_self * s_self + w_cross * s_cross + w_f * f
    return InformationTerms(s_self=s_self, f=f, s_cross=s_cross, inf=inf)


def min_max(inf_curve: Sequence[float]) -> np.ndarray:
    """Eq.6: (INF − min)/(max − min) over layers; a constant curve has no normalisation and is refused."""
    x = _curve("inf_curve", inf_curve)
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        raise ValueError(f"inf_curve: expected a curve that varies over layers (min-max is undefined), got constant {lo}")
    return (x - lo) / (hi - lo)


def retention_curve(alpha: float, beta: float, l_c: float, m: float, num_layers: int) -> np.ndarray:
    """Eq.5 at i = 1..num_layers: (L,) α·exp(−β(i − L_c)) + M."""
    i = np.arange(1, num_layers + 1, dtype=np.float64)
    return alpha * np.exp(-beta * (i - l_c)) + m


def eq7_loss(retention: Sequence[float], target: Sequence[float], lam: float = 1.0) -> float:
    """Eq.7: Σ (O − I)² + λ·Σ (∇O − ∇I)², ∇ = ``np.gradient`` (central differences, one-sided at the ends)."""
    o, t = np.asarray(retention, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if o.shape != t.shape or o.ndim != 1 or o.size < 2:
        raise ValueError(f"retention: expected a 1-D curve of the target's length (>= 2), got {o.shape} vs {t.shape}")
    return float(np.sum((o - t) ** 2) + lam * np.sum((np.gradient(o) - np.gradient(t)) ** 2))


def budgets_for(retention: Sequence[float], visual_tokens: int) -> List[int]:
    """Per layer k_i = max(1, ⌊O(i)·N⌋), made non-increasing (running minimum)."""
    n = as_int("visual_tokens", visual_tokens, low=1, meaning="a number of visual tokens")
    out: List[int] = []
    for o in retention:
        k = max(1, min(n, int(math.floor(float(o) * n))))
        out.append(k if not out else min(out[-1], k))
    return out


@dataclass
class AdaTokenSchedule:
    """A fitted AdaToken-3D schedule.

    r: retention at the last layer (O(L) = r). alpha, beta, L_c, M: Eq.5's θ (amplitude, rate, centre offset,
    floor). retention: (L,) O(i), i = 1..L. budgets: (L,) visual tokens kept at each layer's input for
    ``visual_tokens`` = N. provenance: where it came from (fit settings, calibration description).
    """

    r: float
    alpha: float
    beta: float
    L_c: float
    M: float
    retention: Tuple[float, ...]
    budgets: Tuple[int, ...]
    visual_tokens: int
    provenance: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.retention = tuple(float(x) for x in _curve("retention", self.retention))
        self.budgets = tuple(as_int("budgets", k, low=1, meaning="per-layer token counts") for k in self.budgets)
        if len(self.budgets) != len(self.retention):
            raise ValueError(f"budgets: expected {len(self.retention)} values (one per layer), got {len(self.budgets)}")
        if any(b > a for a, b in zip(self.budgets, self.budgets[1:])):
            raise ValueError(f"budgets: expected non-increasing counts, got {list(self.budgets)}")
        self.visual_tokens = as_int("visual_tokens", self.visual_tokens, low=1, meaning="a number of visual tokens")

    @property
    def num_layers(self) -> int:
        return len(self.retention)

    def budgets_for(self, visual_tokens: int) -> List[int]:
        """k_i for a sample with ``visual_tokens`` spatial tokens (the stored ``budgets`` at N)."""
        return budgets_for(self.retention, visual_tokens)

    def to_json(self) -> str:
        return json.dumps({
            "r": self.r,
            "theta": {"alpha": self.alpha, "beta": self.beta, "L_c": self.L_c, "M": self.M},
            "retention": list(self.retention),
            "budgets": list(self.budgets),
            "visual_tokens": self.visual_tokens,
            "provenance": self.provenance,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "AdaTokenSchedule":
        d = json.loads(text)
        keys = {"r", "theta", "retention", "budgets", "visual_tokens", "provenance"}
        if not isinstance(d, dict) or not keys <= set(d) or not {"alpha", "beta", "L_c", "M"} <= set(d["theta"]):
            raise ValueError(f"text: expected a schedule JSON with keys {sorted(keys)} and theta alpha/beta/L_c/M")
        th = d["theta"]
        return cls(r=d["r"], alpha=th["alpha"], beta=th["beta"], L_c=th["L_c"], M=th["M"], retention=d["retention"],
                   budgets=d["budgets"], visual_tokens=d["visual_tokens"], provenance=d["provenance"])


def fit_schedule(inf_curve: Sequence[float], r: float, visual_tokens: int, lam: float = 1.0,
                 initial: Sequence[float] = INITIAL, provenance: Optional[Dict[str, Any]] = None) -> AdaTokenSchedule:
    """Fit Eq.5 to the min-max INF (Eq.6) under Eq.7 with SLSQP, O(1) = 1 and O(L) = r (§6.3, §6.5 items 4–6).

    inf_curve: (L,) INF(i), i = 1..L (un-normalised). r: last-layer retention in (0, 1). visual_tokens: N for the
    stored budgets. Raises RuntimeError when SLSQP fails or misses the boundary equalities by > ``CONSTRAINT_TOL``.
    The stored O(1), O(L) are the constraints' exact values (1, r).
    """
    from scipy.optimize import minimize

    target = min_max(inf_curve)
    num_layers = target.size
    if num_layers < 3:
        raise ValueError(f"inf_curve: expected at least 3 layers, got {num_layers}")
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 < float(r) < 1.0:
        raise ValueError(f"r: expected the last-layer retention as a fraction in (0, 1), got {r!r}")
    r = float(r)
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not float(lam) >= 0.0:
        raise ValueError(f"lam: expected Eq.7's derivative weight λ >= 0, got {lam!r}")
    x0 = _curve("initial", initial, 4)
    bounds = [(lo, float(num_layers) if hi is None else hi) for lo, hi in BOUNDS]
    if any(not lo <= v <= hi for v, (lo, hi) in zip(x0, bounds)):
        raise ValueError(f"initial: expected (α, β, L_c, M) within the bounds {bounds}, got {x0.tolist()}")

    def curve(th: np.ndarray) -> np.ndarray:
        return retention_curve(th[0], th[1], th[2], th[3], num_layers)

    cons = [{"type": "eq", "fun": lambda th: curve(th)[0] - 1.0},
            {"type": "eq", "fun": lambda th: curve(th)[-1] - r}]
    res = minimize(lambda th: eq7_loss(curve(th), target, lam), x0, method="SLSQP", bounds=bounds,
                   constraints=cons, options={"ftol": 1e-12, "maxiter": 1000})
    o = curve(res.x)
    miss = max(abs(o[0] - 1.0), abs(o[-1] - r))
    if not res.success or miss > CONSTRAINT_TOL:
        raise RuntimeError(f"fit_schedule: SLSQP did not converge ({res.message}; boundary miss {miss:.3g})")
    o[0], o[-1] = 1.0, r
    import scipy

    prov = {"fit": {"method": "SLSQP", "scipy": scipy.__version__, "lam": float(lam), "initial": x0.tolist(),
                    "bounds": [list(b) for b in bounds], "loss": float(res.fun), "iterations": int(res.nit),
                    "inf_norm": target.tolist()}}
    prov.update(provenance or {})
    alpha, beta, l_c, m = (float(v) for v in res.x)
    return AdaTokenSchedule(r=r, alpha=alpha, beta=beta, L_c=l_c, M=m, retention=tuple(o),
                            budgets=tuple(budgets_for(o, visual_tokens)), visual_tokens=visual_tokens, provenance=prov)


def _load_fitted(value: object) -> AdaTokenSchedule:
    """``fitted`` as a schedule: an ``AdaTokenSchedule`` as is, a path (str / PathLike) read as its JSON."""
    if isinstance(value, AdaTokenSchedule):
        return value
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"fitted: expected an AdaTokenSchedule or the path of its JSON (AdaTokenSchedule.to_json), "
                         f"got {value!r} ({type(value).__name__})")
    path = os.fspath(value)
    if not os.path.isfile(path):
        raise ValueError(f"fitted: no schedule JSON at {path!r} (expected the file AdaTokenSchedule.to_json wrote)")
    try:
        with open(path, encoding="utf-8") as f:
            return AdaTokenSchedule.from_json(f.read())
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"fitted: {path!r} is not an AdaToken-3D schedule JSON ({type(e).__name__}: {e})") from None


@register("adatoken3d")
@dataclass
class AdaToken3D(LayerMethod):
    """AdaToken-3D's inference plan: the fitted schedule's budgets, ranked as the released PyramidDrop ranks.

    fitted: the fitted ``AdaTokenSchedule``, or the path (str / PathLike) of its JSON; the loaded schedule is
    ``fitted_schedule`` (the field keeps what was given, so a run records the path). Not named ``schedule``: that
    is ``LayerMethod.schedule``, the per-layer token counts.

    Budgets are per sample: a sample with N_b spatial tokens keeps k_i = ``fitted_schedule.budgets_for(N_b)``
    (max(1, ⌊O(i)·N_b⌋), non-increasing) from layer i − 1 on, so LLaVA-3D scenes with different voxel counts
    each follow the curve. Ranking happens at every layer where some sample's budget drops (a sample whose budget
    does not drop there keeps all its tokens); ``prune_layers`` (0-based, >= 1) restricts ranking to those layers,
    each sample dropping to its own budget of that layer. Layer 0 never drops (O(1) = 1 is required).

    visual_tokens: optional N; when given, every sample with visual tokens must bring exactly N (a guard for a
    fixed-geometry run) and ``schedule`` accepts only N. positions: "compact" (survivors renumbered after each
    drop, as the released PDrop) or "original".
    """

    fitted: Union[AdaTokenSchedule, str, os.PathLike]
    visual_tokens: Optional[int] = None
    prune_layers: Optional[Sequence[int]] = None
    positions: str = "compact"

    def __post_init__(self) -> None:
        sched = _load_fitted(self.fitted)
        ret = sched.retention
        if ret[0] != 1.0:
            raise ValueError(f"fitted: expected O(1) = 1 (layer 0 sees every spatial token), "
                             f"got retention[0] = {ret[0]}")
        if any(not 0.0 <= o <= 1.0 for o in ret):
            raise ValueError(f"fitted: expected retention fractions in [0, 1], got {list(ret)}")
        self._fitted = sched
        if self.visual_tokens is not None:
            self.visual_tokens = as_int("visual_tokens", self.visual_tokens, low=1, meaning="a number of visual tokens")
        if self.prune_layers is not None:
            if isinstance(self.prune_layers, (str, bytes)) or not isinstance(self.prune_layers, Iterable):
                raise ValueError(f"prune_layers: expected a sequence of layer indices, got {self.prune_layers!r}")
            self.prune_layers = tuple(as_int("prune_layers", x, meaning="integer layer indices")
                                      for x in self.prune_layers)
            if not self.prune_layers or any(b <= a for a, b in zip(self.prune_layers, self.prune_layers[1:])):
                raise ValueError(f"prune_layers: expected strictly increasing layer indices, got {self.prune_layers}")
        if self.positions not in ("original", "compact"):
            raise ValueError(f"positions: expected 'original' or 'compact', got {self.positions!r}")

    @property
    def fitted_schedule(self) -> AdaTokenSchedule:
        """The schedule ``fitted`` names (loaded once, at construction)."""
        return self._fitted

    def validate_for(self, num_layers: int) -> None:
        if num_layers != self._fitted.num_layers:
            raise ValueError(f"fitted: fitted for {self._fitted.num_layers} layers, the decoder has {num_layers}")
        for x in self.prune_layers or ():
            check_layer_index("prune_layers", x, num_layers)

    def _check_count(self, n: int) -> None:
        if self.visual_tokens is not None and n and n != self.visual_tokens:
            raise ValueError(f"visual_tokens: this config is for N = {self.visual_tokens} visual tokens per sample, "
                             f"got a sample with {n}")

    def schedule(self, visual_tokens: int, num_layers: int) -> List[int]:
        """(num_layers,) visual tokens each layer sees for a sample with N = ``visual_tokens``: the budgets for
        N (or their samples at ``prune_layers``); all 0 for N = 0."""
        n = as_int("visual_tokens", visual_tokens, low=0, meaning="a number of visual tokens")
        self._check_count(n)
        self.validate_for(num_layers)
        out = [n] * num_layers
        if n == 0:
            return out
        full = self._fitted.budgets_for(n)
        cur = n
        for layer in (self.prune_layers if self.prune_layers is not None else range(1, num_layers)):
            cur = min(cur, full[layer])
            for j in range(layer, num_layers):
                out[j] = cur
        return out

    def make_plan(self, request: PruningRequest, num_layers: int) -> Plan:
        per = [self.schedule(int(n), num_layers) for n in request.visual_counts()]
        layers = [j for j in range(1, num_layers) if any(s[j] < s[j - 1] for s in per)]
        return _PDropPlan(layers, [[s[j] for j in layers] for s in per])


__all__ = [
    "AdaToken3D",
    "AdaTokenSchedule",
    "InformationTerms",
    "SpanBlockSums",
    "budgets_for",
    "eq7_loss",
    "fit_schedule",
    "information_flow",
    "min_max",
    "retention_curve",
]
