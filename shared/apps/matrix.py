"""The method × host matrix, computed from what methods need and hosts provide.

    python -m shared.apps.matrix            # the README's table (markdown)

A cell is ``✔`` (the host provides every need), ``✔ views=`` (with that host option) or
``✘ need`` (the first need the host cannot provide). ``tests/test_matrix.py`` runs every ✔ cell on a
tiny model of the host's real classes and checks every ✘ cell is refused naming that need.
"""
from __future__ import annotations

import argparse
from typing import Any, List, Sequence, Tuple

import numpy as np

from ..hosts.base import host_class, host_names
from ..methods import AdaToken3D, AdaTokenSchedule, Fast3D, FastV, LVLMCSP, PruMerge, PruMergePlus, PyramidDrop, RandomDrop, SeGPruner, VisionZip
from ..needs import method_needs


def adatoken_row(num_layers: int = 4, r: float = 0.25) -> AdaToken3D:
    """AdaToken-3D fitted (``fit_schedule``) to a linear information curve over ``num_layers`` layers at last-layer
    retention ``r``: a schedule must match its decoder's layer count, so tests rebuild it for each tiny host."""
    from ..methods.adatoken import fit_schedule

    return AdaToken3D(fit_schedule(np.linspace(1.0, 0.0, num_layers), r, visual_tokens=100))


def adatoken_keep_all(num_layers: int) -> AdaToken3D:
    """AdaToken-3D with retention 1 at every layer (a schedule no fit produces: the fit needs O(L) = r < 1)."""
    ones = (1.0,) * num_layers
    return AdaToken3D(AdaTokenSchedule(r=1.0, alpha=1.0, beta=0.0, L_c=1.0, M=0.0, retention=ones,
                                       budgets=(100,) * num_layers, visual_tokens=100))

#: One row per method (LVLM_CSP once per clustering input it can need).
ROWS: List[Tuple[str, Any]] = [
    ("fastv", FastV(layer=2, keep_ratio=0.25)),
    ("pdrop", PyramidDrop(layers=(1, 2), ratio=0.5)),
    ("adatoken3d", adatoken_row()),
    ("random", RandomDrop(layer=1, keep_ratio=0.25)),
    ("fast3d", Fast3D(layer=0, keep=6)),
    ("lvlm_csp (uniform/random)", LVLMCSP(1, 8, 1, 4)),
    ("lvlm_csp (seg_query=query)", LVLMCSP(1, 8, 1, 4, seg_query="query")),
    ("lvlm_csp (cls)", LVLMCSP(1, 8, 1, 4, clustering="cls")),
    ("lvlm_csp (seg_first)", LVLMCSP(1, 8, 1, 4, clustering="seg_first")),
    ("prumerge", PruMerge()),
    ("prumerge_plus", PruMergePlus()),
    ("visionzip", VisionZip()),
    ("segpruner", SeGPruner()),
]


def cell(method: Any, host: str) -> str:
    cls = host_class(host)
    needs = method_needs(method)
    missing = sorted(needs - cls.always)
    options = sorted({cls.optional[n] for n in missing if n in cls.optional})
    lacking = [n for n in missing if n not in cls.optional]
    if lacking:
        return "✘ " + ", ".join(lacking)
    return "✔" + ("" if not options else " " + " ".join(f"{o}=" for o in options))


def table(rows: Sequence[Tuple[str, Any]] = ROWS) -> str:
    hosts = host_names()
    lines = ["| method | " + " | ".join(f"`{h}`" for h in hosts) + " |", "|---|" + "---|" * len(hosts)]
    for label, method in rows:
        lines.append(f"| `{label}` | " + " | ".join(cell(method, h) for h in hosts) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(list(argv))
    print(table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(main(sys.argv[1:]))
