"""LVLM_CSP clustering stage: which Nc of the N image tokens the first Lc decoder layers see.

Pure functions over a G×G CLIP patch grid (N = G², row-major token k = r·G + c). Each selector
returns a sorted 1-D ``torch.long`` tensor of distinct indices in [0, N) (sorted so the causal order
of the kept tokens is the original one).

- ``random_tokens``: Nc indices uniformly without replacement (seeded generator).
- ``uniform_tokens``: the paper's Eq. 2 as printed (``layout="literal"``: S[i] = i·⌊N/Nc⌋, a 1-D
  stride over the flattened grid, which on a 2-D grid collapses onto a few columns), or a 2-D
  lattice (``layout="grid"``).
- ``cls_tokens``: the Nc highest CLS-attention scores (Eq. 3), ties to the lower index.
- ``seg_first_tokens``: Eq. 4-5, quotas proportional to instance areas drawn from each instance's
  patches (the masks come from ``shared.segfirst``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

UNIFORM_LAYOUTS = ("literal", "grid")
BUDGETS = ("paper", "exact")
FALLBACKS = ("uniform", "random")


# ----------------------------------------------------------------------------------------- checks
def _check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an int in {rng}, got {value}")
    return value


def _check_n_nc(n: int, nc: int) -> None:
    _check_int("n", n, 1)
    _check_int("nc", nc, 1, n)


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected a seeded torch.Generator (torch.Generator().manual_seed(s)), "
            f"got {type(generator).__name__}"
        )


def grid_side(n: int) -> int:
    """G for a square grid of N = G² tokens; ValueError naming ``n`` otherwise."""
    _check_int("n", n, 1)
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"n: expected a square number of tokens (G×G grid), got {n}")
    return g


def _sorted_long(idx: torch.Tensor) -> torch.Tensor:
    return torch.sort(idx.to(torch.long).reshape(-1)).values


# -------------------------------------------------------------------------------------- selectors
def random_tokens(n: int, nc: int, generator: torch.Generator) -> torch.Tensor:
    """Nc of N indices uniformly without replacement (``randperm`` of ``generator``), sorted. Shape (Nc,)."""
    _check_n_nc(n, nc)
    _check_generator(generator)
    return _sorted_long(torch.randperm(n, generator=generator)[:nc])


def grid_lattice_shape(n: int, nc: int) -> Tuple[int, int]:
    """Rows × cols of the ``layout="grid"`` lattice for Nc points on the G×G grid (N = G²).

    Exact factorisation first: among r·c = Nc with r ≤ c ≤ G take the most square one (smallest
    c − r), accepted if c ≤ 2r. Otherwise (Nc prime, or only elongated factor pairs) the near-square
    lattice r = ⌈√Nc⌉, c = ⌈Nc / r⌉ (r·c ≥ Nc; r, c ≤ G because Nc ≤ G²).
    """
    g = grid_side(n)
    _check_int("nc", nc, 1, n)
    best = None
    for r in range(1, math.isqrt(nc) + 1):
        if nc % r == 0:
            c = nc // r
            if c <= g:
                best = (r, c)  # r grows, so the last admissible pair is the most square one
    if best is not None and best[1] <= 2 * best[0]:
        return best
    r = math.isqrt(nc)
    if r * r < nc:
        r += 1
    return r, -(-nc // r)


def uniform_tokens(n: int, nc: int, layout: str = "literal") -> torch.Tensor:
    """Uniform clustering selection, sorted. Shape (Nc,).

    ``"literal"`` (paper Eq. 2 as printed, the default): S[i] = i·⌊N/Nc⌋, i = 0…Nc−1. On a 16×16
    grid Nc = 16 gives column 0 only, Nc = 32 columns {0, 8}, Nc = 64 columns {0, 4, 8, 12}.

    ``"grid"`` (a 2-D variant, not in the paper): an r × c lattice from ``grid_lattice_shape``; lattice
    row a sits on grid row ⌊(a + ½)·G/r⌋ and column b on ⌊(b + ½)·G/c⌋ (cell centres of an even split).
    If r·c = Nc every lattice point is taken; if r·c > Nc the points at row-major lattice ranks
    ⌊j·r·c/Nc⌋, j = 0…Nc−1, are taken (evenly spaced, so every lattice row band keeps points).
    """
    _check_n_nc(n, nc)
    if layout == "literal":
        return torch.arange(nc, dtype=torch.long) * (n // nc)
    if layout != "grid":
        raise ValueError(f"layout: expected one of {UNIFORM_LAYOUTS}, got {layout!r}")
    g = grid_side(n)
    r, c = grid_lattice_shape(n, nc)
    rows = (2 * torch.arange(r) + 1) * g // (2 * r)
    cols = (2 * torch.arange(c) + 1) * g // (2 * c)
    lattice = (rows[:, None] * g + cols[None, :]).reshape(-1)
    ranks = torch.arange(nc) * (r * c) // nc
    return _sorted_long(lattice[ranks])


def cls_tokens(scores: torch.Tensor, nc: int) -> torch.Tensor:
    """The Nc highest of ``scores`` (N,) (CLS attention over the image tokens), ties to the lower index; sorted."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a 1-D tensor of N token scores, got {shape}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores: expected a real tensor, got {scores.dtype}")
    _check_n_nc(scores.numel(), nc)
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores: contains NaN")
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    return _sorted_long(order[:nc])


# ------------------------------------------------------------------------------------- seg-first
@dataclass
class SegFirstSelection:
    """Result of Seg-First (or of its fallback).

    indices: (K,) sorted distinct token indices; K = ``count`` (|S|, recorded for N_avg/FLOPs).
    quotas: (M,) Eq. 5 quota S_o[i] = max(1, ⌊Nc·area_i/Σarea⌋) per input instance (0 if dropped).
    drawn: (M,) tokens drawn from each instance's set (min(quota, |T_i|), after trimming for "exact").
    kept: (M,) bool, instances with area > 0 (those outside the centre crop are dropped).
    fallback_used: True when no instance was left and the fallback selector chose all Nc tokens.
    """

    indices: torch.Tensor
    quotas: torch.Tensor
    drawn: torch.Tensor
    kept: torch.Tensor
    fallback_used: bool
    count: int


def _check_token_sets(token_sets: Sequence[torch.Tensor], n: int) -> List[torch.Tensor]:
    if isinstance(token_sets, torch.Tensor) or not isinstance(token_sets, (list, tuple)):
        raise TypeError(f"token_sets: expected a list of 1-D LongTensors (one per instance), got {type(token_sets).__name__}")
    out = []
    for i, t in enumerate(token_sets):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"token_sets: entry {i} must be a 1-D tensor of token indices, got {getattr(t, 'shape', type(t).__name__)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"token_sets: entry {i} must hold integer indices, got {t.dtype}")
        t = t.detach().cpu().to(torch.long)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"token_sets: entry {i} has indices outside [0, {n}): min {int(t.min())}, max {int(t.max())}")
        out.append(torch.unique(t))  # sorted, distinct
    return out


def _check_areas(areas, m: int) -> torch.Tensor:
    if not isinstance(areas, torch.Tensor):
        raise TypeError(f"areas: expected a 1-D tensor of {m} instance areas, got {type(areas).__name__}")
    if areas.dim() != 1 or areas.numel() != m:
        raise ValueError(f"areas: expected shape ({m},) (one area per token set), got {tuple(areas.shape)}")
    if areas.is_complex() or areas.dtype == torch.bool:
        raise TypeError(f"areas: expected a real tensor, got {areas.dtype}")
    areas = areas.detach().cpu()
    if areas.is_floating_point() and not bool(torch.isfinite(areas).all()):
        raise ValueError("areas: contains NaN or inf")
    if m and float(areas.min()) < 0:
        raise ValueError(f"areas: expected areas >= 0, got min {float(areas.min())}")
    return areas


def eq5_quotas(areas: torch.Tensor, nc: int) -> torch.Tensor:
    """S_o[i] = max(1, ⌊Nc·area_i / Σ_j area_j⌋) for area_i > 0, 0 for area_i = 0. Shape (M,), long.

    Integer areas are floored exactly in integer arithmetic; float areas in float64.
    """
    kept = areas > 0
    q = torch.zeros(areas.shape, dtype=torch.long)
    if not bool(kept.any()):
        return q
    if areas.is_floating_point():
        a = areas.to(torch.float64)
        q_k = torch.floor(nc * a[kept] / a[kept].sum()).to(torch.long)
    else:
        a = areas.to(torch.long)
        q_k = (nc * a[kept]) // a[kept].sum()
    q[kept] = q_k.clamp(min=1)
    return q


def _trim_to_budget(drawn: torch.Tensor, areas: torch.Tensor, nc: int) -> torch.Tensor:
    """Lower the largest draws by one (ties: the later instance) until Σ ≤ Nc; when every draw is 1,
    drop whole instances, smallest area first (ties: the later instance)."""
    d = drawn.clone()
    while int(d.sum()) > nc:
        top = int(d.max())
        if top > 1:
            i = int(torch.nonzero(d == top).reshape(-1)[-1])
            d[i] -= 1
            continue
        cand = torch.nonzero(d == 1).reshape(-1)
        a = areas[cand].to(torch.float64)
        smallest = cand[a == a.min()]
        d[int(smallest[-1])] = 0
    return d


def seg_first_tokens(
    token_sets: Sequence[torch.Tensor],
    areas: torch.Tensor,
    nc: int,
    generator: torch.Generator,
    budget: str = "paper",
    fallback: str = "uniform",
    *,
    n: int,
    fallback_layout: str = "literal",
) -> SegFirstSelection:
    """Seg-First token selection (LVLM_CSP Eq. 4-5) over N = ``n`` grid tokens.

    token_sets: M 1-D tensors T_i, the patches instance i covers (``segfirst.masks_to_grid``).
    areas: (M,) pixel areas inside the CLIP crop; instances with area 0 are dropped.

    ``budget="paper"``: quota_i = max(1, ⌊Nc·area_i/Σarea⌋); draw min(quota_i, |T_i|) tokens of T_i
    uniformly without replacement (``randperm`` of ``generator``, instances in input order); S is the
    union (overlaps collapse). No top-up when |S| < Nc, no trimming when |S| > Nc (every object keeps
    ≥ 1 token: 41 objects at Nc = 16 give ≥ 41 tokens).

    ``budget="exact"`` (ablation, not in the paper): the same draws, first trimmed to Σ ≤ Nc (largest
    draws lowered one at a time; if every draw is 1, the smallest-area instances are dropped), then
    topped up to exactly Nc with tokens drawn uniformly at random from the background (in no T_i),
    then, if the background runs out, from any unselected token.

    No instance left (M = 0 or all areas 0): ``fallback`` ("uniform": ``uniform_tokens(n, nc,
    fallback_layout)``; "random": ``random_tokens``) picks Nc tokens and ``fallback_used`` is True.
    """
    _check_int("n", n, 1)
    _check_int("nc", nc, 1, n)
    _check_generator(generator)
    if budget not in BUDGETS:
        raise ValueError(f"budget: expected one of {BUDGETS}, got {budget!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback: expected one of {FALLBACKS}, got {fallback!r}")
    if fallback_layout not in UNIFORM_LAYOUTS:
        raise ValueError(f"fallback_layout: expected one of {UNIFORM_LAYOUTS}, got {fallback_layout!r}")
    sets = _check_token_sets(token_sets, n)
    m = len(sets)
    areas = _check_areas(areas, m)
    kept = areas > 0
    for i in range(m):
        if bool(kept[i]) and sets[i].numel() == 0:
            raise ValueError(
                f"token_sets: instance {i} has area {float(areas[i])} > 0 but no tokens "
                f"(masks_to_grid gives such an instance its argmax-coverage patch)"
            )
    quotas = eq5_quotas(areas, nc)
    if not bool(kept.any()):
        idx = uniform_tokens(n, nc, fallback_layout) if fallback == "uniform" else random_tokens(n, nc, generator)
        zeros = torch.zeros(m, dtype=torch.long)
        return SegFirstSelection(idx, quotas, zeros, kept, True, int(idx.numel()))

    sizes = torch.tensor([s.numel() for s in sets], dtype=torch.long)
    drawn = torch.minimum(quotas, sizes)
    if budget == "exact":
        drawn = _trim_to_budget(drawn, areas, nc)
    picks = []
    for i in range(m):
        if int(drawn[i]) > 0:
            perm = torch.randperm(sets[i].numel(), generator=generator)[: int(drawn[i])]
            picks.append(sets[i][perm])
    selected = torch.unique(torch.cat(picks)) if picks else torch.zeros(0, dtype=torch.long)
    if budget == "exact" and selected.numel() < nc:
        taken = torch.zeros(n, dtype=torch.bool)
        taken[selected] = True
        covered = torch.zeros(n, dtype=torch.bool)
        for s in sets:
            covered[s] = True
        extra = []
        need = nc - selected.numel()
        for background_only in (True, False):
            pool = torch.nonzero(~taken & ~covered if background_only else ~taken).reshape(-1)
            take = min(need, pool.numel())
            if take:
                chosen = pool[torch.randperm(pool.numel(), generator=generator)[:take]]
                extra.append(chosen)
                taken[chosen] = True
                need -= take
            if need == 0:
                break
        selected = torch.unique(torch.cat([selected] + extra))
    return SegFirstSelection(selected, quotas, drawn, kept, False, int(selected.numel()))


__all__ = [
    "BUDGETS",
    "FALLBACKS",
    "SegFirstSelection",
    "UNIFORM_LAYOUTS",
    "cls_tokens",
    "eq5_quotas",
    "grid_lattice_shape",
    "grid_side",
    "random_tokens",
    "seg_first_tokens",
    "uniform_tokens",
]
