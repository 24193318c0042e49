"""LLaVA-3D's geometry on the stock transformers ``LlamaModel`` (no LLaVA-3D files needed): a tiny-width 32-layer
LLaMA fed LLaVA-3D's prefill layout, [SYS 35 | N voxel tokens | PRM 36], query = the last prompt token (the ':' of
"ASSISTANT:"). N = 1986 gives the 2,057 tokens Table III's 11.46 TFLOPs implies; the checks against the slow
references (which run the stock eager layers with attention weights) use a smaller scene, N = 250 (321 tokens).

- vanilla at 2,057 tokens: the engine without a method (eager, LLaVA-3D's torch 2.1.0 pin; sdpa, torch >= 2.1.1)
  and AdaToken-3D with retention 1 everywhere equal the stock forward bit for bit;
- AdaToken-3D from a schedule fitted at r = 0.1 (loaded from its JSON file) keeps exactly ⌊O(i)·N⌋ at every
  layer for N = 1986 and N = 250, the latter with the kept sets of the released PDrop rank-and-drop
  (``released_pdrop``) run at the same 31 stages;
- PyramidDrop ``paper`` (λ = 0.5) and ``matched_r10`` (λ = 0.1^(1/3)) keep their counts at 2,057 tokens and, in
  both position modes, equal the released transcription: kept sets per stage exactly, the kept tokens' final
  hidden states to float tolerance;
- FastV (K = 2, R = 50 %) follows its schedule at 2,057 tokens;
- greedy generation with a KV cache after an AdaToken-3D prefill equals the masking reference recomputed
  without a cache (``reference.ScheduleDecoder``) at N = 250, and the engine's own cache-less replay at N = 1986.

Runs on transformers 4.37.2 (LLaVA-3D's pin) and the latest 5.x only: the other pins' LLaMA is covered by the
small engine tests, and these prefills are long for CPU.
"""
from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if transformers.__version__ != "4.37.2" and int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("LLaVA-3D geometry: transformers 4.37.2 (LLaVA-3D's pin) and 5.x only", allow_module_level=True)

from shared import FastV, pruning  # noqa: E402
from shared.apps.matrix import adatoken_keep_all  # noqa: E402
from shared.engine.adapters import patched_forward  # noqa: E402
from shared.methods.adatoken import AdaToken3D, fit_schedule  # noqa: E402
from shared.methods.pyramid_drop import PRESETS  # noqa: E402

from . import reference, released_pdrop, tiny  # noqa: E402

SYS, N, PRM = 35, 1986, 36
LENGTH = SYS + N + PRM  # 2057
N_REF = 250  # the scene size of the checks against the slow references (321 tokens)
LAYERS = 32
IMPLS = [i for k, i in tiny.available() if k == "llama"]
IMPL = IMPLS[-1]  # sdpa where this version has it (LLaVA-3D on torch >= 2.1.1), else eager


def _model(impl):
    """32 layers, hidden 64, 4 heads = 4 KV heads (the released ranking has no GQA), 4,096 positions."""
    return tiny.build("llama", impl, layers=LAYERS, kv_heads=4, max_positions=4096)


def _ids(n=N, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (1, SYS + n + PRM), generator=g)


def _prefill(model, method, ids, n=N):
    with torch.no_grad(), pruning(model.model, method) as eng:
        eng.prepare(visual_spans=[(SYS, SYS + n)])
        out = model.model(inputs_embeds=model.get_input_embeddings()(ids)).last_hidden_state
    return out, eng.last_stats


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The r = 0.1 schedule fitted to a linear INF over 32 layers, written as JSON; (path, schedule)."""
    sched = fit_schedule(np.linspace(1, 0, LAYERS), 0.1, visual_tokens=N)
    path = tmp_path_factory.mktemp("adatoken") / "schedule_r10.json"
    path.write_text(sched.to_json(), encoding="utf-8")
    return path, sched


def _budgets(retention, n):
    """⌊O(i)·n⌋, at least 1, running minimum (the plan's rule, written out)."""
    out = []
    for o in retention:
        k = max(1, math.floor(o * n))
        out.append(min(out[-1], k) if out else k)
    return out


def _drops(budgets):
    return [j for j in range(1, LAYERS) if budgets[j] < budgets[j - 1]]


@pytest.mark.parametrize("impl", IMPLS)
def test_vanilla_is_the_stock_forward_bit_for_bit(impl):
    model = _model(impl)
    ids = _ids()
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        for method in (None, adatoken_keep_all(LAYERS)) if impl == IMPL else (None,):
            with pruning(model.model, method) as eng:
                eng.prepare(visual_spans=[(SYS, SYS + N)])
                out = model(input_ids=ids).logits
            assert torch.equal(out, stock), type(method).__name__
            if method is not None:
                assert eng.last_stats.visual[0].tolist() == [N] * LAYERS


def test_adatoken_at_r10_keeps_exactly_the_budgets_as_released_pdrop_ranks(fitted):
    path, sched = fitted
    method = AdaToken3D(path)
    model = _model(IMPL)
    budgets = _budgets(sched.retention, N)
    assert budgets[0] == N and budgets[-1] == 198  # ⌊0.1 · 1986⌋
    assert _drops(budgets) == list(range(1, LAYERS))  # the curve drops at every layer for N = 1986
    _, stats = _prefill(model, method, _ids())
    assert stats.visual[0].tolist() == budgets == method.schedule(N, LAYERS)
    assert stats.tokens[0].tolist() == [SYS + PRM + k for k in budgets]
    # N = 250 with the released rank-and-drop at the same stages, keep = int(N · k/N) = k exactly (rational ratios)
    budgets = _budgets(sched.retention, N_REF)
    stages = _drops(budgets)
    assert budgets[-1] == 25 and stages == list(range(1, LAYERS))
    ids = _ids(N_REF)
    out, stats = _prefill(model, method, ids, N_REF)
    assert stats.visual[0].tolist() == budgets
    ref = _model("eager")
    want_h, want_pos, want_stages = released_pdrop.prefill(
        ref, ref.get_input_embeddings()(ids).detach(), SYS, N_REF, layer_list=stages,
        ratio_list=[Fraction(1)] + [Fraction(budgets[j], N_REF) for j in stages])
    assert [j for j, _ in stats.stages] == [0] + stages
    assert [s[0].tolist() for _, s in stats.stages[1:]] == want_stages
    torch.testing.assert_close(out[0, want_pos], want_h[0], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["paper", "matched_r10"])
def test_pdrop_presets_keep_their_counts_and_equal_the_released_rank_and_drop(preset):
    model, ref = _model(IMPL), _model("eager")
    keep = PRESETS[preset].keep_counts(N)
    assert keep == {"paper": [993, 496, 248], "matched_r10": [921, 427, 198]}[preset]
    _, stats = _prefill(model, PRESETS[preset], _ids())
    assert stats.visual[0].tolist() == [N] * 8 + [keep[0]] * 8 + [keep[1]] * 8 + [keep[2]] * 8
    ids = _ids(N_REF, seed=12)
    emb = ref.get_input_embeddings()(ids).detach()
    for positions in ("compact", "original"):
        method = replace(PRESETS[preset], positions=positions)
        out, stats = _prefill(model, method, ids, N_REF)
        want_h, want_pos, want_stages = released_pdrop.prefill(
            ref, emb, SYS, N_REF, layer_list=(8, 16, 24), ratio_list=[1.0, *method.stage_ratios()],
            renumber=positions == "compact")
        assert [len(s) for s in want_stages] == method.keep_counts(N_REF)
        assert [j for j, _ in stats.stages] == [0, 8, 16, 24], positions
        assert [s[0].tolist() for _, s in stats.stages[1:]] == want_stages, positions
        torch.testing.assert_close(out[0, want_pos], want_h[0], atol=5e-5, rtol=1e-4)


def test_fastv_follows_its_schedule():
    method = FastV(layer=2, keep_ratio=0.5)
    out, stats = _prefill(_model(IMPL), method, _ids())
    assert stats.visual[0].tolist() == method.schedule(N, LAYERS) == [N] * 2 + [N // 2] * 30
    assert bool(torch.isfinite(out).all())


STEPS = 3


def _generate(model, ids, use_cache):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                          num_beams=1, pad_token_id=0, use_cache=use_cache)


def test_cached_generation_after_an_adatoken_prefill_equals_the_cacheless_references(fitted):
    path, sched = fitted
    method = AdaToken3D(path)
    model, ref = _model(IMPL), _model("eager")
    # N = 250: against the masking reference (every step recomputed on the whole sequence, no cache)
    ids = _ids(N_REF, seed=13)
    budgets = _budgets(sched.retention, N_REF)
    events = reference.pdrop_events(_drops(budgets), [budgets[j] for j in _drops(budgets)])
    with torch.no_grad():
        emb = ref.get_input_embeddings()(ids)
        _, kept, _, alive = reference.run(ref, emb, (SYS, SYS + N_REF), ids.shape[1] - 1, events, positions="compact")
        assert [len(k) for k in kept] == budgets
        with patched_forward(ref.model, reference.ScheduleDecoder(ref, [alive], positions="compact")):
            want = _generate(ref, ids, use_cache=False)
        with pruning(model.model, method) as eng, eng.generation():
            eng.prepare(visual_spans=[(SYS, SYS + N_REF)])
            got = _generate(model, ids, use_cache=True)
    assert eng.last_stats.visual[0].tolist() == budgets
    assert torch.equal(got, want), f"{got[0, -STEPS:].tolist()} vs {want[0, -STEPS:].tolist()}"
    # N = 1986: the cached decode against the engine replaying the prefill decision without a cache
    ids = _ids()
    got = {}
    with torch.no_grad():
        for use_cache in (True, False):
            with pruning(model.model, method) as eng, eng.generation():
                eng.prepare(visual_spans=[(SYS, SYS + N)])
                got[use_cache] = _generate(model, ids, use_cache)
    assert torch.equal(got[True], got[False])
