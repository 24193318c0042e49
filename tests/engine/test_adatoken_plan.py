"""AdaToken-3D on the engine: a fitted schedule keeps exactly its budgets per layer, ranked and
compacted as the released PyramidDrop (every pinned transformers version)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import PyramidDrop, pruning
from shared.methods.adatoken import AdaToken3D, AdaTokenSchedule, fit_schedule

from . import tiny

CASES = tiny.available()
IDS = [f"{k}-{i}" for k, i in CASES]
LAYERS, L_SEQ, VIS = 4, 40, (6, 30)
N = VIS[1] - VIS[0]  # 24
BUDGETS = [24, 15, 9, 6]  # ⌊24 · 0.25^((i−1)/3)⌋: the pure exponential a linear INF fits to


def _run(model, method, batch=2):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, model.config.vocab_size, (batch, L_SEQ), generator=g)
    with torch.no_grad(), pruning(model.model, method) as eng:
        eng.prepare(visual_spans=[VIS] * batch)
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
