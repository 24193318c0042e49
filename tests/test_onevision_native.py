"""SeGPruner on a native transformers 5.x LlavaOnevisionForConditionalGeneration (shared.hosts.hf_onevision).

A tiny random model with a 56 px / 14 px SigLIP (4x4 = 16 tokens per view + 1 newline) built from config;
the multi-image single-crop inputs are built directly (what the processor emits for nested image
lists: grid²+1 placeholders per view, pixel_values per view, batch_num_images).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the native LLaVA-OneVision path is tested on transformers 5.x", allow_module_level=True)

from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig  # noqa: E402

from shared.datasets import make_room_scene, prepare_views  # noqa: E402
from shared import FastV, PruMerge, PyramidDrop, SeGPruner, prune  # noqa: E402
from shared.hosts.hf_onevision import grid_of  # noqa: E402
from shared.hosts.selection import geometry_from_views  # noqa: E402

IMG, SIZE, GRID, P = 250, 56, 4, 16


def tiny_ov(seed=0):
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=SIZE, patch_size=14, vision_use_head=False)
    tc = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=260, max_position_embeddings=4096, pad_token_id=0)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_index=IMG, video_token_index=251,
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               image_grid_pinpoints=[[SIZE, SIZE], [SIZE, 2 * SIZE]])
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_ov()


def scene_views(n_views, seed=0):
    return prepare_views(make_room_scene(n_views=n_views, height=42, width=56, seed=seed), size=SIZE, padding="mean")


def inputs_for(views, prefix=5, suffix=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = len(views.images)
    ids = torch.cat([torch.randint(1, 240, (1, prefix), generator=g), torch.full((1, v * (P + 1)), IMG),
                     torch.randint(1, 240, (1, suffix), generator=g)], dim=1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=views.pixel_values(),
                image_sizes=torch.tensor([[SIZE, SIZE]] * v), batch_num_images=torch.tensor([v]))


def reference_encoding(model, px):
    """Features and saliency without shared.scoring: the tower's own eager attention weights."""
    out = model.model.vision_tower(px, output_hidden_states=True, output_attentions=True)
    return out.hidden_states[-1], out.attentions[-1].double().mean(dim=2).mean(dim=1)


def layer0_input(model, fn):
    """What decoder layer 0 receives (the LLM input after pre-LLM removal) and fn's result."""
    seen = []

    def hook(_m, args, kw):
        if not seen:
            seen.append((args[0] if args else kw["hidden_states"]).detach().clone())

    h = model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = fn()
    finally:
        h.remove()
    return seen[0], result


def test_grid_is_a_parameter(model):
    assert grid_of(model) == GRID


def test_llm_receives_exactly_the_kept_tokens_and_one_newline_per_view(model):
    """The layer-0 input is text + projected kept tokens + a newline per view, and the logits at those
    positions equal the stock decoder run on that collapsed sequence (positions renumbered)."""
    views = scene_views(3)
    inputs = inputs_for(views)
    pruner = SeGPruner(tokens=5, important_ratio=0.4, lam=0.5)
    geom = geometry_from_views(views, grid=GRID, patch=14)

    def run():
        with torch.no_grad(), prune(model, pruner, views=[geom]) as session:
            logits = model(**inputs).logits
        return session, logits

    h0, (session, logits) = layer0_input(model, run)
    feats, sal = reference_encoding(model, inputs["pixel_values"])
    keep = pruner.select(sal.float(), feats, geom.centroids, geom.valid)
    rec = session.last
    assert keep.sum(1).tolist() == [5, 5, 5] and torch.equal(keep, rec.pre_llm[0]["keep"])
    core = model.model
    ids = inputs["input_ids"][0]
    emb = model.get_input_embeddings()
    rows = [emb(ids[:5])]
    for v in range(3):
        rows += [core.multi_modal_projector(feats[v][keep[v]]), core.image_newline[None]]
    rows.append(emb(ids[-7:]))
    want = torch.cat(rows).detach()
    assert h0.shape == (1, 5 + 3 * 6 + 7, 64)
    assert torch.allclose(h0[0], want, atol=1e-5)
    with torch.no_grad():
        stock = model.lm_head(core.language_model(inputs_embeds=want[None]).last_hidden_state)
    kept_slots = [True] * 5 + [bool(k) for v in range(3) for k in list(keep[v]) + [True]] + [True] * 7
    slots = torch.nonzero(torch.tensor(kept_slots)).flatten()
    assert torch.allclose(logits[0, slots], stock[0], atol=1e-5)
    assert rec.stats.visual[0].tolist() == [18] * 3 and int(rec.stats.tokens[0, 0]) - 18 == 12
    assert rec.stats.visual_tokens.tolist() == [3 * (P + 1)] and rec.pre_llm[0]["tokens"] == 18


def test_keeping_every_token_equals_the_unpruned_model(model):
    views = scene_views(3, seed=1)
    inputs = inputs_for(views, seed=1)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        ref_logits = model(**inputs).logits
        everything = SeGPruner(tokens=P, important_ratio=1.0)
        with prune(model, everything) as session:
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            logits = model(**inputs).logits
    assert out.tolist() == ref.tolist()
    assert torch.equal(logits, ref_logits)
    assert session.last.pre_llm[0]["per_view"] == [P] * 3


@pytest.mark.parametrize("mode,tokens", [("per_view", 4), ("per_scene", 9)])
def test_per_view_and_per_scene_budgets(model, mode, tokens):
    views = scene_views(3, seed=2)
    inputs = inputs_for(views, seed=2)
    pruner = SeGPruner(tokens=tokens, important_ratio=0.25, lam=0.5, mode=mode)
    with torch.no_grad(), prune(model, pruner, views=[geometry_from_views(views, grid=GRID)]) as session:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    per_view = session.last.pre_llm[0]["per_view"]
    if mode == "per_view":
        assert per_view == [4, 4, 4]
    else:
        assert sum(per_view) == 9
    assert session.last.stats.visual[0].tolist() == [sum(per_view) + 3] * 3
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("method", [FastV(layer=1, keep=5), PyramidDrop(layers=(1, 2), ratio=0.5)], ids=["fastv", "pdrop"])
def test_segpruner_stacks_with_an_in_llm_method(model, method):
    views = scene_views(2, seed=6)
    inputs = inputs_for(views, seed=6)
    pruner = SeGPruner(tokens=6, important_ratio=0.5, lam=0.5)
    with torch.no_grad(), prune(model, pruner, method, views=[geometry_from_views(views, grid=GRID)]) as session:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    vis = session.last.stats.visual[0].tolist()
    assert vis[0] == 2 * 7 and vis == method.schedule(14, 3)
    assert session.last.stats.visual_tokens.tolist() == [2 * (P + 1)]


def test_left_padded_batch_equals_single_samples(model):
    va, vb = scene_views(2, seed=3), scene_views(3, seed=4)
    a, b = inputs_for(va, prefix=3, suffix=4, seed=3), inputs_for(vb, prefix=6, suffix=5, seed=4)
    pruner = SeGPruner(tokens=6, important_ratio=0.5, lam=0.5)
    ga, gb = geometry_from_views(va, grid=GRID), geometry_from_views(vb, grid=GRID)
    la, lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    length = max(la, lb)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    ids[0, length - la:], mask[0, length - la:] = a["input_ids"][0], 1
    ids[1, length - lb:], mask[1, length - lb:] = b["input_ids"][0], 1
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
                 image_sizes=torch.tensor([[SIZE, SIZE]] * 5), batch_num_images=torch.tensor([2, 3]))

    def gen(inp, geoms):
        with torch.no_grad(), prune(model, pruner, views=geoms) as session:
            out = model.generate(**inp, max_new_tokens=4, do_sample=False)
        return out[:, inp["input_ids"].shape[1]:], session.last

    both, rec = gen(batch, [ga, gb])
    one, _ = gen(a, [ga])
    two, _ = gen(b, [gb])
    assert rec.stats.visual[:, 0].tolist() == [2 * 7, 3 * 7]
    assert both[0].tolist() == one[0].tolist()
    assert both[1].tolist() == two[0].tolist()


def test_patch_centroids_follow_the_token_grid():
    # 56x28 frames padded to 56x56: rows 0-13 and 42-55 (the first and last token rows) are padding
    views = prepare_views(make_room_scene(n_views=2, height=28, width=56, seed=5), size=SIZE, padding="mean")
    geom = geometry_from_views(views, grid=GRID, patch=14)
    d, K, T = views.depth.double(), views.K.double(), views.cam2world.double()
    for v, r, c in [(0, 1, 2), (1, 2, 0), (1, 0, 3)]:
        ys, xs = torch.meshgrid(torch.arange(r * 14, r * 14 + 14), torch.arange(c * 14, c * 14 + 14), indexing="ij")
        z = d[v, ys, xs]
        ok = z > 0
        cam = torch.stack([(xs - K[v, 0, 2]) / K[v, 0, 0] * z, (ys - K[v, 1, 2]) / K[v, 1, 1] * z, z], -1)[ok]
        world = cam @ T[v, :3, :3].T + T[v, :3, 3]
        token = r * GRID + c
        assert bool(geom.valid[v, token]) == bool(ok.any())
        if ok.any():
            assert torch.allclose(geom.centroids[v, token].double(), world.mean(0), atol=1e-4)
    assert not bool(geom.valid[:, :GRID].any()) and not bool(geom.valid[:, -GRID:].any())
    assert bool(geom.valid[:, GRID:-GRID].all())
    compat = geometry_from_views(views, grid=GRID, patch=14, compat_released=True)
    assert bool(compat.valid.all())  # released: every token is a candidate


def test_errors_name_the_parameter(model):
    views = scene_views(2)
    inputs = inputs_for(views)
    pruner = SeGPruner(tokens=4, important_ratio=1.0)
    ids = torch.cat([inputs["input_ids"][:, :5], inputs["input_ids"][:, 7:]], dim=1)  # two placeholders lost
    bad = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    with prune(model, pruner), pytest.raises(ValueError, match=r"^input_ids: sample 0 has 32 image placeholders"):
        model.generate(**bad, max_new_tokens=1)
    single = dict(inputs, input_ids=torch.cat([inputs["input_ids"][:, :5], torch.full((1, 3 * P), IMG),
                                               inputs["input_ids"][:, -7:]], dim=1),
                  pixel_values=torch.randn(1, 3, 3, SIZE, SIZE), image_sizes=torch.tensor([[SIZE, 2 * SIZE]]),
                  batch_num_images=torch.tensor([1]))
    single["attention_mask"] = torch.ones_like(single["input_ids"])
    with prune(model, pruner), pytest.raises(ValueError, match=r"^input_ids: sample 0 has \d+ image placeholders, not views"):
        model.generate(**single, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"^method: segpruner needs 'geometry' .*pass views= .*'hf_onevision'"):
        with prune(model, SeGPruner(tokens=4, important_ratio=0.5)):
            pass
    with prune(model, SeGPruner(tokens=4, important_ratio=0.5), views=[None]) as s:
        assert s.host.name == "hf_onevision"
        with pytest.raises(ValueError, match=r"^views: SeGPruner picks 2 tokens by 3D distance"):
            model.generate(**inputs, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"^views: geometry was given for 2 sample\(s\)"):
        with prune(model, SeGPruner(tokens=4, important_ratio=0.5), views=[None, None]):
            model.generate(**inputs, max_new_tokens=1)
    with pytest.raises(ValueError, match="^on_invalid_pose"):
        with prune(model, pruner, on_invalid_pose="skip"):
            pass
    with pytest.raises(ValueError, match=r"^method: prumerge needs 'cls_token'"):
        with prune(model, PruMerge()):
            pass


def test_demo_runs_and_writes_the_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from shared.apps.demo_segpruner import main

    assert main(["--out", str(tmp_path), "--views", "3", "--tokens", "20", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 views x (729 grid + 1 newline) = 2190 visual tokens" in out
    assert "kept grid tokens per view: [20, 20, 20]" in out
    assert out.count("LLM visual tokens: 63 (+55 text)") == 2  # per_view and per_scene (60 in all)
    for name in ("kept_per_view.png", "kept_per_scene.png", "centroids_3d.png"):
        assert (tmp_path / name).stat().st_size > 10_000
