"""LISA host glue (shared.hosts.lisa), its patch series and the RefCOCO/ReasonSeg eval driver.

The glue runs on a tiny random LLaMA + CLIP pair wrapped to call it exactly as the patched
``model/LISA.py`` does: ``seg_offset`` for the ``seg_token_mask`` (instead of 255), then
``pruning_context`` around a LLaVA-style forward (one image spliced at index 35 of each row,
``[SEG] . </s>`` near the end, rows right padded, LISA's 2-D mask). References are computed in
this file: the engine driven directly, stock decoder forwards, [CLS] attention by hand, Seg-First
token sets worked out on the patch grid. The driver runs on the real-format fixtures in
``tests/fixtures/lisa`` (RefCOCO ``refs(unc).p`` + ``instances.json``, a ReasonSeg json/jpg)
with a fake model (the real one cannot load here) whose masks are known.

Runs on transformers 4.31 (LISA's pin: ``PYTHONPATH=.venvs/tf-4.31.0``) and 5.x.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import py_compile
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared import FastV, PyramidDrop, pruning
from shared.accounting import CONVENTIONS, DecoderDims, prefill_flops
from shared.engine import PrefillStats
from shared.hosts import lisa
from shared.methods.lvlm_csp import LVLMCSP
from shared.methods.prumerge import PruMerge
from shared.methods.visionzip import VisionZip

from .engine import tiny

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lisa"
LISA_PIN = "3cb2d4301f1af4691bd4f3938335ef06e76f155a"

TF_MAJOR = int(__import__("transformers").__version__.split(".")[0])
LAYERS = 6
IMG, PATCH = 56, 14  # 4 x 4 = 16 image tokens
N = (IMG // PATCH) ** 2
SEG, IM_START, IM_END, BOS, EOS, PAD, DOT = 100, 101, 102, 1, 2, 0, 29
SYS = 35  # index of the image placeholder: BOS + 33 system tokens + <im_start>


# --------------------------------------------------------------------------- a LISA-shaped model
class Tower(nn.Module):
    """LISA's CLIPVisionTower: hidden_states[-2] without [CLS] of a CLIPVisionModel, no grad."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.vision_tower = clip

    @torch.no_grad()
    def forward(self, images):
        out = self.vision_tower(images, output_hidden_states=True)
        return out.hidden_states[-2][:, 1:]

    @property
    def config(self):
        return self.vision_tower.config

    @property
    def num_patches(self):
        return (self.config.image_size // self.config.patch_size) ** 2


class TinyLisa(nn.Module):
    """LISAForCausalLM's inference path on a tiny LLaMA decoder and CLIP tower."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.lm = tiny.build("llama", "eager", layers=LAYERS, seed=seed)
        torch.manual_seed(seed + 1)
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               image_size=IMG, patch_size=PATCH)
        clip = CLIPVisionModel(cfg).eval()
        self.model = self.lm.model
        self.model.vision_tower = Tower(clip)
        self.model.mm_projector = nn.Linear(32, self.lm.config.hidden_size)
        self.model.get_vision_tower = lambda: self.model.vision_tower  # LlavaMetaModel.get_vision_tower
        self.seg_token_idx = SEG

    def get_model(self):
        return self.model

    # LlavaLlamaForCausalLM.forward, eval branch, mm_use_im_start_end splice
    def llava_forward(self, images, attention_mask, input_ids):
        dec = self.model
        feats = dec.mm_projector(dec.vision_tower(images))
        rows = []
        for b in range(input_ids.shape[0]):
            s = int((input_ids[b] == lisa.IMAGE_TOKEN_INDEX).nonzero())
            rows.append(torch.cat([dec.embed_tokens(input_ids[b, :s]), feats[b], dec.embed_tokens(input_ids[b, s + 1:])]))
        emb = torch.stack(rows)
        pad_left = torch.ones(input_ids.shape[0], emb.shape[1] - input_ids.shape[1], dtype=torch.bool)
        mask = torch.cat([pad_left, attention_mask], dim=1)
        # LISA (transformers 4.31) asks the decoder for all hidden states. On 5.x that flag makes the
        # decoder's output recorder hook every submodule, the nested CLIP tower included, which then
        # returns extra hidden states on its later calls: a 5.x quirk, so the flag is 4.x-only here.
        extra = {"output_hidden_states": True, "return_dict": True} if TF_MAJOR < 5 else {}
        out = dec(inputs_embeds=emb, attention_mask=mask, **extra)
        return out.last_hidden_state

    # the patched LISAForCausalLM.model_forward, inference branch
    def model_forward(self, images_clip, input_ids, attention_masks, pruner=None, image_paths=None):
        seg_token_mask = input_ids[:, 1:] == self.seg_token_idx
        seg_token_mask = torch.cat([seg_token_mask, torch.zeros((seg_token_mask.shape[0], 1)).bool()], dim=1)
        offset = lisa.seg_offset(self, images_clip, pruner)
        seg_token_mask = torch.cat([torch.zeros((seg_token_mask.shape[0], offset)).bool(), seg_token_mask], dim=1)
        images_ext = images_clip.expand(input_ids.shape[0], -1, -1, -1).contiguous()
        with lisa.pruning_context(self, input_ids, images_clip, pruner, image_paths=image_paths):
            hidden = self.llava_forward(images_ext, attention_masks, input_ids)
        return hidden, seg_token_mask, offset


def make_batch(user_lens=(9, 5), seed=0):
    """Rows: BOS, 33 system tokens, <im_start>, IMAGE, <im_end>, user tokens, [SEG], '.', </s>, padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_usr in user_lens:
        sys_toks = torch.randint(3, 90, (33,), generator=g)
        usr = torch.randint(3, 90, (n_usr,), generator=g)
        rows.append(torch.cat([torch.tensor([BOS]), sys_toks, torch.tensor([IM_START, lisa.IMAGE_TOKEN_INDEX, IM_END]),
                               usr, torch.tensor([SEG, DOT, EOS])]))
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD)
    mask = ids.ne(PAD)
    seg_ids = torch.tensor([int((r == SEG).nonzero()) for r in ids])
    return ids, mask, seg_ids


def image(seed=5):
    return torch.randn(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def spliced(model, images_clip, ids, mask, feats=None):
    """Embeddings and 2-D mask of the spliced sequence, built independently of the glue."""
    dec = model.model
    if feats is None:  # LISA runs the tower on one copy of the image per row
        with torch.no_grad():
            rows_img = images_clip.expand(ids.shape[0], -1, -1, -1).contiguous()
            hs = dec.vision_tower.vision_tower(rows_img, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = dec.mm_projector(hs)
    n = feats.shape[1]
    rows = [torch.cat([dec.embed_tokens(ids[b, :SYS]), feats[b if feats.shape[0] > 1 else 0], dec.embed_tokens(ids[b, SYS + 1:])])
            for b in range(ids.shape[0])]
    m = torch.cat([torch.ones(ids.shape[0], n - 1, dtype=torch.bool), mask], dim=1)
    return torch.stack(rows).detach(), m, n


@pytest.fixture(scope="module")
def model():
    return TinyLisa()


# ----------------------------------------------------------------------------------- the glue
def test_layout_and_offset(model):
    ids, mask, seg_ids = make_batch()
    assert lisa.num_patches(model) == N
    assert lisa.seg_offset(model) == N - 1
    lay = lisa.expanded_layout(ids, N, SEG)
    assert lay.visual_spans == [(SYS, SYS + N)] * 2
    assert lay.seg_index.tolist() == (seg_ids + N - 1).tolist()
    assert lay.length == ids.shape[1] + N - 1
    bad = ids.clone()
    bad[1, 3] = lisa.IMAGE_TOKEN_INDEX
    with pytest.raises(ValueError, match="input_ids: expected exactly one image placeholder"):
        lisa.image_starts(bad)


def test_no_method_is_a_no_op(model):
    ids, mask, _ = make_batch()
    img = image()
    with torch.no_grad():
        h0, m0, off0 = model.model_forward(img, ids, mask, pruner=None)
        h1, m1, off1 = model.model_forward(img, ids, mask, pruner=lisa.LisaPruner())
        emb, m, n = spliced(model, img, ids, mask)
        ref = model.model(inputs_embeds=emb, attention_mask=m).last_hidden_state
    assert off0 == off1 == N - 1
    assert torch.equal(h0, ref) and torch.equal(h1, ref) and torch.equal(m0, m1)
    with lisa.pruning_context(model, ids, img, None) as session:
        assert session is None
        assert "forward" not in model.model.__dict__


@pytest.mark.parametrize(
    "cfg",
    [
        LVLMCSP(2, 6, 2, 4, clustering="uniform"),
        LVLMCSP(2, 6, 2, 4, clustering="random", seed=3),
        LVLMCSP(1, 8, 3, 5, clustering="uniform", uniform_layout="grid", seg_query="pre_seg"),
    ],
    ids=["uniform", "random", "grid-pre_seg"],
)
def test_csp_through_the_glue_equals_the_engine_driven_directly(model, cfg):
    ids, mask, seg_ids = make_batch()
    img = image()
    pruner = lisa.LisaPruner(method=cfg)
    with torch.no_grad():
        hidden, seg_mask, off = model.model_forward(img, ids, mask, pruner=pruner)
        emb, m, n = spliced(model, img, ids, mask)
        seg_exp = seg_ids + N - 1
        with pruning(model.model, cfg) as eng:
            eng.prepare(visual_spans=[(SYS, SYS + N)] * 2, guidance_index=seg_exp, query_index=seg_exp - 1)
            ref = model.model(inputs_embeds=emb, attention_mask=m).last_hidden_state
    assert torch.equal(hidden, ref)
    rec = pruner.records[-1]
    assert torch.equal(rec.stats.visual, eng.last_stats.visual)
    lc, nc, ls, np_ = cfg.paper_tuple
    assert rec.stats.visual[0].tolist() == [nc] * lc + [N] * ls + [np_] * (LAYERS - lc - ls)
    assert rec.selected == [nc, nc]
    assert torch.equal(rec.selection[0], cfg.cluster(N)[0])
    # full length: the image slots pruned in the last stage are zero; LISA's mask picks the pre-[SEG] rows
    assert hidden.shape[1] == ids.shape[1] + N - 1
    assert off == N - 1
    picked = hidden[seg_mask]
    assert torch.equal(picked, torch.stack([hidden[b, int(seg_exp[b]) - 1] for b in range(2)]))
    assert bool((picked.abs().sum(-1) > 0).all())
    image_rows = hidden[:, SYS:SYS + N]
    assert int((image_rows.abs().sum(-1) == 0).sum(1)[0]) == N - np_
    assert rec.text_tokens == [int(mask[b].sum()) - 1 for b in range(2)]


def test_fastv_and_pdrop_score_with_the_pre_seg_query(model):
    ids, mask, seg_ids = make_batch()
    img = image()
    seg_exp = seg_ids + N - 1
    for cfg, q, qi in [
        (FastV(layer=2, keep=5), "pre_seg", seg_exp - 1),
        (FastV(layer=1, keep=3), "seg", seg_exp),
        (PyramidDrop(layers=(2, 4), ratio=0.5), "pre_seg", seg_exp - 1),
    ]:
        pruner = lisa.LisaPruner(method=cfg, query=q)
        with torch.no_grad():
            hidden, _, _ = model.model_forward(img, ids, mask, pruner=pruner)
            emb, m, _ = spliced(model, img, ids, mask)
            with pruning(model.model, cfg) as eng:
                eng.prepare(visual_spans=[(SYS, SYS + N)] * 2, query_index=qi)
                ref = model.model(inputs_embeds=emb, attention_mask=m).last_hidden_state
        assert torch.equal(hidden, ref), (cfg, q)
        assert torch.equal(pruner.records[-1].stats.visual, eng.last_stats.visual)
    # "last": the engine's default, each row's last valid token (</s>)
    pruner = lisa.LisaPruner(method=FastV(layer=2, keep=5), query="last")
    with torch.no_grad():
        hidden, _, _ = model.model_forward(img, ids, mask, pruner=pruner)
        with pruning(model.model, FastV(layer=2, keep=5)) as eng:
            eng.prepare(visual_spans=[(SYS, SYS + N)] * 2, query_index=seg_exp + 2)
            ref = model.model(inputs_embeds=emb, attention_mask=m).last_hidden_state
    assert torch.equal(hidden, ref)


def _cls_topk_by_hand(model, img, k):
    clip = model.model.vision_tower.vision_tower
    with torch.no_grad():
        hs = clip(img, output_hidden_states=True).hidden_states
        layer = lisa.last_clip_attention(model)
        ln = clip.vision_model.encoder.layers[-1].layer_norm1 if hasattr(clip, "vision_model") else clip.encoder.layers[-1].layer_norm1
        x = ln(hs[-2])
        q = layer.q_proj(x[:, 0]).double()
        kk = layer.k_proj(x).double()
        att = torch.softmax(q @ kk[0].T / kk.shape[-1] ** 0.5, dim=-1)[0, 1:]
    return torch.sort(torch.topk(att, k).indices).values


def test_cls_clustering_uses_the_last_clip_layer_cls_attention(model):
    ids, mask, seg_ids = make_batch()
    img = image(seed=11)
    cfg = LVLMCSP(2, 6, 2, 4, clustering="cls")
    pruner = lisa.LisaPruner(method=cfg)
    with torch.no_grad():
        hidden, _, _ = model.model_forward(img, ids, mask, pruner=pruner)
    expected = _cls_topk_by_hand(model, img, 6)
    rec = pruner.records[-1]
    assert [s.tolist() for s in rec.selection] == [expected.tolist()] * 2
    emb, m, _ = spliced(model, img, ids, mask)
    with torch.no_grad(), pruning(model.model, cfg) as eng:
        seg_exp = seg_ids + N - 1
        eng.prepare(visual_spans=[(SYS, SYS + N)] * 2, guidance_index=seg_exp, query_index=seg_exp - 1,
                    visual_selection=[expected, expected])
        ref = model.model(inputs_embeds=emb, attention_mask=m).last_hidden_state
    assert torch.equal(hidden, ref)


def test_seg_first_reads_the_original_image_and_maps_masks_through_the_clip_crop(model, tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to read the original image (pip install pillow)")

    from shared.segfirst import CallableMaskSource

    h, w = IMG, 2 * IMG  # resize keeps 56 x 112, the centre crop starts at x = 28
    path = tmp_path / "orig.png"
    Image.fromarray(np.full((h, w, 3), 90, dtype=np.uint8)).save(path)
    seen = []

    def masks(img):
        seen.append(img.shape)
        m = np.zeros((3, h, w), dtype=bool)
        m[0, 0:28, 28:56] = True  # crop patches rows 0-1, cols 0-1 -> tokens 0, 1, 4, 5
        m[1, 0:28, 0:28] = True  # entirely left of the crop: dropped
        m[2, 28:56, 56:84] = True  # crop patches rows 2-3, cols 2-3 -> tokens 10, 11, 14, 15
        return m

    cfg = LVLMCSP(2, 8, 2, 4, clustering="seg_first", seed=1)
    pruner = lisa.LisaPruner(method=cfg, mask_source=CallableMaskSource(masks))
    ids, mask, seg_ids = make_batch()
    img = image()
    with torch.no_grad():
        hidden, _, _ = model.model_forward(img, ids, mask, pruner=pruner, image_paths=[str(path)])
    assert seen == [(h, w, 3)]
    rec = pruner.records[-1]
    want = [0, 1, 4, 5, 10, 11, 14, 15]  # equal areas: quota 8 * 1/2 = 4 each = the whole token sets
    assert [s.tolist() for s in rec.selection] == [want, want]
    assert rec.info["instances"] == 3
    emb, m, _ = spliced(model, img, ids, mask)
    sel = torch.tensor(want)
    with torch.no_grad(), pruning(model.model, cfg) as eng:
        seg_exp = seg_ids + N - 1
        eng.prepare(visual_spans=[(SYS, SYS + N)] * 2, guidance_index=seg_exp, query_index=seg_exp - 1,
                    visual_selection=[sel, sel])
        ref = model.model(inputs_embeds=emb, attention_mask=m).last_hidden_state
    assert torch.equal(hidden, ref)
    with pytest.raises(ValueError, match="image_paths"):
        model.model_forward(img, ids, mask, pruner=pruner, image_paths=None)
    with pytest.raises(ValueError, match="mask_source"):
        lisa.LisaPruner(method=cfg)
    # a plain callable returning masks at another size (e.g. YOLO's letterboxed shape) is refused
    letterboxed = lisa.LisaPruner(method=cfg, mask_source=lambda im: np.ones((1, 64, 64), dtype=bool))
    with pytest.raises(ValueError, match=r"^masks: the mask source returned shape \(1, 64, 64\), expected \(M, 56, 112\)"):
        model.model_forward(img, ids, mask, pruner=letterboxed, image_paths=[str(path)])


@pytest.mark.parametrize("reducer", [PruMerge(adaptive=False, reduction_ratio=0.25, neighbours=3),
                                     VisionZip(dominant=3, contextual=2)], ids=["prumerge", "visionzip"])
def test_pre_llm_reducer_shortens_the_sequence_and_the_offset_follows(model, reducer):
    ids, mask, seg_ids = make_batch()
    img = image(seed=7)
    clip = model.model.vision_tower.vision_tower
    with torch.no_grad():
        reduced = reducer(clip, img)
    k = reduced.K
    assert k == 5
    pruner = lisa.LisaPruner(reducer=reducer)
    with torch.no_grad():
        hidden, seg_mask, off = model.model_forward(img, ids, mask, pruner=pruner)
        feats = model.model.mm_projector(reduced.features.expand(ids.shape[0], -1, -1))  # one row per expression, as LISA
        emb, m, n = spliced(model, img, ids, mask, feats=feats)
        ref = model.model(inputs_embeds=emb, attention_mask=m).last_hidden_state
    assert n == k and off == k - 1
    assert hidden.shape[1] == ids.shape[1] + k - 1
    assert torch.equal(hidden, ref)
    picked = hidden[seg_mask]
    assert torch.equal(picked, torch.stack([hidden[b, int(seg_ids[b]) + k - 2] for b in range(2)]))
    rec = pruner.records[-1]
    assert rec.image_tokens == k and rec.patches == N
    assert rec.stats.visual.tolist() == [[k] * LAYERS] * 2
    assert rec.stats.tokens[:, 0].tolist() == [int(mask[b].sum()) + k - 1 for b in range(2)]
    assert pruner._reduced is None  # cleared after the forward


def test_configuration_errors_name_the_parameter(model):
    with pytest.raises(ValueError, match="method/reducer"):
        lisa.LisaPruner(method=FastV(layer=2, keep=4), reducer=PruMerge())
    with pytest.raises(ValueError, match="query"):
        lisa.LisaPruner(method=FastV(layer=2, keep=4), query="first")
    with pytest.raises(TypeError, match="method"):
        lisa.LisaPruner(method="fastv")
    with pytest.raises(ValueError, match="^query: LVLM_CSP ranks with the \\[SEG\\]"):
        lisa.LisaPruner(method=LVLMCSP(2, 6, 2, 4), query="seg")
    ids, mask, _ = make_batch()
    no_seg = ids.clone()
    no_seg[no_seg == SEG] = DOT
    with pytest.raises(ValueError, match=r"input_ids: rows \[0, 1\] have no \[SEG\]"):
        model.model_forward(image(), no_seg, mask, pruner=lisa.LisaPruner(method=LVLMCSP(2, 6, 2, 4)))
    assert "forward" not in model.model.__dict__  # the engine is gone after the error


# ------------------------------------------------------------------------------- patch series
def test_patch_series_applies_to_the_pinned_lisa(tmp_path):
    sub = ROOT / "LISA"
    if not (sub / ".git").exists():
        pytest.skip("LISA submodule not checked out; run scripts/apply_patches.sh LISA")
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    patches = sorted((ROOT / "patches" / "LISA").glob("*.patch"))
    assert patches, "patches/LISA holds no series"
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=str(tmp_path), GIT_TERMINAL_PROMPT="0")
    work = tmp_path / "lisa"

    def git(*args, cwd=work):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, env=env,
                              check=True, text=True, capture_output=True)

    git("clone", "-q", "--no-checkout", str(sub), str(work), cwd=tmp_path)
    try:
        git("checkout", "-q", "--detach", LISA_PIN)
    except subprocess.CalledProcessError:
        pytest.skip(f"the LISA checkout lacks the pinned commit {LISA_PIN[:8]}")
    git("am", "-q", "--3way", *map(str, patches))
    assert git("rev-list", "--count", f"{LISA_PIN}..HEAD").stdout.strip() == str(len(patches))
    src = (work / "model" / "LISA.py").read_text()
    assert "shape[0], 255))" not in src  # both hard-coded offsets are gone
    assert src.count("shared_lisa.seg_offset(") == 2 and "shared_lisa.pruning_context(" in src
    assert src.count("# [Pruner]") >= 3
    py_compile.compile(str(work / "model" / "LISA.py"), doraise=True, cfile=str(tmp_path / "LISA.pyc"))


# ------------------------------------------------------------------------------------ driver
def _load_driver():
    spec = importlib.util.spec_from_file_location("lisa_eval_seg", ROOT / "eval" / "LISA" / "eval_seg.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


drv = _load_driver()


def _rect_mask(h, w, poly):
    """The fixtures' polygons are axis-aligned rectangles; rasterised half-open [x0, x1) x [y0, y1)."""
    xs, ys = poly[0::2], poly[1::2]
    m = np.zeros((h, w), dtype=np.uint8)
    m[int(min(ys)):int(max(ys)), int(min(xs)):int(max(xs))] = 1
    return m


class FixtureValDataset:
    """The interface of LISA's ValDataset (attributes the driver reads, the 10-tuple items), read
    from the real-format fixtures by this test: RefCOCO through refs(unc).p + instances.json, the
    ReasonSeg json with LISA's rules (first sentence, 'ignore' shapes = 255, larger shapes first)."""

    def __init__(self, base, val_dataset):
        parts = val_dataset.split("|")
        if len(parts) == 2:
            self.data_type = "reason_seg"
            self.images = sorted(str(p) for p in (Path(base) / "reason_seg" / parts[0] / parts[1]).glob("*.jpg"))
        else:
            ds, split_by, split = parts
            self.data_type = "refer_seg"
            refs = pickle.load(open(Path(base) / ds / f"refs({split_by}).p", "rb"))
            inst = json.load(open(Path(base) / ds / "instances.json"))
            refs = [r for r in refs if r["split"] == split]
            imgs = {im["id"]: im for im in inst["images"]}
            img2refs = {}
            for r in refs:
                img2refs.setdefault(r["image_id"], []).append(r)
            self.refer_seg_ds = {
                "images": [dict(imgs[i], file_name=str(Path(base) / "images/mscoco/images/train2014" / imgs[i]["file_name"]))
                           for i in sorted(img2refs)],
                "annotations": {a["id"]: a for a in inst["annotations"]},
                "img2refs": img2refs,
            }

    def __len__(self):
        return len(self.refer_seg_ds["images"]) if self.data_type == "refer_seg" else len(self.images)

    def __getitem__(self, idx):
        if self.data_type == "refer_seg":
            info = self.refer_seg_ds["images"][idx]
            path = info["file_name"]
            sents, masks = [], []
            for ref in self.refer_seg_ds["img2refs"][info["id"]]:
                ann = self.refer_seg_ds["annotations"][ref["ann_id"]]
                for s in ref["sentences"]:
                    sents.append(s["sent"].strip().lower())
                    masks.append(_rect_mask(info["height"], info["width"], ann["segmentation"][0]))
        else:
            path = self.images[idx]
            doc = json.load(open(path.replace(".jpg", ".json")))
            h, w = doc["imageHeight"], doc["imageWidth"]  # labelme fields; LISA reads the jpg itself
            sents = [doc["text"][0].strip()]
            m = np.zeros((h, w), dtype=np.uint8)
            shapes = sorted(doc["shapes"], key=lambda s: -int(_rect_mask(h, w, sum(s["points"], [])).sum()))
            for s in shapes:
                r = _rect_mask(h, w, sum(s["points"], [])).astype(bool)
                m[r] = 255 if "ignore" in s["label"].lower() else 1
            masks = [m]
        masks = torch.from_numpy(np.stack(masks))
        return (path, torch.zeros(3, 8, 8), torch.zeros(3, IMG, IMG), [f"<image> {s} [SEG]." for s in sents], masks,
                torch.ones(masks.shape[1:]) * 255, masks.shape[1:], None, None, True)


def fixture_collate(batch):
    (path, images, images_clip, convs, masks, label, resize, _, _, inference), = batch
    return {"image_paths": [path], "images": images[None], "images_clip": images_clip[None],
            "input_ids": torch.zeros(len(convs), 4, dtype=torch.long), "masks_list": [masks.float()],
            "label_list": [label], "resize_list": [resize], "offset": torch.tensor([0, len(convs)]),
            "conversation_list": convs, "inference": inference}


PRED_BOXES = {  # predicted (x0, y0, x1, y1) per sentence; None = empty prediction
    "person on the left": (4, 6, 24, 30),  # exact
    "left guy": (14, 6, 34, 30),  # 10 x 24 overlap of 20 x 24 gt, union 30 x 24
    "the dog": None,
    "man in red": (20, 10, 40, 20),  # 10 x 10 of 20 x 10, union 30 x 10
    "What in this picture keeps food cold?": (8, 6, 40, 30),
}
LAYER_VISUAL = [6, 6, 16, 16, 4, 4]
FAKE_DIMS = DecoderDims(hidden=64, intermediate=96, layers=LAYERS, heads=4, kv_heads=4)


class FakeLisaModel:
    """Returns masks from PRED_BOXES and records a fixed token schedule, as the patched LISA would."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, pruner=None, **batch):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        gt = batch["masks_list"][0]
        rows, h, w = gt.shape
        text = [c.split("<image> ")[1].rsplit(" [SEG].", 1)[0] for c in batch["conversation_list"]]
        pred = torch.full((rows, h, w), -3.0)
        for r, t in enumerate(text):
            box = PRED_BOXES[t]
            if box is not None:
                pred[r, box[1]:box[3], box[0]:box[2]] = 2.0
        text_tokens = 40 + rows  # any per-row number works; the driver must carry it through
        vis = torch.tensor([LAYER_VISUAL] * rows)
        stats = PrefillStats(tokens=vis + text_tokens, visual=vis, sequence_length=torch.full((rows,), text_tokens + N),
                             visual_tokens=torch.full((rows,), N))
        pruner.records.append(lisa.LisaRecord(stats=stats, image_tokens=N, patches=N, seg_index=torch.zeros(rows),
                                              selection=[torch.arange(6)] * rows))
        return {"pred_masks": [pred], "gt_masks": [gt]}


def _args(out, **kw):
    a = drv.build_parser().parse_args(["--out", str(out), "--val-dataset", "refcoco|unc|val", "ReasonSeg|val",
                                       "--version", "fake", "--dataset-dir", str(FIXTURES), "--no-progress"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def _make_dataset(val):
    base = FIXTURES if val.startswith("ReasonSeg") else FIXTURES / "refer_seg"
    return FixtureValDataset(base, val)


def _expected():
    """gIoU / cIoU per dataset from the fixture boxes, by counting pixels."""
    ref = {  # (I_fg, U_fg) per expression, worked out from the boxes above
        "refcoco|unc|val": [(480, 480), (240, 720), (0, 900), (100, 300)],
        # ReasonSeg: gt target 32 x 24 = 768 px minus the ignore overlap [30, 40) x [20, 30) = 100 -> 668;
        # the prediction equals the target box, which is ignore-free outside the overlap
        "ReasonSeg|val": [(668, 668)],
    }
    out = {}
    for d, pairs in ref.items():
        ious = [i / (u + 1e-5) for i, u in pairs]
        out[d] = (100 * sum(ious) / len(ious), 100 * sum(i for i, _ in pairs) / (sum(u for _, u in pairs) + 1e-10))
    return out


def test_expression_keys_follow_valdataset_order():
    ds = _make_dataset("refcoco|unc|val")
    keys = drv.all_expressions(ds)
    assert [[(e.key, e.sentence) for e in ex] for _, ex in keys] == [
        [("101:0", "person on the left"), ("101:1", "left guy"), ("101:2", "the dog")],
        [("202:0", "man in red")],
    ]
    rs = _make_dataset("ReasonSeg|val")
    assert [e.key for _, ex in drv.all_expressions(rs) for e in ex] == ["fixture_0001:0"]
    assert drv.expand_val_datasets(["refcoco+|unc|val|testA", "ReasonSeg|val|test"]) == [
        "refcoco+|unc|val", "refcoco+|unc|testA", "ReasonSeg|val", "ReasonSeg|test"]
    with pytest.raises(ValueError, match="val_dataset"):
        drv.expand_val_datasets(["refcoco|val"])


def test_driver_metrics_accounting_and_table(tmp_path):
    args = _args(tmp_path / "run")
    summary = drv.run(args, FakeLisaModel(), _make_dataset, fixture_collate, FAKE_DIMS, "cpu", torch.float32, env={})
    exp = _expected()
    for d, (giou, ciou) in exp.items():
        s = summary["datasets"][d]
        assert s["gIoU"] == pytest.approx(giou, abs=1e-9) and s["cIoU"] == pytest.approx(ciou, abs=1e-9)
    assert summary["datasets"]["refcoco|unc|val"]["gIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0 + 1 / 3) / 4, abs=1e-4)
    recs = [json.loads(x) for x in (tmp_path / "run" / "refcoco_unc_val.jsonl").read_text().splitlines()]
    assert [r["key"] for r in recs] == ["101:0", "101:1", "101:2", "202:0"]
    conv = CONVENTIONS["lvlm_csp"]
    for r in recs:
        t = 40 + r["image_rows"]
        assert r["visual_per_layer"] == LAYER_VISUAL and r["text_tokens"] == t and r["selected"] == 6
        assert r["n_avg"] == pytest.approx(sum(LAYER_VISUAL) / LAYERS)
        assert r["tflops"] == pytest.approx(prefill_flops([v + t for v in LAYER_VISUAL], FAKE_DIMS, conv) / 1e12)
        assert r["tflops_paper_t"] == pytest.approx(prefill_flops([v + 62 for v in LAYER_VISUAL], FAKE_DIMS, conv) / 1e12)
    table = (tmp_path / "run" / "table.md").read_text()
    assert "| method | config | N_avg | TFLOPs | TFLOPs@T=62 | RefCOCO val mIoU | RefCOCO val cIoU | ReasonSeg val mIoU |" in table
    rows = list(__import__("csv").reader(open(tmp_path / "run" / "table.csv")))
    assert rows[0][:5] == ["method", "config", "N_avg", "TFLOPs", "TFLOPs@T=62"]
    assert rows[1][0] == "LISA" and float(rows[1][5]) == pytest.approx(round(exp["refcoco|unc|val"][0], 1))
    # the combined table of several runs
    drv.main_table(["--runs", str(tmp_path / "run"), str(tmp_path / "run"), "--out", str(tmp_path / "both")])
    assert len(list(__import__("csv").reader(open(tmp_path / "both.csv")))) == 3


def test_killed_run_resumes_without_duplicates(tmp_path):
    full = drv.run(_args(tmp_path / "full"), FakeLisaModel(), _make_dataset, fixture_collate, FAKE_DIMS, "cpu",
                   torch.float32, env={})
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        drv.run(_args(out), FakeLisaModel(fail_after=1), _make_dataset, fixture_collate, FAKE_DIMS, "cpu",
                torch.float32, env={})
    part = out / "refcoco_unc_val.jsonl"
    assert len(part.read_text().splitlines()) == 3  # the first image's three expressions
    with open(part, "a") as fh:  # a crash in the middle of writing a record
        fh.write('{"key": "202:0", "image_id": 2')
    model = FakeLisaModel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = drv.run(_args(out), model, _make_dataset, fixture_collate, FAKE_DIMS, "cpu", torch.float32, env={})
    assert any("truncated" in str(w.message) for w in caught)
    assert model.calls == 2  # image 202 and the ReasonSeg image; image 101 was skipped
    keys = [json.loads(x)["key"] for x in part.read_text().splitlines()]
    assert keys == ["101:0", "101:1", "101:2", "202:0"]
    for d in full["datasets"]:
        assert resumed["datasets"][d]["gIoU"] == full["datasets"][d]["gIoU"]
        assert resumed["datasets"][d]["cIoU"] == full["datasets"][d]["cIoU"]
    with pytest.raises(ValueError, match="another configuration"):
        drv.run(_args(out, prune="fastv"), FakeLisaModel(), _make_dataset, fixture_collate, FAKE_DIMS, "cpu",
                torch.float32, env={})


def test_sharded_run_merges_to_the_single_process_result(tmp_path):
    single = drv.run(_args(tmp_path / "one"), FakeLisaModel(), _make_dataset, fixture_collate, FAKE_DIMS, "cpu",
                     torch.float32, env={})
    out = tmp_path / "two"
    for rank in (1, 0):
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        assert drv.run(_args(out), FakeLisaModel(), _make_dataset, fixture_collate, FAKE_DIMS, "cpu",
                       torch.float32, env=env) is None
    assert (out / "refcoco_unc_val.rank00000-of-00002.jsonl").exists()
    merged = drv.run(_args(out, merge_only=True), None, _make_dataset, fixture_collate, FAKE_DIMS, "cpu",
                     torch.float32, env={})
    one = (tmp_path / "one" / "refcoco_unc_val.jsonl").read_text().splitlines()
    two = (out / "refcoco_unc_val.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "image_seconds"} for x in lines]
    assert strip(one) == strip(two)
    assert merged["datasets"] == single["datasets"]


def test_build_pruner_from_flags():
    p = drv.build_parser()
    base = ["--out", "x"]
    pr, name, cfg = drv.build_pruner(p.parse_args(base + ["--prune", "csp", "--csp", "8", "64", "6", "16",
                                                           "--csp-cluster", "cls", "--seed", "3"]))
    assert name == "LVLM_CSP" and pr.method.paper_tuple == (8, 64, 6, 16) and pr.method.clustering == "cls"
    assert pr.method.seed == 3 and cfg == "(8,64,6,16) cls"
    pr, _, cfg = drv.build_pruner(p.parse_args(base + ["--prune", "csp", "--csp-preset", "7b-224/10-48-4-8"]))
    assert pr.method.paper_tuple == (10, 48, 4, 8) and cfg == "(10,48,4,8) uniform/literal"
    pr, name, cfg = drv.build_pruner(p.parse_args(base + ["--prune", "fastv", "--fastv-k", "2", "--fastv-r", "64"]))
    assert (name, cfg, pr.method.layer, pr.method.keep, pr.query) == ("FastV", "K=2 R=64", 2, 64, "pre_seg")
    pr, name, _ = drv.build_pruner(p.parse_args(base + ["--prune", "visionzip"]))
    assert name == "VisionZip" and pr.reducer.dominant + pr.reducer.contextual == 64
    pr, name, _ = drv.build_pruner(p.parse_args(base + ["--prune", "prumerge_plus"]))
    assert name == "PruMerge+" and pr.reducer.adaptive
    with pytest.raises(ValueError, match="yolo_weights"):
        drv.build_pruner(p.parse_args(base + ["--prune", "csp", "--csp-cluster", "seg_first"]))


def test_eval_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "eval" / "LISA" / "eval.sh")], check=True)


def test_paper_style_tflops_reproduce_lvlm_csp_table1():
    """(8, 64, 6, 16) on LISA-7B: N_avg (8·64 + 6·256 + 18·16) / 32 = 73 and 1.76 TFLOPs at T = 62 (LVLM_CSP Table 1)."""
    from shared.accounting import DIMS

    vis = torch.tensor([[64] * 8 + [256] * 6 + [16] * 18])
    t = 63  # a measured row: its own text length
    stats = PrefillStats(tokens=vis + t, visual=vis, sequence_length=torch.tensor([256 + t]),
                         visual_tokens=torch.tensor([256]))
    rec = lisa.LisaRecord(stats=stats, image_tokens=256, patches=256, seg_index=torch.tensor([300]))
    (row,) = drv.row_efficiency(rec, DIMS["llama-7b"], 62)
    assert row["n_avg"] == 73.0 and row["text_tokens"] == t and row["selected"] is None
    assert round(row["tflops_paper_t"], 2) == 1.76
    assert row["tflops"] > row["tflops_paper_t"]  # one more text token per layer
