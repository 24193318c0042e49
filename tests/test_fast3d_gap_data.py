"""GAP training pieces that need no accelerate: loss, top-k F1, schedule, optimiser groups, config
translation (the authors' train.yaml), data loading, held-out split by scene."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from shared.apps.fast3d_train import (
    AUTHORS_VAL_LABEL,
    TrainConfig,
    config_from_mapping,
    cosine_with_floor,
    param_groups,
)
from shared.datasets.fast3d_gap import GapCollator, SceneFeatures, load_split, split_by_scene
from shared.methods.fast3d_gap import gap_kl_loss, topk_set_f1
from shared.methods.fast3d_targets import annotation_keys
from tests.fast3d_tiny import write_data_root


def test_kl_loss_is_kl_of_normalised_target():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g)
    target = torch.rand(3, 7, generator=g) * 0.01  # unnormalised, like extracted attention sums
    p = torch.softmax(logits.double(), -1)
    t = target.double() / target.double().sum(-1, keepdim=True)
    kl = (t * (t / p).log()).sum(-1).mean()  # KL(t ‖ p), batch mean
    assert float(gap_kl_loss(logits, target)) == pytest.approx(float(kl), abs=1e-5)
    assert float(gap_kl_loss(torch.log(t).float(), target)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="target"):
        gap_kl_loss(logits, target[:, :6])


def test_topk_set_f1_is_sklearn_positive_class_f1():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(20, 9, generator=g), torch.rand(20, 9, generator=g)
    for k in (1, 3, 5):
        got = topk_set_f1(logits, target, k)
        for i in range(20):
            p = set(logits[i].topk(k).indices.tolist())
            t = set(target[i].topk(k).indices.tolist())
            tp = len(p & t)
            prec, rec = tp / len(p), tp / len(t)
            f1 = 0.0 if tp == 0 else 2 * prec * rec / (prec + rec)
            assert float(got[i]) == pytest.approx(f1)
    assert float(topk_set_f1(target, target, 4).min()) == 1.0
    with pytest.raises(ValueError, match="topk"):
        topk_set_f1(logits, target, 10)


def test_schedule_matches_the_authors_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_floor(opt, warmup_steps=10, total_steps=110, min_lr_multi=1e-3)
    lrs = []
    for _ in range(111):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3)  # the floor also applies during warm-up (step 0)
    assert lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(1e-3) and min(lrs) == pytest.approx(1e-3)


def test_param_groups_lr_and_decay():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
            self.head = torch.nn.Linear(2, 1)
            self.frozen = torch.nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    net = Net()
    groups = param_groups(net, lr=8e-4, text_lr=8e-5, weight_decay=0.01)
    where = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert where[id(net.text_encoder[0].weight)] == (8e-5, 0.01)
    assert where[id(net.text_encoder[0].bias)] == (8e-5, 0.0)
    assert where[id(net.text_encoder[1].weight)] == (8e-5, 0.0)  # 1-D
    assert where[id(net.head.weight)] == (8e-4, 0.01) and where[id(net.head.bias)] == (8e-4, 0.0)
    assert id(net.frozen.weight) not in where


# the authors' fast3d/config/train.yaml, key by key
AUTHORS_TRAIN_YAML = {
    "eval_only": False, "annotation_root": "../annotations", "attn_maps_root": "../outputs/infer_attn_maps",
    "output_dir": "outputs", "seed": 42, "train_tags": "scanrefer#scan2cap#scanqa#sqa3d#multi3dref",
    "val_tags": "scanrefer#scan2cap#scanqa#sqa3d#multi3dref", "use_ori_attn_maps": False,
    "use_mentioned_oids_in_answers": True, "use_spatial_dec": True, "train_text_encoder": True,
    "train_batch_size": 64, "eval_batch_size": 64, "num_workers": 16, "gradient_accumulation_steps": 1,
    "max_epoch": 50, "warmup_epochs": 0.1, "val_interval": 1.0, "logging_steps": 1, "eval_train_set": False,
    "text_lr": 0.00008, "lr": 0.0008, "weight_decay": 0.01, "min_lr_multi": 0.001, "max_grad_norm": 5.0,
}


def test_authors_yaml_gives_the_defaults():
    cfg = TrainConfig(**config_from_mapping(AUTHORS_TRAIN_YAML))
    default = TrainConfig()
    for name in ("seed", "train_sets", "val_sets", "target_key", "train_text_encoder", "batch_size", "epochs",
                 "warmup_epochs", "lr", "text_lr", "weight_decay", "min_lr_multi", "max_grad_norm"):
        assert getattr(cfg, name) == getattr(default, name), name
    assert cfg.targets_root == "../outputs/infer_attn_maps" and cfg.num_workers == 16
    assert TrainConfig(**config_from_mapping({"use_ori_attn_maps": True})).target_key == "a_map_ori"
    assert TrainConfig(select_on="val").selected_on == AUTHORS_VAL_LABEL
    with pytest.raises(ValueError, match="predict"):
        config_from_mapping({"eval_only": True})
    with pytest.raises(ValueError, match="unknown key 'lr_rate'"):
        config_from_mapping({"lr_rate": 1})
    with pytest.raises(ValueError, match="select_on"):
        TrainConfig(select_on="test")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gapdata"))
    return root, write_data_root(root)


def test_dataset_reads_the_authors_layout(data_root):
    root, paths = data_root
    ann = paths["annotations"]
    feats = SceneFeatures(os.path.join(ann, "scannet_mask3d_uni3d_feats.pt"),
                          os.path.join(ann, "scannet_mask3d_videofeats.pt"), n_obj=6)
    sets = load_split(ann, "scanrefer#scanqa", "train", feats, paths["targets"])
    assert sorted(sets) == ["scanqa", "scanrefer"] and len(sets["scanqa"]) == 24
    item = sets["scanqa"][7]
    with open(os.path.join(ann, "scanqa_train.json")) as f:
        anno = json.load(f)[7]
    assert item["index"] == 7 and item["prompt"] == anno["prompt"]
    assert item["key"] == annotation_keys("scanqa", json.load(open(os.path.join(ann, "scanqa_train.json"))))[7]
    raw = torch.load(os.path.join(ann, "scannet_mask3d_uni3d_feats.pt"))
    scene = item["scene_id"]
    for o in range(6):  # raw features, zero rows for slots without features
        k = f"{scene}_{o:02}"
        assert torch.equal(item["obj_feats"][o], raw[k] if k in raw else torch.zeros(8))
    attrs = torch.load(os.path.join(ann, "scannet_mask3d_train_attributes.pt"))
    assert torch.equal(item["locs"], attrs[scene]["locs"])
    # authors' target files (no keys) match by annotation index
    recs = torch.load(os.path.join(paths["targets"], "infer_attn_maps_train_scanqa.pt"))
    authors = [{k: v for k, v in r.items() if k != "key"} for r in recs]
    torch.save(authors, os.path.join(root, "authors.pt"))
    from shared.datasets.fast3d_gap import GapDataset

    with open(os.path.join(ann, "scanqa_train.json")) as f:
        annos = json.load(f)
    ds = GapDataset("scanqa", annos, feats, attrs, authors, "a_map_ori")
    assert torch.equal(ds[7]["target"], recs[7]["a_map_ori"])
    with pytest.raises(ValueError, match="2 of 24 samples have no target"):
        GapDataset("scanqa", annos, feats, attrs, authors[:-2])
    bad = dict(attrs)
    bad[scene] = {"locs": attrs[scene]["locs"][:5]}
    with pytest.raises(ValueError, match=r"locs: scene .* \(6, 6\)"):
        GapDataset("scanqa", annos, feats, bad, authors)[7]
    batch = GapCollator(_Tok())([ds[0], ds[1]])
    assert batch["obj_feats"].shape == (2, 6, 8) and batch["target"].shape == (2, 6)


class _Tok:
    model_max_length = 512

    def __call__(self, prompts, return_tensors, padding):
        n = max(len(p) for p in prompts)
        ids = torch.tensor([[ord(c) for c in p] + [0] * (n - len(p)) for p in prompts])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def test_split_by_scene_holds_out_whole_scenes(data_root):
    root, paths = data_root
    ann = paths["annotations"]
    feats = SceneFeatures(os.path.join(ann, "scannet_mask3d_uni3d_feats.pt"),
                          os.path.join(ann, "scannet_mask3d_videofeats.pt"), n_obj=6)
    sets = load_split(ann, "scanrefer#scanqa", "train", feats, paths["targets"])
    kept, held, scenes = split_by_scene(sets, 0.25, seed=0)
    assert len(scenes) == 1
    for name in sets:
        k = {kept[name].scene_of(i) for i in range(len(kept[name]))}
        h = {held[name].scene_of(i) for i in range(len(held[name]))}
        assert h == set(scenes) and not (k & h) and len(kept[name]) + len(held[name]) == len(sets[name])
    assert split_by_scene(sets, 0.25, seed=0)[2] == scenes
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_by_scene(sets, 1.0, seed=0)
