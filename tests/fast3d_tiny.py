"""Tiny stand-ins for Fast3D's GAP tests: the random RoBERTa folder (``shared.apps.fast3d_tiny.write_roberta``,
re-exported), tiny GAP configs, and a synthetic Chat-Scene-style data root."""
from __future__ import annotations

import json
import os
import random
from typing import Dict, Optional, Sequence

import torch

from shared.apps.fast3d_tiny import SPECIALS, byte_alphabet, write_roberta  # noqa: F401  (re-exported)


def tiny_gap_config(n_obj: int = 6, feat: int = 8, img: int = 8, text_hidden: int = 32, hidden: int = 16,
                    heads: int = 2, layers: int = 2, dropout: float = 0.1):
    from shared.methods.fast3d_cmt import CMTConfig
    from shared.methods.fast3d_gap import GAPConfig

    return GAPConfig(feat_dim=feat, img_feat_dim=img, text_hidden_size=text_hidden, max_obj_num=n_obj,
                     cmt=CMTConfig(hidden_size=hidden, num_heads=heads, num_layers=layers, ffn_dim=2 * hidden,
                                   dropout=dropout))


WORDS = ["chair", "table", "lamp", "sofa", "bed", "door", "window", "desk"]


def write_data_root(root: str, n_obj: int = 6, feat: int = 8, img: int = 8, scenes_per_split: int = 4,
                    per_scene: int = 6, sets: Sequence[str] = ("scanrefer", "scanqa"), seed: int = 0,
                    with_targets: bool = True) -> Dict[str, str]:
    """Synthetic annotations/features/attributes/targets in the authors' layout.

    The target of a sample puts its mass on the scene's "salient" objects (labels chair, table, lamp),
    a function of the object features that a GAP network learns in a few steps."""
    from shared.methods.fast3d_targets import annotation_keys, write_targets

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    ann_dir = os.path.join(root, "annotations")
    tgt_dir = os.path.join(root, "targets")
    os.makedirs(ann_dir, exist_ok=True)
    os.makedirs(tgt_dir, exist_ok=True)
    word_feat = torch.randn(len(WORDS), feat, generator=g)
    word_img = torch.randn(len(WORDS), img, generator=g)
    feats, img_feats = {}, {}
    for split in ("train", "val"):
        attrs = {}
        scenes = [f"scene{1000 * (split == 'val') + i:04d}_00" for i in range(scenes_per_split)]
        labels = {}
        for s in scenes:
            n_real = n_obj - rng.randint(0, 2)  # trailing slots without features (zeros, as Chat-Scene)
            lab = [rng.randrange(len(WORDS)) for _ in range(n_real)]
            labels[s] = lab
            for o, w in enumerate(lab):
                feats[f"{s}_{o:02}"] = word_feat[w] + 0.1 * torch.randn(feat, generator=g)
                img_feats[f"{s}_{o:02}"] = word_img[w] + 0.1 * torch.randn(img, generator=g)
            attrs[s] = {"objects": [WORDS[w] for w in lab] + ["pad"] * (n_obj - n_real),
                        "locs": torch.rand(n_obj, 6, generator=g) * 4}
        torch.save(attrs, os.path.join(ann_dir, f"scannet_mask3d_{split}_attributes.pt"))
        for set_name in sets:
            annos = []
            for s in scenes:
                for _ in range(per_scene):
                    w = rng.choice(labels[s])
                    annos.append({"scene_id": s, "obj_id": labels[s].index(w),
                                  "prompt": f"where is the {WORDS[w]}?", "caption": f"<OBJ{labels[s].index(w):03}>."})
            name = f"{set_name}_mask3d_{split}.json" if set_name != "scanqa" else f"{set_name}_{split}.json"
            with open(os.path.join(ann_dir, name), "w") as f:
                json.dump(annos, f)
            if with_targets:
                keys = annotation_keys(set_name, annos)
                recs = []
                for i, (a, k) in enumerate(zip(annos, keys)):
                    t = torch.full((n_obj,), 0.01)
                    t[[o for o, x in enumerate(labels[a["scene_id"]]) if x < 3]] = 1.0
                    recs.append({"key": k, "index": i, "a_map": t, "a_map_ori": t * 0.5})
                write_targets(iter(recs), os.path.join(tgt_dir, f"infer_attn_maps_{split}_{set_name}.pt"))
    torch.save(feats, os.path.join(ann_dir, "scannet_mask3d_uni3d_feats.pt"))
    torch.save(img_feats, os.path.join(ann_dir, "scannet_mask3d_videofeats.pt"))
    return {"annotations": ann_dir, "targets": tgt_dir}


def random_objects(batch: int, cfg, seed: int = 0, generator: Optional[torch.Generator] = None):
    g = generator or torch.Generator().manual_seed(seed)
    n = cfg.max_obj_num
    return (torch.randn(batch, n, cfg.feat_dim, generator=g), torch.randn(batch, n, cfg.img_feat_dim, generator=g),
            torch.rand(batch, n, cfg.cmt.dim_loc, generator=g) * 3)
