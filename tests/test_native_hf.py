"""Sessions on native transformers 5.x LLaVA (host ``hf_llava``): in-LLM methods, LVLM_CSP's clustering
inputs, pre-LLM reducers against a collapsed prompt, stacking, beams and cache-less generation."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("native LLaVA path is tested on transformers 5.x; the 4.x envs test the host decoders",
                allow_module_level=True)

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

import shared  # noqa: E402
from shared import FastV, PyramidDrop, VisionZip, prune  # noqa: E402
from shared.methods.lvlm_csp import LVLMCSP  # noqa: E402
from shared.methods.prumerge import PruMerge  # noqa: E402

IMG = 127
SEG_ID = 100


def _tiny(batch=1):
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=56, patch_size=14, projection_dim=32)
    tc = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(1, 99, (batch, 5), generator=g), torch.full((batch, 16), IMG),
                     torch.randint(1, 99, (batch, 9), generator=g)], dim=1)
    return model, ids, torch.randn(batch, 3, 56, 56, generator=g)


def _with_seg(ids):
    ids = ids.clone()
    ids[:, -3] = SEG_ID  # a guidance token after the image, as LISA's [SEG]
    return ids


def _decoder(model):
    return model.model.language_model


def test_visual_tokens_found_from_image_placeholders():
    model, ids, px = _tiny()
    with torch.no_grad(), prune(model, FastV(layer=2, keep=5)) as session:
        model(input_ids=ids, pixel_values=px)
    assert session.host.name == "hf_llava"
    assert session.last.stats.visual[0].tolist() == [16, 16, 5, 5]
    assert session.last.stats.tokens[0].tolist() == [30, 30, 19, 19]
    assert len(session.records) == 1
    # every hook and patch is gone
    assert not model._forward_pre_hooks and "forward" not in _decoder(model).__dict__
    assert not _decoder(model)._forward_pre_hooks and not _decoder(model)._forward_hooks
    assert "generate" not in model.__dict__ and "_shared_pruning_session" not in model.__dict__


def test_nothing_pruned_equals_stock_llava_logits():
    model, ids, px = _tiny()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
        for method in (FastV(layer=1, keep=16), PyramidDrop(layers=(1, 3), ratio=1.0), None):
            with prune(model, method) as session:
                out = model(input_ids=ids, pixel_values=px).logits
            assert torch.equal(ref, out), method
        assert session.last.stats.visual[0].tolist() == [16] * 4


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("method", [FastV(layer=1, keep=4), PyramidDrop(layers=(1, 3), ratio=0.5),
                                    LVLMCSP(1, 5, 2, 3, clustering="cls")], ids=["fastv", "pdrop", "csp-cls"])
def test_generate_with_and_without_cache_agree_greedy_and_beam(method, beams):
    """The session wraps generate: cache-less steps replay the prefill decision (they used to re-rank with
    the newest token), and per-image inputs ([CLS] scores of 2 images) follow generate's beam copies."""
    model, ids, px = _tiny(batch=2)
    ids = _with_seg(ids)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad():
        out = {}
        for use_cache in (True, False):
            with prune(model, method, guidance_token_id=SEG_ID) as session:
                out[use_cache] = model.generate(input_ids=ids, pixel_values=px, use_cache=use_cache, **kw)
            assert len(session.records) == 1 and session.last.batch == 2 * beams
    assert torch.equal(out[True], out[False])


def test_csp_with_full_budgets_equals_stock_llava_logits():
    model, ids, px = _tiny()
    ids = _with_seg(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
        with prune(model, LVLMCSP(1, 16, 1, 16), guidance_token_id=SEG_ID) as session:
            out = model(input_ids=ids, pixel_values=px).logits
    assert session.last.stats.visual[0].tolist() == [16, 16, 16, 16]
    assert torch.equal(ref, out)


def _layer0_input(model, ids, px, *methods, **kw):
    seen = {}

    def grab(_m, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    h = _decoder(model).layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), prune(model, *methods, **kw) as session:
            logits = model(input_ids=ids, pixel_values=px).logits
    finally:
        h.remove()
    return seen["h"][0], logits, session.last


def _stock_embeds(model, ids, px):
    seen = {}

    def grab(_m, args, kwargs):
        seen["e"] = kwargs["inputs_embeds"].clone()

    h = _decoder(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=px)
    finally:
        h.remove()
    return seen["e"]


def test_csp_cls_clustering_reads_the_clip_cls_attention_and_matches_the_engine_run_directly():
    model, ids, px = _tiny()
    ids = _with_seg(ids)
    cfg = LVLMCSP(1, 5, 2, 3, clustering="cls")
    # by hand: the last CLIP layer's input is LN1(hidden_states[-2]); [CLS] row, one full-width product
    with torch.no_grad():
        vt = model.model.vision_tower
        hs = vt(px, output_hidden_states=True).hidden_states
        last = getattr(vt, "vision_model", vt).encoder.layers[-1]
        x = last.layer_norm1(hs[-2])
        q, k = last.self_attn.q_proj(x[:, :1]), last.self_attn.k_proj(x)
        cls = torch.softmax(q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5, dim=-1)[0, 0, 1:]
    expect = torch.sort(torch.topk(cls, 5).indices).values
    h0, logits, rec = _layer0_input(model, ids, px, cfg, guidance_token_id=SEG_ID)
    emb = _stock_embeds(model, ids, px)[0]
    vis_pos = (ids[0] == IMG).nonzero().flatten()
    keep = torch.sort(torch.cat([(ids[0] != IMG).nonzero().flatten(), vis_pos[expect]])).values
    assert torch.equal(h0, emb[keep])
    assert rec.stats.visual[0].tolist() == [5, 16, 16, 3]
    assert rec.stats.stages[0][1][0].tolist() == vis_pos[expect].tolist()
    # the same run through the engine directly on the decoder, with the selection passed in
    dec = _decoder(model)
    with torch.no_grad(), shared.pruning(dec, cfg) as eng:
        eng.prepare(visual_mask=(ids == IMG), guidance_index=[ids.shape[1] - 3], visual_selection=[expect])
        direct = model.lm_head(dec(inputs_embeds=emb[None]).last_hidden_state)
    assert torch.allclose(direct, logits, atol=1e-6)


def test_needs_are_refused_naming_method_need_and_host():
    model, ids, px = _tiny()
    with pytest.raises(ValueError, match=r"^method: lvlm_csp needs 'instance_masks' .*pass grid_masks= .*'hf_llava'"):
        with prune(model, LVLMCSP(1, 4, 1, 2, clustering="seg_first"), guidance_token_id=SEG_ID):
            pass
    with pytest.raises(ValueError, match=r"^method: lvlm_csp needs 'guidance_token'"):
        with prune(model, LVLMCSP(1, 4, 1, 2)):
            pass
    with pytest.raises(ValueError, match=r"^method: segpruner needs 'geometry'"):
        with prune(model, shared.SeGPruner(tokens=4)):
            pass
    with pytest.raises(ValueError, match="^views: not an option of host 'hf_llava'"):
        with prune(model, FastV(layer=1, keep=2), views=[None]):
            pass
    with pytest.raises(ValueError, match=r"^methods: two in-LLM methods"):
        with prune(model, FastV(layer=1, keep=2), PyramidDrop()):
            pass
    with prune(model, LVLMCSP(1, 4, 1, 2), guidance_token_id=SEG_ID), pytest.raises(ValueError, match="^guidance_token_id"):
        model(input_ids=ids, pixel_values=px)  # no [SEG] in the prompt
    assert "_shared_pruning_session" not in model.__dict__


def test_csp_seg_first_selects_inside_the_instance_masks():
    from shared.segfirst import masks_to_grid

    model, ids, px = _tiny()
    ids = _with_seg(ids)
    masks = torch.zeros(2, 60, 80, dtype=torch.bool)  # original image 60x80 -> resize 56x74, crop 56x56 at x=9
    masks[0, :30, 9:37] = True  # top-left quarter of the crop: 2x2 = 4 patches
    masks[1, 45:, 60:] = True  # a small object in the bottom-right corner
    grid = masks_to_grid(masks, size=56, patch=14)
    cfg = LVLMCSP(1, 4, 1, 2, clustering="seg_first", seed=5)
    sel, info = cfg.cluster(16, grid_masks=grid, key="photo-1")
    allowed = set(torch.cat(grid.token_sets).tolist())
    assert set(sel.tolist()) <= allowed and not info["fallback_used"]
    h0, _, rec = _layer0_input(model, ids, px, cfg, guidance_token_id=SEG_ID, grid_masks=[grid],
                               sample_keys=["photo-1"])
    emb = _stock_embeds(model, ids, px)[0]
    vis_pos = (ids[0] == IMG).nonzero().flatten()
    keep = torch.sort(torch.cat([(ids[0] != IMG).nonzero().flatten(), vis_pos[sel]])).values
    assert torch.equal(h0, emb[keep])
    assert rec.stats.visual[0].tolist() == [len(sel), 16, 2, 2]
    assert torch.equal(rec.info[0]["quotas"], info["quotas"])


def test_csp_seg_first_refuses_masks_mapped_to_another_grid():
    from shared.segfirst import masks_to_grid

    grid = masks_to_grid(torch.ones(1, 60, 80, dtype=torch.bool), size=224, patch=14)  # 16x16 = 256 tokens
    with pytest.raises(ValueError, match=r"^grid_masks: masks were mapped onto a 16x16 grid \(256 tokens\)"):
        LVLMCSP(1, 4, 1, 2, clustering="seg_first").cluster(16, grid_masks=grid, key="x")


def _collapsed_logits(model, ids, px, reducer):
    """The reducer's output spliced into a prompt holding K placeholders, by hand: the stock decoder."""
    from shared.methods.prellm import capture_vision_inputs

    with torch.no_grad():
        reduced = reducer.reduce(capture_vision_inputs(model.model.vision_tower, px, reducer.layer,
                                                       reducer.select_layer, reducer.select_feature))
        k = int(reduced.counts[0])
        proj = model.model.multi_modal_projector(reduced.features[:, :k])
        vis = (ids[0] == IMG).nonzero().flatten()
        short = torch.cat([ids[:, : int(vis[0])], torch.full((1, k), IMG), ids[:, int(vis[-1]) + 1:]], dim=1)
        emb = model.get_input_embeddings()(short)
        emb[0, int(vis[0]):int(vis[0]) + k] = proj[0]
        logits = model.lm_head(_decoder(model)(inputs_embeds=emb).last_hidden_state)
    return logits, short, k


@pytest.mark.parametrize("reducer", [PruMerge(adaptive=False, reduction_ratio=0.25, neighbours=4), VisionZip(dominant=4, contextual=2)],
                         ids=["prumerge", "visionzip"])
def test_a_pre_llm_reducer_equals_the_collapsed_prompt(reducer):
    model, ids, px = _tiny()
    want, short, k = _collapsed_logits(model, ids, px, reducer)
    with torch.no_grad(), prune(model, reducer) as session:
        got = model(input_ids=ids, pixel_values=px).logits
    rec = session.last
    kept = torch.cat([torch.arange(5 + k), torch.arange(21, 30)])  # text, the first K placeholders, text
    torch.testing.assert_close(got[0, kept], want[0], atol=1e-5, rtol=1e-5)
    assert rec.stats.visual[0].tolist() == [k] * 4 and rec.stats.visual_tokens.tolist() == [16]
    assert rec.pre_llm[0]["tokens"] == k


def test_a_reducer_stacks_with_an_in_llm_method_and_the_accounting_covers_both():
    from shared.accounting import CONVENTIONS, DecoderDims

    model, ids, px = _tiny()
    zip_ = VisionZip(dominant=6, contextual=2)  # 8 tokens per image
    with torch.no_grad(), prune(model, zip_, FastV(layer=2, keep=3)) as session:
        model(input_ids=ids, pixel_values=px)
    rec = session.last
    assert rec.stats.visual[0].tolist() == [8, 8, 3, 3]
    (eff,) = rec.efficiency(DecoderDims.from_config(model.config.text_config), CONVENTIONS["fastv"])
    assert eff.visual_tokens == 16 and eff.pruning_ratio == pytest.approx(1 - (8 + 8 + 3 + 3) / 4 / 16)
    assert eff.tokens_per_layer == [22, 22, 17, 17]


def test_demo_main_job_runs(capsys):
    from shared.apps.demo import main

    assert main(["--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens per layer: [576, 144, 144" in out  # FastV K=1 R=25% on 8 layers
    assert "Fast3D" in out and "INCONSISTENT" in out
