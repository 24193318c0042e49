"""GAP training with accelerate (``shared.apps.fast3d_train``) on a tiny synthetic set.

Needs accelerate (``.venvs/yolo``) and transformers: ``PYTHONPATH=.venvs/tf-5.23.0 .venvs/yolo/bin/python -m
pytest tests/test_fast3d_train.py`` (scripts/test.sh; elsewhere the file skips, and fails with
``HOST_TESTS_REQUIRED=1``). The synthetic targets put the attention on the scene's "salient" objects
(``tests/fast3d_tiny.write_data_root``), which the tiny network learns in a few steps.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from tests.hosts.upstream import unavailable

_missing = [m for m in ("accelerate", "transformers") if importlib.util.find_spec(m) is None]


@pytest.fixture(autouse=True)
def _needs_accelerate():
    if _missing:
        unavailable(f"GAP training needs {_missing} (.venvs/yolo + PYTHONPATH=.venvs/tf-5.23.0)")


from shared.apps import fast3d_train  # noqa: E402
from shared.apps.fast3d_train import AUTHORS_VAL_LABEL, TrainConfig, predict, train  # noqa: E402
from shared.methods.fast3d_gap import gap_logits, load_gap  # noqa: E402
from tests.fast3d_tiny import tiny_gap_config, write_data_root, write_roberta  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a shared CPU: one intra-op thread avoids spinning thread pools (5x faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gap"))
    paths = write_data_root(root)
    roberta = write_roberta(os.path.join(root, "roberta"))
    return root, paths, roberta


def config(setup, out, **kw):
    root, paths, roberta = setup
    base = dict(annotation_root=paths["annotations"], targets_root=paths["targets"], roberta_path=roberta,
                output_dir=out, train_sets="scanrefer#scanqa", val_sets="scanrefer#scanqa", topk=(1, 3, 5),
                batch_size=8, eval_batch_size=16, num_workers=0, epochs=6, heldout_fraction=0.25,
                gap=dict(tiny_gap_config(dropout=0.1).to_dict(), head_dropout=0.0), lr=1e-2, text_lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def states(path):
    return torch.load(path, weights_only=True)["model_state_dict"]


def test_loss_falls_and_outputs(setup, tmp_path):
    out = str(tmp_path / "run")
    summary = train(config(setup, out))
    hist = summary["history"]
    assert len(hist) == 6 and hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert summary["selected_on"].startswith("heldout") and summary["metric"] == "heldout_scanrefer_topk_5_f1_score"
    best = torch.load(os.path.join(out, "gap_best.pth"), weights_only=True)
    assert best["selected_on"] == summary["selected_on"] and best["step"] == summary["best"]["step"]
    assert best["value"] == max(h["heldout_scanrefer_topk_5_f1_score"] for h in hist)
    held = json.load(open(os.path.join(out, "heldout_scenes.json")))
    assert len(held) == 1 and held[0].startswith("scene")

    # predict: the authors' inference format + the stable-key variant, equal to gap_logits
    root, paths, roberta = setup
    pred_dir = str(tmp_path / "pred")
    files = predict(os.path.join(out, "gap_best.pth"), roberta, paths["annotations"], "scanrefer", "val", pred_dir,
                    batch_size=5)
    by_index = torch.load(files["scanrefer"], weights_only=True)
    by_key = torch.load(files["scanrefer"][:-3] + ".by_key.pt", weights_only=True)
    annos = json.load(open(os.path.join(paths["annotations"], "scanrefer_mask3d_val.json")))
    assert sorted(by_index) == list(range(len(annos))) and len(by_key) == len(annos)
    model, tok = load_gap(os.path.join(out, "gap_best.pth"), roberta)
    attrs = torch.load(os.path.join(paths["annotations"], "scannet_mask3d_val_attributes.pt"))
    feats = torch.load(os.path.join(paths["annotations"], "scannet_mask3d_uni3d_feats.pt"))
    img = torch.load(os.path.join(paths["annotations"], "scannet_mask3d_videofeats.pt"))
    a = annos[3]
    rows = [[feats.get(f"{a['scene_id']}_{o:02}", torch.zeros(8)) for o in range(6)],
            [img.get(f"{a['scene_id']}_{o:02}", torch.zeros(8)) for o in range(6)]]
    ref = gap_logits(model, tok, [a["prompt"]], torch.stack(rows[0])[None], torch.stack(rows[1])[None],
                     attrs[a["scene_id"]]["locs"][None])[0]
    torch.testing.assert_close(by_index[3]["a_map"], ref, atol=1e-5, rtol=0)
    key = next(k for k, v in by_key.items() if v["index"] == 3)
    assert torch.equal(by_key[key]["a_map"], by_index[3]["a_map"])


def test_resume_mid_epoch_continues_exactly(setup, tmp_path):
    full = str(tmp_path / "full")
    train(config(setup, full, epochs=2))
    part = str(tmp_path / "part")
    first = train(config(setup, part, epochs=2, stop_after_steps=7))  # 5 steps per epoch: stops inside epoch 2
    assert first["steps"] == 7
    with open(os.path.join(part, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_7"
    with pytest.raises(ValueError, match="--resume auto"):
        train(config(setup, part, epochs=2))
    second = train(config(setup, part, epochs=2), resume="auto")
    assert second["steps"] == second["total_steps"] == 10
    a, b = states(os.path.join(full, "gap_last.pth")), states(os.path.join(part, "gap_last.pth"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    hist_full = [json.loads(x) for x in open(os.path.join(full, "metrics.jsonl"))]
    hist_part = [json.loads(x) for x in open(os.path.join(part, "metrics.jsonl"))]
    assert [h["step"] for h in hist_part] == [5, 10]
    for x, y in zip(hist_full, hist_part):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        train(config(setup, part, epochs=3), resume="auto")


def test_cli_authors_protocol_label(setup, tmp_path):
    out = str(tmp_path / "cli")
    cfg = config(setup, out, epochs=1, select_on="val")
    raw = {k: v for k, v in cfg.__dict__.items() if k not in ("output_dir",)}
    raw["topk"] = list(raw["topk"])
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    assert fast3d_train.main(["--config", str(path), "--output-dir", out]) == 0
    sel = json.load(open(os.path.join(out, "selection.json")))
    assert sel["selected_on"] == AUTHORS_VAL_LABEL and sel["metric"] == "val_scanrefer_topk_5_f1_score"
    assert torch.load(os.path.join(out, "gap_best.pth"), weights_only=True)["selected_on"] == AUTHORS_VAL_LABEL
    root, paths, roberta = setup
    scenes = tmp_path / "scenes.json"
    scenes.write_text(json.dumps(["scene0001_00"]))
    assert fast3d_train.main(["predict", "--checkpoint", os.path.join(out, "gap_best.pth"), "--roberta-path", roberta,
                              "--annotation-root", paths["annotations"], "--sets", "scanqa", "--split", "train",
                              "--scenes", str(scenes), "--name", "calib", "--out-dir", str(tmp_path / "p"),
                              "--device", "cpu"]) == 0
    got = torch.load(tmp_path / "p" / "infer_attn_maps_calib_scanqa.pt", weights_only=True)
    annos = json.load(open(os.path.join(paths["annotations"], "scanqa_train.json")))
    assert sorted(got) == [i for i, a in enumerate(annos) if a["scene_id"] == "scene0001_00"]
    scenes.write_text(json.dumps(["scene9999_00"]))
    with pytest.raises(ValueError, match="scenes"):
        fast3d_train.main(["predict", "--checkpoint", os.path.join(out, "gap_best.pth"), "--roberta-path", roberta,
                           "--annotation-root", paths["annotations"], "--sets", "scanqa", "--split", "train",
                           "--scenes", str(scenes), "--out-dir", str(tmp_path / "q"), "--device", "cpu"])
