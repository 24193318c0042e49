"""``python -m shared.adatoken calibrate --source llava3d`` (``llava3d_source`` + ``run_calibration`` + ``fit_state``)
on the tiny REAL LLaVA-3D of ``llava_3d_build`` and its synthetic scenes.

Only the checkpoint load is replaced: ``shared.datasets.llava3d.load_llava3d`` returns the tiny model, tokenizer
and processor (as ``load_pretrained_model`` would). The question files are written here in LLaVA-3D's layout
under ``<tmp>/playground/data/annotations`` (ScanQA-train and SQA3D-train on scenes 0 and 1; a ScanQA-val file
on scene 2, whose questions the calibration must leave out). References, independent of the calibration glue:

- inputs from ``llava_3d_build.synthetic_scene_batch`` (not ``shared.datasets.llava3d.build_inputs``);
- (a) ``span_block_sums`` run directly on the decoder with the ``inputs_embeds`` of the model's own
  ``prepare_inputs_labels_for_multimodal`` and SYS/SPA/PRM = [0, s), [s, s + N), [s + N, n) where s is the
  ``<image>`` id and N the voxel count of ``encode_rgbd_videos`` (not the host's published mask);
- (b) the logits of ``model(...)`` without a session (``test_llava_3d_fork.py`` shows that equals the
  unpatched fork);
- (c) the per-layer counts k_i = max(1, floor(O(i) N)) with a running minimum, from the written JSON's retention.

Skips without the LLaVA-3D submodule (no snapshot is shared). Run: ``PYTHONPATH=.venvs/tf-4.37.2
.venvs/yolo/bin/python -m pytest tests/hosts/test_llava_3d_calibrate.py``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from . import upstream
from .llava_3d_build import require_environment as _environment

K = 3
STEPS = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tree = upstream.tree_or_skip("LLaVA-3D")
    _environment()
    from . import llava_3d_build as lb

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("l3d_calib")
    model, tok, proc = lb.build_tiny_llava3d(root, tree, layers=4, views=4, scenes=3)
    ann = root / "playground" / "data" / "annotations"
    q = lb.QUESTIONS[:4]
    scanqa = [{"question_id": f"train-{i}", "video": f"scannet/{lb.scene_id(i % 2)}", "text": t}
              for i, t in enumerate(q)]
    sqa = [{"question_id": 500 + i, "video": f"scannet/{lb.scene_id((i + 1) % 2)}", "text": f"{q[0]} {t}"}
           for i, t in enumerate(q[1:])]
    val = [{"question_id": "val-0", "video": f"scannet/{lb.scene_id(2)}", "text": q[0]}]
    # a train question on the eval scene: the default exclusion (eval files under --data-root) must drop it
    scanqa.append({"question_id": "train-held-out", "video": f"scannet/{lb.scene_id(2)}", "text": q[1]})
    (ann / "llava-3d-scanqa_train_question.json").write_text(json.dumps(scanqa))
    (ann / "llava-3d-sqa3d_train_question.json").write_text(json.dumps(sqa))
    (ann / "llava-3d-scanqa_val_question.json").write_text(json.dumps(val))
    yield {"lb": lb, "root": root, "model": model, "tok": tok, "proc": proc}
    torch.set_num_threads(n)


def counts_by_hand(retention, n: int) -> List[int]:
    out: List[int] = []
    for o in retention:
        k = max(1, int(np.floor(o * n)))
        out.append(k if not out else min(out[-1], k))
    return out


def _reference(env, rec):
    """The record's inputs (builder), its prefill embeds, spans from the voxel features, and stock logits."""
    from shared.methods.adatoken_calibration import span_block_sums

    lb, model = env["lb"], env["model"]
    batch = lb.synthetic_scene_batch(env["tok"], env["proc"], [str(env["root"] / "data" / rec["video"])],
                                     [rec["text"]])
    ids = batch["inputs"]
    with torch.no_grad():
        logits = model(input_ids=ids, images=batch["images"], depths=batch["depths"], poses=batch["poses"],
                       intrinsics=batch["intrinsics"]).logits
        embeds = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, batch["images"],
                                                            batch["depths"], batch["poses"], batch["intrinsics"],
                                                            None)[4]
        feats, offsets = model.encode_rgbd_videos(batch["images"], batch["depths"], batch["poses"],
                                                  batch["intrinsics"])
    s, n = int((ids[0] == -200).nonzero()), int(offsets[0])
    length = embeds.shape[1]
    assert length == ids.shape[1] - 1 + n and torch.equal(embeds[0, s:s + n], feats)
    sums = span_block_sums(model.get_model(), embeds, (0, s), (s, s + n), (n + s, length), chunk=5)
    return {"batch": batch, "logits": logits, "sums": sums, "n": n, "sys": s, "length": length}


def test_llava3d_calibration_on_the_real_host(env, tmp_path, monkeypatch):
    import shared
    from shared.adatoken import calibrate
    from shared.datasets import llava3d as data
    from shared.methods.adatoken import AdaToken3D

    model, root = env["model"], env["root"]
    calls = []

    def fake_load(model_path, model_base=None, device="cuda", dtype=None, data_root=None):
        calls.append({"model_path": model_path, "device": device, "dtype": dtype, "data_root": data_root})
        return env["tok"], model, {"image": None, "video": env["proc"]}

    monkeypatch.setattr(data, "load_llava3d", fake_load)
    source = calibrate.llava3d_source(str(root / "llava-3d-tiny"), data_root=str(root), k=K, seed=0,
                                      device="cpu", dtype="float32", video_folder=str(root / "data"))
    assert len(source.records) == K
    assert all(r["scene_id"] != env["lb"].scene_id(2) for r in source.records)
    assert source.settings["prompts"] == K and source.settings["video_folder"] == str(root / "data")

    logits: List[torch.Tensor] = []
    hook = model.register_forward_hook(lambda _m, _a, out: logits.append(out.logits.detach().clone()))
    state_path = str(tmp_path / "state.jsonl")
    try:
        calibrate.run_calibration(source, state_path, chunk=5, stop_after=2, progress=False)
        state = calibrate.run_calibration(source, state_path, chunk=5, progress=False)  # resumes: the third only
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0]["data_root"] == str(root / "playground" / "data")
    assert calls[0]["device"] == "cpu" and calls[0]["dtype"] == torch.float32
    assert len(logits) == K and len(state.rows) == K
    rows = sorted(state.rows, key=lambda r: r["index"])
    assert [r["key"] for r in rows] == [str(r["question_id"]) for r in source.records]

    refs = [_reference(env, rec) for rec in source.records]
    for rec, row, got, ref in zip(source.records, rows, logits, refs):
        # (b) the calibrated forward is the stock forward
        assert torch.equal(got, ref["logits"]), rec["question_id"]
        # (a) the stored block sums are the decoder's, on the spans where the voxel features are
        s = ref["sums"]
        for name in ("spa_spa", "prm_spa", "spa_sys"):
            assert np.allclose(row[name], getattr(s, name), rtol=0, atol=1e-5), (name, row[name], getattr(s, name))
        assert (row["spa_rows"], row["prm_rows"]) == (ref["n"], ref["length"] - ref["sys"] - ref["n"])
        assert (row["sys_tokens"], row["length"]) == (ref["sys"], ref["length"])
        assert min(row["spa_spa"]) > 0 and min(row["prm_spa"]) > 0 and min(row["spa_sys"]) > 0

    # (c) the fit's schedule JSON drives AdaToken3D on the host, per scene N
    schedules = calibrate.fit_state(state, [0.25])
    path = calibrate.write_schedules(schedules, str(tmp_path / "out"))[0]
    with open(path, encoding="utf-8") as fh:
        written = json.load(fh)
    bs = written["provenance"]["block_sums"]
    assert np.allclose(bs["spa_spa"], sum(np.asarray(r["sums"].spa_spa) for r in refs), rtol=0, atol=1e-5)
    assert bs["spa_rows"] == sum(r["n"] for r in refs)
    retention = written["retention"]
    assert len(retention) == 4 and retention[0] == 1.0 and retention[-1] == 0.25
    for ref in refs[:2]:
        n, batch = ref["n"], ref["batch"]
        with shared.prune(model, AdaToken3D(fitted=path), host="llava_3d") as session:
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
        vis = session.last.stats.visual[0].tolist()
        assert vis == counts_by_hand(retention, n) and vis[-1] < n
