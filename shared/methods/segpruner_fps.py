"""Batched farthest-point sampling under a fused geometric + semantic distance (SeGPruner's diversifier).

The rule. For tokens i, j of one batch row the fused distance is

    f(i, j) = λ · ‖p_i − p_j‖ / dx + (1 − λ) · (1 − cos(F_i, F_j))

with p in metres and dx a per-row normaliser (``"first_centroid"``: the largest distance from the start
token, as the released SeGPruner code computes it at its first iteration, so later d/dx may exceed 1;
``"diameter"``: the largest distance between two candidates). FPS starts at ``start``, keeps for every
candidate the minimum fused distance to the tokens chosen so far, and picks the arg-max next; ties go to
the token listed first in ``order`` (the released code lists the residual tokens by descending saliency and
takes the first arg-max). A token is never picked twice and non-candidates are never picked. dx = 0 (all
candidates at one point) makes the geometric term 0 instead of 0/0.

Which float64 values. Two candidates whose running minima differ by less than the rounding of f are
ordered by rounding, so the rule names one float64 evaluation of f, the *reference value*
(``reference_values``): a pure function of the pair, built from element-wise float64 operations and a fixed
pairwise (tree) summation, so equal inputs give equal bits on any device and in any batch. The kept set is
the one the reference values give; exact ties (duplicated tokens) go to the token listed first.

Certified evaluation. Reference values for every pair would be slow, so the strategies compute f with BLAS
in a work precision (float32, or float64) and carry a rigorous bound E on its difference from the
reference value (``error_bound``: a dot product of n terms summed in any order is off by at most
γ_n · Σ|x_k y_k|, γ_n = n·u / (1 − n·u); plus the rounding of norms, points and additions). At each step the
candidates whose approximate running minimum lies within 2E of the largest form a set S. When S holds one
token it is the reference arg-max. Otherwise each member's running minimum is recomputed over the picks
whose approximate distance lies within 2E of its approximate minimum (no other pick can attain it), first
in float64 (any summation order, bound E2 ~1e-12), and where that leaves two members within 2·E2 (exact
ties), from reference values, ties to the token listed first. Every strategy and precision therefore
returns the reference rule's indices; they differ in speed only (``stats["resolved"]`` counts the
resolved row-steps).

Strategies: ``"matrix"`` builds each row's (N, N) Gram matrix of the raw features once (its upper blocks,
the lower half mirrored); a step is then a row gather, the geometric row, a running minimum and a top-2.
``"rows"`` computes only the pick's dot products (one matrix-vector product per row and step), in groups
of rows whose features fit ``chunk_bytes`` (12 MiB on CPU, so that they stay in cache). ``"auto"`` takes
the matrix when it fits ``max_matrix_bytes`` and, on CPU, when the steps are a sizeable share of N
(``resolve_strategy``); on CUDA, where the loop's kernel launches dominate, whenever it fits. Precision
``"auto"`` is float32 unless float32 matrix products may run in reduced precision (TF32 or bf16 passes:
``torch.get_float32_matmul_precision()`` other than ``"highest"``, or the backend flags) or the feature
norms leave [1e-6, 1e18] (candidates' smallest, every token's largest), where float32 products could
underflow or overflow; then float64.
"""
from __future__ import annotations

import numbers
from typing import Callable, List, Optional, Tuple

import torch

NORMALIZERS = ("first_centroid", "diameter")
STRATEGIES = ("auto", "matrix", "rows")
PRECISIONS = ("auto", "float32", "float64")

_F64 = torch.float64
_WORK = {"float32": torch.float32, "float64": torch.float64}
_CPU_ROW_PENALTY = 13.0       # CPU auto: matrix when steps · 13 >= N (a row group's features in cache) ...
_CPU_DRAM_ROW_PENALTY = 16.0  # ... or steps · 16 >= N when every step reads them from memory
_CPU_CHUNK_BYTES = 12 << 20   # rows on CPU: work-precision feature bytes per row group
_NORM_RANGE = (1e-6, 1e18)    # float32 work only for feature norms in this range
_BLOCK_BYTES = 64 << 20       # temporaries of the diameter


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN/inf (one min/max pass; ~15x faster than ``isfinite(t).all()`` on CPU)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _desc(t: object) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check(points, features, order, candidates, start) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated (order (B, R), candidates (B, R), start position in order (B,) or None)."""
    if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[-1] != 3 or not points.is_floating_point():
        raise ValueError(f"points: expected a (B, N, 3) floating tensor of coordinates in metres, got {_desc(points)}")
    b, n, _ = points.shape
    dev = points.device
    if (not isinstance(features, torch.Tensor) or features.dim() != 3 or tuple(features.shape[:2]) != (b, n)
            or features.shape[-1] < 1 or not features.is_floating_point()):
        raise ValueError(f"features: expected a ({b}, {n}, C) floating tensor matching points, got {_desc(features)}")
    if features.device != dev:
        raise ValueError(f"features: expected the device of points ({dev}), got {features.device}")
    if order is None:
        order = torch.arange(n, device=dev).expand(b, n)
    else:
        if not isinstance(order, torch.Tensor) or order.dim() != 2 or order.shape[0] != b or order.dtype != torch.long:
            raise ValueError(f"order: expected a ({b}, R) long tensor of token indices, got {_desc(order)}")
        order = order.to(dev)
        if order.numel() and bool(((order < 0) | (order >= n)).any()):
            raise ValueError(f"order: token indices must lie in [0, {n})")
        ones = torch.ones_like(order, dtype=torch.int32)
        seen = torch.zeros(b, n, dtype=torch.int32, device=dev).scatter_add_(1, order, ones)
        if bool((seen > 1).any()):
            raise ValueError("order: a token is listed twice in one row")
    r = order.shape[1]
    if candidates is None:
        candidates = torch.ones(b, r, dtype=torch.bool, device=dev)
    elif not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.bool or tuple(candidates.shape) != (b, r):
        raise ValueError(f"candidates: expected a ({b}, {r}) bool tensor aligned with order, got {_desc(candidates)}")
    candidates = candidates.to(dev)
    pos = None
    if start is not None:
        if not isinstance(start, torch.Tensor) or tuple(start.shape) != (b,) or start.dtype != torch.long:
            raise ValueError(f"start: expected a ({b},) long tensor of token indices, got {_desc(start)}")
        hit = (order == start.to(dev).unsqueeze(1)) & candidates
        if not bool(hit.any(dim=1).all()):
            raise ValueError("start: every start token must be a candidate listed in order")
        pos = hit.to(torch.int8).argmax(dim=1)
    return order, candidates, pos


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, n, m) by explicit differences (no ‖a‖²+‖b‖²−2ab cancellation)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _row_block(n: int, bytes_per_row: int) -> int:
    return max(1, min(n, _BLOCK_BYTES // max(1, bytes_per_row)))


def normalizer_dx(points: torch.Tensor, cand: torch.Tensor, start: torch.Tensor, normalizer: str) -> torch.Tensor:
    """Per-row normaliser dx (B,) over the candidates of points (B, R, 3); start: (B,) position of the first
    pick. A zero dx (all candidates at one point) is returned as 1, which makes every d/dx = 0."""
    b, r, _ = points.shape
    zero = torch.zeros((), dtype=points.dtype, device=points.device)
    if normalizer == "first_centroid":
        d = (points - points[torch.arange(b, device=points.device), start].unsqueeze(1)).norm(dim=-1)
        dx = torch.where(cand, d, zero).amax(dim=1)
    elif normalizer == "diameter":
        dx = torch.zeros(b, dtype=points.dtype, device=points.device)
        step = _row_block(r, 8 * r * b)
        for s in range(0, r, step):
            d = _distances(points[:, s:s + step], points)
            ok = cand[:, s:s + step].unsqueeze(-1) & cand.unsqueeze(1)
            dx = torch.maximum(dx, torch.where(ok, d, zero).flatten(1).amax(dim=1))
    else:
        raise ValueError(f"normalizer: expected one of {', '.join(NORMALIZERS)}, got {normalizer!r}")
    return torch.where(dx > 0, dx, torch.ones_like(dx))


# -- reference values ---------------------------------------------------------------------------------------

def _tree_sum_(buf: torch.Tensor, width: int) -> torch.Tensor:
    """Sum over the first ``width`` columns of (n, W) float64 (zeros beyond the data; width a power of two) by
    a fixed pairwise tree, in place. Returns the (n,) sums (column 0)."""
    while width > 1:
        width //= 2
        buf[:, :width].add_(buf[:, width:2 * width])
    return buf[:, 0]


def reference_values(fi: torch.Tensor, fj: torch.Tensor, pi: torch.Tensor, pj: torch.Tensor, lam: float,
                     a: torch.Tensor) -> torch.Tensor:
    """Reference float64 fused distances of n pairs: features fi, fj (n, C), points pi, pj (n, 3) in metres,
    a = λ / dx (n,). Element-wise float64 operations and a fixed pairwise tree summation only, so each value
    is a pure function of its pair: cos = Σ f_i f_j / (√Σ f_i² · √Σ f_j²), d = √((Δx² + Δy²) + Δz²)."""
    n, c = fi.shape
    width = 1 << max(0, (c - 1).bit_length())
    buf = torch.zeros(3 * n, width, dtype=_F64, device=fi.device)
    x, y = fi.to(_F64), fj.to(_F64)
    torch.mul(x, x, out=buf[:n, :c])
    torch.mul(y, y, out=buf[n:2 * n, :c])
    torch.mul(x, y, out=buf[2 * n:, :c])
    sums = _tree_sum_(buf, width)
    cos = sums[2 * n:] / (sums[:n].sqrt() * sums[n:2 * n].sqrt())
    d = pi.to(_F64) - pj.to(_F64)
    d = d * d
    dist = (d[:, 0] + d[:, 1] + d[:, 2]).sqrt()
    return (1.0 - lam) * (1.0 - cos) + a.to(_F64) * dist


def _gamma(n: int, u: float) -> float:
    return n * u / (1.0 - n * u)


def error_bound(channels: int, dot_terms: int, norm_rel: float, lam: float, a: torch.Tensor,
                centred_max: torch.Tensor, raw_max: torch.Tensor, min_norm: torch.Tensor,
                work: torch.dtype) -> torch.Tensor:
    """Per-row bound E (B,) float64 on |approximate f − reference f| for any pair of candidates.

    channels: C; dot_terms: the longest chain of work-precision additions behind one cosine (C for one BLAS
    dot product; c + k − 1 when k partial dot products of c channels are added in turn); norm_rel: relative
    error bound of the feature norms that scale the work-precision features; a: λ/dx (B,); centred_max /
    raw_max: largest |coordinate| of the candidates after centring on their bounding box (the work-precision
    points) / as given (the reference); min_norm: smallest candidate feature norm (B,), for products that
    underflow (or are flushed to zero). u is the work precision's unit roundoff, U float64's. Terms: the dot
    product of unit vectors in work precision, with their rounding (γ_{dot_terms+16}(u)) and their norms'
    error (2.01·norm_rel); the reference's tree sums (2·γ_{C+16}(U)); underflow (2·C·tiny / min_norm²); the
    distance from rounded, scaled, centred points (32u·a·P, plus 32U·a·P for the reference); the final
    additions (4(u + U)·V with V bounding the magnitudes added).
    """
    finfo = torch.finfo(work)
    u, big_u = finfo.eps / 2, torch.finfo(_F64).eps / 2
    e_geo = a * (32.0 * u * centred_max + 32.0 * big_u * raw_max) + 16.0 * finfo.tiny
    v = 2.0 * (1.0 - lam) + a * 4.0 * centred_max
    e = e_geo + 4.0 * (u + big_u) * v
    if lam < 1.0:
        under = 2.0 * channels * finfo.tiny / min_norm.clamp_min(1e-150) ** 2
        e_cos = _gamma(dot_terms + 16, u) + 2.01 * norm_rel + 2.0 * _gamma(channels + 16, big_u) + under
        e = e + (1.0 - lam) * e_cos
    return e


def _feature_norms(features: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """Feature norms (B, N) in float64 (one batch row at a time: 5x faster than all rows at once on CPU) and
    their relative error bound γ_{C+2}(U)."""
    norms = torch.stack([torch.linalg.vector_norm(features[r], dim=-1, dtype=_F64) for r in range(features.shape[0])])
    return norms, _gamma(features.shape[-1] + 2, torch.finfo(_F64).eps / 2)


# -- shared state of one call -----------------------------------------------------------------------------------

class _Problem:
    """Token-space inputs of one call: candidates, tie-break ranks, float64 points, dx, bounds, scales.

    The strategies' approximate values are λd/dx − (1 − λ) cos = f − (1 − λ) (a constant changes no
    comparison)."""

    def __init__(self, points, features, order, cand, pos, lam, normalizer, precision):
        b, n, _ = points.shape
        dev = points.device
        self.b, self.n, self.c, self.lam = b, n, features.shape[-1], lam
        self.features = features.detach()
        self.tok_cand = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, order, cand)
        r = order.shape[1]
        self.rank = torch.full((b, n), r, dtype=torch.long, device=dev)
        self.rank.scatter_(1, order, torch.arange(r, device=dev).expand(b, r))
        self.start = order.gather(1, pos.unsqueeze(1)).squeeze(1)
        zero = torch.zeros((), dtype=_F64, device=dev)
        cmask = self.tok_cand.unsqueeze(-1)
        self.pts = torch.where(cmask, points.detach().to(_F64), zero)
        if not all_finite(self.pts):
            raise ValueError("points: non-finite coordinates on candidate tokens (mark tokens without geometry "
                             "as non-candidates)")
        norms, self.norm_rel = _feature_norms(self.features)
        if not all_finite(norms):
            if not all_finite(self.features):
                raise ValueError("features: contains NaN or infinite values")
            raise ValueError("features: a feature norm overflows float64 (rescale the features)")
        if bool(((norms == 0) & self.tok_cand).any()):
            raise ValueError("features: a candidate token has an all-zero feature vector (cosine undefined)")
        inf = torch.full((), float("inf"), dtype=_F64, device=dev)
        self.inv = torch.where(self.tok_cand, 1.0 / norms, zero)
        min_norm = torch.where(self.tok_cand, norms, inf).amin(dim=1)
        max_norm = norms.amax(dim=1)  # every token's: float32 products of non-candidates must not overflow either
        self.work = _WORK[resolve_precision(precision, dev, float(min_norm.min()), float(max_norm.max()))]
        self.dx = normalizer_dx(self.pts, self.tok_cand, self.start, normalizer)
        self.a = lam / self.dx
        lo = torch.where(cmask, self.pts, inf).amin(dim=1)
        hi = torch.where(cmask, self.pts, -inf).amax(dim=1)
        centre = torch.where(torch.isfinite(lo), (lo + hi) / 2, zero)
        self.centred = torch.where(cmask, self.pts - centre.unsqueeze(1), zero)
        self._bound_args = (self.a, self.centred.abs().flatten(1).amax(dim=1), self.pts.abs().flatten(1).amax(dim=1),
                            min_norm)
        self.features_flat = self.features.reshape(b * n, self.c)
        self.pts_flat = self.pts.view(b * n, 3)
        self.rank_flat = self.rank.view(b * n)
        self.inv_flat = self.inv.view(b * n)
        self.resolved = 0                                       # row-steps resolved with reference values

    def set_bound(self, dot_terms: int) -> None:
        """Thresholds for the strategy's approximation: 2E plus the rounding of the comparisons, made in float64
        (Python floats; ``thr``) and in the work precision (``thr_work``, (B, 1), rounded up)."""
        a, centred_max, raw_max, min_norm = self._bound_args
        e = error_bound(self.c, dot_terms, self.norm_rel, self.lam, a, centred_max, raw_max, min_norm, self.work)
        v = 2.0 * (1.0 - self.lam) + a * 4.0 * centred_max
        self.thr = (2.0 * e + 8.0 * torch.finfo(_F64).eps * v).tolist()
        # float64 values of the resolution (any summation order, the float64 norms, raw points) against the
        # reference
        e2 = error_bound(self.c, self.c, self.norm_rel, self.lam, a, raw_max, raw_max, min_norm, _F64)
        self.level2_thr = (2.0 * e2 + 8.0 * torch.finfo(_F64).eps * (v + a * 4.0 * raw_max)).tolist()
        # work-precision comparisons r >= top − thr_work and h <= r + thr_work: their rounding is covered
        thr_work = 2.0 * e + 4.0 * torch.finfo(self.work).eps * (2.0 * v + 2.0 * e)
        up = torch.tensor(float("inf"), dtype=self.work, device=thr_work.device)
        self.thr_work = thr_work.to(self.work).nextafter(up).unsqueeze(1)

    def initial_running(self, rows: slice) -> torch.Tensor:
        inf = torch.full((), float("inf"), dtype=self.work, device=self.tok_cand.device)
        return torch.where(self.tok_cand[rows], inf, -inf)

    def resolve(self, rows: slice, running: torch.Tensor, val: torch.Tensor, hist: torch.Tensor,
                picked: torch.Tensor, m: int) -> torch.Tensor:
        """Reference arg-max of each row of a group (called when some row's top-2, val (G, 2), lie within 2E).

        running: (G, N) approximate running minima; hist: (≥m, G, N) the approximate rows of the m picks so far;
        picked: (G, ≥m) their tokens. Per row, S = tokens within 2E of its top; each member's minimum is
        recomputed over the picks within 2E of its approximate minimum (the others cannot attain it), first
        in float64 with any summation order (``level2``: off the reference by at most E2, ~1e-12); a row
        whose float64 top is not clear by 2·E2 (exact ties) is decided by reference values, ties to the token
        listed first. Work-precision comparisons use ``thr_work`` (a superset of S, or of the picks, is still
        exact)."""
        g_count, n = running.shape
        thr_w = self.thr_work[rows]
        g, s = (running >= val[:, :1] - thr_w).nonzero(as_tuple=True)
        gs = g * n + s
        h = hist.view(hist.shape[0], g_count * n)[:m].index_select(1, gs)           # (m, |S|)
        lim = running.view(-1).index_select(0, gs) + thr_w.view(-1).index_select(0, g)
        j, w = (h <= lim).nonzero(as_tuple=True)
        rg = g.index_select(0, w) + rows.start
        base = rg * self.n
        ti = base + s.index_select(0, w)
        tj = base + picked.view(-1).index_select(0, (rg - rows.start) * picked.shape[1] + j)
        fi, fj = self.features_flat.index_select(0, ti), self.features_flat.index_select(0, tj)
        pi, pj = self.pts_flat.index_select(0, ti), self.pts_flat.index_select(0, tj)
        a = self.a.index_select(0, rg)
        cos = (fi.to(_F64) * fj.to(_F64)).sum(-1) * self.inv_flat.index_select(0, ti) * self.inv_flat.index_select(0, tj)
        f2 = a * torch.linalg.vector_norm(pi - pj, dim=1) - (1.0 - self.lam) * cos
        inf = torch.full(s.shape, float("inf"), dtype=_F64, device=s.device)
        lvl2 = inf.scatter_reduce(0, w, f2, "amin").tolist()
        gl, sl = g.tolist(), s.tolist()
        e2 = self.level2_thr[rows]
        top = [None] * g_count
        for k, (gg, v) in enumerate(zip(gl, lvl2)):
            if top[gg] is None or v > lvl2[top[gg]]:
                top[gg] = k
        out = [sl[top[gg]] for gg in range(g_count)]
        unclear = sorted({gg for k, gg in enumerate(gl) if k != top[gg] and lvl2[k] >= lvl2[top[gg]] - e2[gg]})
        if unclear:
            f = reference_values(fi, fj, pi, pj, self.lam, a)
            ref = inf.scatter_reduce(0, w, f, "amin").tolist()
            ranks = self.rank_flat.index_select(0, (g + rows.start) * self.n + s).tolist()
            best = {}
            for k, gg in enumerate(gl):
                if gg in unclear:
                    key = (ref[k], -ranks[k], sl[k])
                    if gg not in best or key > best[gg]:
                        best[gg] = key
            for gg, key in best.items():
                out[gg] = key[2]
        return torch.tensor(out, device=s.device)


# -- strategies ---------------------------------------------------------------------------------------------------

def _row_groups(b: int, per_row_bytes: int, budget: Optional[int]) -> List[slice]:
    size = b if budget is None else max(1, min(b, int(budget) // max(1, per_row_bytes)))
    return [slice(s, min(b, s + size)) for s in range(0, b, size)]


def _work_features(prob: _Problem, rows: slice) -> torch.Tensor:
    """(G, N, C) features of the rows in the work precision, contiguous (no copy when they already are)."""
    return prob.features[rows].to(prob.work).contiguous()


def _fps_loop(prob: _Problem, rows: slice, steps: int, dot_terms: int,
              dot_rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The FPS loop of a row group: dot_rows(flat) -> (G, N) approximate dot products of the picks' raw
    features (flat = g·N + token) with every token's, scaled here by both inverse norms into cosines; λd/dx
    from the centred points scaled by a = λ/dx; running minimum; certified arg-max (top-2 gap > 2E, else
    ``_Problem.resolve``)."""
    prob.set_bound(dot_terms)
    lam, thr, w = prob.lam, prob.thr[rows], prob.work
    pts = (prob.centred[rows] * prob.a[rows].view(-1, 1, 1)).to(w).transpose(1, 2).contiguous()  # (G, 3, N)
    g, _, n = pts.shape
    inv = prob.inv[rows].to(w)
    inv_flat = (-(1.0 - lam) * prob.inv[rows]).to(w).view(-1)
    ar = torch.arange(g, device=pts.device)
    off = ar * n
    hist = torch.empty(steps, g, n, dtype=w, device=pts.device)
    picked = torch.empty(g, steps, dtype=torch.long, device=pts.device)
    running = prob.initial_running(rows)
    run_flat = running.view(-1)
    pos = prob.start[rows]
    for i in range(steps):
        picked[:, i] = pos
        flat = off + pos if g > 1 else pos
        diff = pts - (pts[ar, :, pos].unsqueeze(2) if g > 1 else pts[:, :, pos])
        diff.mul_(diff)
        row = torch.sum(diff, dim=1, out=hist[i]).sqrt_()                          # λd/dx
        coef = inv_flat.index_select(0, flat).unsqueeze(1)                         # −(1−λ)/‖F_p‖
        row.addcmul_(dot_rows(flat), inv * coef)                                   # − (1−λ) cos
        torch.minimum(running, row, out=running)
        run_flat.index_fill_(0, flat, float("-inf"))
        if i + 1 < steps:
            val, idx = running.topk(2, dim=1)
            vl = val.tolist()
            amb = sum(1 for (v0, v1), t in zip(vl, thr) if v1 >= v0 - t)
            if amb:
                prob.resolved += amb
                pos = prob.resolve(rows, running, val, hist, picked, i + 1)
            else:
                pos = idx[:, 0]
    return picked


def _run_matrix(prob: _Problem, rows: slice, steps: int) -> torch.Tensor:
    """Dot products from the (G, N, N) Gram matrix, built once: only its 10 upper blocks of 4 × 4 are
    multiplied (it is symmetric), the lower half mirrored; a step gathers rows."""
    f = _work_features(prob, rows)
    g, n, c = f.shape
    gram = torch.empty(g, n, n, dtype=prob.work, device=f.device)
    blk = -(-n // 4)
    for i in range(0, n, blk):
        upper = torch.bmm(f[:, i:i + blk], f[:, i:].transpose(1, 2))
        gram[:, i:i + blk, i:] = upper
        gram[:, i + blk:, i:i + blk] = upper[:, :, blk:].transpose(1, 2)
    del f
    flat = gram.view(g * n, n)
    return _fps_loop(prob, rows, steps, c, lambda idx: flat.index_select(0, idx))


def _run_rows(prob: _Problem, rows: slice, steps: int) -> torch.Tensor:
    """Dot products of the pick only: one matrix-vector product per row and step."""
    f = _work_features(prob, rows)
    g, n, c = f.shape
    ff, ft = f.view(g * n, c), f.transpose(1, 2)
    if g == 1:
        return _fps_loop(prob, rows, steps, c, lambda idx: torch.mv(ff, ff[idx[0]]).unsqueeze(0))
    return _fps_loop(prob, rows, steps, c, lambda idx: torch.bmm(ff.index_select(0, idx).unsqueeze(1), ft).squeeze(1))


# -- dispatch -------------------------------------------------------------------------------------------------------

def _fp32_matmul_is_ieee(device: torch.device) -> bool:
    if torch.get_float32_matmul_precision() != "highest":
        return False
    flags = [getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)]
    if device.type == "cuda":
        if torch.backends.cuda.matmul.allow_tf32:
            return False
        flags.append(torch.backends.cuda.matmul)
    for flag in flags:
        mode = getattr(flag, "fp32_precision", "ieee")
        if mode not in ("ieee", "none"):
            return False
    return True


def resolve_precision(precision: str, device: torch.device, min_norm: float = 1.0, max_norm: float = 1.0) -> str:
    """The work precision ``"auto"`` runs: float32 when float32 matrix products are IEEE on ``device`` and the
    candidate feature norms lie in [1e-6, 1e18]; else float64."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    in_range = _NORM_RANGE[0] <= min_norm and max_norm <= _NORM_RANGE[1]
    return "float32" if in_range and _fp32_matmul_is_ieee(device) else "float64"


def resolve_strategy(strategy: str, b: int, n: int, steps: int, device: torch.device, max_matrix_bytes: int,
                     channels: int = 0, work_bytes: int = 4, chunk_bytes: Optional[int] = None) -> str:
    """The strategy ``"auto"`` runs for B rows of N tokens with C = ``channels`` and ``steps`` picks.

    CPU crossovers (2-core EPYC, float32, measured with ``benchmarks/segpruner_selection.py``-style inputs): a
    rows step is one pass over a row group's features, the matrix is a Gram product up front; the matrix is
    faster when steps · 13 >= N while a row group's features fit in cache (12 views × 729 × 1152: rows
    faster up to T = 48, matrix from T = 64) and when steps · 16 >= N when every step reads them from memory
    (one FPS over 8,748 tokens: rows at T = 256, matrix at T = 768).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    if b * n * n * work_bytes > max_matrix_bytes:
        return "rows"
    if device.type != "cpu":
        return "matrix"
    budget = _CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    in_cache = n * channels * work_bytes <= budget
    return "matrix" if steps * (_CPU_ROW_PENALTY if in_cache else _CPU_DRAM_ROW_PENALTY) >= n else "rows"


def fused_fps(
    points: torch.Tensor,
    features: torch.Tensor,
    steps: int,
    lam: float,
    *,
    order: Optional[torch.Tensor] = None,
    candidates: Optional[torch.Tensor] = None,
    start: Optional[torch.Tensor] = None,
    normalizer: str = "first_centroid",
    strategy: str = "auto",
    precision: str = "auto",
    max_matrix_bytes: int = 1 << 30,
    chunk_bytes: Optional[int] = None,
    stats: Optional[dict] = None,
) -> torch.Tensor:
    """Farthest-point sampling under the fused distance, vectorised over the batch.

    points: (B, N, 3) coordinates in metres (read only for candidates; others may be NaN).
    features: (B, N, C) token features, finite (any floating dtype).
    steps: picks per row (M); every row needs at least M candidates.
    lam: λ in [0, 1], the weight of the geometric term.
    order: optional (B, R) long, the tokens considered, in tie-break order (default: all N in index order).
    candidates: optional (B, R) bool aligned with ``order``: the tokens FPS may pick (default: all).
    start: optional (B,) long token index of the first pick (a candidate; default: the first candidate).
    normalizer: ``"first_centroid"`` or ``"diameter"`` (module docstring).
    strategy: ``"auto"``, ``"matrix"`` or ``"rows"``; precision: ``"auto"``, ``"float32"`` or ``"float64"``
    (work precision of the certified approximation). All return the same indices (module docstring).
    max_matrix_bytes: largest fused matrix per row group (B·N²·work bytes; ``"auto"`` needs all rows to fit).
    chunk_bytes: rows strategy: work-precision feature bytes per row group (default: 12 MiB on CPU, all on CUDA).
    stats: optional dict, filled with ``strategy``, ``precision`` and ``resolved`` (row-steps resolved with
    reference values).
    Returns (B, M) long token indices (into N), in pick order.
    """
    order, cand, pos = _check(points, features, order, candidates, start)
    b, n, _ = points.shape
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    lam_f = float(lam) if isinstance(lam, numbers.Real) and not isinstance(lam, bool) else float("nan")
    if not 0.0 <= lam_f <= 1.0:  # NaN fails too
        raise ValueError(f"lam: expected λ in [0, 1], got {lam!r}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer: expected one of {', '.join(NORMALIZERS)}, got {normalizer!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    counts = cand.sum(dim=1)
    if steps > 0 and bool((counts < steps).any()):
        row = int(torch.nonzero(counts < steps)[0, 0])
        raise ValueError(f"steps: row {row} has {int(counts[row])} candidate tokens, fewer than the {steps} picks")
    if steps == 0 or b == 0:
        return torch.zeros(b, 0, dtype=torch.long, device=points.device)
    if pos is None:
        pos = cand.to(torch.int8).argmax(dim=1)
    prob = _Problem(points, features, order, cand, pos, lam_f, normalizer, precision)
    wbytes = torch.empty((), dtype=prob.work).element_size()
    chosen = resolve_strategy(strategy, b, n, steps, points.device, max_matrix_bytes, prob.c, wbytes, chunk_bytes)
    if chosen == "matrix":
        groups = _row_groups(b, n * n * wbytes, max_matrix_bytes)
        run = _run_matrix
    else:
        if chunk_bytes is None and points.device.type == "cpu":
            chunk_bytes = _CPU_CHUNK_BYTES
        groups = _row_groups(b, n * prob.c * wbytes, chunk_bytes)
        run = _run_rows
    picks = torch.cat([run(prob, rows, steps) for rows in groups], dim=0)
    if stats is not None:
        stats.update(strategy=chosen, precision=str(prob.work).replace("torch.", ""), resolved=prob.resolved)
    return picks


__all__ = ["NORMALIZERS", "PRECISIONS", "STRATEGIES", "all_finite", "error_bound", "fused_fps", "normalizer_dx",
           "reference_values", "resolve_precision", "resolve_strategy"]
