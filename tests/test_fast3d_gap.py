"""Fast3D's GAP network (``shared.methods.fast3d_gap`` / ``fast3d_cmt``).

- State-dict layout = the authors' ``Fast3dNet`` at their default config. The expected keys/shapes
  are in ``tests/fixtures/fast3d/gap_state_dict_keys.json``: the ``gap`` part was written by reading
  the authors' module definitions (wencan25/Fast3D @ 3c42c63, ``fast3d/modeling_fast3d.py``:
  ``text_projector``, ``obj_feat_projector``, ``obj_id_embedding`` (100 × 768), ``out_head_attn``
  = Sequential(Linear 768→384, ReLU, LayerNorm(384), Dropout, Linear 384→1); ``fast3d/cmt_module.py``:
  ``CMT.layers`` = 4 × ``TransformerSpatialDecoderLayer`` — ``multihead_attn`` (nn.MultiheadAttention
  768/12), ``linear1`` 768→2048, ``linear2``, ``norm1..3``, and ``self_attn`` =
  ``MultiHeadAttentionSpatial`` (``w_qs/w_ks/w_vs/fc`` 768→768, ``layer_norm``, ``lang_cond_fc``
  768→12·(5+1)) — plus ``loc_layers.0`` = Sequential(Linear 6→768, LayerNorm)); the
  ``text_encoder`` part is RoBERTa-base's own layout (transformers ``RobertaModel`` with its pooler,
  identical on 4.31–5.x). The sizes add up to the notes' 34.3 M parameters outside RoBERTa.
- Forward = an independent functional reference written from the notes' equations (§6.4) that reads
  the weights from the state dict by the authors' key names, so names and math are checked together.
- ``load_gap``: strict loading that lists missing/unexpected/mis-shaped keys; local RoBERTa only.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from shared.methods.fast3d_cmt import CMTConfig, pairwise_geometry  # noqa: E402
from shared.methods.fast3d_gap import (  # noqa: E402
    GAPConfig,
    GAPNet,
    GapScorer,
    encode_prompts,
    gap_logits,
    load_gap,
    load_text_encoder,
)
from tests.fast3d_tiny import random_objects, tiny_gap_config, write_roberta  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "fast3d", "gap_state_dict_keys.json")


def test_state_dict_layout_matches_authors():
    from transformers import RobertaConfig, RobertaModel

    with open(FIXTURE) as f:
        fx = json.load(f)
    expected = {k: tuple(s) for k, s in fx["gap"] + fx["text_encoder"]}
    rcfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
    with torch.device("meta"):
        net = GAPNet(GAPConfig(), RobertaModel(rcfg))
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert set(got) - set(expected) == set(), "keys the authors' checkpoint lacks"
    assert set(expected) - set(got) == set(), "keys of the authors' checkpoint we lack"
    assert got == expected
    outside = sum(math.prod(s) for k, s in fx["gap"])
    assert round(outside / 1e6, 1) == 34.3  # notes §6.4: ≈ 34.3 M parameters outside RoBERTa


# ------------------------------------------------------------------ independent functional reference
def ref_forward(sd, cfg: GAPConfig, text_states, text_mask, feats, img_feats, locs):
    """Eval-mode forward from the state dict (authors' key names), written from notes §6.4."""
    D, H = cfg.cmt.hidden_size, cfg.cmt.num_heads
    dh = D // H
    lin = lambda x, p: F.linear(x, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    ln = lambda x, p, eps=1e-5: F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)  # noqa: E731
    B, n, _ = feats.shape
    txt = lin(text_states, "text_projector")
    obj = lin(torch.cat([feats, img_feats], -1), "obj_feat_projector") + sd["obj_id_embedding.weight"]
    # pairwise geometry, spelled out per pair
    c = locs[..., :3]
    geo = torch.zeros(B, n, n, 5)
    for b in range(B):
        dmax = 0.0
        for i in range(n):
            for j in range(n):
                dmax = max(dmax, math.sqrt(float(((c[b, i] - c[b, j]) ** 2).sum()) + 1e-10))
        for i in range(n):
            for j in range(n):
                dx, dy, dz = (c[b, i] - c[b, j]).tolist()
                d = math.sqrt(dx * dx + dy * dy + dz * dz + 1e-10)
                dxy = math.sqrt(dx * dx + dy * dy + 1e-10)
                geo[b, i, j] = torch.tensor([d / dmax, dz / d, dxy / d, dy / dxy, dx / dxy])
    loc = ln(lin(locs, "mm_encoder.loc_layers.0.0"), "mm_encoder.loc_layers.0.1")
    key_pad = text_mask == 0
    for li in range(cfg.cmt.num_layers):
        p = f"mm_encoder.layers.{li}."
        x = obj + loc
        # spatial self-attention (pre-norm input is also the residual of the attention block)
        y = ln(x, p + "norm1")
        q = lin(y, p + "self_attn.w_qs").view(B, n, H, dh).permute(0, 2, 1, 3)
        k = lin(y, p + "self_attn.w_ks").view(B, n, H, dh).permute(0, 2, 1, 3)
        v = lin(y, p + "self_attn.w_vs").view(B, n, H, dh).permute(0, 2, 1, 3)
        att = q @ k.transpose(-1, -2) / math.sqrt(dh)
        cond = lin(y + txt[:, :1], p + "self_attn.lang_cond_fc").view(B, n, H, 6)
        wts, bias = cond[..., 1:], cond[..., 0]  # (B, n, H, 5), (B, n, H)
        gate = torch.sigmoid((wts[:, :, :, None, :] * geo[:, :, None, :, :]).sum(-1) + bias[..., None])
        gate = gate.permute(0, 2, 1, 3)  # (B, n, H, n) -> (B, H, n, n)
        w = torch.softmax(att + torch.log(gate.clamp(min=1e-6)), -1)
        o = (w @ v).permute(0, 2, 1, 3).reshape(B, n, D)
        x = x + ln(y + lin(o, p + "self_attn.fc"), p + "self_attn.layer_norm")
        # cross-attention to text
        y = ln(x, p + "norm2")
        Wq, Wk, Wv = sd[p + "multihead_attn.in_proj_weight"].chunk(3)
        bq, bk, bv = sd[p + "multihead_attn.in_proj_bias"].chunk(3)
        qq = F.linear(y, Wq, bq).view(B, n, H, dh).transpose(1, 2)
        kk = F.linear(txt, Wk, bk).view(B, -1, H, dh).transpose(1, 2)
        vv = F.linear(txt, Wv, bv).view(B, -1, H, dh).transpose(1, 2)
        s = (qq @ kk.transpose(-1, -2)) / math.sqrt(dh)
        s = s.masked_fill(key_pad[:, None, None, :], float("-inf"))
        o = (torch.softmax(s, -1) @ vv).transpose(1, 2).reshape(B, n, D)
        x = x + lin(o, p + "multihead_attn.out_proj")
        y = ln(x, p + "norm3")
        x = x + lin(F.gelu(lin(y, p + "linear1")), p + "linear2")
        obj = x
    h = ln(F.relu(lin(obj, "out_head_attn.0")), "out_head_attn.2", eps=1e-12)
    return lin(h, "out_head_attn.4").squeeze(-1)


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    return write_roberta(str(tmp_path_factory.mktemp("roberta")))


def tiny_net(roberta_dir, seed=0, **kw):
    enc, tok = load_text_encoder(roberta_dir)
    torch.manual_seed(seed)
    return GAPNet(tiny_gap_config(**kw), enc), tok


def test_forward_matches_functional_reference(roberta_dir):
    net, tok = tiny_net(roberta_dir)
    with torch.no_grad():  # O(1) random weights (the N(0, 0.02) init leaves tiny logits): every term matters
        for name, p in net.named_parameters():
            if not name.startswith("text_encoder"):
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) + (1.0 if "norm" in name and p.dim() == 1
                                                                         and name.endswith("weight") else 0.0))
    net.eval()
    prompts = ["where is the chair?", "the lamp"]  # different lengths: padded text keys
    feats, img, locs = random_objects(2, net.config)
    got = gap_logits(net, tok, prompts, feats, img, locs)
    ids, mask = encode_prompts(tok, prompts)
    with torch.no_grad():
        text = net.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = ref_forward(net.state_dict(), net.config, text, mask, feats, img, locs)
    assert got.shape == (2, 6) and float(got.std()) > 0.02
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    geo = pairwise_geometry(locs[..., :3])
    assert geo.shape == (2, 6, 6, 5) and float(geo[..., 0].max()) == pytest.approx(1.0)


def test_gap_logits_eval_mode_and_restores_training(roberta_dir):
    net, tok = tiny_net(roberta_dir)
    net.train()
    feats, img, locs = random_objects(1, net.config)
    a = gap_logits(net, tok, ["the sofa"], feats, img, locs)
    b = gap_logits(net, tok, ["the sofa"], feats, img, locs)
    assert torch.equal(a, b) and net.training  # dropout off inside, training mode restored


def test_scorer_takes_the_chat_scene_gap_inputs(roberta_dir):
    net, tok = tiny_net(roberta_dir)
    feats, img, locs = random_objects(2, net.config)
    scorer = GapScorer(net, tok)
    # the keyword names shared.hosts.chat_scene passes as gap_inputs
    one = scorer(**{"prompt": "the lamp", "obj_feats": feats[1], "obj_img_feats": img[1], "locs": locs[1]})
    both = gap_logits(net, tok, ["where is the chair?", "the lamp"], feats, img, locs)
    assert one.shape == (6,)
    torch.testing.assert_close(one, both[1], atol=1e-5, rtol=0)  # batch of one = row of a padded batch


def test_refuses_object_count_mismatch(roberta_dir):
    net, tok = tiny_net(roberta_dir)
    feats, img, locs = random_objects(1, tiny_gap_config(n_obj=5))
    with pytest.raises(ValueError, match="max_obj_num"):
        gap_logits(net, tok, ["x"], feats, img, locs)
    with pytest.raises(ValueError, match="prompts"):
        gap_logits(net, tok, ["x", "y"], *random_objects(1, net.config))


def test_load_gap_strict(roberta_dir, tmp_path):
    net, tok = tiny_net(roberta_dir, seed=3)
    net.eval()
    # the authors' checkpoint format (no gap_config: the config must be given)
    authors = {"step": 7, "optimizer_state_dict": {"state": {}, "param_groups": []},
               "model_state_dict": net.state_dict()}
    path = tmp_path / "checkpoint_best.pth"
    torch.save(authors, path)
    loaded, tok2 = load_gap(path, roberta_dir, config=tiny_gap_config())
    feats, img, locs = random_objects(2, net.config)
    torch.testing.assert_close(gap_logits(loaded, tok2, ["a chair", "bed"], feats, img, locs),
                               gap_logits(net, tok, ["a chair", "bed"], feats, img, locs), atol=0, rtol=0)
    # this project's format carries the config
    ours = dict(authors, gap_config=net.config.to_dict())
    torch.save(ours, tmp_path / "gap_best.pth")
    assert load_gap(tmp_path / "gap_best.pth", roberta_dir)[0].config == net.config
    with pytest.raises(ValueError) as e:  # wrong object count: named, not silently dropped
        load_gap(path, roberta_dir, config=tiny_gap_config(n_obj=7))
    assert "obj_id_embedding.weight: checkpoint (6, 16) vs model (7, 16)" in str(e.value)
    sd = dict(net.state_dict())
    sd.pop("out_head_attn.4.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"model_state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        load_gap(tmp_path / "bad.pth", roberta_dir, config=tiny_gap_config())
    msg = str(e.value)
    assert "missing (1): out_head_attn.4.bias" in msg and "unexpected (1): extra.weight" in msg
    with pytest.raises(FileNotFoundError, match="roberta_path"):
        load_gap(path, tmp_path / "no-such-roberta", config=tiny_gap_config())


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        CMTConfig(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="max_obj_num"):
        GAPConfig(max_obj_num=0)
    cfg = tiny_gap_config()
    assert GAPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
