"""Fast3D compat mode (``shared.methods.fast3d_compat``) against a transcription of the released FastV/oracle
forward (``released_fast3d.ReleasedFast3D``) on a tiny random LLaMA, on every pinned transformers version.

Prompt layout: 40 tokens, 24 visual tokens at [6, 30) (8 object slots x 3), random visual embeddings so
that masking them changes what is generated.
"""
from __future__ import annotations

import random

import pytest
import torch

from shared import Fast3D, FastV, RandomDrop, pruning
from shared.engine.adapters import patched_forward
from shared.methods.fast3d_compat import Fast3DCompat, KeyMaskRunner, compat, sap_budget_objects

from . import tiny
from .released_fast3d import ReleasedFast3D

L_SEQ, SYS, END = 40, 6, 30
IMG = END - SYS
GEN = dict(num_beams=5, max_new_tokens=6, repetition_penalty=3.0, do_sample=False, pad_token_id=0, min_length=1,
           length_penalty=1.0)
SCORES = torch.tensor([0.3, -1.2, 2.5, 0.7, 1.9, -0.4, 0.1, 1.1])  # 8 object slots, distinct


def _model(impl="eager"):
    return tiny.build("llama", impl, layers=4)


def _prompt(model, seed=0):
    ids = torch.randint(1, model.config.vocab_size, (1, L_SEQ), generator=torch.Generator().manual_seed(seed))
    emb = model.get_input_embeddings()(ids).detach().clone()
    g = torch.Generator().manual_seed(100 + seed)
    emb[:, SYS:END] = torch.randn(1, IMG, emb.shape[-1], generator=g) * emb.std()
    return emb


def _released(model, rule, keep, layer, **kw):
    if rule == "oracle":
        a_map = SCORES.unsqueeze(-1).repeat(1, 3).reshape(-1).unsqueeze(0)  # Chat3D.evaluate
        return ReleasedFast3D(model, use_fast_v=False, use_fast_v_oracle=True, fast_v_sys_length=SYS,
                              fast_v_image_token_length=IMG, fast_v_attention_rank=keep, fast_v_agg_layer=layer,
                              oracle_a_map=a_map)
    return ReleasedFast3D(model, use_fast_v=True, fast_v_sys_length=SYS, fast_v_image_token_length=IMG,
                          fast_v_attention_rank=keep, fast_v_agg_layer=layer, **kw)


def _prepare(runner, method):
    if method.rule == "oracle":
        sel, _ = method.host_selection(IMG, object_scores=SCORES, slot_to_object=torch.arange(8), group=3)
        runner.prepare(visual_spans=[(SYS, END)], visual_selection=[sel])
    else:
        runner.prepare(visual_spans=[(SYS, END)])


def _run_compat(model, method, emb, generate=False):
    with torch.no_grad(), pruning(model.model, method) as runner:
        assert isinstance(runner, KeyMaskRunner)
        _prepare(runner, method)
        if generate:
            with runner.generation():
                out = model.generate(inputs_embeds=emb, **GEN)
        else:
            out = model(inputs_embeds=emb).logits
    return out, runner


def _run_released(model, ref, emb, generate=False):
    with torch.no_grad(), patched_forward(model.model, ref):
        return model.generate(inputs_embeds=emb, **GEN) if generate else model(inputs_embeds=emb).logits


CONFIGS = {
    "fastv-K2-R7": ("fastv", 2, 7),
    "oracle-K2-R6": ("oracle", 2, 6),  # whole slots
    "oracle-K1-R7": ("oracle", 1, 7),  # splits a slot: torch.topk's tie order decides, on both sides
    "oracle-K0-R9": ("oracle", 0, 9),  # SAP's K = 0: every layer masked
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_logits_equal_the_released_forward(name):
    rule, layer, keep = CONFIGS[name]
    model = _model()
    emb = _prompt(model)
    ref = _released(model, rule, keep, layer)
    want = _run_released(model, ref, emb)
    got, runner = _run_compat(model, Fast3DCompat(rule=rule, layer=layer, keep=keep), emb)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert [h.kept.tolist() for h in runner.history] == [s.tolist() for s in ref.selections]
    with torch.no_grad():
        plain = model(inputs_embeds=emb).logits
    assert (plain - got).abs().max() > 1e-2  # the masking does change the result


def test_positions_up_to_999_run_as_in_the_released_forward():
    """Fast3D's rotary table always has 1000 rows; stock 4.31/4.37 slice theirs to the KV length."""
    model = _model()
    emb = _prompt(model)
    pos = torch.arange(1000 - L_SEQ, 1000)[None]
    ref = _released(model, "fastv", 7, 2)
    with torch.no_grad(), patched_forward(model.model, ref):
        want = model(inputs_embeds=emb, position_ids=pos).logits
    runner = Fast3DCompat(rule="fastv", layer=2, keep=7).make_runner(model.model)
    with torch.no_grad(), patched_forward(model.model, runner.forward):
        runner.prepare(visual_spans=[(SYS, END)])
        got = model(inputs_embeds=emb, position_ids=pos).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["fastv-K2-R7", "oracle-K2-R6"])
def test_beam_generation_equals_the_released_forward_with_per_step_reselection(name):
    rule, layer, keep = CONFIGS[name]
    keep = 4 if rule == "fastv" else keep
    model = _model()
    emb = _prompt(model)
    ref = _released(model, rule, keep, layer)
    want = _run_released(model, ref, emb, generate=True)
    got, runner = _run_compat(model, Fast3DCompat(rule=rule, layer=layer, keep=keep), emb, generate=True)
    assert torch.equal(got, want), f"compat {got.tolist()} vs released {want.tolist()}"
    steps = [h.kept.tolist() for h in runner.history]
    assert steps == [s.tolist() for s in ref.selections]  # the same selection at every forward
    assert [h.step for h in runner.history] == list(range(len(steps))) and len(steps) >= 6
    if rule == "oracle":
        assert all(s == steps[0] for s in steps)  # static
        return
    # FastV re-ranks at every decode step, and pruned tokens come back
    assert len({tuple(s) for s in steps}) > 2
    revived = [p for t in range(1, len(steps)) for p in steps[t] if p not in steps[0]]
    assert revived
    # canonical FastV (prefill-only selection, per beam, physical drop) generates something else here
    with torch.no_grad(), pruning(model.model, FastV(layer=layer, keep=keep)) as eng, eng.generation():
        eng.prepare(visual_spans=[(SYS, END)])
        canonical = model.generate(inputs_embeds=emb, **GEN)
    assert eng.last_stats.visual[0].tolist() == [IMG, IMG, keep, keep]
    assert not torch.equal(canonical, got)


def test_key_mask_never_hides_text_and_compute_is_unchanged():
    model = _model()
    emb = _prompt(model)
    method = Fast3DCompat(rule="fastv", layer=2, keep=5)
    _, runner = _run_compat(model, method, emb, generate=True)
    visual = torch.zeros(L_SEQ, dtype=torch.bool)
    visual[SYS:END] = True
    for h in runner.history:
        assert h.key_valid.shape == (h.keys,)
        vis = torch.cat([visual, torch.zeros(h.keys - L_SEQ, dtype=torch.bool)])
        assert bool(h.key_valid[~vis].all())  # system, instruction and generated tokens always visible
        assert int(h.key_valid[vis].sum()) == 5
        assert torch.equal(torch.nonzero(h.key_valid & vis).flatten(), h.kept)
    stats = runner.last_stats  # the prefill: 5 beams x every token at every layer
    assert stats.tokens.tolist() == [[L_SEQ] * 4] * 5
    assert stats.visual.tolist() == [[IMG] * 4] * 5
    assert stats.visual_tokens.tolist() == [IMG] * 5
    assert method.schedule(IMG, 4) == [IMG] * 4
    assert method.key_schedule(IMG, 4) == [IMG, IMG, 5, 5]


def test_random_rule_draws_r_tokens_every_forward_like_the_k0_branch():
    """Fast3D's FastV at K = 0 shuffles with Python's global RNG (not reproducible bit for bit): compare
    the structure, a fresh R-subset of the span at every forward, and check the seeded draws."""
    model = _model()
    emb = _prompt(model)
    ref = _released(model, "fastv", 5, 0, rng=random.Random(0))
    _run_released(model, ref, emb, generate=True)
    runs = []
    for seed in (0, 0, 1):
        _, runner = _run_compat(model, Fast3DCompat(rule="random", layer=0, keep=5, seed=seed), emb, generate=True)
        runs.append([h.kept.tolist() for h in runner.history])
    for sels in ([s.tolist() for s in ref.selections], runs[0]):
        assert len(sels) >= 6
        assert all(len(s) == 5 and all(SYS <= p < END for p in s) for s in sels)
        assert len({tuple(s) for s in sels}) > 1  # redrawn per forward
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_host_selection_repeats_object_scores_per_slot_and_sap_budget():
    m = Fast3DCompat(rule="oracle", layer=2, keep=6)
    sel, info = m.host_selection(12, object_scores=torch.tensor([0.1, 0.9, 0.5, 0.3]))
    assert sel.tolist() == [3, 4, 5, 6, 7, 8] and info["keep"] == 6  # slots 1 and 2, whole triplets
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    assert sap_budget_objects(probs, 0.75) == 2 and sap_budget_objects(probs, 0.999) == 4
    sap = Fast3DCompat(rule="oracle", layer=0, alpha=0.75)
    sel, info = sap.host_selection(12, object_scores=probs.log())  # softmax(log p) = p
    assert sel.tolist() == [3, 4, 5, 9, 10, 11] and info["objects"] == 2 and info["keep"] == 6
    assert sap.needs() == {"decoder", "object_groups"} and sap.uses_selection
    assert Fast3DCompat(rule="fastv", keep=3).needs() == {"decoder"}
    with pytest.raises(ValueError, match="^slot_to_object: Fast3D compat reproduces .* identity object ids"):
        m.host_selection(12, object_scores=torch.ones(4), slot_to_object=[1, 0, 2, 3])
    with pytest.raises(ValueError, match=r"^object_scores: 4 slots x group 3 = 12 tokens, but the sample has 15"):
        m.host_selection(15, object_scores=torch.ones(4))
    with pytest.raises(ValueError, match="^group: the host lays out 2"):
        m.host_selection(8, object_scores=torch.ones(4), group=2)
    with pytest.raises(ValueError, match="^object_scores: scores must be finite"):
        m.host_selection(12, object_scores=torch.tensor([0.1, float("nan"), 0.2, 0.3]))
    with pytest.raises(ValueError, match="^keep: R=6 exceeds"):
        Fast3DCompat(rule="oracle", keep=6).host_selection(3, object_scores=torch.ones(1))


def test_host_selection_runs_the_online_scorer_and_refuses_attention_maps_for_sap():
    calls = []
    m = Fast3DCompat(rule="oracle", layer=0, keep=3, scorer=lambda **kw: calls.append(kw) or torch.tensor([0., 2., 1.]))
    sel, info = m.host_selection(9, group=3, slot_to_object=None, object_scores=None, gap_inputs={"prompt": "p"},
                                 key="k")
    assert sel.tolist() == [3, 4, 5] and calls == [{"prompt": "p"}] and "gap_seconds" in info
    with pytest.raises(ValueError, match="^object_scores: the oracle rule needs one score per object slot"):
        Fast3DCompat(rule="oracle", keep=3).host_selection(9)
    with pytest.raises(ValueError, match="^object_scores: SAP needs GAP logits"):
        Fast3DCompat(rule="oracle", layer=0, alpha=0.21).host_selection(9, object_scores=torch.tensor([.01, .02, .005]))


def test_compat_converts_canonical_configs():
    assert compat(FastV(layer=2, keep=15)) == Fast3DCompat(rule="fastv", layer=2, keep=15)
    assert compat(Fast3D(layer=6, keep=60)) == Fast3DCompat(rule="oracle", layer=6, keep=60)
    scorer = lambda **kw: torch.zeros(100)  # noqa: E731
    sap = compat(Fast3D(layer=0, alpha=0.21, scorer=scorer))
    assert sap == Fast3DCompat(rule="oracle", layer=0, alpha=0.21) and sap.scorer is scorer
    assert compat(RandomDrop(layer=0, keep=30, seed=4)) == Fast3DCompat(rule="random", layer=0, keep=30, seed=4)
    assert compat(sap) is sap
    with pytest.raises(ValueError, match="^keep_ratio: Fast3D keeps an absolute R"):
        compat(FastV(layer=2, keep_ratio=0.5))
    with pytest.raises(ValueError, match="^group: Fast3D's random pruning .* draws single tokens"):
        compat(RandomDrop(layer=0, keep=30, group=3))
    with pytest.raises(TypeError, match="^method: no Fast3D compat mode for int"):
        compat(3)


def test_refusals_name_the_parameter():
    model = _model()
    emb = _prompt(model)
    with pytest.raises(ValueError, match="^layer: the fastv rule ranks with layer K-1.*rule='random'"):
        Fast3DCompat(rule="fastv", layer=0, keep=4)
    with pytest.raises(ValueError, match="^rule: expected one of fastv, oracle, random"):
        Fast3DCompat(rule="gap", keep=4)
    with pytest.raises(ValueError, match="^keep: expected R"):
        Fast3DCompat(rule="fastv", layer=2)
    with pytest.raises(ValueError, match="^layer: K=4 is outside the decoder"):
        KeyMaskRunner(model.model, Fast3DCompat(rule="fastv", layer=4, keep=4))
    if ("llama", "sdpa") in tiny.available():
        with pytest.raises(ValueError, match="^attn_implementation: .* 'sdpa'"):
            KeyMaskRunner(_model("sdpa").model, Fast3DCompat(rule="fastv", layer=2, keep=4))
    runner = KeyMaskRunner(model.model, Fast3DCompat(rule="fastv", layer=2, keep=4))
    two = torch.cat([emb, _prompt(model, seed=1)])
    with torch.no_grad(), patched_forward(model.model, runner.forward):
        with pytest.raises(ValueError, match="^visual_mask: no visual-token positions"):
            model.model(inputs_embeds=emb)
        runner.prepare(visual_spans=[(SYS, END)] * 2)
        with pytest.raises(ValueError, match="^inputs_embeds: Fast3D compat runs one sample"):
            model.model(inputs_embeds=two)
        mask = torch.ones(1, L_SEQ, dtype=torch.long)
        mask[0, 0] = 0
        runner.prepare(visual_spans=[(SYS, END)])
        with pytest.raises(ValueError, match="^attention_mask: Fast3D's FastV/oracle masks ignore the padding"):
            model.model(inputs_embeds=emb, attention_mask=mask)
        runner.prepare(visual_spans=[(SYS, END)])
        with pytest.raises(ValueError, match="^position_ids: position 1029 is >= 1000"):
            model.model(inputs_embeds=emb, position_ids=torch.arange(990, 990 + L_SEQ)[None])
        runner.prepare(visual_spans=[(SYS, END)], query_index=[35])
        with pytest.raises(ValueError, match="^query_index: Fast3D ranks with the last token"):
            model.model(inputs_embeds=emb)
        runner.prepare(visual_spans=[(SYS, END)], visual_selection=[torch.arange(4)])
        with pytest.raises(ValueError, match="^visual_selection: rule='fastv' ranks inside the LLM"):
            model.model(inputs_embeds=emb)
        runner.prepare(visual_spans=[(SYS, END)])
        with runner.generation(), pytest.raises(ValueError, match="^use_cache: Fast3D's generate ran with the KV cache"):
            model.model(inputs_embeds=emb, use_cache=False)
    oracle = KeyMaskRunner(model.model, Fast3DCompat(rule="oracle", layer=1, keep=3))
    with torch.no_grad(), patched_forward(model.model, oracle.forward):
        oracle.prepare(visual_spans=[(SYS, END)])
        with pytest.raises(ValueError, match="^visual_selection: rule='oracle' needs the per-sample ranking"):
            model.model(inputs_embeds=emb)


def test_session_brings_its_own_runner_and_records_full_compute():
    """``make_runner`` through ``shared.prune`` on the native LLaVA host (transformers 5.x); GAP's oracle
    rule needs object groups, which a 2D host does not provide."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the native LLaVA host runs on transformers 5.x")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from shared import prune

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=56, patch_size=14, projection_dim=32)
    tc = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=127, image_seq_length=16)
    cfg.text_config._attn_implementation = "eager"
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(1, 99, (1, 5), generator=g), torch.full((1, 16), 127),
                     torch.randint(1, 99, (1, 9), generator=g)], dim=1)
    px = torch.randn(1, 3, 56, 56, generator=g)
    with torch.no_grad(), prune(model, compat(FastV(layer=2, keep=4))) as session:
        out = model.generate(input_ids=ids, pixel_values=px, num_beams=3, max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        assert isinstance(session.engine, KeyMaskRunner)
        assert len(session.engine.history) == out.shape[1] - ids.shape[1]
    assert len(session.records) == 1
    assert session.last.stats.tokens.tolist() == [[30] * 4] * 3
    assert session.last.stats.visual.tolist() == [[16] * 4] * 3
    with pytest.raises(ValueError, match=r"^method: fast3d_compat needs 'object_groups'"):
        with prune(model, Fast3DCompat(rule="oracle", layer=2, keep=6)):
            pass


class Chat3D(torch.nn.Module):
    """The two things the ``chat_scene`` host reads from Chat-Scene's model: its name and ``llama_model``."""

    def __init__(self, llama_model):
        super().__init__()
        self.llama_model = llama_model


def _chat_scene_generate(model, method, emb, assigned_ids):
    """Chat3D.evaluate for one sample, as the patch series runs it: P2 publishes the objects, generate
    runs, and P1 routes the vendored LlamaModel.forward to the session."""
    from shared import prune
    from shared.hosts.chat_scene import llama_forward, publish_objects

    chat = Chat3D(model)
    decoder = model.model
    stock = decoder.forward
    batch = {"scene_id": ["scene0011_00"], "obj_ids": [0], "qid": [7]}
    with torch.no_grad(), patched_forward(decoder, lambda *a, **k: llama_forward(decoder, stock, *a, **k)), \
            prune(chat, method, object_scores={"scene0011_00:7": SCORES},
                  sample_keys=lambda b, i: f"{b['scene_id'][i]}:{b['qid'][i]}") as session:
        publish_objects(chat, 0, emb, SYS, IMG, assigned_ids, torch.zeros(8, 4), None, torch.zeros(8, 6), "q", batch)
        out = model.generate(inputs_embeds=emb, **GEN)
    return out, session


def test_oracle_through_the_chat_scene_host_equals_the_released_forward():
    """Object scores reach the runner as the host hands them (selection_inputs -> host_selection ->
    visual_selection); compat records full compute where canonical Fast3D records the drop."""
    model = _model()
    emb = _prompt(model)
    ref = _released(model, "oracle", 6, 2)
    want = _run_released(model, ref, emb, generate=True)
    got, session = _chat_scene_generate(model, Fast3DCompat(rule="oracle", layer=2, keep=6), emb, torch.arange(8))
    assert torch.equal(got, want)
    assert isinstance(session.engine, KeyMaskRunner)
    assert [h.kept.tolist() for h in session.engine.history] == [s.tolist() for s in ref.selections]
    assert session.last.stats.visual.tolist() == [[IMG] * 4] * 5 and session.last.info[0]["keep"] == 6
    _, canonical = _chat_scene_generate(model, Fast3D(layer=2, keep=6), emb, torch.arange(8))
    assert canonical.last.stats.visual.tolist() == [[IMG, IMG, 6, 6]] * 5
    with pytest.raises(ValueError, match="^slot_to_object: Fast3D compat reproduces its evaluation with identity"):
        _chat_scene_generate(model, Fast3DCompat(rule="oracle", layer=2, keep=6), emb, torch.arange(8).flip(0))
