"""PyramidDrop's presets for the LLaVA-3D comparisons: ``paper`` (λ = 0.5) and ``matched_r10/20/40``
(λ = r^(1/3) on layers 8/16/24, the last stage keeping r of the N spatial tokens, note §6.5 item 7), built by
name from the evaluation command line."""
from __future__ import annotations

import argparse
from decimal import Decimal, getcontext
from fractions import Fraction

import pytest

from shared.evalkit.cli import add_method_args, methods_from_args
from shared.methods.pyramid_drop import PRESETS, PyramidDrop, matched

MATCHED = {"matched_r10": "0.1", "matched_r20": "0.2", "matched_r40": "0.4"}


@pytest.mark.parametrize("name", sorted(MATCHED))
def test_matched_presets_keep_floor_r_n_at_the_last_stage_for_every_scene_size(name):
    """Over every LLaVA-3D voxel count N = 1..2560: the last stage keeps ⌊r·N⌋ (exact rational r) and the
    earlier stages ⌊λ^s·N⌋ (λ = r^(1/3) to 40 digits), i.e. PDrop's int() rule never falls one short."""
    p = PRESETS[name]
    r = Fraction(MATCHED[name])
    getcontext().prec = 40
    lam = Decimal(MATCHED[name]) ** (Decimal(1) / Decimal(3))
    assert (p.layers, p.positions) == ((8, 16, 24), "compact")
    # the note's λ values
    assert round(p.ratio, 3) == {"matched_r10": 0.464, "matched_r20": 0.585, "matched_r40": 0.737}[name]
    for n in range(1, 2561):
        kept = p.keep_counts(n)
        assert kept[-1] == (r * n).numerator // (r * n).denominator, n
        assert kept[:2] == [int((lam ** s * n).to_integral_value(rounding="ROUND_FLOOR")) for s in (1, 2)], n
    k = p.keep_counts(1986)
    assert k[-1] == int(r * 1986)  # 198 / 397 / 794 voxel tokens in the last 8 layers of a 1986-token scene
    assert p.schedule(1986, 32) == [1986] * 8 + [k[0]] * 8 + [k[1]] * 8 + [k[2]] * 8


def test_the_paper_preset_and_the_matched_builder():
    assert PRESETS["paper"].keep_counts(1986) == [993, 496, 248]
    assert matched(0.1) == PRESETS["matched_r10"]
    assert matched(0.25, layers=(2, 4)).stage_ratios() == [0.5, 0.25]
    with pytest.raises(ValueError, match="^r:"):
        matched(0.0)
    with pytest.raises(ValueError, match="^r:"):
        matched(1.5)


@pytest.mark.parametrize("name", ["paper", *sorted(MATCHED)])
def test_presets_build_from_the_evaluation_command_line(name):
    p = argparse.ArgumentParser()
    add_method_args(p)
    (m,) = methods_from_args(p.parse_args(["--method", "pdrop", "--method-args", f"preset={name}"]))
    assert isinstance(m, PyramidDrop) and m == PRESETS[name]
    (o,) = methods_from_args(p.parse_args(["--method", "pdrop", "--method-args", f"preset={name}",
                                           "positions='original'"]))
    assert o.positions == "original" and o.stage_ratios() == m.stage_ratios()
