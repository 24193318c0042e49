"""SAP α search (``shared.apps.fast3d_alpha``).

The SAP rule is injected: ``ref_rule`` below is this test's own implementation of the spec (notes §6.5:
p = softmax(logits); k* = the smallest k whose k largest p sum to ≥ α, n if never), written with plain
Python loops, so these tests do not depend on ``shared.methods.fast3d``.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from shared.apps import fast3d_alpha
from shared.apps.fast3d_alpha import AUTHORS_GRID, PROTOCOLS, load_logits, search_alpha, set_ratios


def ref_rule(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    out = []
    for row in logits.double().tolist():
        m = max(row)
        e = [math.exp(x - m) for x in row]
        z = sum(e)
        p = sorted((x / z for x in e), reverse=True)
        acc, k = 0.0, len(p)
        for i, x in enumerate(p):
            acc += x
            if acc >= alpha:
                k = i + 1
                break
        out.append(k)
    return torch.tensor(out, dtype=torch.long)


def synthetic(seed=0, sizes=(12, 7, 16), n=10):
    g = torch.Generator().manual_seed(seed)
    return {f"set{i}": torch.randn(s, n, generator=g) * (1.0 + i) for i, s in enumerate(sizes)}


def test_ratio_arithmetic():
    # p = (0.5, 0.3, 0.2, 0, 0...) over 10 objects: α=0.5 → k*=1, α=0.6 → 2, α=0.95 → 3
    p = torch.tensor([0.5, 0.3, 0.2] + [1e-12] * 7)
    logits = torch.log(p)[None].repeat(2, 1)
    for alpha, k in ((0.5, 1), (0.6, 2), (0.95, 3)):
        ratio, n = set_ratios({"a": logits}, alpha, ref_rule)["a"]
        assert n == 2 and ratio == pytest.approx(100 * (1 - k / 10))


def achievable(logits_by_set, average="sets"):
    """Every overall ratio SAP can produce (brute force): k* is constant while α stays between two
    consecutive prefix masses, so evaluate k* = 1 + #(prefix masses < α) at each interval's midpoint."""
    cums = {s: torch.softmax(lg.double(), -1).sort(-1, descending=True).values.cumsum(-1)
            for s, lg in logits_by_set.items()}
    edges = sorted({0.0, 1.0} | {float(x) for c in cums.values() for x in c.flatten() if float(x) < 1.0})
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        a = 0.5 * (lo + hi)
        per = {}
        for s, c in cums.items():
            k = ((c < a).sum(-1) + 1).clamp(max=c.shape[-1]).double()
            per[s] = (float(100 * (1 - (k / c.shape[-1]).mean())), c.shape[0])
        out.append(fast3d_alpha.overall(per, average))
    return out


@pytest.mark.parametrize("average", ["sets", "samples"])
def test_bisection_finds_the_closest_achievable_ratio(average):
    data = synthetic()
    for target in (90.0, 75.0, 60.0):
        res = search_alpha(data, target=target, protocol="calibration", average=average, rule=ref_rule)
        best = min(abs(r - target) for r in achievable(data, average))
        assert abs(res.ratio - target) == pytest.approx(best, abs=1e-9)
        assert res.ratio == pytest.approx(fast3d_alpha.overall(set_ratios(data, res.alpha, ref_rule), average))
        assert res.protocol == PROTOCOLS["calibration"] and res.average == average
        assert res.within_tolerance == (abs(res.ratio - target) / target <= 0.02)
    sets_res = search_alpha(data, 75.0, rule=ref_rule)
    assert sets_res.ratio == pytest.approx(sum(sets_res.per_set.values()) / 3)  # unweighted over sets


def test_unreachable_target_is_reported():
    data = synthetic(n=6)  # at most 100·(1 − 1/6) = 83.3 % can be pruned
    res = search_alpha(data, target=95.0, rule=ref_rule)
    assert res.ratio == pytest.approx(100 * (1 - 1 / 6)) and not res.within_tolerance


def test_authors_val_protocol_grid_and_label():
    data = synthetic(1)
    res = search_alpha(data, target=80.0, protocol="authors-val", rule=ref_rule)
    assert res.protocol.startswith("authors-val") and "evaluation split" in res.protocol
    assert res.alpha in AUTHORS_GRID and [a for a, _ in res.evaluated] == list(AUTHORS_GRID)
    grid_best = min(AUTHORS_GRID, key=lambda a: (abs(fast3d_alpha.overall(set_ratios(data, a, ref_rule), "sets") - 80), a))
    assert res.alpha == grid_best
    with pytest.raises(ValueError, match="average"):
        search_alpha(data, protocol="authors-val", average="samples", rule=ref_rule)
    p = torch.softmax(data["set0"].double(), -1)
    assert res.reference_top10_mass["set0"] == pytest.approx(float(p.topk(10, -1).values.sum(-1).mean()))


def test_files_and_cli(tmp_path, monkeypatch, capsys):
    data = synthetic(2)
    for name, lg in data.items():  # the authors' inference format {anno_index: {"a_map": logits}}
        torch.save({i: {"a_map": row} for i, row in enumerate(lg)}, tmp_path / f"infer_attn_maps_calib_{name}.pt")
    assert torch.equal(load_logits(str(tmp_path / "infer_attn_maps_calib_set1.pt")), data["set1"])
    monkeypatch.setattr(fast3d_alpha, "default_rule", lambda: ref_rule)
    out = tmp_path / "alpha.json"
    assert fast3d_alpha.main(["--pred-dir", str(tmp_path), "--sets", "set0#set1#set2", "--target", "70",
                              "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["alpha"] == pytest.approx(search_alpha(data, 70.0, rule=ref_rule).alpha)
    assert res["protocol"] == PROTOCOLS["calibration"]
    assert json.loads(capsys.readouterr().out)["ratio"] == pytest.approx(res["ratio"])
    # an extracted target file (a_map_ori present) is refused: SAP needs GAP logits
    torch.save([{"index": 0, "a_map": torch.rand(5), "a_map_ori": torch.rand(5)}], tmp_path / "targets.pt")
    with pytest.raises(ValueError, match="target"):
        load_logits(str(tmp_path / "targets.pt"))


def test_default_rule_is_the_projects_sap_rule():
    """The search's default rule is ``shared.methods.fast3d.sap_object_counts``; it agrees with this file's
    reference, so the CLI (which uses the default) chooses the same α."""
    from shared.methods.fast3d import sap_object_counts

    assert fast3d_alpha.default_rule() is sap_object_counts
    data = synthetic(3)
    for a in (1e-12, 0.21, 0.5, 0.9, 1.0):
        for lg in data.values():
            assert torch.equal(sap_object_counts(lg, a), ref_rule(lg, a))
    assert search_alpha(data, 80.0).alpha == search_alpha(data, 80.0, rule=ref_rule).alpha
