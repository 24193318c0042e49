"""Choose SAP's α (Fast3D) for a target pruning ratio from GAP predictions.

    # default: calibrate on predictions for scenes held out from training (see fast3d_train predict --name calib)
    python -m shared.apps.fast3d_alpha --pred-dir out/gap/pred --name calib --target 90
    # the authors' protocol: α searched on the val predictions that are then evaluated (labelled as such)
    python -m shared.apps.fast3d_alpha --pred-dir out/gap/pred --protocol authors-val

Per sample SAP keeps the k* objects whose softmax(GAP logits) mass first reaches α
(``shared.methods.fast3d.sap_object_counts``); its pruning ratio is 100·(1 − k*/n_obj). A set's ratio
is the mean over its samples; the overall ratio is the unweighted mean over sets (as the authors;
``--average samples`` weights every sample equally). The ratio can only fall as α grows, so the
default protocol bisects α; ``authors-val`` scans the authors' two-decimal grid 0.01…0.99. The
result is accepted when |ratio − target| / target ≤ tolerance % (authors: 2 %).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

SapRule = Callable[[torch.Tensor, float], torch.Tensor]

PROTOCOLS = {
    "calibration": "calibration (α tuned on GAP predictions for a split held out from training, not on the "
                   "evaluation split)",
    "authors-val": "authors-val (α tuned on the evaluation split's own GAP predictions, unweighted mean over the "
                   "val sets; the authors' protocol)",
}
#: The authors' α values have two decimals (0.21); their search tried such values by hand.
AUTHORS_GRID = tuple(round(0.01 * i, 2) for i in range(1, 100))


def default_rule() -> SapRule:
    """The project's SAP rule ``shared.methods.fast3d.sap_object_counts(logits (..., n), alpha) -> (...,) long``."""
    try:
        from ..methods.fast3d import sap_object_counts
    except ImportError as e:  # pragma: no cover - depends on the branch
        raise ImportError("shared.methods.fast3d.sap_object_counts is not available in this checkout") from e
    return sap_object_counts


def load_logits(path: str) -> torch.Tensor:
    """GAP logits of one prediction file as (N, n_obj) float32: the authors' ``{index: {"a_map": logits}}``,
    the by-key variant ``{key: {"a_map", "index"}}`` or a list of such dicts. Refuses target files
    (records with ``a_map_ori``: attention sums, on which SAP's softmax is meaningless)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    recs = list(data.values()) if isinstance(data, Mapping) else list(data)
    if not recs:
        raise ValueError(f"predictions: {path} holds no samples")
    if any("a_map_ori" in r for r in recs):
        raise ValueError(f"predictions: {path} is an extracted attention-target file (has a_map_ori), not GAP logits")
    rows = [torch.as_tensor(r["a_map"]).float().reshape(-1) for r in recs]
    if len({r.numel() for r in rows}) != 1:
        raise ValueError(f"predictions: {path} mixes object counts {sorted({r.numel() for r in rows})}")
    return torch.stack(rows)


def set_ratios(logits_by_set: Mapping[str, torch.Tensor], alpha: float, rule: SapRule) -> Dict[str, Tuple[float, int]]:
    """Per set: (mean pruning ratio in %, samples) at ``alpha``; ratio = 100·(1 − mean k*/n_obj)."""
    out = {}
    for name, logits in logits_by_set.items():
        k = rule(logits, alpha).double()
        out[name] = (float(100.0 * (1.0 - (k / logits.shape[-1]).mean())), int(logits.shape[0]))
    return out


def overall(ratios: Mapping[str, Tuple[float, int]], average: str) -> float:
    if average == "sets":
        return sum(r for r, _ in ratios.values()) / len(ratios)
    total = sum(n for _, n in ratios.values())
    return sum(r * n for r, n in ratios.values()) / total


@dataclass
class AlphaResult:
    """alpha: chosen α; ratio: its overall pruning ratio (%); per_set: {set: ratio %}; within_tolerance:
    |ratio − target| / target ≤ tolerance %; evaluated: every (α, ratio) tried; reference_top10_mass:
    per set, the mean softmax mass of the top-10 objects (the authors' "reference alpha")."""

    alpha: float
    ratio: float
    target: float
    tolerance: float
    within_tolerance: bool
    protocol: str
    average: str
    per_set: Dict[str, float]
    samples: Dict[str, int]
    reference_top10_mass: Dict[str, float]
    evaluated: List[Tuple[float, float]] = field(default_factory=list)


def search_alpha(logits_by_set: Mapping[str, torch.Tensor], target: float = 90.0, tolerance: float = 2.0,
                 protocol: str = "calibration", average: str = "sets", rule: Optional[SapRule] = None,
                 iters: int = 50) -> AlphaResult:
    """α in (0, 1] whose overall pruning ratio is closest to ``target`` (%).

    logits_by_set: {set: (N, n_obj) GAP logits}. protocol "calibration": bisection on α (``iters``
    halvings); "authors-val": the authors' grid 0.01…0.99, unweighted mean over sets.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if average not in ("sets", "samples"):
        raise ValueError(f"average: expected 'sets' or 'samples', got {average!r}")
    if protocol == "authors-val" and average != "sets":
        raise ValueError("average: the authors' protocol averages the sets unweighted ('sets')")
    if not 0.0 < float(target) < 100.0:
        raise ValueError(f"target: expected a pruning ratio in (0, 100) %, got {target!r}")
    if not logits_by_set:
        raise ValueError("logits_by_set: no prediction sets given")
    rule = rule or default_rule()
    seen: Dict[float, Tuple[float, Dict[str, Tuple[float, int]]]] = {}

    def at(alpha: float) -> float:
        if alpha not in seen:
            per = set_ratios(logits_by_set, alpha, rule)
            seen[alpha] = (overall(per, average), per)
        return seen[alpha][0]

    if protocol == "authors-val":
        candidates = list(AUTHORS_GRID)
        for a in candidates:
            at(a)
    else:
        lo, hi = 1e-12, 1.0  # ratio(lo) is the largest possible, ratio(hi) the smallest
        r_lo, r_hi = at(lo), at(hi)
        if r_lo > target > r_hi:
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                if at(mid) >= target:
                    lo = mid
                else:
                    hi = mid
        candidates = [lo, hi]
    best = min(candidates, key=lambda a: (abs(seen[a][0] - target), a))
    ratio, per = seen[best]
    probs = {name: torch.softmax(lg.double(), -1) for name, lg in logits_by_set.items()}
    top10 = {name: float(p.topk(min(10, p.shape[-1]), dim=-1).values.sum(-1).mean()) for name, p in probs.items()}
    return AlphaResult(
        alpha=float(best), ratio=ratio, target=float(target), tolerance=float(tolerance),
        within_tolerance=abs(ratio - target) / target <= tolerance / 100.0, protocol=PROTOCOLS[protocol],
        average=average, per_set={k: v[0] for k, v in per.items()}, samples={k: v[1] for k, v in per.items()},
        reference_top10_mass=top10, evaluated=sorted((a, r) for a, (r, _) in seen.items()),
    )


def _parse_pred(items: Sequence[str]) -> Dict[str, str]:
    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--pred: expected SET=PATH, got {it!r}")
        out[name] = path
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.apps.fast3d_alpha", description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="calibration")
    p.add_argument("--pred-dir", help="folder of infer_attn_maps_{name}_{set}.pt files (fast3d_train predict)")
    p.add_argument("--name", default=None, help="file tag: default 'calib' (calibration) or 'val' (authors-val)")
    p.add_argument("--sets", default="scanrefer#scan2cap#multi3dref#scanqa#sqa3d")
    p.add_argument("--pred", action="append", default=[], metavar="SET=PATH", help="a prediction file (repeatable)")
    p.add_argument("--target", type=float, default=90.0, help="target pruning ratio in %% (default 90)")
    p.add_argument("--tolerance", type=float, default=2.0, help="accepted relative deviation in %% (default 2)")
    p.add_argument("--average", choices=("sets", "samples"), default="sets")
    p.add_argument("--out", help="also write the result as JSON here")
    a = p.parse_args(argv)
    files = _parse_pred(a.pred)
    if a.pred_dir:
        name = a.name or ("val" if a.protocol == "authors-val" else "calib")
        for s in [x for x in a.sets.replace(",", "#").split("#") if x]:
            files.setdefault(s, os.path.join(a.pred_dir, f"infer_attn_maps_{name}_{s}.pt"))
    if not files:
        p.error("give --pred-dir or --pred SET=PATH")
    logits = {s: load_logits(path) for s, path in files.items()}
    res = search_alpha(logits, a.target, a.tolerance, a.protocol, a.average)
    text = json.dumps(asdict(res), indent=1)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(json.dumps({k: v for k, v in asdict(res).items() if k != "evaluated"}, indent=1))
    if not res.within_tolerance:
        print(f"warning: the closest ratio {res.ratio:.2f} % misses the target {a.target} % by more than "
              f"{a.tolerance} %", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
