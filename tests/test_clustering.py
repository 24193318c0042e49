"""LVLM_CSP clustering-stage selectors (shared.methods.lvlm_csp_clustering): hand-computed patterns and the Eq. 5 rule."""
from __future__ import annotations

import pytest
import torch

from shared.methods.lvlm_csp_clustering import (
    SegFirstSelection,
    cls_tokens,
    eq5_quotas,
    grid_lattice_shape,
    random_tokens,
    seg_first_tokens,
    uniform_tokens,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_valid(idx: torch.Tensor, n: int, count=None) -> None:
    assert idx.dtype == torch.long and idx.dim() == 1
    assert torch.equal(idx, torch.sort(idx).values)
    assert idx.unique().numel() == idx.numel()
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    if count is not None:
        assert idx.numel() == count


# ----------------------------------------------------------------------------------- uniform
@pytest.mark.parametrize(
    "n,nc,columns,rows",
    [
        (256, 16, {0}, set(range(16))),
        (256, 32, {0, 8}, set(range(16))),
        (256, 64, {0, 4, 8, 12}, set(range(16))),
        (256, 96, set(range(0, 16, 2)), set(range(12))),  # stride 2: rows 0-11 only
        (576, 24, {0}, set(range(24))),
    ],
)
def test_uniform_literal_degenerate_patterns(n, nc, columns, rows):
    idx = uniform_tokens(n, nc)
    assert_valid(idx, n, nc)
    g = int(n ** 0.5)
    assert {int(k) % g for k in idx} == columns
    assert {int(k) // g for k in idx} == rows
    stride = n // nc
    assert idx.tolist() == [i * stride for i in range(nc)]


def test_uniform_literal_column_zero_exactly():
    assert uniform_tokens(256, 16).tolist() == [r * 16 for r in range(16)]
    assert uniform_tokens(256, 16, layout="literal").tolist() == [r * 16 for r in range(16)]


def test_uniform_literal_rows_of_128_on_576():
    idx = uniform_tokens(576, 128)  # stride 4: last index 127*4 = 508 -> row 21
    assert max(int(k) // 24 for k in idx) == 21


def test_uniform_grid_hand_computed():
    # 4x4 lattice on 16x16: cell centres floor((a + 1/2) * 16/4) = 2, 6, 10, 14
    want = sorted(r * 16 + c for r in (2, 6, 10, 14) for c in (2, 6, 10, 14))
    assert uniform_tokens(256, 16, layout="grid").tolist() == want
    # 32 = 4 x 8: columns floor((b + 1/2) * 2) = 1, 3, ..., 15
    want = sorted(r * 16 + c for r in (2, 6, 10, 14) for c in range(1, 16, 2))
    assert uniform_tokens(256, 32, layout="grid").tolist() == want
    assert uniform_tokens(256, 1, layout="grid").tolist() == [8 * 16 + 8]
    assert grid_lattice_shape(576, 128) == (8, 16)
    assert grid_lattice_shape(256, 17) == (5, 4)  # 17 is prime: 5 x 4 lattice, 17 of its 20 points


@pytest.mark.parametrize("n", [256, 576])
@pytest.mark.parametrize("nc", [4, 7, 16, 17, 24, 26, 31, 32, 48, 64, 80, 96, 128, 200])
def test_uniform_grid_spreads_over_rows_and_columns(n, nc):
    idx = uniform_tokens(n, nc, layout="grid")
    assert_valid(idx, n, nc)
    g = int(n ** 0.5)
    bands = min(4, int(nc ** 0.5))  # an r x c lattice has r >= isqrt(Nc) rows
    rows = {(int(k) // g) * bands // g for k in idx}
    cols = {(int(k) % g) * bands // g for k in idx}
    assert rows == set(range(bands)), f"row bands hit: {sorted(rows)}"
    assert cols == set(range(bands)), f"column bands hit: {sorted(cols)}"


def test_uniform_all_tokens_and_bad_layout():
    assert uniform_tokens(256, 256, "grid").tolist() == list(range(256))
    assert uniform_tokens(256, 256).tolist() == list(range(256))
    with pytest.raises(ValueError, match="^layout:"):
        uniform_tokens(256, 16, layout="diagonal")
    with pytest.raises(ValueError, match="^n:"):
        uniform_tokens(250, 16, layout="grid")  # not a square grid
    assert uniform_tokens(250, 16).tolist() == [15 * i for i in range(16)]  # literal needs no square


# ------------------------------------------------------------------------------------ random
def test_random_is_seeded_and_uniform():
    a = random_tokens(256, 64, gen(3))
    b = random_tokens(256, 64, gen(3))
    c = random_tokens(256, 64, gen(4))
    assert_valid(a, 256, 64)
    assert a.tolist() == sorted(torch.randperm(256, generator=gen(3))[:64].tolist())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    counts = torch.zeros(256)
    g = gen(0)
    for _ in range(400):
        counts[random_tokens(256, 64, g)] += 1
    # each token is chosen with probability 1/4: mean 100, sd ~8.7
    assert 60 < float(counts.min()) and float(counts.max()) < 140


# --------------------------------------------------------------------------------------- cls
def test_cls_topk_with_ties_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert cls_tokens(scores, 2).tolist() == [1, 2]
    assert cls_tokens(scores, 3).tolist() == [1, 2, 4]
    assert cls_tokens(scores, 4).tolist() == [1, 2, 3, 4]
    assert cls_tokens(torch.zeros(256), 16).tolist() == list(range(16))


def test_cls_against_reference_ranking():
    g = gen(1)
    scores = torch.randint(0, 20, (576,), generator=g).float()  # many ties
    ref = sorted(range(576), key=lambda k: (-float(scores[k]), k))[:100]
    assert cls_tokens(scores, 100).tolist() == sorted(ref)
    s2 = torch.softmax(torch.randn(256, generator=g), 0)
    assert cls_tokens(s2, 32).tolist() == sorted(torch.argsort(s2, descending=True)[:32].tolist())


# -------------------------------------------------------------------------------- seg-first
def block(r0: int, r1: int, c0: int, c1: int, g: int = 16) -> torch.Tensor:
    return torch.tensor([r * g + c for r in range(r0, r1) for c in range(c0, c1)], dtype=torch.long)


def test_quotas_three_to_one():
    sets = [block(0, 8, 0, 8), block(8, 16, 8, 16)]
    sel = seg_first_tokens(sets, torch.tensor([300, 100]), 16, gen(), n=256)
    assert isinstance(sel, SegFirstSelection)
    assert sel.quotas.tolist() == [12, 4] and sel.drawn.tolist() == [12, 4]
    assert not sel.fallback_used and sel.count == 16
    assert_valid(sel.indices, 256, 16)
    s = set(sel.indices.tolist())
    assert len(s & set(sets[0].tolist())) == 12 and len(s & set(sets[1].tolist())) == 4


def test_float_and_integer_areas_give_same_quotas():
    a = torch.tensor([300, 100, 7, 0, 1])
    assert eq5_quotas(a, 16).tolist() == eq5_quotas(a.double(), 16).tolist() == [11, 3, 1, 0, 1]
    # Nc*a/sum = 16*300/408 = 11.76 -> 11; 16*100/408 = 3.9 -> 3; tiny ones -> max(1, 0) = 1


def test_tiny_object_gets_one_token():
    sets = [block(0, 16, 0, 8), block(15, 16, 15, 16)]
    sel = seg_first_tokens(sets, torch.tensor([10000, 1]), 16, gen(), n=256)
    assert sel.quotas.tolist() == [15, 1]  # floor(16*10000/10001) = 15; floor(16/10001) = 0 -> 1
    assert 255 in sel.indices.tolist() and sel.count == 16


def test_many_small_objects_exceed_budget():
    sets = [torch.tensor([k * 6]) for k in range(41)]
    sel = seg_first_tokens(sets, torch.full((41,), 5), 16, gen(), n=256)
    assert sel.quotas.tolist() == [1] * 41
    assert sel.count >= 41 and sel.indices.tolist() == [k * 6 for k in range(41)]


def test_quota_larger_than_token_set_takes_all_of_it():
    sets = [block(0, 8, 0, 16), torch.tensor([200, 201])]
    sel = seg_first_tokens(sets, torch.tensor([300, 100]), 16, gen(), n=256)
    assert sel.quotas.tolist() == [12, 4] and sel.drawn.tolist() == [12, 2]
    assert {200, 201} <= set(sel.indices.tolist()) and sel.count == 14  # no top-up


def test_overlaps_collapse():
    t = torch.tensor([5, 6, 7])
    sel = seg_first_tokens([t, t.clone()], torch.tensor([50, 50]), 6, gen(), n=256)
    assert sel.quotas.tolist() == [3, 3] and sel.indices.tolist() == [5, 6, 7] and sel.count == 3


def test_instance_outside_crop_dropped():
    sets = [block(0, 4, 0, 4), block(10, 12, 10, 12)]
    sel = seg_first_tokens(sets, torch.tensor([0, 50]), 4, gen(), n=256)
    assert sel.kept.tolist() == [False, True] and sel.quotas.tolist() == [0, 4]
    assert set(sel.indices.tolist()) == set(sets[1].tolist())
    # an out-of-crop instance has no tokens at all in practice
    sel2 = seg_first_tokens([torch.zeros(0, dtype=torch.long), sets[1]], torch.tensor([0, 50]), 4, gen(), n=256)
    assert torch.equal(sel2.indices, sel.indices)


@pytest.mark.parametrize("sets,areas", [([], torch.zeros(0)), ([block(0, 2, 0, 2)], torch.tensor([0]))])
def test_no_instance_falls_back(sets, areas):
    sel = seg_first_tokens(sets, areas, 16, gen(), n=256)
    assert sel.fallback_used and sel.count == 16
    assert torch.equal(sel.indices, uniform_tokens(256, 16))
    sel = seg_first_tokens(sets, areas, 16, gen(9), fallback="random", n=256)
    # the documented rule written out: the first Nc of a seeded randperm, sorted
    assert sel.fallback_used and sel.indices.tolist() == sorted(torch.randperm(256, generator=gen(9))[:16].tolist())
    sel = seg_first_tokens(sets, areas, 16, gen(), n=256, fallback_layout="grid")
    assert torch.equal(sel.indices, uniform_tokens(256, 16, "grid"))


def test_draws_are_seeded_and_uniform_within_instance():
    sets = [block(0, 4, 0, 16), block(8, 12, 0, 16)]
    areas = torch.tensor([100, 100])
    a = seg_first_tokens(sets, areas, 8, gen(5), n=256)
    b = seg_first_tokens(sets, areas, 8, gen(5), n=256)
    c = seg_first_tokens(sets, areas, 8, gen(6), n=256)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    counts = torch.zeros(256)
    g = gen(0)
    for _ in range(300):
        sel = seg_first_tokens(sets, areas, 8, g, n=256)
        assert set(sel.indices.tolist()) <= set(torch.cat(sets).tolist())
        counts[sel.indices] += 1
    # 4 of 64 tokens per instance per draw: 18.75 expected per token
    inside = counts[torch.cat(sets)]
    assert float(inside.min()) > 5 and float(inside.max()) < 40


# ------------------------------------------------------------------------------------- exact
@pytest.mark.parametrize(
    "sets,areas,nc",
    [
        ([torch.tensor([k * 6]) for k in range(41)], torch.arange(1, 42), 16),  # over budget
        ([block(0, 16, 0, 8), torch.tensor([255])], torch.tensor([10000, 1]), 16),
        ([torch.tensor([5, 6, 7])] * 2, torch.tensor([50, 50]), 6),  # overlap -> short
        ([block(0, 8, 0, 16), torch.tensor([200, 201])], torch.tensor([300, 100]), 16),  # |T| short
        ([block(0, 16, 0, 16)], torch.tensor([7]), 64),
    ],
)
def test_exact_budget_returns_exactly_nc(sets, areas, nc):
    sel = seg_first_tokens(sets, areas, nc, gen(2), budget="exact", n=256)
    assert_valid(sel.indices, 256, nc)
    assert sel.count == nc and not sel.fallback_used


def test_exact_trims_largest_quota_then_smallest_objects():
    sets = [block(0, 4, 0, 4), torch.tensor([100]), torch.tensor([101]), torch.tensor([102])]
    sel = seg_first_tokens(sets, torch.tensor([100, 1, 1, 1]), 4, gen(), budget="exact", n=256)
    assert sel.quotas.tolist() == [3, 1, 1, 1]  # floor(400/103) = 3; sum 6 > 4
    assert sel.drawn.tolist() == [1, 1, 1, 1]
    sets = [torch.tensor([k]) for k in range(41)]
    sel = seg_first_tokens(sets, torch.arange(1, 42), 16, gen(), budget="exact", n=256)
    assert sel.indices.tolist() == list(range(25, 41))  # the 16 largest objects keep their token


def test_exact_top_up_prefers_background():
    # T_0 = T_1 = tokens 0-9; quotas 4 + 4 overlap, so the union is mostly short of Nc = 8.
    t = torch.arange(10)
    topped = 0
    for seed in range(20):
        sel = seg_first_tokens([t, t.clone()], torch.tensor([1, 1]), 8, gen(seed), budget="exact", n=256)
        # the documented draw order: randperm of the generator per instance, in input order
        g = gen(seed)
        drawn = set(t[torch.randperm(10, generator=g)[:4]].tolist()) | set(t[torch.randperm(10, generator=g)[:4]].tolist())
        got = sel.indices.tolist()
        assert sel.count == 8
        assert {k for k in got if k < 10} == drawn  # no undrawn instance token was used to top up
        assert len([k for k in got if k >= 10]) == 8 - len(drawn)
        topped += len(drawn) < 8
    assert topped > 10
    # background exhausted: T_0 = T_1 = tokens 0-249, quotas 127 + 127 -> union well short of 254;
    # all 6 background tokens are used, the rest comes from undrawn instance tokens
    t = torch.arange(250)
    sel = seg_first_tokens([t, t.clone()], torch.tensor([1, 1]), 254, gen(), budget="exact", n=256)
    assert_valid(sel.indices, 256, 254)
    assert set(range(250, 256)) <= set(sel.indices.tolist())


# ------------------------------------------------------------------------------------ errors
def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match="^nc:"):
        random_tokens(256, 0, gen())
    with pytest.raises(ValueError, match="^nc:"):
        uniform_tokens(256, 257)
    with pytest.raises(TypeError, match="^nc:"):
        uniform_tokens(256, 16.0)
    with pytest.raises(TypeError, match="^generator:"):
        random_tokens(256, 16, None)
    with pytest.raises(ValueError, match="^scores:"):
        cls_tokens(torch.zeros(2, 8), 2)
    with pytest.raises(ValueError, match="^scores:"):
        cls_tokens(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="^nc:"):
        cls_tokens(torch.zeros(8), 9)
    t = [torch.tensor([1, 2])]
    with pytest.raises(ValueError, match="^token_sets:"):
        seg_first_tokens([torch.tensor([256])], torch.tensor([1]), 4, gen(), n=256)
    with pytest.raises(ValueError, match="^token_sets:"):
        seg_first_tokens([torch.tensor([-1])], torch.tensor([1]), 4, gen(), n=256)
    with pytest.raises(TypeError, match="^token_sets:"):
        seg_first_tokens([torch.tensor([1.0])], torch.tensor([1]), 4, gen(), n=256)
    with pytest.raises(ValueError, match="^token_sets:"):
        seg_first_tokens([torch.zeros(0, dtype=torch.long)], torch.tensor([3]), 4, gen(), n=256)
    with pytest.raises(ValueError, match="^areas:"):
        seg_first_tokens(t, torch.tensor([-1]), 4, gen(), n=256)
    with pytest.raises(ValueError, match="^areas:"):
        seg_first_tokens(t, torch.tensor([1, 2]), 4, gen(), n=256)
    with pytest.raises(ValueError, match="^areas:"):
        seg_first_tokens(t, torch.tensor([float("nan")]), 4, gen(), n=256)
    with pytest.raises(ValueError, match="^nc:"):
        seg_first_tokens(t, torch.tensor([1]), 0, gen(), n=256)
    with pytest.raises(ValueError, match="^nc:"):
        seg_first_tokens(t, torch.tensor([1]), 300, gen(), n=256)
    with pytest.raises(ValueError, match="^budget:"):
        seg_first_tokens(t, torch.tensor([1]), 4, gen(), budget="strict", n=256)
    with pytest.raises(ValueError, match="^fallback:"):
        seg_first_tokens(t, torch.tensor([1]), 4, gen(), fallback="cls", n=256)
