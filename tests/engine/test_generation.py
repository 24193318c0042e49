"""Generation under pruning, against the masking reference, on every pinned transformers version.

Pruning is decided once, at prefill; the reference (``reference.ScheduleDecoder``) recomputes every
step from scratch with that decision as key masks, and HF ``generate`` drives both. Covered: greedy and
beam search with a KV cache, the same without a cache (the engine replays the prefill decision),
plans that prune before layer 0 (LVLM_CSP's clustering stage, a layer-0 drop), continuing from a
returned cache, and the refusals that keep wrong results from passing silently.
"""
from __future__ import annotations

import pytest
import torch

from shared import FastV, PyramidDrop, pruning
from shared.engine import Plan
from shared.methods.lvlm_csp import LVLMCSP

from . import reference, tiny
from .test_engine import _Custom

CASES = tiny.available()
IDS = [f"{k}-{i}" for k, i in CASES]
L_SEQ, VIS = 40, (6, 30)
N = VIS[1] - VIS[0]
STEPS = 5


def _prompts(model, batch=2, seed=21):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, L_SEQ), generator=g)


class _Layer0Drop(Plan):
    """Keep the visual tokens at even offsets from layer 0 on (a pre-ranked layer-0 selection, like
    Fast3D's SAP at K = 0)."""

    def before_layer(self, view):
        if view.layer != 0:
            return None
        out = []
        for b in range(view.active.batch_size):
            pos = view.active.positions[b][view.active.valid[b]]
            vis = view.request.visual_mask[b, pos]
            out.append(pos[~vis | ((pos - VIS[0]) % 2 == 0)])
        return out


def _schedules(kind, method, emb_rows):
    """Per-sample alive-per-layer schedules from the masking reference on each prompt."""
    ref = tiny.build(kind, "eager")
    out = []
    for emb in emb_rows:
        emb = emb[None]
        if isinstance(method, FastV):
            _, _, _, alive = reference.run(ref, emb, VIS, L_SEQ - 1, reference.fastv_events(method.layer, method.keep))
        elif isinstance(method, PyramidDrop):
            keeps = method.keep_counts(N)
            _, _, _, alive = reference.run(ref, emb, VIS, L_SEQ - 1, reference.pdrop_events(method.layers, keeps),
                                           positions=method.positions)
        elif isinstance(method, LVLMCSP):
            sel = [VIS[0] + int(i) for i in method.cluster(N)[0]]
            _, _, _, alive = reference.run_csp(ref, emb, VIS, L_SEQ - 1, sel, method.cluster_layers,
                                               method.scatter_layers, method.prune_tokens)
        else:  # the layer-0 drop
            a = torch.ones(L_SEQ, dtype=torch.bool)
            a[VIS[0]:VIS[1]] = torch.arange(N) % 2 == 0
            alive = [a] * len(ref.model.layers)
        out.append(alive)
    return out


METHODS = {
    "fastv": lambda: FastV(layer=2, keep=7),
    "pdrop": lambda: PyramidDrop(layers=(1, 3), ratio=0.5),
    "pdrop-compact": lambda: PyramidDrop(layers=(1, 3), ratio=0.5, positions="compact"),
    "csp": lambda: LVLMCSP(2, 8, 1, 5, clustering="uniform", seg_query="query"),
    "layer0": lambda: _Custom(lambda: _Layer0Drop()),
}


def _generate(model, ids, beams, use_cache, **kw):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                          num_beams=beams, num_return_sequences=1, pad_token_id=0, use_cache=use_cache, **kw)


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
@pytest.mark.parametrize("which", sorted(METHODS))
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_equals_the_masking_reference_with_and_without_cache(kind, impl, which, beams):
    model = tiny.build(kind, impl)
    ids = _prompts(model)
    method = METHODS[which]()
    emb = model.get_input_embeddings()(ids).detach()
    positions = getattr(method, "positions", "original")
    with torch.no_grad():
        decoder = reference.ScheduleDecoder(tiny.build(kind, "eager"), _schedules(kind, method, emb), positions)
        ref_model = decoder.model
        from shared.engine.adapters import patched_forward

        with patched_forward(ref_model.model, decoder):
            want = _generate(ref_model, ids, beams, use_cache=False)
        got = {}
        for use_cache in (True, False):
            with pruning(model.model, method) as eng, eng.generation():
                eng.prepare(visual_spans=[VIS] * 2)  # one span per sample; generate expands beams
                got[use_cache] = _generate(model, ids, beams, use_cache=use_cache)
            assert eng.last_stats.visual.shape[0] == 2 * beams
    assert torch.equal(got[True], want), f"cached generate differs from the reference: {got[True]} vs {want}"
    assert torch.equal(got[False], want), "cache-less generate must replay the prefill decision"


@pytest.mark.parametrize("kind,impl", CASES[:1], ids=IDS[:1])
def test_per_sample_inputs_for_beams_must_describe_copies(kind, impl):
    model = tiny.build(kind, impl)
    ids = _prompts(model, batch=4)
    emb = model.get_input_embeddings()(ids).detach()
    with torch.no_grad(), pruning(model.model, FastV(layer=1, keep=4)) as eng:
        eng.prepare(visual_spans=[VIS, VIS])  # 2 entries for 4 rows that are not pairs of copies
        with pytest.raises(ValueError, match=r"^visual_spans: one entry per sample .* not copies"):
            model.model(inputs_embeds=emb)
        eng.prepare(visual_spans=[VIS] * 3)  # 3 does not divide 4
        with pytest.raises(ValueError, match="^visual_spans: expected 4 entries"):
            model.model(inputs_embeds=emb)


def _stock_can_continue(model, ids, extra):
    """Does this transformers version's own generate continue from a returned cache (no pruning)?"""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    seq = torch.cat([out.sequences, extra], dim=1)
    try:
        cont = model.generate(input_ids=seq, attention_mask=torch.ones_like(seq), past_key_values=out.past_key_values,
                              max_new_tokens=2, do_sample=False, pad_token_id=0)
    except Exception:  # noqa: BLE001 - any failure means the stock path does not support it
        return False
    fresh = model.generate(input_ids=seq, attention_mask=torch.ones_like(seq), max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
    return torch.equal(cont, fresh)


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
def test_continuing_from_a_returned_cache_equals_the_reference(kind, impl):
    """LVLM_CSP prunes before layer 0, so layer 0 caches fewer tokens than the sequence holds; generate
    reads the past length from layer 0 (transformers 5.x when a cache is passed back in)."""
    model = tiny.build(kind, impl)
    ids = _prompts(model, batch=1)
    extra = torch.tensor([[5, 9, 11]])
    with torch.no_grad():
        if not _stock_can_continue(model, ids, extra):
            pytest.skip("this transformers version's generate cannot continue from a returned cache even unpruned")
        method = LVLMCSP(2, 8, 1, 5, clustering="uniform", seg_query="query")
        emb = model.get_input_embeddings()(ids).detach()
        with pruning(model.model, method) as eng:
            eng.prepare(visual_spans=[VIS])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                                 pad_token_id=0, return_dict_in_generate=True)
            seq = torch.cat([out.sequences, extra], dim=1)
            cont = model.generate(input_ids=seq, attention_mask=torch.ones_like(seq),
                                  past_key_values=out.past_key_values, max_new_tokens=3, do_sample=False, pad_token_id=0)
        ref = tiny.build(kind, "eager")
        schedule = _schedules(kind, method, emb)[0]
        for t in range(3):  # recompute each continued step with the reference
            hid = reference.run_schedule(ref, ref.get_input_embeddings()(seq), schedule)
            nxt = int(ref.lm_head(hid)[0, -1].argmax())
            assert nxt == int(cont[0, seq.shape[1]]), f"step {t}"
            seq = torch.cat([seq, cont[:, seq.shape[1]:seq.shape[1] + 1]], dim=1)


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
def test_a_cropped_pruned_cache_is_refused(kind, impl):
    model = tiny.build(kind, impl)
    ids = _prompts(model, batch=1)
    with torch.no_grad(), pruning(model.model, LVLMCSP(2, 8, 1, 5, clustering="uniform", seg_query="query")) as eng:
        eng.prepare(visual_spans=[VIS])
        out = model.model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        if not hasattr(cache, "crop"):
            pytest.skip("this transformers version's cache cannot be cropped")
        cache.crop(-3 if hasattr(cache, "layers") else L_SEQ - 3)  # 5.x takes tokens to remove
        with pytest.raises((ValueError, RuntimeError), match="^(cache_position|past_key_values)"):
            model.model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([L_SEQ - 3]))


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
def test_layer0_cache_reports_the_logical_length(kind, impl):
    """Layer 0's cache holds the whole prompt (pruned slots zero) whatever the cache format."""
    model = tiny.build(kind, impl)
    ids = _prompts(model, batch=1)
    with torch.no_grad(), pruning(model.model, _Custom(lambda: _Layer0Drop())) as eng:
        eng.prepare(visual_spans=[VIS])
        out = model.model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    k0 = cache[0][0] if isinstance(cache, (tuple, list)) else (
        cache.layers[0].keys if hasattr(cache, "layers") else cache.key_cache[0])
    k1 = cache[1][0] if isinstance(cache, (tuple, list)) else (
        cache.layers[1].keys if hasattr(cache, "layers") else cache.key_cache[1])
    assert k0.shape[-2] == L_SEQ
    assert k1.shape[-2] == L_SEQ - N // 2
    dropped = [i for i in range(*VIS) if (i - VIS[0]) % 2 == 1]
    assert int(torch.count_nonzero(k0[..., dropped, :])) == 0
    if hasattr(cache, "get_seq_length"):
        assert cache.get_seq_length() == L_SEQ
    seen = getattr(cache, "_seen_tokens", getattr(cache, "seen_tokens", None)) if not hasattr(cache, "layers") else None
    if isinstance(seen, int):
        assert seen == L_SEQ


@pytest.mark.parametrize("kind,impl", CASES[:1], ids=IDS[:1])
def test_a_cacheless_forward_in_a_generation_must_extend_its_prompt(kind, impl):
    model = tiny.build(kind, impl)
    ids = _prompts(model, batch=1)
    other = _prompts(model, batch=1, seed=99)
    with torch.no_grad(), pruning(model.model, FastV(layer=1, keep=4)) as eng, eng.generation():
        eng.prepare(visual_spans=[VIS])
        model.model(input_ids=ids, use_cache=False)
        with pytest.raises(ValueError, match="^use_cache: inside one generation"):
            model.model(input_ids=torch.cat([other, other[:, :1]], dim=1), use_cache=False)
