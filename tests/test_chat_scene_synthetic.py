"""shared.datasets.chat_scene_synthetic: the files, keys, dtypes and fields Chat-Scene reads, the matches the
annotations state, determinism and refusals. (Chat-Scene's own ValDataset reads these files in
tests/hosts/test_chat_scene_real.py.)"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from shared.datasets import chat_scene_synthetic as syn


def _overlap_volume(a, b, n=200_000, seed=0):
    """Monte-Carlo volume of a ∩ b (a check of the IoU apart from its formula)."""
    rng = np.random.default_rng(seed)
    lo, hi = a[:3] - a[3:] / 2, a[:3] + a[3:] / 2
    pts = rng.uniform(lo, hi, size=(n, 3))
    inside = np.all(np.abs(pts - b[:3]) <= b[3:] / 2, axis=1)
    return inside.mean() * np.prod(a[3:])


def test_box_iou_3d():
    a = np.array([0, 0, 0, 1, 1, 1.0])
    b = np.array([0.5, 0, 0, 1, 1, 1.0])
    assert syn.box_iou_3d(a, b) == pytest.approx(0.5 / 1.5, abs=1e-7)
    assert syn.box_iou_3d(a, a) == pytest.approx(1.0, abs=1e-7)
    assert syn.box_iou_3d(a, np.array([2, 0, 0, 1, 1, 1.0])) == 0.0
    c = np.array([0.3, -0.2, 0.1, 0.8, 1.4, 0.6])
    inter = _overlap_volume(a, c)
    assert syn.box_iou_3d(a, c) == pytest.approx(inter / (1 + 0.8 * 1.4 * 0.6 - inter), abs=5e-3)


def test_files_and_fields(tmp_path):
    d = syn.write_chat_scene_annotations(tmp_path, scenes=2, instances=(9, 7), gt_objects=(7, 6), per_task=3, seed=1)
    assert d.counts == {t: 6 for t in syn.TASKS}
    feats = torch.load(tmp_path / syn.FEATS)
    img = torch.load(tmp_path / syn.IMG_FEATS)
    inst = torch.load(tmp_path / syn.INSTANCE_ATTRIBUTES)
    gt = torch.load(tmp_path / syn.GT_ATTRIBUTES)
    assert sorted(feats) == sorted(img) == sorted(f"{s}_{k:02}" for s in d.scenes for k in range(d.instances[s]))
    assert all(v.shape == (1024,) and v.dtype == torch.float32 for v in feats.values())
    assert all(v.shape == (1024,) and v.dtype == torch.float16 for v in img.values())
    for s in d.scenes:
        assert inst[s]["locs"].shape == (d.instances[s], 6) and inst[s]["locs"].dtype == torch.float32
        assert gt[s]["locs"].shape == (d.gt_objects[s], 6) and len(gt[s]["objects"]) == d.gt_objects[s]
        assert len(inst[s]["objects"]) == d.instances[s] and bool((inst[s]["locs"][:, 3:] > 0).all())
    iou = lambda s, k, g: syn.box_iou_3d(inst[s]["locs"][k].numpy(), gt[s]["locs"][g].numpy())  # noqa: E731
    load = lambda t: json.loads((tmp_path / syn.ANNOTATIONS[t]).read_text())  # noqa: E731
    for a in load("scanrefer"):
        assert set(a) == {"scene_id", "obj_id", "prompt", "ref_captions"}
        best = int(re.fullmatch(r"<OBJ(\d{3})>\.", a["ref_captions"][0]).group(1))
        ious = [iou(a["scene_id"], k, a["obj_id"]) for k in range(d.instances[a["scene_id"]])]
        assert ious[best] == max(ious)
    lookup = json.loads((tmp_path / syn.UNIQUE_MULTIPLE).read_text())
    for a in load("scanrefer"):
        labels = gt[a["scene_id"]]["objects"]
        assert lookup[a["scene_id"]][str(a["obj_id"])] == int(labels.count(labels[a["obj_id"]]) > 1)
    m3 = load("multi3dref")
    assert {a["eval_type"] for a in m3} == set(syn.MULTI3DREF_TYPES)
    for a in m3:
        assert a["obj_id"] == 0 and (a["ref_captions"] == []) == a["eval_type"].startswith("zt")
        assert len(a["ref_captions"]) == (2 if a["eval_type"] == "mt" else 0 if a["eval_type"].startswith("zt") else 1)
    corpus = json.loads((tmp_path / syn.SCAN2CAP_CORPUS).read_text())
    s2c = load("scan2cap")
    assert len(corpus) > len(s2c)  # a described object without annotation scores "sos eos", as in the real corpus
    for a in s2c:
        assert f"<OBJ{a['pred_id']:03}>" in a["prompt"] and a["ref_captions"] == corpus[f"{a['scene_id']}|{a['obj_id']}"]
        assert a["iou"] == pytest.approx(iou(a["scene_id"], a["pred_id"], a["obj_id"]), abs=1e-12)
        assert all(c.startswith("sos ") and c.endswith(" eos") for c in a["ref_captions"])
    for t in ("scanqa", "sqa3d"):
        assert all(a["prompt"].endswith(syn.QA_SUFFIX) and a["ref_captions"] for a in load(t))
    for a in load("sqa3d"):
        q = a["prompt"].split(". ", 1)[1]
        want = next((i for i, w in enumerate(syn.SQA_TYPES) if q.lower().startswith(w)), 5)
        assert a["sqa_type"] == want
    assert {a["sqa_type"] for a in load("sqa3d")} == set(range(6))


def test_deterministic_and_refusals(tmp_path):
    a = syn.write_chat_scene_annotations(tmp_path / "a", seed=3)
    b = syn.write_chat_scene_annotations(tmp_path / "b", seed=3)
    c = syn.write_chat_scene_annotations(tmp_path / "c", seed=4)
    for name in list(syn.ANNOTATIONS.values()) + [syn.SCAN2CAP_CORPUS]:
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
    fa, fb, fc = (torch.load(x.root / syn.FEATS) for x in (a, b, c))
    assert all(torch.equal(fa[k], fb[k]) for k in fa) and not all(torch.equal(fa[k], fc[k]) for k in fa)
    assert a.ann_list("scanqa") == [str(a.root / n) for n in (syn.FEATS, syn.IMG_FEATS, syn.INSTANCE_ATTRIBUTES,
                                                            "scanqa_val.json")]
    with pytest.raises(ValueError, match=r"^task: expected one of scanrefer"):
        a.ann_list("nr3d")
    with pytest.raises(ValueError, match=r"^instances: expected an int >= 1 or 2 of them"):
        syn.write_chat_scene_annotations(tmp_path / "x", instances=(3,))
    with pytest.raises(ValueError, match=r"^gt_objects: expected an int >= 2"):
        syn.write_chat_scene_annotations(tmp_path / "x", gt_objects=1)
    with pytest.raises(ValueError, match=r"^feat_dim: expected an int >= 1"):
        syn.write_chat_scene_annotations(tmp_path / "x", feat_dim=0)


def test_train_files_carry_captions_and_leave_the_val_files_unchanged(tmp_path):
    import hashlib
    import re

    from shared.datasets.chat_scene_synthetic import TRAIN_ANNOTATIONS, TRAIN_INSTANCE_ATTRIBUTES

    write_chat_scene_annotations = syn.write_chat_scene_annotations
    plain = write_chat_scene_annotations(tmp_path / "a", seed=3)
    data = write_chat_scene_annotations(tmp_path / "b", seed=3, train_per_task=2)
    again = write_chat_scene_annotations(tmp_path / "c", seed=3, train_per_task=2)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for f in plain.root.iterdir():  # the val files do not depend on the training files
        assert digest(f) == digest(data.root / f.name)
    assert plain.train_counts == {} and data.train_counts == {t: 2 * len(data.scenes) for t in TRAIN_ANNOTATIONS}
    attrs = torch.load(data.root / TRAIN_INSTANCE_ATTRIBUTES)
    for task, name in TRAIN_ANNOTATIONS.items():
        assert digest(data.root / name) == digest(again.root / name)
        annos = json.loads((data.root / name).read_text())
        for a in annos:
            assert {"scene_id", "obj_id", "prompt", "caption"} <= set(a) and "ref_captions" not in a
            n = len(attrs[a["scene_id"]]["locs"])
            assert all(int(i) < n for i in re.findall(r"<OBJ(\d{3})>", a["prompt"] + a["caption"]))
        if task == "scanrefer":
            assert all(re.fullmatch(r"<OBJ\d{3}>\.", a["caption"]) and a["caption"] == f"<OBJ{a['obj_id']:03}>." for a in annos)
        if task in ("scanqa", "sqa3d"):
            assert all(a["caption"][0].isupper() and a["caption"].endswith(".") for a in annos)
    with pytest.raises(ValueError, match=r"^train_per_task: expected an int >= 0"):
        write_chat_scene_annotations(tmp_path / "d", train_per_task=-1)
