"""PruMerge, PruMerge+ and VisionZip against loop transcriptions of the authors' code.

The references below follow 42Shawn/LLaVA-PruMerge ``token_prune_merge_advanced(_plus)`` and
dvlab-research/VisionZip ``CLIPVisionTower_VisionZip.forward`` step by step (hooked q/k outputs,
``output_attentions`` maps, per-token Python loops); they share no code with ``shared``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shared.methods import get_method
from shared.methods.prellm import (
    CLS_INDEX,
    MERGED_INDEX,
    PAD_INDEX,
    ReducedTokens,
    VisionInputs,
    capture_vision_inputs,
)
from shared.methods.prumerge import PruMerge, PruMergePlus, iqr_outlier_ratio
from shared.methods.visionzip import VisionZip

transformers = pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

ATOL = 1e-6


# ----------------------------------------------------------------------------------------------
# reference transcriptions
# ----------------------------------------------------------------------------------------------
def ref_outlier_ratio(attn: torch.Tensor) -> float:
    values = attn.to(torch.float32).numpy().flatten()
    q1 = np.percentile(values, 25)
    q3 = np.percentile(values, 75)
    iqr = q3 - q1
    upper = q3 + 1.5 * iqr
    return len(np.where(values > upper)[0]) / len(values)


def ref_complement(idx: torch.Tensor, dim: int) -> torch.Tensor:
    """complement_idx: arange(dim) with the idx positions set to 0, sorted, first len(idx) dropped."""
    rows = []
    for row in idx.tolist():
        a = list(range(dim))
        for j in row:
            a[j] = 0
        a.sort()
        rows.append(a[len(row):])
    return torch.tensor(rows, dtype=torch.long).view(idx.shape[0], dim - idx.shape[1])


def ref_prumerge(q, k, image_features, plus=False, if_adaptive=True, reduction_ratio=1 / 8, neighbours=32):
    """q, k: (B, N+1, C) outputs of q_proj / k_proj; image_features: (B, N, C). Batch semantics of the repo."""
    B, N, C = image_features.shape
    attn = torch.softmax((q @ k.transpose(-2, -1)) * C ** -0.5, dim=-1)
    cls_attn = attn[:, 0, 1:]
    if if_adaptive:
        reduction_ratio = ref_outlier_ratio(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    if plus:
        step_length = int(1 / reduction_ratio)
        if if_adaptive:
            assert B == 1, "the reference PruMerge+ adaptive path only runs with one image"
            flat = idx.flatten().tolist()
            seq = list(range(0, N - 1, int(step_length / 3)))
            filtered = [x for x in seq if x not in flat]
            idx = torch.cat([idx, torch.tensor([filtered], dtype=torch.long)], dim=1)
        else:
            new_idx = torch.zeros(B, idx.shape[1] * 2, dtype=torch.long)
            for i in range(B):
                seq = torch.arange(int(step_length / 2), N - 1, int(step_length))
                new_idx[i] = torch.cat([idx[i], seq])
            idx = new_idx
    keys = k[:, 1:]
    compl = ref_complement(idx, N)
    out = []
    for b in range(B):
        x_others = image_features[b, idx[b]]
        x_attn = cls_attn[b, idx[b]]
        key_others = nn.functional.normalize(keys[b, idx[b]], p=2, dim=-1)
        non_topk = image_features[b, compl[b]]
        non_topk_attn = cls_attn[b, compl[b]]
        non_topk_key = nn.functional.normalize(keys[b, compl[b]], p=2, dim=-1)
        tokens = []
        for i in range(idx.shape[1]):
            rest_x = torch.cat([x_others[:i], x_others[i + 1:], non_topk])
            rest_attn = torch.cat([x_attn[:i], x_attn[i + 1:], non_topk_attn])
            rest_key = torch.cat([key_others[:i], key_others[i + 1:], non_topk_key])
            cos = rest_key @ key_others[i]
            near = torch.topk(cos, k=neighbours, largest=True).indices
            weighted = torch.zeros(C)
            for j in near.tolist():
                weighted = weighted + rest_x[j] * rest_attn[j]
            tokens.append(weighted + x_others[i])
        extra = torch.zeros(C)
        for j in range(non_topk.shape[0]):
            extra = extra + non_topk[j] * non_topk_attn[j]
        tokens.append(extra)
        out.append(torch.stack(tokens))
    return torch.stack(out), idx


def ref_visionzip(attn_weights, hidden_states, metric, dominant, contextual):
    """attn_weights (B, H, N, N) of the layer, its output hidden_states (B, N, C), metric (B, N, dh)."""
    B, N, C = hidden_states.shape
    dominant_num = dominant - 1
    feats, indices = [], []
    for b in range(B):
        cls_sum = attn_weights[b, :, 0, 1:].sum(dim=0)
        top = (torch.topk(cls_sum, dominant_num).indices + 1).tolist()
        keep = sorted([0] + top)
        rest = [p for p in range(N) if p not in keep]
        m = metric[b, rest]
        m = m / m.norm(dim=-1, keepdim=True)
        R = len(rest)
        step = max(1, R // contextual)
        targets = list(range(0, R, step))[:contextual]
        sums = [torch.zeros(C) for _ in targets]
        counts = [0 for _ in targets]
        for j in range(R):
            if j in targets:
                continue
            sims = [float(m[j] @ m[t]) for t in targets]
            best = sims.index(max(sims))
            sums[best] = sums[best] + hidden_states[b, rest[j]]
            counts[best] += 1
        tokens = [hidden_states[b, p] for p in keep]
        tokens += [hidden_states[b, rest[t]] + sums[n] / max(counts[n], 1) for n, t in enumerate(targets)]
        feats.append(torch.stack(tokens))
        indices.append([p - 1 for p in keep] + [rest[t] - 1 for t in targets])
    return torch.stack(feats), torch.tensor(indices)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
class FakeAttention(nn.Module):
    def __init__(self, dim: int, heads: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.num_heads = heads
        self.head_dim = dim // heads


def random_inputs(batch=1, patches=64, dim=32, heads=4, seed=0, has_cls=False):
    """Attention module + hidden states scaled so that the [CLS] attention has IQR outliers."""
    attn = FakeAttention(dim, heads, seed)
    g = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(batch, 1 + patches, dim, generator=g) * 3.0
    feats = torch.randn(batch, 1 + patches, dim, generator=g)
    return VisionInputs(hidden, attn, feats if has_cls else feats[:, 1:], has_cls=has_cls)


def tiny_tower(seed=3, layers=4, image=56):
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=image, patch_size=14)
    cfg._attn_implementation = "eager"  # only for the reference's output_attentions; ignored by 4.31
    torch.manual_seed(seed)
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():  # sharper attention, so that the [CLS] row has IQR outliers on 16 patches
        for layer in encoder_layers(model):
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    pixels = torch.randn(2, 3, image, image, generator=torch.Generator().manual_seed(seed))
    return model, pixels


def encoder_layers(model):
    vm = getattr(model, "vision_model", model)  # 4.x nests the transformer, 5.x does not
    return vm.encoder.layers


def tower_reference_inputs(model, pixels, layer):
    """What the repos read: q_proj/k_proj forward-hook outputs of ``layer``, hidden states, attention maps."""
    out = {}
    attn = encoder_layers(model)[layer].self_attn
    hq = attn.q_proj.register_forward_hook(lambda m, i, o: out.__setitem__("q", o))
    hk = attn.k_proj.register_forward_hook(lambda m, i, o: out.__setitem__("k", o))
    with torch.no_grad():
        res = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    hq.remove()
    hk.remove()
    return out["q"], out["k"], res.hidden_states, res.attentions


def no_hooks(model) -> bool:
    """No hook of ours left (transformers 5.x keeps its own output-capturing forward hooks)."""
    return all(not m._forward_pre_hooks and all("output_capturing" in getattr(h, "__qualname__", "")
                                                 for h in m._forward_hooks.values())
               for m in model.modules())


def assert_same(red: ReducedTokens, feats: torch.Tensor, idx: torch.Tensor, row: int = 0) -> None:
    n = int(red.counts[row])
    assert n == feats.shape[0]
    assert torch.equal(red.indices[row, :n], idx)
    torch.testing.assert_close(red.features[row, :n], feats, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# equality with the references
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("adaptive", [True, False])
def test_prumerge_matches_reference_on_random_inputs(seed, adaptive):
    inp = random_inputs(seed=seed)
    method = PruMerge(adaptive=adaptive, neighbours=8)
    red = method.reduce(inp)
    with torch.no_grad():
        q = inp.attn.q_proj(inp.attn_hidden)
        k = inp.attn.k_proj(inp.attn_hidden)
        ref, ref_idx = ref_prumerge(q, k, inp.features, if_adaptive=adaptive, neighbours=8)
    assert ref_idx.shape[1] > 0
    if adaptive:
        assert red.K == int(64 * ref_outlier_ratio(torch.softmax(q[:, :1] @ k.transpose(1, 2) / 32 ** 0.5, -1)[:, 0, 1:])) + 1
    else:
        assert red.K == 64 // 8 + 1 == method.output_tokens(64)
    assert_same(red, ref[0], torch.cat([ref_idx[0], torch.tensor([MERGED_INDEX])]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("adaptive", [True, False])
def test_prumerge_plus_matches_reference_on_random_inputs(seed, adaptive):
    inp = random_inputs(seed=seed)
    red = PruMergePlus(adaptive=adaptive, neighbours=8).reduce(inp)
    with torch.no_grad():
        q = inp.attn.q_proj(inp.attn_hidden)
        k = inp.attn.k_proj(inp.attn_hidden)
        ref, ref_idx = ref_prumerge(q, k, inp.features, plus=True, if_adaptive=adaptive, neighbours=8)
    assert_same(red, ref[0], torch.cat([ref_idx[0], torch.tensor([MERGED_INDEX])]))


def test_prumerge_plus_duplicate_samples_follow_complement_idx():
    """Non-adaptive PruMerge+ may sample a patch that top-k already kept: the repo keeps both copies."""
    found = False
    for seed in range(20):
        inp = random_inputs(seed=seed)
        red = PruMergePlus(adaptive=False, neighbours=8).reduce(inp)
        kept = red.indices[0, :-1]
        if kept.unique().numel() < kept.numel():
            found = True
            with torch.no_grad():
                q = inp.attn.q_proj(inp.attn_hidden)
                k = inp.attn.k_proj(inp.attn_hidden)
                ref, ref_idx = ref_prumerge(q, k, inp.features, plus=True, if_adaptive=False, neighbours=8)
            assert_same(red, ref[0], torch.cat([ref_idx[0], torch.tensor([MERGED_INDEX])]))
            break
    assert found, "no seed produced a duplicate spatial sample"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dominant,contextual", [(54, 10), (20, 7), (1, 5), (30, 35)])
def test_visionzip_matches_reference_on_random_inputs(seed, dominant, contextual):
    inp = random_inputs(seed=seed, patches=64, has_cls=True)
    red = VisionZip(dominant=dominant, contextual=contextual).reduce(inp)
    h, dh = inp.attn.num_heads, inp.attn.head_dim
    with torch.no_grad():
        b, n, c = inp.attn_hidden.shape
        q = inp.attn.q_proj(inp.attn_hidden).view(b, n, h, dh)
        k = inp.attn.k_proj(inp.attn_hidden).view(b, n, h, dh)
        maps = torch.stack([torch.softmax((q[:, :, i] * dh ** -0.5) @ k[:, :, i].transpose(1, 2), -1)
                            for i in range(h)], dim=1)
        ref, ref_idx = ref_visionzip(maps, inp.features, k.mean(dim=2), dominant, contextual)
    assert red.K == dominant + contextual and not red.ragged
    assert_same(red, ref[0], ref_idx[0])
    assert red.indices[0, 0] == CLS_INDEX


@pytest.mark.parametrize("image", [56, 112])
def test_tower_prumerge_and_plus_match_reference(image):
    model, pixels = tiny_tower(image=image)
    depth = len(encoder_layers(model))
    q, k, hs, _ = tower_reference_inputs(model, pixels, depth - 1)  # PruMerge: last layer, input hs[-2]
    p = (image // 14) ** 2
    for cls, plus in ((PruMerge, False), (PruMergePlus, True)):
        red = cls(neighbours=min(32, p - 1))(model, pixels)
        for b in range(2):  # the repo's PruMerge+ runs one image at a time
            feats = hs[-2][b:b + 1, 1:]
            ref, ref_idx = ref_prumerge(q[b:b + 1], k[b:b + 1], feats, plus=plus, neighbours=min(32, p - 1))
            assert ref_idx.shape[1] > 0
            assert_same(red, ref[0], torch.cat([ref_idx[0], torch.tensor([MERGED_INDEX])]), row=b)
    assert no_hooks(model)


@pytest.mark.parametrize("image,dominant,contextual", [(56, 6, 4), (56, 1, 15), (112, 54, 10)])
def test_tower_visionzip_matches_reference(image, dominant, contextual):
    model, pixels = tiny_tower(image=image)
    depth = len(encoder_layers(model))
    _, k, hs, maps = tower_reference_inputs(model, pixels, depth - 2)  # VisionZip: layer L-2, output hs[-2]
    b, n, _ = k.shape
    metric = k.view(b, n, 4, 16).mean(dim=2)
    ref, ref_idx = ref_visionzip(maps[-2], hs[-2], metric, dominant, contextual)
    red = VisionZip(dominant=dominant, contextual=contextual)(model, pixels)
    for row in range(2):
        assert_same(red, ref[row], ref_idx[row], row=row)
    assert no_hooks(model)


def test_outlier_scope_batch_reproduces_the_pooled_count():
    inp = random_inputs(batch=2, seed=4)
    red = PruMerge(neighbours=8, outlier_scope="batch").reduce(inp)
    with torch.no_grad():
        q = inp.attn.q_proj(inp.attn_hidden)
        k_ = inp.attn.k_proj(inp.attn_hidden)
        ref, ref_idx = ref_prumerge(q, k_, inp.features, neighbours=8)
    assert not red.ragged
    for row in range(2):
        assert_same(red, ref[row], torch.cat([ref_idx[row], torch.tensor([MERGED_INDEX])]), row=row)
    # PruMerge+ (the repo fails for B > 1): the pooled top-k, then each image's own spatial samples
    plus = PruMergePlus(neighbours=8, outlier_scope="batch").reduce(inp)
    k = ref_idx.shape[1]
    with torch.no_grad():
        ratio = ref_outlier_ratio(torch.softmax(q @ k_.transpose(1, 2) * 32 ** -0.5, dim=-1)[:, 0, 1:])
    stride = int(int(1 / ratio) / 3)
    for row in range(2):
        kept = plus.indices[row, : int(plus.counts[row]) - 1]
        assert torch.equal(kept[:k], ref_idx[row])
        samples = [x for x in range(0, 63, stride) if x not in ref_idx[row].tolist()]
        assert kept[k:].tolist() == samples


# ----------------------------------------------------------------------------------------------
# batches, layers, hooks, accounting
# ----------------------------------------------------------------------------------------------
METHODS = [PruMerge(neighbours=8), PruMergePlus(neighbours=8), PruMerge(adaptive=False, neighbours=8),
           VisionZip(dominant=20, contextual=6)]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_batch_of_two_equals_two_single_runs(method):
    inp = random_inputs(batch=2, seed=5, has_cls=isinstance(method, VisionZip))
    both = method.reduce(inp)
    singles = [method.reduce(VisionInputs(inp.attn_hidden[i:i + 1], inp.attn, inp.features[i:i + 1],
                                          has_cls=inp.has_cls)) for i in range(2)]
    if isinstance(method, PruMerge) and method.adaptive:
        assert both.ragged  # the two images have different outlier counts (per-image rule)
    for i, single in enumerate(singles):
        assert int(both.counts[i]) == single.K
        assert_same(both, single.features[0], single.indices[0], row=i)
        assert (both.indices[i, single.K:] == PAD_INDEX).all()
        assert (both.features[i, single.K:] == 0).all()
        torch.testing.assert_close(both.per_image()[i], single.features[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_tower_batch_of_two_equals_two_single_runs(method):
    model, pixels = tiny_tower(image=112)
    both = method(model, pixels)
    for i in range(2):
        single = method(model, pixels[i:i + 1])
        assert int(both.counts[i]) == single.K
        assert torch.equal(both.indices[i, :single.K], single.indices[0])
        torch.testing.assert_close(both.features[i, :single.K], single.features[0], atol=1e-5, rtol=1e-5)
    assert no_hooks(model)


def test_capture_layers_follow_the_tower_depth():
    for depth in (3, 4):
        model, pixels = tiny_tower(layers=depth)
        layers = encoder_layers(model)
        with torch.no_grad():
            hs = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        pm = PruMerge().capture(model, pixels)
        assert pm.layer == depth - 1 and pm.num_layers == depth and not pm.has_cls
        assert pm.attn is layers[depth - 1].self_attn
        torch.testing.assert_close(pm.attn_hidden, layers[depth - 1].layer_norm1(hs[-2]), atol=0, rtol=0)
        torch.testing.assert_close(pm.features, hs[-2][:, 1:], atol=0, rtol=0)
        vz = VisionZip().capture(model, pixels)
        assert vz.layer == depth - 2 and vz.has_cls and vz.attn is layers[depth - 2].self_attn
        torch.testing.assert_close(vz.attn_hidden, layers[depth - 2].layer_norm1(hs[-3]), atol=0, rtol=0)
        torch.testing.assert_close(vz.features, hs[-2], atol=0, rtol=0)
        assert no_hooks(model)


def test_capture_of_the_last_hidden_state():
    model, pixels = tiny_tower()
    with torch.no_grad():
        hs = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    for select_layer in (-1, 4, 0, -5):
        got = capture_vision_inputs(model, pixels, layer=0, select_layer=select_layer, select_feature="cls_patch")
        torch.testing.assert_close(got.features, hs[select_layer], atol=0, rtol=0)
    assert no_hooks(model)


def test_capture_is_immune_to_duplicated_transformers_hooks():
    """transformers 5.x: a parent model called with output_hidden_states=True re-installs its hidden-state
    hooks inside an already hooked tower (LISA's layout), so the tower's hidden_states repeat every
    layer; the capture does not use them."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x returns hidden states without hooks")
    from transformers import LlamaConfig, LlamaModel

    model, pixels = tiny_tower()
    want = PruMerge(neighbours=8).capture(model, pixels)
    with torch.no_grad():
        model(pixel_values=pixels, output_hidden_states=True)
        parent = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, vocab_size=16)).eval()
        parent.holder = nn.Module()
        parent.holder.tower = model
        parent(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
        assert len(model(pixel_values=pixels, output_hidden_states=True).hidden_states) == 2 * 4 + 1
    got = PruMerge(neighbours=8).capture(model, pixels)
    assert torch.equal(got.features, want.features) and torch.equal(got.attn_hidden, want.attn_hidden)
    assert no_hooks(model)


def test_hook_removed_when_the_forward_fails():
    model, _ = tiny_tower()
    with pytest.raises(Exception):
        capture_vision_inputs(model, torch.randn(1, 3, 50, 50), layer=-1)  # 50 px does not match the tower
    assert no_hooks(model)


def test_iqr_ratio_and_extra_token_by_hand():
    assert iqr_outlier_ratio(torch.tensor([1.0] * 7 + [100.0])) == 1 / 8
    assert iqr_outlier_ratio(torch.arange(8.0)) == 0.0
    # no outlier: PruMerge keeps nothing and emits only the attention-weighted sum of all patches
    attn = FakeAttention(8, 2, 0)
    nn.init.zeros_(attn.q_proj.weight)
    nn.init.zeros_(attn.q_proj.bias)  # q = 0: uniform attention over the 1 + 4 keys
    feats = torch.arange(32.0).view(1, 4, 8)
    red = PruMerge(neighbours=2).reduce(VisionInputs(torch.randn(1, 5, 8), attn, feats))
    assert red.K == 1 and red.indices.tolist() == [[MERGED_INDEX]]
    torch.testing.assert_close(red.features[0, 0], feats[0].sum(0) / 5, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="^inputs: image 0 has no IQR outlier"):
        PruMergePlus(neighbours=2).reduce(VisionInputs(torch.randn(1, 5, 8), attn, feats))


def test_registry_and_presets():
    assert isinstance(get_method("prumerge"), PruMerge)
    assert get_method("prumerge_plus").name == "prumerge_plus"
    for tokens, split in ((64, (54, 10)), (128, (108, 20)), (192, (162, 30))):
        vz = get_method("visionzip", tokens=tokens)
        assert (vz.dominant, vz.contextual) == split and vz.output_tokens(576) == tokens
    assert (VisionZip().dominant, VisionZip().contextual) == (54, 10)


# ----------------------------------------------------------------------------------------------
# parameter errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,param", [
    (PruMerge, {"neighbours": 0}, "neighbours"),
    (PruMerge, {"reduction_ratio": 0.0}, "reduction_ratio"),
    (PruMerge, {"reduction_ratio": 1.5}, "reduction_ratio"),
    (PruMerge, {"outlier_scope": "dataset"}, "outlier_scope"),
    (PruMerge, {"adaptive": 1}, "adaptive"),
    (PruMergePlus, {"layer": "last"}, "layer"),
    (VisionZip, {"tokens": 100}, "tokens"),
    (VisionZip, {"dominant": 0, "contextual": 10}, "dominant"),
    (VisionZip, {"dominant": 54, "contextual": 0}, "contextual"),
    (VisionZip, {"dominant": 54}, "contextual"),
    (VisionZip, {"tokens": 64, "dominant": 60}, "dominant"),
    (VisionZip, {"select_layer": 1.5}, "select_layer"),
])
def test_bad_parameters_name_the_parameter(cls, kwargs, param):
    with pytest.raises((ValueError, TypeError), match=f"^{param}: "):
        cls(**kwargs)


def test_bad_parameters_against_the_inputs():
    inp = random_inputs(patches=16)
    with pytest.raises(ValueError, match="^neighbours: expected at most P - 1 = 15"):
        PruMerge(neighbours=16).reduce(inp)
    with pytest.raises(ValueError, match="^reduction_ratio: "):
        PruMerge(adaptive=False, reduction_ratio=0.05, neighbours=4).reduce(inp)  # int(16 * 0.05) = 0 tokens
    with pytest.raises(ValueError, match="^reduction_ratio: "):
        PruMergePlus(adaptive=False, reduction_ratio=0.3, neighbours=4).reduce(inp)  # 4 top vs 5 samples
    vz_inp = random_inputs(patches=16, has_cls=True)
    with pytest.raises(ValueError, match="^dominant/contextual: "):
        VisionZip(dominant=10, contextual=8).reduce(vz_inp)
    with pytest.raises(ValueError, match="^inputs: "):
        VisionZip().reduce(inp)  # features without [CLS]
    model, pixels = tiny_tower()
    with pytest.raises(ValueError, match=r"^layer: expected an encoder-layer index in \[-4, 3\]"):
        PruMerge(layer=4).capture(model, pixels)
    with pytest.raises(ValueError, match="^select_layer: "):
        VisionZip(select_layer=-6).capture(model, pixels)
    with pytest.raises(ValueError, match="^select_feature: "):
        capture_vision_inputs(model, pixels, layer=-1, select_feature="cls")
    with pytest.raises(ValueError, match="^pixel_values: "):
        capture_vision_inputs(model, pixels[0], layer=-1)
    with pytest.raises(TypeError, match="^tower: "):
        capture_vision_inputs(nn.Linear(2, 2), pixels, layer=-1)
    with pytest.raises(ValueError, match="^features: "):
        VisionInputs(torch.randn(1, 5, 8), FakeAttention(8, 2, 0), torch.randn(1, 5, 8))
    assert no_hooks(model)
