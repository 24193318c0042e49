"""Synthetic Chat-Scene annotations: a few ScanNet-like scenes in the exact files Chat-Scene reads.

Chat-Scene's ``ValDataset`` (``dataset/dataset_val.py``) and its metrics (``utils/eval.py``) read an
``annotations/`` folder. This module writes one with deterministic random content, in the same files,
keys, dtypes and JSON fields as Chat-Scene's preprocessing (segmentor ``mask3d``, point encoder
``uni3d``, the names of its ``scripts/config.py``):

==========================================  ==============================================================
``scannet_mask3d_uni3d_feats.pt``           {"<scene>_<inst:02>": (feat_dim,) float32}, one per instance
``scannet_mask3d_videofeats.pt``            {"<scene>_<inst:02>": (img_feat_dim,) float16}
``scannet_mask3d_val_attributes.pt``        {scene: {"objects": [label] * n, "locs": (n, 6) float32}}
                                            Mask3D instances, centre xyz + size, n <= max_obj_num
``scannet_val_attributes.pt``               the same for the ground-truth objects (m, 6)
``scanrefer_mask3d_val.json``               [{scene_id, obj_id (GT id), prompt, ref_captions
                                            ["<OBJ{best-IoU instance:03}>."]}]
``multi3dref_mask3d_val.json``              [{scene_id, obj_id: 0, prompt, ref_captions [GT ids], eval_type}]
``scan2cap_mask3d_val.json``                [{scene_id, obj_id (GT id), pred_id (instance), prompt naming
                                            <OBJ{pred_id:03}>, ref_captions ["sos ... eos"], iou}]
``scan2cap_val_corpus.json``                {"<scene>|<GT id>": ["sos ... eos", ...]}
``scanqa_val.json``                         [{scene_id, obj_id, prompt (+ answer suffix), ref_captions}]
``sqa3d_val.json``                          [{scene_id, obj_id: 0, prompt (situation + question + suffix),
                                            ref_captions, sqa_type 0..5}]
``scanrefer_unique_multiple_lookup.json``   {scene: {"<GT id>": 0 unique label | 1 multiple}}
==========================================  ==============================================================

With ``train_per_task > 0`` also the training files (the same scenes): ``scannet_mask3d_train_attributes.pt``
and ``scanrefer_mask3d_train.json`` / ``multi3dref_mask3d_train.json`` / ``scan2cap_mask3d_train.json`` /
``scanqa_train.json`` / ``sqa3d_train.json``, each ``[{scene_id, obj_id, prompt, caption[, eval_type |
sqa_type]}]`` with Chat-Scene's train answers (``"<OBJxxx>."``, ``"Yes. <OBJa> and <OBJb>."`` / ``"No."``,
a sentence, ``"Capitalised answer."``), object ids in Mask3D instance space. They come from their own
random stream, so the val files are the same with or without them.

Geometry: each scene has ``m`` ground-truth boxes in a 6 x 6 x 3 m room; its Mask3D instances are the
GT boxes jittered (so some match at IoU >= 0.5, some only >= 0.25, some below) plus spurious boxes, in
shuffled order. IoUs are axis-aligned 3D box IoUs (what Chat-Scene's ``box3d_iou`` computes for its
axis-aligned corners). Prompts and captions use this module's own wording; their structure (suffixes,
the ``<OBJxxx>`` ids, "sos ... eos") is Chat-Scene's.

    data = write_chat_scene_annotations("out/annotations", seed=0)
    data.ann_list("scanrefer")   # [feats, img feats, instance attributes, annotation json], as val_file_dict
"""
from __future__ import annotations

import json
import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

TASKS = ("scanrefer", "multi3dref", "scan2cap", "scanqa", "sqa3d")
FEATS = "scannet_mask3d_uni3d_feats.pt"
IMG_FEATS = "scannet_mask3d_videofeats.pt"
INSTANCE_ATTRIBUTES = "scannet_mask3d_val_attributes.pt"
GT_ATTRIBUTES = "scannet_val_attributes.pt"
ANNOTATIONS = {
    "scanrefer": "scanrefer_mask3d_val.json",
    "multi3dref": "multi3dref_mask3d_val.json",
    "scan2cap": "scan2cap_mask3d_val.json",
    "scanqa": "scanqa_val.json",
    "sqa3d": "sqa3d_val.json",
}
TRAIN_ANNOTATIONS = {
    "scanrefer": "scanrefer_mask3d_train.json",
    "multi3dref": "multi3dref_mask3d_train.json",
    "scan2cap": "scan2cap_mask3d_train.json",
    "scanqa": "scanqa_train.json",
    "sqa3d": "sqa3d_train.json",
}
TRAIN_INSTANCE_ATTRIBUTES = "scannet_mask3d_train_attributes.pt"
SCAN2CAP_CORPUS = "scan2cap_val_corpus.json"
UNIQUE_MULTIPLE = "scanrefer_unique_multiple_lookup.json"
#: the suffix Chat-Scene's preprocessing appends to ScanQA / SQA3D questions
QA_SUFFIX = " Answer the question using a single word or phrase."
MULTI3DREF_TYPES = ("zt_w_d", "zt_wo_d", "st_w_d", "st_wo_d", "mt")
#: SQA3D question types as Chat-Scene's ``get_sqa_question_type``: by the first word
SQA_TYPES = ("what", "is", "how", "can", "which")

LABELS = ("chair", "table", "sofa", "bed", "cabinet", "door", "window", "lamp", "desk", "shelf")
COLORS = ("brown", "white", "black", "grey", "blue", "red", "green", "wooden")
ROOM = (6.0, 6.0, 3.0)


@dataclass(frozen=True)
class SyntheticScenes:
    """What ``write_chat_scene_annotations`` wrote: the folder, the scene ids, per scene the number of
    Mask3D instances and of GT objects, and per task the number of annotations."""

    root: Path
    scenes: Tuple[str, ...]
    instances: Dict[str, int]
    gt_objects: Dict[str, int]
    counts: Dict[str, int]
    train_counts: Dict[str, int] = dataclasses.field(default_factory=dict)

    def path(self, name: str) -> str:
        return str(self.root / name)

    def ann_list(self, task: str) -> List[str]:
        """``[feats, img feats, instance attributes, annotation json]`` of ``task``, the order of
        Chat-Scene's ``val_file_dict`` entries (``ValDataset(ann_list=...)``)."""
        if task not in ANNOTATIONS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
        return [self.path(FEATS), self.path(IMG_FEATS), self.path(INSTANCE_ATTRIBUTES), self.path(ANNOTATIONS[task])]


def box_iou_3d(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two axis-aligned boxes given as (6,) centre xyz + size (positive), with the 1e-8 added to the
    union that Chat-Scene's ``box3d_iou`` adds (the ``iou`` its Scan2Cap preprocessing stores)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lo = np.maximum(a[:3] - a[3:] / 2, b[:3] - b[3:] / 2)
    hi = np.minimum(a[:3] + a[3:] / 2, b[:3] + b[3:] / 2)
    inter = float(np.prod(np.clip(hi - lo, 0.0, None)))
    return inter / (float(np.prod(a[3:]) + np.prod(b[3:])) - inter + 1e-8)


def _check_counts(name: str, value: Union[int, Sequence[int]], scenes: int, low: int) -> List[int]:
    vals = [value] * scenes if isinstance(value, int) else list(value)
    if len(vals) != scenes or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in vals):
        raise ValueError(f"{name}: expected an int >= {low} or {scenes} of them (one per scene), got {value!r}")
    return vals


def _scene_geometry(rng: np.random.Generator, m: int, n: int) -> Tuple[np.ndarray, List[str], np.ndarray, List[str]]:
    """GT boxes (m, 6) + labels, Mask3D boxes (n, 6) + labels: the first min(m, n) instances are jittered
    GT boxes (jitter growing with the index, so IoUs spread over [0, 1]), the rest spurious; shuffled."""
    size = rng.uniform(0.4, 1.6, size=(m, 3))
    centre = rng.uniform(size / 2, np.array(ROOM) - size / 2)
    gt = np.concatenate([centre, size], 1).astype(np.float32)
    gt_labels = [LABELS[int(i)] for i in rng.integers(0, len(LABELS), m)]
    inst, inst_labels = [], []
    matched = min(m, n)
    for k in range(matched):
        level = k / max(matched - 1, 1)  # 0: near copy, 1: far off
        c = gt[k, :3] + rng.normal(0.0, 0.05 + 0.5 * level, 3) * gt[k, 3:]
        s = gt[k, 3:] * rng.uniform(0.85, 1.15 + 0.5 * level, 3)
        inst.append(np.concatenate([c, s]))
        inst_labels.append(gt_labels[k])
    for _ in range(n - matched):
        s = rng.uniform(0.3, 1.0, 3)
        inst.append(np.concatenate([rng.uniform(s / 2, np.array(ROOM) - s / 2), s]))
        inst_labels.append(LABELS[int(rng.integers(0, len(LABELS)))])
    order = rng.permutation(n)
    inst_arr = np.stack(inst)[order].astype(np.float32) if n else np.zeros((0, 6), np.float32)
    return gt, gt_labels, inst_arr, [inst_labels[i] for i in order]


def _describe(rng: np.random.Generator, label: str) -> str:
    where = ("near the wall", "by the window", "in the corner", "next to the door", "in the middle of the room")
    return f"the {COLORS[int(rng.integers(0, len(COLORS)))]} {label} {where[int(rng.integers(0, len(where)))]}"


def write_chat_scene_annotations(root: Union[str, os.PathLike], scenes: int = 2,
                                 instances: Union[int, Sequence[int]] = (9, 7),
                                 gt_objects: Union[int, Sequence[int]] = (7, 6), per_task: int = 3,
                                 feat_dim: int = 1024, img_feat_dim: int = 1024, seed: int = 0,
                                 train_per_task: int = 0) -> SyntheticScenes:
    """Write the annotation folder described in the module docstring under ``root`` (created).

    scenes: how many (ids ``scene0{100 + i:03}_00``); instances / gt_objects: per scene (an int for all)
    the Mask3D instances (keep it <= the model's ``max_obj_num``: ``ValDataset`` builds that many slots)
    and GT objects (>= 2); per_task: annotations per task and scene; feat_dim / img_feat_dim: the 3D / 2D
    feature widths (Chat-Scene: 1024 / 1024); train_per_task: training annotations per task and scene
    (0: no training files). Deterministic in ``seed``."""
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 1:
        raise ValueError(f"scenes: expected an int >= 1, got {scenes!r}")
    n_inst = _check_counts("instances", instances, scenes, 1)
    n_gt = _check_counts("gt_objects", gt_objects, scenes, 2)
    for name, v in (("per_task", per_task), ("feat_dim", feat_dim), ("img_feat_dim", img_feat_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if isinstance(train_per_task, bool) or not isinstance(train_per_task, int) or train_per_task < 0:
        raise ValueError(f"train_per_task: expected an int >= 0, got {train_per_task!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    feats, img_feats, inst_attrs, gt_attrs = {}, {}, {}, {}
    annos: Dict[str, List[Dict]] = {t: [] for t in TASKS}
    corpus: Dict[str, List[str]] = {}
    lookup: Dict[str, Dict[str, int]] = {}
    scene_ids = tuple(f"scene0{100 + i:03}_00" for i in range(scenes))
    for sid, n, m in zip(scene_ids, n_inst, n_gt):
        gt, gt_labels, inst, inst_labels = _scene_geometry(rng, m, n)
        inst_attrs[sid] = {"objects": inst_labels, "locs": torch.from_numpy(inst)}
        gt_attrs[sid] = {"objects": gt_labels, "locs": torch.from_numpy(gt)}
        for k in range(n):
            feats[f"{sid}_{k:02}"] = torch.randn(feat_dim, generator=gen)
            img_feats[f"{sid}_{k:02}"] = torch.randn(img_feat_dim, generator=gen).half()
        ious = np.array([[box_iou_3d(inst[k], gt[g]) for g in range(m)] for k in range(n)])  # (n, m)
        best = ious.argmax(0)  # per GT object: its best instance (first on ties, as the preprocessing)
        described = rng.permutation(m)[: max(per_task + 1, 2)]
        descriptions = {int(g): _describe(rng, gt_labels[g]) for g in described}
        # scanrefer: GT id, the best-IoU instance as the answer; unique/multiple by label in the scene
        lookup[sid] = {}
        for g in described[:per_task]:
            g = int(g)
            annos["scanrefer"].append({
                "scene_id": sid, "obj_id": g, "ref_captions": [f"<OBJ{int(best[g]):03}>."],
                "prompt": f"Which object matches the description \"{descriptions[g]}\"? Give its ID.",
            })
            lookup[sid][str(g)] = 0 if gt_labels.count(gt_labels[g]) == 1 else 1
        # multi3dref: the five evaluation types in turn; zero-target ones list no GT id
        for j in range(per_task):
            kind = MULTI3DREF_TYPES[len(annos["multi3dref"]) % len(MULTI3DREF_TYPES)]  # all types in turn
            g = int(described[j % len(described)])
            if kind.startswith("zt"):
                ids, text = [], f"the {COLORS[-1]} piano"
            elif kind.startswith("st"):
                ids, text = [g], descriptions[g]
            else:
                ids = sorted({g, int(described[(j + 1) % len(described)])})
                text = f"the {gt_labels[ids[0]]} or the {gt_labels[ids[1]]}"
            annos["multi3dref"].append({
                "scene_id": sid, "obj_id": 0, "prompt": f"List the IDs of all objects described as \"{text}\", if any.",
                "ref_captions": ids, "eval_type": kind,
            })
        # scan2cap: every described GT object is in the corpus; all but the last are annotated
        for g in described:
            g = int(g)
            corpus[f"{sid}|{g}"] = [f"sos {descriptions[g]}. eos", f"sos this is a {gt_labels[g]}. eos"]
        for g in described[:per_task]:
            g = int(g)
            p = int(best[g])
            annos["scan2cap"].append({
                "scene_id": sid, "obj_id": g, "pred_id": p,
                "prompt": f"Describe <OBJ{p:03}> and where it stands in the room.",
                "ref_captions": corpus[f"{sid}|{g}"], "iou": float(ious[p, g]),
            })
        # scanqa / sqa3d: questions about the described objects
        for j in range(per_task):
            g = int(described[j % len(described)])
            color = descriptions[g].split()[1]
            annos["scanqa"].append({
                "scene_id": sid, "obj_id": g, "prompt": f"What color is the {gt_labels[g]}?" + QA_SUFFIX,
                "ref_captions": [color, f"{color} {gt_labels[g]}"],
            })
            qtype = len(annos["sqa3d"]) % (len(SQA_TYPES) + 1)  # all six types in turn
            question = {0: "What is in front of me?", 1: "Is the door open?", 2: "How many chairs can I see?",
                        3: "Can I sit on my left?", 4: "Which way is the window?", 5: "Could I reach the lamp?"}[qtype]
            annos["sqa3d"].append({
                "scene_id": sid, "obj_id": 0,
                "prompt": f"I am standing by the {gt_labels[g]}. " + question + QA_SUFFIX,
                "ref_captions": [["the " + gt_labels[g], "yes", "two", "yes", "left", "no"][qtype]], "sqa_type": qtype,
            })

    torch.save(feats, root / FEATS)
    torch.save(img_feats, root / IMG_FEATS)
    torch.save(inst_attrs, root / INSTANCE_ATTRIBUTES)
    torch.save(gt_attrs, root / GT_ATTRIBUTES)
    for task, name in ANNOTATIONS.items():
        (root / name).write_text(json.dumps(annos[task], indent=1) + "\n", encoding="utf-8")
    (root / SCAN2CAP_CORPUS).write_text(json.dumps(corpus, indent=1) + "\n", encoding="utf-8")
    (root / UNIQUE_MULTIPLE).write_text(json.dumps(lookup, indent=1) + "\n", encoding="utf-8")
    train_counts: Dict[str, int] = {}
    if train_per_task:
        train = _train_annotations(np.random.default_rng([seed, 1]), inst_attrs, train_per_task)
        torch.save(inst_attrs, root / TRAIN_INSTANCE_ATTRIBUTES)
        for task, name in TRAIN_ANNOTATIONS.items():
            (root / name).write_text(json.dumps(train[task], indent=1) + "\n", encoding="utf-8")
        train_counts = {t: len(a) for t, a in train.items()}
    return SyntheticScenes(root, scene_ids, dict(zip(scene_ids, n_inst)), dict(zip(scene_ids, n_gt)),
                           {t: len(a) for t, a in annos.items()}, train_counts)


def _train_annotations(rng: np.random.Generator, inst_attrs: Dict[str, Dict], per_task: int) -> Dict[str, List[Dict]]:
    """Chat-Scene's training annotations (``preprocess/prepare_*_annos.py`` with ``split == "train"``) on the
    Mask3D instances: a ``caption`` (the teacher-forced answer) instead of ``ref_captions``."""
    out: Dict[str, List[Dict]] = {t: [] for t in TASKS}
    for sid, attrs in inst_attrs.items():
        labels = attrs["objects"]
        n = len(labels)
        for j in range(per_task):
            k = int(rng.integers(0, n))
            text = _describe(rng, labels[k])
            color = text.split()[1]
            out["scanrefer"].append({"scene_id": sid, "obj_id": k, "caption": f"<OBJ{k:03}>.",
                                     "prompt": f"Which object matches the description \"{text}\"? Give its ID."})
            out["scan2cap"].append({"scene_id": sid, "obj_id": k, "prompt": f"Describe <OBJ{k:03}> and where it stands "
                                    f"in the room.", "caption": f"This is {text}."})
            out["scanqa"].append({"scene_id": sid, "obj_id": k, "prompt": f"What color is the {labels[k]}?" + QA_SUFFIX,
                                  "caption": color.capitalize() + "."})
            qtype = j % (len(SQA_TYPES) + 1)
            out["sqa3d"].append({"scene_id": sid, "obj_id": 0, "sqa_type": qtype,
                                 "prompt": f"I am standing by the {labels[k]}. Is it on my left?" + QA_SUFFIX,
                                 "caption": ("Yes.", "No.")[j % 2]})
            ids = sorted({k, int(rng.integers(0, n))}) if j % 3 else []
            answer = "No." if not ids else "Yes. " + " and ".join(f"<OBJ{i:03}>" for i in ids) + "."
            out["multi3dref"].append({"scene_id": sid, "obj_id": 0, "caption": answer,
                                      "eval_type": MULTI3DREF_TYPES[0 if not ids else (2 if len(ids) == 1 else 4)],
                                      "prompt": f"List the IDs of all objects described as \"{text}\", if any."})
    return out


__all__ = [
    "ANNOTATIONS",
    "FEATS",
    "GT_ATTRIBUTES",
    "IMG_FEATS",
    "INSTANCE_ATTRIBUTES",
    "MULTI3DREF_TYPES",
    "QA_SUFFIX",
    "SCAN2CAP_CORPUS",
    "SyntheticScenes",
    "TASKS",
    "TRAIN_ANNOTATIONS",
    "TRAIN_INSTANCE_ATTRIBUTES",
    "UNIQUE_MULTIPLE",
    "box_iou_3d",
    "write_chat_scene_annotations",
]
