"""Samples for Fast3D's GAP network, read from Chat-Scene's annotation files (the authors' layout).

Files under ``annotation_root``: ``{set}_mask3d_{split}.json`` (else ``{set}_{split}.json``) — lists of
``{scene_id, prompt, ...}``; ``scannet_mask3d_uni3d_feats.pt`` / ``scannet_mask3d_videofeats.pt`` —
``{"{scene_id}_{obj:02}": (1024,)}``; ``scannet_mask3d_{split}_attributes.pt`` — ``{scene_id: {"locs":
(n_obj, 6)}}``. Targets (``shared.methods.fast3d_targets``): ``infer_attn_maps_{split}_{set}.pt``.

Objects are slots 0..n_obj-1 of a scene; a slot without features gets zeros (as Chat-Scene and the
authors do); a scene whose box list is not exactly n_obj long is refused. Features enter raw.
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..methods.fast3d_targets import annotation_keys, load_targets

#: The authors' five tasks, in their train/val order.
FAST3D_SETS = ("scanrefer", "scan2cap", "scanqa", "sqa3d", "multi3dref")


def parse_sets(sets: Any) -> List[str]:
    """``"a#b"`` (the authors' tags), ``"a,b"`` or a list → list of set names."""
    if isinstance(sets, str):
        names = [s for s in sets.replace(",", "#").split("#") if s]
    else:
        names = [str(s) for s in sets]
    if not names:
        raise ValueError(f"sets: expected set names such as 'scanrefer#scanqa', got {sets!r}")
    return names


def annotation_file(root: str, set_name: str, split: str) -> str:
    for name in (f"{set_name}_mask3d_{split}.json", f"{set_name}_{split}.json"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"annotation_root: neither {set_name}_mask3d_{split}.json nor {set_name}_{split}.json in {root}")


def target_file(root: str, set_name: str, split: str) -> str:
    return os.path.join(root, f"infer_attn_maps_{split}_{set_name}.pt")


class SceneFeatures:
    """Per-scene (n_obj, d) Uni3D and DINOv2 features, zero rows for missing object slots."""

    def __init__(self, feat_file: str, img_feat_file: str, n_obj: int) -> None:
        self.feats = torch.load(feat_file, map_location="cpu", weights_only=True)
        self.img_feats = torch.load(img_feat_file, map_location="cpu", weights_only=True)
        self.n_obj = n_obj
        self.scenes = {k.rsplit("_", 1)[0] for k in self.feats}
        self._cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _dim(self, table: Mapping[str, torch.Tensor]) -> int:
        return int(next(iter(table.values())).shape[-1])

    def __call__(self, scene_id: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if scene_id not in self._cache:
            if scene_id not in self.scenes:
                raise KeyError(f"scene_id: {scene_id} has no object features in the feature file")
            out = []
            for table in (self.feats, self.img_feats):
                rows = torch.zeros(self.n_obj, self._dim(table))
                for o in range(self.n_obj):
                    v = table.get(f"{scene_id}_{o:02}")
                    if v is not None:
                        rows[o] = v.float().reshape(-1)
                out.append(rows)
            self._cache[scene_id] = (out[0], out[1])
        return self._cache[scene_id]


class GapDataset(Dataset):
    """One annotation set of one split. Items: dict(key, index, set, scene_id, prompt, obj_feats
    (n_obj, d3), obj_img_feats (n_obj, d2), locs (n_obj, 6)[, target (n_obj,)])."""

    def __init__(self, set_name: str, annotations: Sequence[Mapping[str, Any]], features: SceneFeatures,
                 attributes: Mapping[str, Any], targets: Optional[Sequence[Mapping[str, Any]]] = None,
                 target_key: str = "a_map", indices: Optional[Sequence[int]] = None) -> None:
        self.set_name = set_name
        self.annotations = list(annotations)
        self.keys = annotation_keys(set_name, self.annotations)
        self.features = features
        self.attributes = attributes
        self.target_key = target_key
        self.indices = list(range(len(self.annotations))) if indices is None else list(indices)
        missing = sorted({self.annotations[i]["scene_id"] for i in self.indices} - set(attributes))
        missing += sorted({self.annotations[i]["scene_id"] for i in self.indices} - features.scenes - set(missing))
        if missing:
            raise ValueError(f"annotations: {set_name}: {len(missing)} scenes lack boxes or features, e.g. {missing[:5]}")
        self.targets: Optional[Dict[int, torch.Tensor]] = None
        if targets is not None:
            self.targets = self._match_targets(targets)

    def _match_targets(self, records: Sequence[Mapping[str, Any]]) -> Dict[int, torch.Tensor]:
        keyed = all("key" in r for r in records)
        table = {r["key"] if keyed else r["index"]: r for r in records}
        out, lacking = {}, []
        for i in self.indices:
            r = table.get(self.keys[i] if keyed else i)
            if r is None:
                lacking.append(self.keys[i])
                continue
            if self.target_key not in r:
                raise ValueError(f"target_key: target of {self.keys[i]!r} has no {self.target_key!r} (keys: {sorted(r)})")
            out[i] = torch.as_tensor(r[self.target_key]).float()
        if lacking:
            how = "key" if keyed else "annotation index (authors' file without keys)"
            raise ValueError(f"targets: {self.set_name}: {len(lacking)} of {len(self.indices)} samples have no target "
                             f"(matched by {how}), e.g. {lacking[:3]}")
        return out

    def subset(self, indices: Sequence[int]) -> "GapDataset":
        sub = object.__new__(GapDataset)
        sub.__dict__.update(self.__dict__)
        sub.indices = list(indices)
        return sub

    def scene_of(self, i: int) -> str:
        return self.annotations[self.indices[i]]["scene_id"]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        idx = self.indices[i]
        anno = self.annotations[idx]
        scene = anno["scene_id"]
        feats, img = self.features(scene)
        locs = torch.as_tensor(self.attributes[scene]["locs"]).float()
        if locs.dim() != 2 or locs.shape[0] != self.features.n_obj:
            raise ValueError(f"locs: scene {scene} has boxes of shape {tuple(locs.shape)}; the GAP network needs "
                             f"({self.features.n_obj}, 6)")
        item = {"key": self.keys[idx], "index": idx, "set": self.set_name, "scene_id": scene,
                "prompt": anno["prompt"], "obj_feats": feats, "obj_img_feats": img, "locs": locs}
        if self.targets is not None:
            item["target"] = self.targets[idx]
        return item


def load_split(annotation_root: str, sets: Any, split: str, features: SceneFeatures,
               targets_root: Optional[str] = None, target_key: str = "a_map",
               scenes: Optional[Sequence[str]] = None) -> Dict[str, GapDataset]:
    """Datasets per set for ``split``; with ``targets_root`` each sample must have a target;
    ``scenes``: keep only samples of these scenes."""
    attributes = torch.load(os.path.join(annotation_root, f"scannet_mask3d_{split}_attributes.pt"),
                            map_location="cpu", weights_only=True)
    out = {}
    for name in parse_sets(sets):
        with open(annotation_file(annotation_root, name, split), encoding="utf-8") as f:
            annos = json.load(f)
        indices = None
        if scenes is not None:
            keep = set(scenes)
            indices = [i for i, a in enumerate(annos) if a["scene_id"] in keep]
            if not indices:
                raise ValueError(f"scenes: none of the {len(keep)} given scenes occurs in {name} ({split})")
        targets = load_targets(target_file(targets_root, name, split)) if targets_root else None
        out[name] = GapDataset(name, annos, features, attributes, targets, target_key, indices)
    return out


def split_by_scene(datasets: Mapping[str, GapDataset], fraction: float, seed: int
                   ) -> Tuple[Dict[str, GapDataset], Dict[str, GapDataset], List[str]]:
    """Hold out ``fraction`` of the scenes (all their samples, in every set): (kept, held_out, scenes)."""
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"heldout_fraction: expected a fraction in (0, 1), got {fraction!r}")
    scenes = sorted({d.scene_of(i) for d in datasets.values() for i in range(len(d))})
    if len(scenes) < 2:
        raise ValueError("heldout_fraction: the training sets have fewer than 2 scenes; nothing to hold out")
    random.Random(seed).shuffle(scenes)
    n = min(len(scenes) - 1, max(1, math.ceil(fraction * len(scenes))))
    held = set(scenes[:n])
    kept, out = {}, {}
    for name, d in datasets.items():
        kept[name] = d.subset([d.indices[i] for i in range(len(d)) if d.scene_of(i) not in held])
        out[name] = d.subset([d.indices[i] for i in range(len(d)) if d.scene_of(i) in held])
    return kept, out, sorted(held)


class GapCollator:
    """Batches items: RoBERTa tokens of the prompts + stacked object tensors (+ targets)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        from ..methods.fast3d_gap import encode_prompts

        ids, mask = encode_prompts(self.tokenizer, [it["prompt"] for it in items])
        batch = {"input_ids": ids, "attention_mask": mask,
                 "obj_feats": torch.stack([it["obj_feats"] for it in items]),
                 "obj_img_feats": torch.stack([it["obj_img_feats"] for it in items]),
                 "locs": torch.stack([it["locs"] for it in items]),
                 "index": torch.tensor([it["index"] for it in items]),
                 "keys": [it["key"] for it in items]}
        if "target" in items[0]:
            batch["target"] = torch.stack([it["target"] for it in items])
        return batch
