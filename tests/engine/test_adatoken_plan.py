"""AdaToken-3D on the engine: a fitted schedule keeps exactly its budgets per layer, ranked and
compacted as the released PyramidDrop, each sample of a mixed-N batch to its own budgets (every pinned
transformers version)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import PyramidDrop, pruning
from shared.methods.adatoken import AdaToken3D, AdaTokenSchedule, fit_schedule

from . import reference, tiny

CASES = tiny.available()
IDS = [f"{k}-{i}" for k, i in CASES]
LAYERS, L_SEQ, VIS = 4, 40, (6, 30)
N = VIS[1] - VIS[0]  # 24
BUDGETS = [24, 15, 9, 6]  # ⌊24 · 0.25^((i−1)/3)⌋: the pure exponential a linear INF fits to


def _ids(model, batch):
    g = torch.Generator().manual_seed(5)
    return torch.randint(1, model.config.vocab_size, (batch, L_SEQ), generator=g)


def _run(model, method, batch=2, spans=None):
    ids = _ids(model, batch)
    with torch.no_grad(), pruning(model.model, method) as eng:
        eng.prepare(visual_spans=spans or [VIS] * batch)
        out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
    return out, eng.last_stats


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
def test_engine_keeps_exactly_the_fitted_budgets_as_compact_pdrop(kind, impl):
    sched = AdaTokenSchedule.from_json(fit_schedule(np.linspace(1, 0, LAYERS), 0.25, visual_tokens=N).to_json())
    assert list(sched.budgets) == BUDGETS
    model = tiny.build(kind, impl, layers=LAYERS)
    out, stats = _run(model, AdaToken3D(sched))
    assert stats.visual.tolist() == [BUDGETS, BUDGETS]
    assert stats.tokens.tolist() == [[L_SEQ - N + k for k in BUDGETS]] * 2
    # the same drops as PyramidDrop at stages 1/2/3 with those counts (24·15/24 etc. are exact in binary)
    pd = PyramidDrop(layers=(1, 2, 3), ratios=(15 / 24, 9 / 24, 6 / 24), positions="compact")
    assert pd.keep_counts(N) == BUDGETS[1:]
    ref, ref_stats = _run(model, pd)
    assert [s[0] for s in stats.stages] == [s[0] for s in ref_stats.stages]
    for (_, got), (_, want) in zip(stats.stages, ref_stats.stages):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind,impl", CASES[:1], ids=IDS[:1])
def test_prune_layers_sample_the_curve_and_wrong_counts_are_refused(kind, impl):
    sched = fit_schedule(np.linspace(1, 0, LAYERS), 0.25, visual_tokens=N)
    model = tiny.build(kind, impl, layers=LAYERS)
    _, stats = _run(model, AdaToken3D(sched, prune_layers=(2,)))
    assert stats.visual.tolist() == [[24, 24, 9, 9]] * 2
    with pytest.raises(ValueError, match="^visual_tokens:"):
        _run(model, AdaToken3D(sched, visual_tokens=30))


def _kept_per_layer(stats, b, layers):
    """Sample b's kept visual positions at each layer's input, from the engine's stage records."""
    out, cur = [], None
    stages = dict(stats.stages)
    for j in range(layers):
        if j in stages:
            cur = stages[j][b].tolist()
        out.append(cur)
    return out


MIXED = [(k, i, "compact") for k, i in CASES] + [(*CASES[0], "original")]


@pytest.mark.parametrize("kind,impl,positions", MIXED, ids=[f"{k}-{i}-{p}" for k, i, p in MIXED])
def test_a_mixed_n_batch_keeps_each_samples_own_budgets(kind, impl, positions):
    """Three scenes with N = 24, 8 and 3 spatial tokens in one batch: each keeps ⌊O(i)·N_b⌋ (at least 1,
    non-increasing) at every layer, ranking only where its own budget drops, with the kept sets of the
    masking reference (``reference.run``: PDrop-style ranking by the consuming layer's attention) run on
    that sample alone."""
    sched = fit_schedule(np.linspace(1, 0, 6), 0.25, visual_tokens=100)
    spans = [(6, 30), (10, 18), (30, 33)]
    ns = [e - a for a, e in spans]
    want = {24: [24, 18, 13, 10, 7, 6], 8: [8, 6, 4, 3, 2, 2], 3: [3, 2, 1, 1, 1, 1]}  # ⌊N · 0.25^(i/5)⌋ by hand
    for n in ns:
        assert want[n] == [max(1, int(np.floor(o * n))) for o in sched.retention]
    model = tiny.build(kind, impl, layers=6)
    ref = tiny.build(kind, "eager", layers=6)
    out, stats = _run(model, AdaToken3D(sched, positions=positions), batch=3, spans=spans)
    assert stats.visual.tolist() == [want[n] for n in ns]
    assert stats.tokens.tolist() == [[L_SEQ - n + k for k in want[n]] for n in ns]
    emb = model.get_input_embeddings()(_ids(model, 3)).detach()
    for b, (span, n) in enumerate(zip(spans, ns)):
        drops = {j: ("self", want[n][j]) for j in range(1, 6) if want[n][j] < want[n][j - 1]}
        hid, kept, alive, _ = reference.run(ref, emb[b : b + 1], span, L_SEQ - 1, drops, positions=positions)
        assert _kept_per_layer(stats, b, 6) == kept, f"sample {b} (N = {n})"
        torch.testing.assert_close(out[b, alive], hid[0, alive], atol=2e-5, rtol=1e-4)
