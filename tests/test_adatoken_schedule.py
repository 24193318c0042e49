"""AdaToken-3D's schedule maths (Eq.1–7, SLSQP fit, budgets, JSON) against hand-derived figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shared.methods.adatoken import (
    AdaToken3D,
    AdaTokenSchedule,
    SpanBlockSums,
    budgets_for,
    eq7_loss,
    fit_schedule,
    information_flow,
    min_max,
    retention_curve,
)

# 3-layer toy: N = 3 SPA rows, |PRM| = 2 rows
TOY = SpanBlockSums(spa_spa=[0.6, 0.3, 0.9], prm_spa=[1.0, 0.5, 0.2], spa_sys=[1.5, 2.4, 0.3], spa_rows=3, prm_rows=2)


def test_eq1_to_4_on_a_three_layer_toy_by_hand():
    t = information_flow(TOY)
    assert np.allclose(t.s_self, [0.2, 0.1, 0.3])  # Eq.1 per-row mean: /N
    assert np.allclose(t.f, [0.146, 0.11242, 0.2493534])  # Eq.2: 0.73·S + 0.27·F(i−1)
    # Eq.3: 0.3·(PRM→SPA)/|PRM| + 0.7·(SPA→SYS)/N = 0.3·[0.5, 0.25, 0.1] + 0.7·[0.5, 0.8, 0.1]
    assert np.allclose(t.s_cross, [0.5, 0.635, 0.1])
    want = [math.exp(0.5) + 0.3 * 0.146 + math.log(1.2),
            math.exp(0.635) + 0.3 * 0.11242 + math.log(1.1),
            math.exp(0.1) + 0.3 * 0.2493534 + math.log(1.3)]
    assert np.allclose(t.inf, want, rtol=0, atol=1e-12)


def test_code_linear_variant_and_raw_scale():
    t = information_flow(TOY, variant="code_linear")
    assert np.allclose(t.f, [0.146, 0.219, 0.438])  # γ = 1: cumulative 0.73·S_self
    assert np.allclose(t.inf, [0.2738, 0.2962, 0.2814])  # 0.4·S_self + 0.3·S_cross + 0.3·F
    raw = information_flow(TOY, variant="code_linear", scale="raw")
    assert np.allclose(raw.s_self, [0.6, 0.3, 0.9]) and np.allclose(raw.s_cross, [1.35, 1.83, 0.27])
    big = SpanBlockSums([1.0] * 3, [1.0] * 3, [2000.0] * 3, spa_rows=3, prm_rows=2)
    with pytest.raises(ValueError, match="^scale: exp"):
        information_flow(big, scale="raw")
    with pytest.raises(ValueError, match="^variant:"):
        information_flow(TOY, variant="linear")


def test_eq6_and_eq7_by_hand():
    assert np.allclose(min_max([3.0, 1.0, 2.0]), [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="^inf_curve: .*constant"):
        min_max([2.0, 2.0, 2.0])
    # O = [1, .5, .2], I = [1, 0, .3]: Σ(O−I)² = .26; ∇O = [−.5, −.4, −.3], ∇I = [−1, −.35, .3] → .6125
    assert eq7_loss([1, 0.5, 0.2], [1, 0, 0.3]) == pytest.approx(0.8725, abs=1e-12)
    assert eq7_loss([1, 0.5, 0.2], [1, 0, 0.3], lam=0.0) == pytest.approx(0.26, abs=1e-12)


def test_fit_on_a_linear_inf_is_the_pure_exponential():
    """INF falling linearly with depth (I_norm 1 → 0): the fit is 1 → r = 0.1 as a pure exponential."""
    layers, r, direction = 32, 0.1, -1
    s = fit_schedule(np.arange(layers) * direction, r, visual_tokens=2000)
    beta = math.log(10) / 31  # 1 → 0.1 over 31 steps: 0.074277
    assert s.beta == pytest.approx(beta, abs=1e-6) and s.M == pytest.approx(0.0, abs=1e-6)
    assert s.alpha * math.exp(s.beta * (s.L_c - 1)) == pytest.approx(1.0, abs=1e-8)  # identifiable amplitude
    assert s.alpha == pytest.approx(1.0, abs=2e-3) and s.L_c == pytest.approx(1.0, abs=2e-2)  # from (0.8, .1, 1, 0)
    o = retention_curve(s.alpha, s.beta, s.L_c, s.M, layers)
    assert o[0] == pytest.approx(1.0, abs=1e-8) and o[-1] == pytest.approx(r, abs=1e-8)  # O(1) = 1, O(L) = r
    assert s.retention[0] == 1.0 and s.retention[-1] == r
    # independent check: the constraints leave a 1-D family (floor M, rate from O(L) = r); M = 0 is its minimum
    target = min_max(np.arange(layers) * direction)
    i = np.arange(layers)
    losses = []
    for m in np.linspace(0.0, 0.099, 100):
        q = ((r - m) / (1 - m)) ** (1 / 31)
        losses.append(eq7_loss((1 - m) * q ** i + m, target))
    assert int(np.argmin(losses)) == 0
    assert s.provenance["fit"]["loss"] == pytest.approx(losses[0], rel=1e-9)


def test_budgets_floor_min_one_and_non_increasing():
    assert budgets_for([1.0, 0.5, 0.52, 0.0001], 10) == [10, 5, 5, 1]
    s = fit_schedule(np.linspace(1, 0, 32), 0.1, visual_tokens=2057)
    b = list(s.budgets)
    assert b[0] == 2057 and b[-1] == 205  # ⌊0.1 · 2057⌋
    assert all(y <= x for x, y in zip(b, b[1:])) and min(b) >= 1
    assert b == [max(1, math.floor(o * 2057)) for o in s.retention]  # already monotone here
    tiny = fit_schedule(np.linspace(1, 0, 8), 0.01, visual_tokens=20)
    assert tiny.budgets[-1] == 1 and all(y <= x for x, y in zip(tiny.budgets, tiny.budgets[1:]))


def test_json_round_trip_and_errors():
    s = fit_schedule(np.linspace(1, 0, 6), 0.25, visual_tokens=24, provenance={"calibration": {"prompts": 64}})
    back = AdaTokenSchedule.from_json(s.to_json())
    assert back == s
    assert back.provenance["calibration"] == {"prompts": 64} and back.provenance["fit"]["method"] == "SLSQP"
    with pytest.raises(ValueError, match="^text:"):
        AdaTokenSchedule.from_json('{"r": 0.1}')
    with pytest.raises(ValueError, match="^r:"):
        fit_schedule(np.linspace(1, 0, 6), 1.5, visual_tokens=24)
    with pytest.raises(ValueError, match="^initial:"):
        fit_schedule(np.linspace(1, 0, 6), 0.25, visual_tokens=24, initial=(2.0, 0.1, 1.0, 0.0))
    with pytest.raises(ValueError, match="^spa_sys:"):
        SpanBlockSums([1.0, 2.0], [1.0, 2.0], [1.0], spa_rows=3, prm_rows=2)


def test_method_schedule_is_the_budgets_and_prune_layers_sample_them():
    s = fit_schedule(np.linspace(1, 0, 4), 0.25, visual_tokens=24)
    assert list(s.budgets) == [24, 15, 9, 6]  # 24 · 0.25^(i/3) = 24, 15.1, 9.5, 6
    assert AdaToken3D(s).schedule(24, 4) == [24, 15, 9, 6]
    assert AdaToken3D(s, prune_layers=(2,)).schedule(24, 4) == [24, 24, 9, 9]
    # any N: ⌊30 · 0.25^(i/3)⌋ = 30, 18.9, 11.9, 7.5; ⌊3 · …⌋ = 3, 1.9, 1.19, 0.75 → at least 1
    assert AdaToken3D(s).schedule(30, 4) == [30, 18, 11, 7]
    assert AdaToken3D(s).schedule(3, 4) == [3, 1, 1, 1]
    assert AdaToken3D(s).schedule(0, 4) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="^visual_tokens:"):
        AdaToken3D(s, visual_tokens=24).schedule(30, 4)
    with pytest.raises(ValueError, match="^fitted:"):
        AdaToken3D(s).schedule(24, 6)
    with pytest.raises(ValueError, match="^prune_layers:"):
        AdaToken3D(s, prune_layers=(2, 1))
    with pytest.raises(ValueError, match="^prune_layers:"):
        AdaToken3D(s, prune_layers=(0, 2)).schedule(24, 4)
    with pytest.raises(ValueError, match="^positions:"):
        AdaToken3D(s, positions="shifted")
    with pytest.raises(ValueError, match="^visual_tokens:"):
        AdaToken3D(s, visual_tokens=0)


def test_fitted_loads_from_a_path_and_bad_paths_or_json_are_refused(tmp_path):
    import shared

    s = fit_schedule(np.linspace(1, 0, 4), 0.25, visual_tokens=24)
    path = tmp_path / "schedule.json"
    path.write_text(s.to_json(), encoding="utf-8")
    for given in (path, str(path)):
        m = AdaToken3D(given)
        assert m.fitted == given and m.fitted_schedule == s and m.schedule(24, 4) == [24, 15, 9, 6]
    by_name = shared.get_method("adatoken3d", fitted=str(path), prune_layers=(2,))
    assert isinstance(by_name, AdaToken3D) and by_name.schedule(24, 4) == [24, 24, 9, 9]
    import argparse

    from shared.evalkit.cli import add_method_args, method_settings, methods_from_args

    cli = argparse.ArgumentParser()
    add_method_args(cli)
    (m,) = methods_from_args(cli.parse_args(["--method", "adatoken3d", "--method-args", f"fitted={path}",
                                             "positions='original'"]))
    assert m.fitted_schedule == s and m.positions == "original"
    assert method_settings([m])[0]["fitted"] == str(path)  # run.json records which schedule file ran
    with pytest.raises(ValueError, match="^fitted: no schedule JSON at .*missing.json"):
        AdaToken3D(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="^fitted: no schedule JSON at"):
        AdaToken3D(str(tmp_path))  # a directory
    bad = tmp_path / "bad.json"
    for text in ("{not json", '{"r": 0.1}', "[1, 2]", '{"r": 0.1, "theta": 3, "retention": [1], "budgets": [1], '
                 '"visual_tokens": 1, "provenance": {}}', s.to_json().replace('"budgets": [', '"budgets": [-1, ')):
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match="^fitted: .*bad.json.* is not an AdaToken-3D schedule JSON"):
            AdaToken3D(bad)
    for wrong in (3, None, b"schedule.json", {"r": 0.1}):
        with pytest.raises(ValueError, match="^fitted: expected an AdaTokenSchedule or the path of its JSON"):
            AdaToken3D(wrong)
    # a schedule whose first layer does not keep everything, or retains more than everything
    d = json.loads(s.to_json())
    for retention, budgets in (([0.9, 0.5, 0.3, 0.25], [21, 12, 7, 6]), ([1.0, 1.2, 0.3, 0.25], [24, 24, 7, 6])):
        d["retention"], d["budgets"] = retention, budgets
        bad.write_text(json.dumps(d), encoding="utf-8")
        with pytest.raises(ValueError, match=r"^fitted: expected (O\(1\) = 1|retention fractions in \[0, 1\])"):
            AdaToken3D(bad)


def test_a_plan_drops_each_sample_to_its_own_budget():
    """Stage layers: every layer where some sample's budget drops; per stage, each sample's count there."""
    import torch

    from shared.engine.plan import PruningRequest

    def request(spans):
        mask = torch.zeros(len(spans), 30, dtype=torch.bool)
        for b, (a, e) in enumerate(spans):
            mask[b, a:e] = True
        return PruningRequest(visual_mask=mask, query_index=torch.full((len(spans),), 29))

    s = fit_schedule(np.linspace(1, 0, 4), 0.25, visual_tokens=24)
    m = AdaToken3D(s)
    assert m.schedule(24, 4) == [24, 15, 9, 6] and m.schedule(5, 4) == [5, 3, 1, 1] and m.schedule(2, 4) == [2, 1, 1, 1]
    plan = m.make_plan(request([(2, 26), (2, 7), (2, 4)]), 4)
    assert plan.stage_of == {1: 0, 2: 1, 3: 2}
    assert plan.counts == [[15, 9, 6], [3, 1, 1], [1, 1, 1]]  # the N=2 sample keeps its one token at layers 2, 3
    only_small = m.make_plan(request([(2, 4)]), 4)
    assert only_small.stage_of == {1: 0} and only_small.counts == [[1]]
