"""The engine on native transformers 5.x LLaVA (the path the demo and later methods use)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("native LLaVA path is tested on transformers 5.x; the 4.x envs test the host decoders",
                allow_module_level=True)

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from shared import FastV, PyramidDrop  # noqa: E402
from shared.hosts import find_decoder, prune  # noqa: E402

IMG = 127


def _tiny():
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=56, patch_size=14, projection_dim=32)
    tc = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(1, 120, (1, 5), generator=g), torch.full((1, 16), IMG),
                     torch.randint(1, 120, (1, 9), generator=g)], dim=1)
    return model, ids, torch.randn(1, 3, 56, 56, generator=g)


def test_visual_tokens_found_from_image_placeholders():
    model, ids, px = _tiny()
    with torch.no_grad(), prune(model, FastV(layer=2, keep=5)) as eng:
        model(input_ids=ids, pixel_values=px)
    assert eng.last_stats.visual[0].tolist() == [16, 16, 5, 5]
    assert eng.last_stats.tokens[0].tolist() == [30, 30, 19, 19]
    assert find_decoder(model) is model.model.language_model
    assert not model._forward_pre_hooks and "forward" not in find_decoder(model).__dict__


def test_nothing_pruned_equals_stock_llava_logits():
    model, ids, px = _tiny()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
        with prune(model, FastV(layer=1, keep=16)):
            out = model(input_ids=ids, pixel_values=px).logits
    assert torch.equal(ref, out)


@pytest.mark.parametrize("method", [FastV(layer=1, keep=4), PyramidDrop(layers=(1, 3), ratio=0.5)])
def test_llava_generate_with_cache_equals_recompute(method):
    model, ids, px = _tiny()
    with torch.no_grad(), prune(model, method, query_index=torch.tensor([ids.shape[1] - 1])):
        gen = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, do_sample=False)
        seq = ids
        for t in range(5):
            logits = model(input_ids=seq, pixel_values=px, use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            assert nxt == int(gen[0, ids.shape[1] + t]), f"step {t}"
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)


def test_prompt_without_image_placeholder_is_an_error():
    model, ids, px = _tiny()
    with prune(model, FastV(layer=1, keep=4)), pytest.raises(ValueError, match="^input_ids"):
        model(input_ids=torch.randint(1, 120, (1, 12)))


def test_demo_main_job_runs(capsys):
    from shared.demo import main

    assert main(["--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens per layer: [576, 144, 144" in out  # FastV K=1 R=25% on 8 layers
    assert "Fast3D" in out and "INCONSISTENT" in out


SEG_ID = 100


def _with_seg(ids):
    ids = ids.clone()
    ids[0, -3] = SEG_ID  # a guidance token after the image, as LISA's [SEG]
    return ids


def test_csp_with_full_budgets_equals_stock_llava_logits():
    from shared.methods.lvlm_csp import LVLMCSP

    model, ids, px = _tiny()
    ids = _with_seg(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
        with prune(model, LVLMCSP(1, 16, 1, 16), guidance_token_id=SEG_ID) as eng:
            out = model(input_ids=ids, pixel_values=px).logits
    assert eng.last_stats.visual[0].tolist() == [16, 16, 16, 16]
    assert torch.equal(ref, out)


def _layer0_input(model, ids, px, method, **kw):
    seen = {}

    def grab(_m, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    dec = find_decoder(model)
    h = dec.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), prune(model, method, **kw) as eng:
            logits = model(input_ids=ids, pixel_values=px).logits
    finally:
        h.remove()
    return seen["h"][0], logits, eng.last_stats


def _stock_embeds(model, ids, px):
    seen = {}

    def grab(_m, args, kwargs):
        seen["e"] = kwargs["inputs_embeds"].clone()

    h = find_decoder(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=px)
    finally:
        h.remove()
    return seen["e"]


def test_csp_cls_clustering_reads_the_clip_cls_attention_and_matches_the_engine_run_directly():
    from shared import pruning
    from shared.methods.lvlm_csp import LVLMCSP

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
    h0, logits, stats = _layer0_input(model, ids, px, cfg, guidance_token_id=SEG_ID)
    emb = _stock_embeds(model, ids, px)[0]
    vis_pos = (ids[0] == IMG).nonzero().flatten()
    keep = torch.sort(torch.cat([(ids[0] != IMG).nonzero().flatten(), vis_pos[expect]])).values
    assert torch.equal(h0, emb[keep])
    assert stats.visual[0].tolist() == [5, 16, 16, 3]
    # the same run through the engine directly on the decoder, with the selection passed in
    dec = find_decoder(model)
    with torch.no_grad(), pruning(dec, cfg) as eng:
        eng.prepare(visual_mask=(ids == IMG), guidance_index=[ids.shape[1] - 3], visual_selection=[expect])
        direct = model.lm_head(dec(inputs_embeds=emb[None]).last_hidden_state)
    assert torch.allclose(direct, logits, atol=1e-6)


def test_csp_seg_first_needs_grid_masks_and_guidance_must_exist():
    from shared.methods.lvlm_csp import LVLMCSP

    model, ids, px = _tiny()
    with prune(model, LVLMCSP(1, 4, 1, 2, clustering="seg_first")), pytest.raises(ValueError, match="^grid_masks"):
        model(input_ids=_with_seg(ids), pixel_values=px)
    with prune(model, LVLMCSP(1, 4, 1, 2), guidance_token_id=SEG_ID), pytest.raises(ValueError, match="^guidance_token_id"):
        model(input_ids=ids, pixel_values=px)


def test_csp_seg_first_selects_inside_the_instance_masks():
    from shared.methods.lvlm_csp import LVLMCSP
    from shared.segfirst import masks_to_grid

    model, ids, px = _tiny()
    ids = _with_seg(ids)
    masks = torch.zeros(2, 60, 80, dtype=torch.bool)  # original image 60x80 -> resize 56x74, crop 56x56 at x=9
    masks[0, :30, 9:37] = True  # top-left quarter of the crop: 2x2 = 4 patches
    masks[1, 45:, 60:] = True  # a small object in the bottom-right corner
    grid = masks_to_grid(masks, size=56, patch=14)
    cfg = LVLMCSP(1, 4, 1, 2, clustering="seg_first", seed=5)
    sel, info = cfg.cluster(16, grid_masks=grid)
    allowed = set(torch.cat(grid.token_sets).tolist())
    assert set(sel.tolist()) <= allowed and not info["fallback_used"]
    h0, _, stats = _layer0_input(model, ids, px, cfg, guidance_token_id=SEG_ID, grid_masks=[grid])
    emb = _stock_embeds(model, ids, px)[0]
    vis_pos = (ids[0] == IMG).nonzero().flatten()
    keep = torch.sort(torch.cat([(ids[0] != IMG).nonzero().flatten(), vis_pos[sel]])).values
    assert torch.equal(h0, emb[keep])
    assert stats.visual[0].tolist() == [len(sel), 16, 2, 2]


def test_csp_seg_first_refuses_masks_mapped_to_another_grid():
    from shared.methods.lvlm_csp import LVLMCSP
    from shared.segfirst import masks_to_grid

    grid = masks_to_grid(torch.ones(1, 60, 80, dtype=torch.bool), size=224, patch=14)  # 16x16 = 256 tokens
    with pytest.raises(ValueError, match=r"^grid_masks: masks were mapped onto a 16x16 grid \(256 tokens\)"):
        LVLMCSP(1, 4, 1, 2, clustering="seg_first").cluster(16, grid_masks=grid)
