"""Fast3D's object-level selection and the seeded random baseline in the engine, on every pinned
transformers version: SAP budgets worked out by hand, whole-triplet selection in slot order, and
generation (greedy and beam, with and without a cache) equal to the masking reference under the
schedule the method must produce."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from shared import Fast3D, RandomDrop, pruning
from shared.engine.adapters import patched_forward
from shared.methods.fast3d import sap_object_counts, slot_scores, top_groups

from . import reference, tiny
from .test_generation import L_SEQ, STEPS, VIS, _generate, _prompts

CASES = tiny.available()
IDS = [f"{k}-{i}" for k, i in CASES]
N = VIS[1] - VIS[0]  # 24 visual tokens = 8 objects x 3
GROUP = 3


def test_sap_budget_by_hand():
    # softmax of log(p) is p: masses 0.5, 0.3, 0.15, 0.05 (sorted)
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    assert [int(sap_object_counts(logits, a)) for a in (0.2, 0.5, 0.51, 0.8, 0.81, 0.95, 0.96, 1.0)] == \
        [1, 1, 2, 2, 3, 3, 4, 4]
    batch = torch.stack([logits, torch.zeros(4)])  # uniform: k* = ceil(4 * alpha)
    assert sap_object_counts(batch, 0.6).tolist() == [2, math.ceil(4 * 0.6)]


def test_sap_refuses_what_is_not_logits():
    amap = torch.tensor([0.01, 0.02, 0.005, 0.003])  # extracted attention mass: non-negative, sums to < 1
    with pytest.raises(ValueError, match=r"^logits: SAP needs GAP logits"):
        sap_object_counts(amap, 0.21)
    for bad, msg in ((torch.tensor([1, 2]), "float tensor"), (torch.tensor([0.1, float("nan")]), "finite"),
                     ([0.1, 0.2], "float tensor")):
        with pytest.raises(ValueError, match=msg):
            sap_object_counts(bad, 0.5)
    for alpha in (0, 1.5, True, "0.2"):
        with pytest.raises(ValueError, match=r"^alpha:"):
            sap_object_counts(torch.zeros(3), alpha)


def test_slot_order_and_whole_triplets():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9])  # per object
    perm = torch.tensor([2, 3, 0, 1])  # slot i carries object perm[i]
    per_slot = slot_scores(scores, perm)
    assert per_slot.tolist() == pytest.approx([0.5, 0.9, 0.1, 0.9])
    # top-2 slots: 1 and 3 (0.9, tie -> lower slot first), whole triplets, sorted
    assert top_groups(per_slot, 2, 3).tolist() == [3, 4, 5, 9, 10, 11]
    with pytest.raises(ValueError, match="permutation"):
        slot_scores(scores, torch.tensor([0, 0, 1, 2]))


def test_fast3d_host_selection_and_refusals():
    m = Fast3D(layer=2, keep=6)
    scores = torch.tensor([3.0, -1.0, 2.0, 0.5])
    idx, info = m.host_selection(12, group=3, slot_to_object=torch.arange(4), object_scores=scores)
    assert idx.tolist() == [0, 1, 2, 6, 7, 8] and info["objects_kept"] == 2 and info["scores_from"] == "given"
    sap = Fast3D(layer=0, alpha=0.99)
    _, info = sap.host_selection(12, group=3, slot_to_object=None, object_scores=scores)
    # softmax([3, -1, 2, 0.5]) sorted = 0.681, 0.251, 0.056, 0.012: cumulative 0.932 < 0.988 < 0.99 -> all 4
    assert info["budget"] == 12
    with pytest.raises(ValueError, match=r"^object_scores: expected a float tensor"):
        m.host_selection(12, group=3, object_scores=torch.tensor([3, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"^object_scores: expected shape \(4,\)"):
        m.host_selection(12, group=3, object_scores=scores[None])
    calls = []
    online = Fast3D(layer=0, keep=3, scorer=lambda **kw: calls.append(kw) or scores)
    idx, info = online.host_selection(12, group=3, gap_inputs={"prompt": "p"})
    assert idx.tolist() == [0, 1, 2] and calls == [{"prompt": "p"}] and info["scores_from"] == "gap"
    with pytest.raises(ValueError, match=r"^keep: R=4 is not a multiple"):
        Fast3D(layer=0, keep=4).host_selection(12, group=3, object_scores=scores)
    with pytest.raises(ValueError, match=r"^object_scores: Fast3D needs per-object scores"):
        Fast3D(layer=0, keep=3).host_selection(12, group=3)
    with pytest.raises(ValueError, match=r"^object_scores: expected shape \(4,\)"):
        m.host_selection(12, group=3, object_scores=torch.zeros(5))
    with pytest.raises(ValueError, match=r"^keep/alpha"):
        Fast3D(layer=0)
    with pytest.raises(ValueError, match=r"^score_kind"):
        Fast3D(layer=0, alpha=0.2, score_kind="attention")
    with pytest.raises(ValueError, match=r"^layer"):
        Fast3D(layer=True, keep=3)


def _fast3d_schedule(layers, k_layer, chosen):
    """alive-per-layer for a selection of absolute visual positions from layer k_layer on."""
    full = torch.ones(L_SEQ, dtype=torch.bool)
    cut = full.clone()
    cut[VIS[0]:VIS[1]] = False
    cut[torch.as_tensor(chosen)] = True
    return [full if j < k_layer else cut for j in range(layers)]


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
@pytest.mark.parametrize("k_layer", [0, 2])
@pytest.mark.parametrize("beams", [1, 3])
def test_fast3d_generation_equals_the_masking_reference(kind, impl, k_layer, beams):
    model = tiny.build(kind, impl)
    ids = _prompts(model)
    method = Fast3D(layer=k_layer, keep=9)
    g = torch.Generator().manual_seed(5)
    picks = []
    for _ in range(2):
        idx, info = method.host_selection(N, group=GROUP, slot_to_object=torch.randperm(N // GROUP, generator=g),
                                          object_scores=torch.randn(N // GROUP, generator=g))
        assert info["objects_kept"] == 3
        picks.append(idx)
    layers = len(model.model.layers)
    schedules = [_fast3d_schedule(layers, k_layer, VIS[0] + p) for p in picks]
    with torch.no_grad():
        decoder = reference.ScheduleDecoder(tiny.build(kind, "eager"), schedules)
        with patched_forward(decoder.model.model, decoder):
            want = _generate(decoder.model, ids, beams, use_cache=False)
        for use_cache in (True, False):
            with pruning(model.model, method) as eng, eng.generation():
                eng.prepare(visual_spans=[VIS] * 2, visual_selection=picks)
                got = _generate(model, ids, beams, use_cache=use_cache)
            assert torch.equal(got, want), f"use_cache={use_cache}: {got} vs {want}"
            vis = eng.last_stats.visual
            assert vis.shape[0] == 2 * beams and vis[0].tolist() == method.schedule(N, layers)


@pytest.mark.parametrize("kind,impl", CASES[:1], ids=IDS[:1])
def test_random_baseline_is_seeded_per_sample_and_equals_the_reference(kind, impl):
    model = tiny.build(kind, impl)
    ids = _prompts(model)
    method = RandomDrop(layer=1, keep=9, seed=3, group=GROUP)
    keys = ["scene0011_00|4|q1", "scene0015_00|0|q7"]
    draws = []
    for key in keys:
        # the documented rule written out: seed = first 8 bytes (little-endian, 63 bits) of sha256("3\0key")
        digest = hashlib.sha256(f"3\x00{key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        groups = torch.randperm(N // GROUP, generator=gen)[:3]
        draws.append(torch.sort((groups[:, None] * GROUP + torch.arange(GROUP)).flatten()).values)
        assert torch.equal(method.draw(N, key), draws[-1])
    assert not torch.equal(draws[0], draws[1])
    assert draws[0].tolist() == [0, 1, 2, 18, 19, 20, 21, 22, 23]  # whole triplets
    layers = len(model.model.layers)
    schedules = [_fast3d_schedule(layers, 1, VIS[0] + d) for d in draws]
    with torch.no_grad():
        decoder = reference.ScheduleDecoder(tiny.build(kind, "eager"), schedules)
        with patched_forward(decoder.model.model, decoder):
            want = _generate(decoder.model, ids, 3, use_cache=False)
        with pruning(model.model, method) as eng, eng.generation():
            eng.prepare(visual_spans=[VIS] * 2, sample_keys=keys)
            got = _generate(model, ids, 3, use_cache=True)
        assert torch.equal(got, want)
        # the draw depends on the key only, not on the batch it comes in
        with pruning(model.model, method) as eng:
            eng.prepare(visual_spans=[VIS], sample_keys=keys[1:])
            model(input_ids=ids[1:])
        assert eng.last_stats.stages[-1][1][0].tolist() == (VIS[0] + draws[1]).tolist()
    with pytest.raises(ValueError, match=r"^group: R=8"):
        RandomDrop(layer=0, keep=8, group=3).keep_count(24)
