"""benchmarks/adatoken_prefill.py on tiny dims, one round: every variant keeps exactly its schedule per layer and
the printed tables have every row (correctness only: no timing assertions)."""
from __future__ import annotations

import importlib.util
import io
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYS, PRM, L = 35, 36, 32


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("adatoken_prefill", os.path.join(ROOT, "benchmarks",
                                                                                     "adatoken_prefill.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _steps(n, stages):
    """[(first layer, visual kept from it on)] -> visual tokens per layer, starting from n."""
    out = [n] * L
    for layer, k in stages:
        out[layer:] = [k] * (L - layer)
    return out


def _floor_budgets(retention, n):
    """k_i = max(1, floor(O(i)·n)), running minimum."""
    out = []
    for o in retention:
        k = max(1, min(n, math.floor(o * n)))
        out.append(min(out[-1], k) if out else k)
    return out


def test_tiny_run_keeps_every_schedule_and_prints_every_variant(bench):
    n = 120
    args = bench.parse(["--dims", "tiny", "--visual", str(n), "--rounds", "1", "--calib-chunks", "32,256",
                        "--quiet"])
    res = bench.measure(args)
    vis = {name: [t - SYS - PRM for t in tok] for name, tok in res.tokens.items()}
    lam = 0.1 ** (1 / 3)
    ret = res.schedule.retention
    assert ret[0] == 1.0 and ret[-1] == 0.1
    full = _floor_budgets(ret, n)
    sampled = lambda layers: _steps(n, [(x, full[x]) for x in layers])  # noqa: E731
    floor = round(sum(full) / L + SYS + PRM) - SYS - PRM
    want = {
        "vanilla (stock)": [n] * L,
        "PDrop λ=0.5 @8,16,24": _steps(n, [(8, 60), (16, 30), (24, 15)]),
        "PDrop λ=0.464 @8,16,24": _steps(n, [(8, int(n * lam)), (16, int(n * lam ** 2)), (24, int(n * lam ** 3))]),
        "AdaToken-3D r=0.1 every drop": full,
        "AdaToken-3D r=0.1 @8,16,24": sampled((8, 16, 24)),
        "AdaToken-3D r=0.1 @ATE10": sampled((4, 8, 12, 16, 18, 20, 22, 24, 26, 28)),
        "floor": [floor] * L,
    }
    assert vis == want
    assert full[-1] == 12 and full[1] < full[0]  # the fit really prunes: r·N at the last layer
    assert all(len(t) == 1 for t in res.times.values())
    assert [c["chunk"] for c in res.calibration] == [32, 256]
    assert res.layer_peak > 0 and all(c["peak"] > 0 for c in res.calibration)

    buf = io.StringIO()
    bench.report(res, buf)
    text = buf.getvalue()
    for name in want:
        label = name if name != "floor" else f"stock on {floor + SYS + PRM} tokens (floor)"
        assert sum(line.startswith(label + " ") for line in text.splitlines()) == 1, label
    calib = text.split("Calibration (")[1].splitlines()
    rows = [line.split() for line in calib if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [32, 256] and all(len(r) == 7 for r in rows)


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse(["--calib-chunks", "64,x"])
    with pytest.raises(SystemExit):
        bench.parse(["--r", "1.5"])
