"""``eval/LLaVA-3D/eval_llava3d.py`` end to end on a tiny random REAL LLaVA-3D and synthetic scenes.

The patched LLaVA-3D tree comes from ``tests/hosts/upstream.py`` (the submodule; LLaVA-3D has no snapshot, so
without the submodule, e.g. in CI, every test here skips with that reason). ``llava_3d_build`` builds the tiny
model from LLaVA-3D's own classes and writes posed RGB-D scenes in EmbodiedScan's layout; the question/answer
files are written here in LLaVA-3D's formats. Reference answers come from ``model.generate`` on inputs built
by ``llava_3d_build.synthetic_scene_batch`` (independent of ``shared.datasets.llava3d``), greedy.
Runs with transformers 4.37.2 and cv2 (``scripts/test.sh``: ``PYTHONPATH=.venvs/tf-4.37.2 .venvs/yolo/bin/python``).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from . import upstream
from .llava_3d_build import require_environment as _environment

ROOT = Path(__file__).resolve().parents[2]
NEW = 6  # new tokens per answer (upstream: 512; a random tiny model rarely stops early)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tree = upstream.tree_or_skip("LLaVA-3D")
    _environment()
    from . import llava_3d_build as lb

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("l3d_eval")
    model, tok, proc = lb.build_tiny_llava3d(root, tree, layers=4, views=4, scenes=2)
    spec = importlib.util.spec_from_file_location("eval_llava3d", ROOT / "eval" / "LLaVA-3D" / "eval_llava3d.py")
    drv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drv)
    ann = root / "playground" / "data" / "annotations"
    qs = lb.QUESTIONS[:4]
    scanqa = [{"question_id": f"q{i}", "video": f"scannet/{lb.scene_id(i % 2)}", "text": q} for i, q in enumerate(qs)]
    (ann / "llava-3d-scanqa_val_question.json").write_text(json.dumps(scanqa))
    (ann / "llava3d_scanqa_val_answer.json").write_text(json.dumps(
        [{"question_id": f"q{i}", "text": ["table", "chair"]} for i in range(len(qs))]))
    sqa = {"questions": [{"question_id": 10 + i, "scene_id": lb.scene_id(i % 2), "situation": "What is on the table?",
                          "question": q} for i, q in enumerate(qs[1:])]}
    (root / "sqa_questions.json").write_text(json.dumps(sqa))
    (root / "sqa_annotations.json").write_text(json.dumps(
        {"annotations": [{"question_id": 10 + i, "answers": [{"answer": "two"}]} for i in range(3)]}))
    box = [0.51234, -0.24567, 0.7771, 0.4, 0.4, 0.4]
    cap = [{"id": 100 + i, "video": f"scannet/{lb.scene_id(i)}", "target": {"boxes": [box]},
            "conversations": [{"value": "<video>\nDescribe the object at <boxes>."}, {"value": "a wooden box"}]}
           for i in range(2)]
    (ann / "llava-3d-scan2cap_val.json").write_text(json.dumps(cap))
    loaded = drv.Model(tok, model, {"image": None, "video": proc}, "llava-3d-tiny")  # as load_pretrained_model
    yield {"lb": lb, "drv": drv, "root": root, "model": model, "tok": tok, "proc": proc, "loaded": loaded,
           "questions": qs, "box": box}
    torch.set_num_threads(n)


def _run(env, out, *extra, task="scanqa", shard=None):
    drv = env["drv"]
    argv = [task, "--data-root", str(env["root"]), "--video-folder", str(env["root"] / "data"), "--out", str(out),
            "--max-new-tokens", str(NEW), "--dtype", "float32", "--no-progress", "--use-java", "no", *extra]
    args = drv.parse_args(argv, need_model=False)
    e = None if shard is None else {"RANK": str(shard[0]), "WORLD_SIZE": str(shard[1]), "LOCAL_RANK": "0",
                                    "LOCAL_WORLD_SIZE": "1"}
    return drv.evaluate(args, loaded=None if args.merge_only else env["loaded"], env=e)


def _preds(out, task="scanqa"):
    return [json.loads(line) for line in open(Path(out) / f"{task}_pred.jsonl")]


def _reference(env, video_index, question, clicks=None):
    lb = env["lb"]
    batch = lb.synthetic_scene_batch(env["tok"], env["proc"], [lb.scene_path(env["root"], video_index)], [question],
                                     clicks=clicks)
    with torch.inference_mode():
        ids = env["model"].generate(**batch, do_sample=False, num_beams=1, max_new_tokens=NEW, use_cache=True)
    return env["tok"].batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_scanqa_end_to_end_resume_and_shards(env, tmp_path):
    out = tmp_path / "one"
    assert _run(env, out) == 0
    preds = _preds(out)
    assert [p["question_id"] for p in preds] == ["q0", "q1", "q2", "q3"]
    assert set(preds[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    for i, p in enumerate(preds):
        assert p["prompt"] == env["questions"][i]
        assert p["text"] == _reference(env, i % 2, env["questions"][i])
    summary = json.loads((out / "summary.json").read_text())
    b = summary["benchmarks"]["scanqa"]
    assert b["n"] == 4 and set(b["metrics"]) >= {"[scanqa] EM1", "[scanqa] EM1_refined"}
    recs = [json.loads(line) for line in open(out / "scanqa.jsonl")]
    assert all(r["visual_per_layer"] == [r["visual_tokens"]] * 4 and r["visual_tokens"] > 0 for r in recs)
    assert "| LLaVA-3D (unpruned) | full / greedy |" in (out / "table.md").read_text()

    # resume: a cut last line is redone, nothing else
    lines = (out / "scanqa.jsonl").read_text().splitlines(keepends=True)
    (out / "scanqa.jsonl").write_text("".join(lines[:-1]) + lines[-1][:10])
    assert _run(env, out) == 0 and _preds(out) == preds

    # two shards (no rendezvous: each writes its file), then --merge-only == one process
    two = tmp_path / "two"
    for rank in (0, 1):
        assert _run(env, two, shard=(rank, 2)) == 0
    assert sorted(p.name for p in two.glob("scanqa.rank*")) == ["scanqa.rank00000-of-00002.jsonl",
                                                              "scanqa.rank00001-of-00002.jsonl"]
    assert _run(env, two, "--merge-only") == 0
    assert _preds(two) == preds

    with pytest.raises(ValueError, match="other settings"):
        _run(env, out, "--temperature", "0.2")


def test_compat_adatoken_sqa3d_and_a_pruning_method(env, tmp_path):
    files = ["--question-file", str(env["root"] / "sqa_questions.json"),
             "--answer-file", str(env["root"] / "sqa_annotations.json")]
    out = tmp_path / "ada"
    assert _run(env, out, *files, "--compat", "adatoken", task="sqa3d") == 0
    preds = _preds(out, "sqa3d")
    qs = env["questions"][1:]
    assert [p["prompt"] for p in preds] == list(qs)  # the situation is dropped
    assert [p["text"] for p in preds] == [_reference(env, i % 2, q) for i, q in enumerate(qs)]
    full = tmp_path / "full"
    assert _run(env, full, *files, task="sqa3d") == 0
    assert [p["prompt"] for p in _preds(full, "sqa3d")] == [f"What is on the table? {q}" for q in qs]
    m = json.loads((full / "summary.json").read_text())["benchmarks"]["sqa3d"]["metrics"]
    assert {f"[sqa3d] EM_type{t}" for t in range(6)} <= set(m)

    pruned = tmp_path / "fastv"
    assert _run(env, pruned, "--method", "fastv", "--method-args", "layer=2", "keep_ratio=0.5") == 0
    recs = [json.loads(line) for line in open(pruned / "scanqa.jsonl")]
    for r in recs:
        n = r["visual_tokens"]
        assert r["visual_per_layer"][:2] == [n, n] and all(v == int(n * 0.5) for v in r["visual_per_layer"][2:])
    assert "FastV" in (pruned / "table.md").read_text()


def test_scan2cap_clicks(env, tmp_path):
    out = tmp_path / "cap"
    assert _run(env, out, task="scan2cap") == 0
    preds = _preds(out, "scan2cap")
    assert [p["question_id"] for p in preds] == [100, 101] and all(p["answer"] == "a wooden box" for p in preds)
    assert preds[0]["prompt"] == "Describe the object at <boxes>."  # upstream records cur_prompt[8:]
    click = [[round(c, 3) for c in env["box"][:3]]]
    for i, p in enumerate(preds):
        assert p["text"] == _reference(env, i, "Describe the object at <boxes>.", clicks=click)


def test_help_needs_no_model():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's shared, no LLaVA-3D on the path
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "LLaVA-3D" / "eval_llava3d.py"), "sqa3d", "--help"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--compat" in r.stdout and "--scene-subset" in r.stdout
