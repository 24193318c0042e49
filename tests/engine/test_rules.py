"""Engine rules on every pinned transformers version: PyramidDrop against a transcription of the
released code in both position modes, text-only rows, sliding windows, per-image random draws, and the
refusals that name their parameter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import FastV, PyramidDrop, pruning
from shared.methods.lvlm_csp import LVLMCSP
from shared.methods.pyramid_drop import PRESETS as PDROP_PRESETS

from . import released_pdrop, tiny

CASES = tiny.available()
IDS = [f"{k}-{i}" for k, i in CASES]
L_SEQ, VIS = 40, (6, 30)
N = VIS[1] - VIS[0]


def _emb(model, batch=1, length=L_SEQ, seed=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=g)
    return ids, model.get_input_embeddings()(ids).detach()


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_pyramid_drop_equals_the_released_rank_and_drop(kind, impl, positions):
    """Kept sets per stage exactly, and the kept tokens' final hidden states, against the transcription
    (``renumber=True`` is the released rule; ``False`` the same code keeping positions)."""
    model = tiny.build(kind, impl, layers=6, kv_heads=4)
    ref = tiny.build(kind, "eager", layers=6, kv_heads=4)
    _, emb = _emb(model)
    method = PyramidDrop(layers=(2, 4), ratio=0.5, positions=positions)
    with torch.no_grad(), pruning(model.model, method) as eng:
        eng.prepare(visual_spans=[VIS])
        out = model.model(inputs_embeds=emb).last_hidden_state
    want_h, want_pos, want_stages = released_pdrop.prefill(
        ref, emb, VIS[0], N, layer_list=(2, 4), ratio_list=(1.0, 0.5, 0.25), renumber=positions == "compact"
    )
    stages = eng.last_stats.stages
    assert [j for j, _ in stages] == [0, 2, 4]
    assert [s[0].tolist() for _, s in stages[1:]] == want_stages
    torch.testing.assert_close(out[0, want_pos], want_h[0], atol=2e-5, rtol=1e-4)


def test_the_pdrop_paper_preset_is_the_released_rule():
    p = PDROP_PRESETS["paper"]
    assert (p.layers, p.stage_ratios(), p.positions) == ((8, 16, 24), [0.5, 0.25, 0.125], "compact")


@pytest.mark.parametrize("kind,impl", CASES, ids=IDS)
@pytest.mark.parametrize("which", ["fastv", "fastv-ratio", "pdrop", "csp"])
def test_a_text_only_row_is_left_unpruned(kind, impl, which):
    method = {
        "fastv": FastV(layer=1, keep=6), "fastv-ratio": FastV(layer=1, keep_ratio=0.25),
        "pdrop": PyramidDrop(layers=(1, 2), ratio=0.5), "csp": LVLMCSP(1, 8, 1, 4, clustering="uniform", seg_query="query"),
    }[which]
    model = tiny.build(kind, impl)
    _, emb = _emb(model, batch=2)
    with torch.no_grad():
        stock = model.model(inputs_embeds=emb[1:]).last_hidden_state
        with pruning(model.model, method) as eng:
            eng.prepare(visual_spans=[VIS, None])
            out = model.model(inputs_embeds=emb).last_hidden_state
    assert eng.last_stats.tokens[1].tolist() == [L_SEQ] * 4
    assert eng.last_stats.visual[1].tolist() == [0] * 4
    torch.testing.assert_close(out[1], stock[0], atol=2e-5, rtol=1e-4)
    assert eng.last_stats.visual[0].tolist() != [N] * 4  # the image row was pruned


@pytest.mark.parametrize("kind", sorted({k for k, _ in CASES if k == "qwen2"}) or ["qwen2"])
def test_a_sliding_window_is_refused_beyond_the_window_and_exact_within(kind):
    if kind not in {k for k, _ in CASES}:
        pytest.skip("no Qwen2 in this transformers version")
    model = tiny.build(kind, "eager", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    ids, _ = _emb(model)
    with torch.no_grad():
        with pruning(model.model, FastV(layer=1, keep=4)) as eng:
            eng.prepare(visual_spans=[VIS])
            with pytest.raises(ValueError, match="^sliding_window"):
                model(input_ids=ids)
        short = ids[:, :14]
        stock = model(input_ids=short).logits
        with pruning(model.model, FastV(layer=1, keep=8)) as eng:
            eng.prepare(visual_spans=[(2, 10)])
            assert torch.equal(model(input_ids=short).logits, stock)


def test_csp_random_draws_per_image_independently_of_the_batch():
    model = tiny.build("llama", "eager", layers=4)
    _, emb = _emb(model, batch=3)
    emb[2] = emb[0]
    cfg = LVLMCSP(1, 6, 1, 4, clustering="random", seed=3, seg_query="query")

    def clustered(e, keys=None):
        with torch.no_grad(), pruning(model.model, cfg) as eng:
            eng.prepare(visual_spans=[VIS] * e.shape[0], sample_keys=keys)
            model.model(inputs_embeds=e)
        return [s.tolist() for s in eng.last_stats.stages[0][1]]

    both = clustered(emb)
    alone = [clustered(emb[b : b + 1])[0] for b in range(3)]
    assert both == alone  # a row's draw does not depend on the batch
    assert both[0] == both[2] and both[0] != both[1]  # equal images draw alike, different ones not
    keyed = clustered(emb, keys=["a", "b", "a"])
    assert keyed[0] == keyed[2] != keyed[1]
    want = (VIS[0] + cfg.cluster(N, key="b")[0]).tolist()
    assert keyed[1] == want
    reseeded = LVLMCSP(1, 6, 1, 4, clustering="random", seed=4).cluster(N, key="b")[0]
    assert reseeded.tolist() != cfg.cluster(N, key="b")[0].tolist()
    with pytest.raises(ValueError, match="^key"):
        cfg.cluster(N)


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: FastV(layer=True, keep=3), "^layer"),
        (lambda: FastV(layer=2, keep=True), "^keep"),
        (lambda: FastV(layer=2, keep_ratio="0.5"), "^keep_ratio"),
        (lambda: FastV(layer=2, keep_ratio=True), "^keep_ratio"),
        (lambda: FastV(layer=2.0, keep=3), "^layer"),
        (lambda: PyramidDrop(layers=(1.7, 2.2)), "^layers"),
        (lambda: PyramidDrop(layers=3), "^layers"),
        (lambda: PyramidDrop(ratio="0.5"), "^ratio"),
        (lambda: PyramidDrop(positions="renumber"), "^positions"),
        (lambda: LVLMCSP(cluster_layers=np.float64(2)), "^cluster_layers"),
        (lambda: LVLMCSP(seed=1.5), "^seed"),
    ],
)
def test_bad_configs_name_the_parameter(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_numpy_integers_are_accepted():
    f = FastV(layer=np.int64(2), keep=np.int32(5))
    assert (f.layer, f.keep) == (2, 5) and type(f.keep) is int
    p = PyramidDrop(layers=np.array([2, 4]), ratio=np.float32(0.5))
    assert p.layers == (2, 4)
    c = LVLMCSP(np.int64(2), np.int64(8), np.int64(1), np.int64(4), seed=np.int64(1))
    assert c.paper_tuple == (2, 8, 1, 4)


def test_bad_requests_name_the_parameter():
    model = tiny.build("llama", "eager")
    ids, emb = _emb(model, batch=1)
    mask = torch.ones(1, L_SEQ, dtype=torch.long)
    mask[0, -4:] = 0

    def run(method, _mask=None, **prep):
        with torch.no_grad(), pruning(model.model, method) as eng:
            eng.prepare(**prep)
            model.model(inputs_embeds=emb, attention_mask=_mask)

    fastv = FastV(layer=1, keep=4)
    with pytest.raises(ValueError, match=r"^visual_spans\[0\]: \(10, 10\) is empty or reversed"):
        run(fastv, visual_spans=[(10, 10)])
    with pytest.raises(ValueError, match=r"^visual_spans\[0\]: \(12, 8\) is empty or reversed"):
        run(fastv, visual_spans=[(12, 8)])
    with pytest.raises(ValueError, match=r"^visual_spans\[0\]: \(30, 41\) lies outside"):
        run(fastv, visual_spans=[(30, 41)])
    with pytest.raises(ValueError, match="^query_index: position 3 of sample 0 precedes its visual tokens"):
        run(fastv, visual_spans=[VIS], query_index=[3])
    with pytest.raises(ValueError, match="^query_index: position 10 of sample 0 is a visual token"):
        run(fastv, visual_spans=[VIS], query_index=[10])
    with pytest.raises(ValueError, match="^visual_selection: FastV does not start from a pre-LLM selection"):
        run(fastv, visual_spans=[VIS], visual_selection=[torch.arange(4)])
    csp = LVLMCSP(1, 6, 1, 4, clustering="uniform")
    with pytest.raises(ValueError, match="^guidance_index: position 12 of sample 0 is a visual token"):
        run(csp, visual_spans=[VIS], guidance_index=[12])
    with pytest.raises(ValueError, match="^guidance_index: position 38 of sample 0 is a padding token"):
        run(csp, visual_spans=[VIS], guidance_index=[38], query_index=[33], _mask=mask)
    with pytest.raises(ValueError, match="^guidance_index: position 2 of sample 0 precedes"):
        run(csp, visual_spans=[VIS], guidance_index=[2])
    with pytest.raises(ValueError, match="^query_index: expected integer positions"):
        run(fastv, visual_spans=[VIS], query_index=[35.0])
