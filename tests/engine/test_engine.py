"""Equivalence tests of the in-decoder engine on the stock decoder classes of the installed
transformers version (CI runs this file once per pinned version)."""
from __future__ import annotations

import pytest
import torch

from shared import FastV, PyramidDrop, pruning
from shared.engine import Plan

from . import reference, tiny

CASES = tiny.available()
IDS = [f"{k}-{i}" for k, i in CASES]
L_SEQ, VIS = 40, (6, 30)  # 24 visual tokens at positions 6..29


class _Custom:
    """A method config around a fixed plan factory (for plans written in the tests)."""

    def __init__(self, plan_factory):
        self.plan_factory = plan_factory

    def validate_for(self, n):
        pass

    def make_plan(self, request, n):
        return self.plan_factory()


def _embeds(model, length=L_SEQ, seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=g)
    return ids, model.get_input_embeddings()(ids).detach()


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
def test_no_pruning_reproduces_stock_exactly(kind, impl):
    model = tiny.build(kind, impl)
    ids, _ = _embeds(model)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with pruning(model.model, None):
            out = model(input_ids=ids, attention_mask=mask).logits
        # FastV keeping every visual token and PDrop with ratio 1 prune nothing either.
        for method in (FastV(layer=2, keep=VIS[1] - VIS[0]), PyramidDrop(layers=(1, 2), ratio=1.0)):
            with pruning(model.model, method) as eng:
                eng.prepare(visual_spans=[VIS])
                out2 = model(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(ref, out2), type(method).__name__
    assert torch.equal(ref, out)


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
@pytest.mark.parametrize("which", ["fastv", "pdrop"])
def test_pruned_forward_matches_slow_reference(kind, impl, which):
    model = tiny.build(kind, impl, layers=4)
    ref_model = tiny.build(kind, "eager", layers=4)
    ids, emb = _embeds(model)
    query = L_SEQ - 1
    if which == "fastv":
        method, events = FastV(layer=2, keep=7), reference.fastv_events(2, 7)
    else:
        method = PyramidDrop(layers=(1, 3), ratio=0.5)
        events = reference.pdrop_events((1, 3), (12, 6))
    with torch.no_grad():
        with pruning(model.model, method) as eng:
            eng.prepare(visual_spans=[VIS])
            out = model.model(inputs_embeds=emb, attention_mask=torch.ones(1, L_SEQ, dtype=torch.long))
            stats = eng.last_stats
        ref_hidden, kept, alive, _ = reference.run(ref_model, emb, VIS, query, events)
    # identical kept sets, layer by layer
    assert _kept_per_layer(stats, 0, len(kept)) == kept
    full = out.last_hidden_state[0]
    torch.testing.assert_close(full[alive], ref_hidden[0][alive], atol=2e-5, rtol=1e-4)
    # pruned slots come back as zeros
    assert torch.count_nonzero(full[~alive]) == 0


def _kept_per_layer(stats, b, layers):
    """The visual positions sample ``b`` kept at each layer, from the engine's per-stage record."""
    out, cur = [], None
    stages = dict((j, sets) for j, sets in stats.stages)
    for j in range(layers):
        if j in stages:
            cur = stages[j][b].tolist()
        out.append(cur)
    return out


def _pruned_hidden(model, method, emb, mask, spans):
    with torch.no_grad(), pruning(model.model, method) as eng:
        eng.prepare(visual_spans=spans)
        return model.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("which", ["fastv", "pdrop"])
def test_batch_of_two_equals_two_single_runs(kind, impl, side, which):
    model = tiny.build(kind, impl)
    method = FastV(layer=1, keep_ratio=0.25) if which == "fastv" else PyramidDrop(layers=(1, 2), ratio=0.5)
    lens, spans_local = [40, 31], [(6, 30), (3, 19)]  # different lengths and visual spans
    pad = max(lens)
    ids = [torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(10 + i)) for i, n in enumerate(lens)]
    singles = []
    for i, n in enumerate(lens):
        emb = model.get_input_embeddings()(ids[i]).detach()
        singles.append(_pruned_hidden(model, method, emb, torch.ones(1, n, dtype=torch.long), [spans_local[i]])[0])
    emb = torch.zeros(2, pad, 64)
    mask = torch.zeros(2, pad, dtype=torch.long)
    spans, offs = [], []
    for i, n in enumerate(lens):
        off = pad - n if side == "left" else 0
        emb[i, off : off + n] = model.get_input_embeddings()(ids[i])[0].detach()
        mask[i, off : off + n] = 1
        spans.append((spans_local[i][0] + off, spans_local[i][1] + off))
        offs.append(off)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), pruning(model.model, method) as eng:
        eng.prepare(visual_spans=spans)
        out = model.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
    for i, n in enumerate(lens):
        got = out[i, offs[i] : offs[i] + n]
        torch.testing.assert_close(got, singles[i], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
@pytest.mark.parametrize("which", ["fastv", "pdrop"])
def test_cached_generate_equals_uncached_recompute(kind, impl, which):
    model = tiny.build(kind, impl)
    method = FastV(layer=2, keep=5) if which == "fastv" else PyramidDrop(layers=(1, 3), ratio=0.5)
    ids, _ = _embeds(model, seed=3)
    steps = 6
    with torch.no_grad(), pruning(model.model, method) as eng:
        eng.prepare(visual_spans=[VIS])
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
            num_beams=1, pad_token_id=0,
        )
        new = gen[0, L_SEQ:].tolist()
        assert len(new) == steps
        # recompute each step from scratch, no cache, same visual span and scoring query
        seq = ids
        for t in range(steps):
            eng.prepare(visual_spans=[VIS], query_index=[L_SEQ - 1])
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            assert nxt == new[t], f"step {t}"
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
def test_probe_scores_equal_eager_attention(kind, impl):
    """q/k-derived rows ≡ the stock eager attention weights, also after tokens were dropped."""
    model = tiny.build(kind, impl)
    ref_model = tiny.build(kind, "eager")
    ids, emb = _embeds(model, seed=5)
    got = {}

    class Probe(Plan):
        def before_layer(self, view):
            got[view.layer] = (view.attention(), view.active.positions[0].clone())
            if view.layer == 2:  # drop every other visual token, then probe the gapped sequence
                return [torch.tensor([i for i in range(L_SEQ) if not (VIS[0] <= i < VIS[1]) or i % 2 == 0])]
            return None

    with torch.no_grad(), pruning(model.model, _Custom(Probe)) as eng:
        eng.prepare(visual_spans=[VIS])
        model.model(inputs_embeds=emb)
    with torch.no_grad():
        length = emb.shape[1]
        alive = torch.ones(length, dtype=torch.bool)
        hidden = emb
        pos = torch.arange(length)[None]
        for j in range(4):
            # the view at layer j shows the state before that layer's own drop
            _, w = reference._call(ref_model, j, hidden, reference._mask(alive, hidden.dtype), pos)
            row = w[0].mean(0)[length - 1][alive]
            scores, positions = got[j]
            assert positions.tolist() == torch.nonzero(alive).flatten().tolist()
            torch.testing.assert_close(scores[0].float(), row.float(), atol=1e-5, rtol=0)
            if j == 2:
                for i in range(*VIS):
                    alive[i] = i % 2 == 0
            hidden, _ = reference._call(ref_model, j, hidden, reference._mask(alive, hidden.dtype), pos)
    assert len(got[3][1]) == length - 12  # layer 3 was probed on the gapped sequence


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
def test_reactivated_tokens_enter_with_layer0_embeddings(kind, impl):
    """Drop visual tokens before layer 0, bring them back at layer 2 (the LVLM_CSP pattern)."""
    model = tiny.build(kind, impl)
    _, emb = _embeds(model, seed=7)
    sub = [i for i in range(L_SEQ) if not (VIS[0] <= i < VIS[1]) or i % 3 == 0]
    seen = {}

    class Csp(Plan):
        def before_layer(self, view):
            if view.layer == 0:
                return [torch.tensor(sub)]
            if view.layer == 2:
                return [torch.arange(L_SEQ)]
            return None

    def pre_hook(_m, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    h = model.model.layers[2].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad(), pruning(model.model, _Custom(Csp)) as eng:
            eng.prepare(visual_spans=[VIS])
            model.model(inputs_embeds=emb, use_cache=False)
            stats = eng.last_stats
    finally:
        h.remove()
    absent = [i for i in range(*VIS) if i not in sub]
    torch.testing.assert_close(seen["h"][0, absent], emb[0, absent], atol=0, rtol=0)
    assert stats.visual[0].tolist() == [8, 8, 24, 24]
    assert stats.tokens[0].tolist() == [24, 24, 40, 40]


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
def test_hidden_states_output_is_full_length(kind, impl):
    model = tiny.build(kind, impl)
    ids, _ = _embeds(model)
    with torch.no_grad(), pruning(model.model, FastV(layer=1, keep=4)) as eng:
        eng.prepare(visual_spans=[VIS])
        out = model.model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 5
    assert all(h.shape == (1, L_SEQ, 64) for h in out.hidden_states)
    dropped = [i for i in range(*VIS) if float(out.hidden_states[2][0, i].abs().sum()) == 0.0]
    assert len(dropped) == (VIS[1] - VIS[0]) - 4


def test_forward_is_restored_after_exit_and_on_error():
    kind, impl = CASES[0]
    model = tiny.build(kind, impl)
    before = model.model.forward
    with pytest.raises(RuntimeError):
        with pruning(model.model, FastV(layer=1, keep=2)):
            assert model.model.forward is not before
            raise RuntimeError("boom")
    assert "forward" not in model.model.__dict__
    ids, _ = _embeds(model)
    model(input_ids=ids)  # stock path still works


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: FastV(layer=0, keep=3), "layer"),
        (lambda: FastV(layer=2, keep=0), "keep"),
        (lambda: FastV(layer=2, keep=-1), "keep"),
        (lambda: FastV(layer=2), "keep/keep_ratio"),
        (lambda: FastV(layer=2, keep_ratio=1.5), "keep_ratio"),
        (lambda: PyramidDrop(layers=(3, 2)), "layers"),
        (lambda: PyramidDrop(ratio=0.0), "ratio"),
        (lambda: PyramidDrop(layers=(1, 2), ratios=(0.5,)), "ratios"),
    ],
)
def test_bad_configs_name_the_parameter(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_inputs_name_the_parameter():
    kind, impl = CASES[0]
    model = tiny.build(kind, impl)
    ids, _ = _embeds(model)
    with pytest.raises(ValueError, match="^layer"):
        with pruning(model.model, FastV(layer=4, keep=2)):
            pass
    with pytest.raises(ValueError, match="^layers"):
        with pruning(model.model, PyramidDrop(layers=(1, 4))):
            pass
    with pruning(model.model, FastV(layer=1, keep=25)) as eng:
        eng.prepare(visual_spans=[VIS])
        with pytest.raises(ValueError, match="^keep"):
            model(input_ids=ids)
        eng.prepare(visual_spans=[(30, 41)])
        with pytest.raises(ValueError, match="^visual_spans"):
            model(input_ids=ids)
        eng.prepare(visual_spans=[(5, 5)])
        with pytest.raises(ValueError, match="^visual_spans"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="^visual_mask"):
            model(input_ids=ids)  # no prepare() for this prefill
        eng.prepare(visual_mask=torch.ones(1, 5, dtype=torch.bool))
        with pytest.raises(ValueError, match="^visual_mask"):
            model(input_ids=ids)
        eng.prepare(visual_spans=[VIS], query_index=[10])
        with pytest.raises(ValueError, match="^query_index"):
            model(input_ids=ids)
    with pytest.raises(TypeError, match="^model"):
        with pruning(torch.nn.Linear(2, 2), FastV(layer=1, keep=2)):
            pass


def test_static_cache_is_refused_with_a_clear_error():
    cache_utils = pytest.importorskip("transformers.cache_utils")
    if not hasattr(cache_utils, "StaticCache"):
        pytest.skip("this transformers version has no StaticCache")

    class NotDynamic(cache_utils.Cache):  # any Cache that is not a DynamicCache
        def __init__(self):
            pass

    kind, impl = CASES[0]
    model = tiny.build(kind, impl)
    ids, _ = _embeds(model)
    with pruning(model.model, FastV(layer=1, keep=2)) as eng:
        eng.prepare(visual_spans=[VIS])
        with pytest.raises(ValueError, match="^past_key_values"):
            model.model(input_ids=ids, past_key_values=NotDynamic(), use_cache=True)
