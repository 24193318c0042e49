"""``shared.datasets.llava3d``: LLaVA-3D's files, scene subsets, prompts and the calibration sample.

Prompts are checked against literal strings written by hand from ``llava/conversation.py`` (``conv_llava_v1``)
and ``llava/eval/model_{scanqa,scan2cap}.py``, and against the checkout's own ``conv_templates["llava_v1"]``
when LLaVA-3D's source is available (``tests/hosts/upstream.py``; skipped otherwise).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from shared.datasets import llava3d as d

FIX = Path(__file__).parent / "fixtures" / "llava_3d"
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")


def _layout(tmp_path: Path) -> Path:
    ann = tmp_path / "playground" / "data" / "annotations"
    ann.mkdir(parents=True)
    for f in FIX.glob("llava*"):
        (ann / f.name).write_text(f.read_text())
    return tmp_path


def test_load_task_reads_upstream_names_and_layout(tmp_path):
    root = _layout(tmp_path)
    scanqa = d.load_task("scanqa", root)
    assert [r["question_id"] for r in scanqa] == ["val-scene0011-0", "val-scene0011-1", "val-scene0063-0",
                                                 "val-scene0999-0"]
    assert scanqa[0]["answers"] == ["brown chair", "chair"] and scanqa[0]["scene_id"] == "scene0011_00"
    assert scanqa[0]["video_path"] == str(root / "playground/data/LLaVA-3D-Pretrain/scannet/scene0011_00")
    sqa = d.load_task("sqa3d", root / "playground" / "data")
    assert [r["type"] for r in sqa] == [0, 1, 1, 2, 5] and sqa[0]["answers"] == ["three"]
    cap = d.load_task("scan2cap", root)
    assert cap[0]["answer"].startswith("This is a brown") and len(cap[0]["boxes"]) == 1
    with pytest.raises(FileNotFoundError, match="data_root"):
        d.load_task("scanqa", tmp_path / "nowhere")


def test_scene_subsets_as_in_the_unofficial_code():
    s19, s22 = d.SCENE_SUBSETS["adatoken_public19"], d.SCENE_SUBSETS["adatoken_public22"]
    assert len(set(s19)) == 19 and len(set(s22)) == 22 and set(s19) < set(s22)
    assert set(s22) - set(s19) == {"scene0063_00", "scene0077_00", "scene0196_00"}
    recs = d.load_qa("scanqa", FIX / "llava-3d-scanqa_val_question.json")
    assert [r["scene_id"] for r in d.filter_scenes(recs, "adatoken_public19")] == ["scene0011_00"] * 2
    assert [r["scene_id"] for r in d.filter_scenes(recs, "adatoken_public22")] == ["scene0011_00"] * 2 + ["scene0063_00"]
    assert d.filter_scenes(recs, "full") == recs
    with pytest.raises(ValueError, match="subset"):
        d.filter_scenes(recs, "public32")


def test_qa_prompt_by_hand():
    rec = d.load_qa("sqa3d", FIX / "llava-3d-sqa3d_test_question.json")[0]
    p = d.build_prompt(rec, "sqa3d")
    assert p.prompt == f"{SYSTEM} USER: <image>\nI am facing the desk. What is on my left? ASSISTANT:"
    assert p.cur_prompt == "I am facing the desk. What is on my left?" and not p.special and p.clicks == []
    assert d.build_prompt(rec, "sqa3d", mm_use_im_start_end=True).prompt.startswith(
        f"{SYSTEM} USER: <im_start><image><im_end>\nI am")


def test_compat_adatoken_drops_the_situation():
    orig = d.load_qa("sqa3d", FIX / "v1_balanced_questions_test_scannetv2.json",
                     FIX / "v1_balanced_sqa_annotations_test_scannetv2.json")
    assert orig[0]["text"] == "I am facing the desk. What is on my left?"  # situation + " " + question
    assert orig[0]["answers"] == ["three"] and [r["type"] for r in orig] == [0, 2]  # from the first word
    assert d.build_prompt(orig[0], "sqa3d", compat="adatoken").prompt == f"{SYSTEM} USER: <image>\nWhat is on my left? ASSISTANT:"
    assert d.build_prompt(orig[0], "sqa3d").cur_prompt == orig[0]["text"]
    assert d.build_prompt(orig[0], "scanqa", compat="adatoken").cur_prompt == orig[0]["text"]  # SQA3D only
    joined = d.load_qa("sqa3d", FIX / "llava-3d-sqa3d_test_question.json")[0]
    with pytest.raises(ValueError, match="original SQA3D question file"):
        d.build_prompt(joined, "sqa3d", compat="adatoken")
    with pytest.raises(ValueError, match="compat"):
        d.build_prompt(joined, "sqa3d", compat="leo")


def test_scan2cap_prompt_and_clicks_by_hand():
    rec = d.load_scan2cap(FIX / "llava-3d-scan2cap_val.json")[0]
    p = d.build_prompt(rec, "scan2cap")
    assert p.prompt == f"{SYSTEM} USER: <image>\nDescribe the object at <boxes> in the room. ASSISTANT:"
    assert p.clicks == [[1.235, -0.988, 0.5]] and p.special
    assert p.recorded_prompt == "Describe the object at <boxes> in the room."  # upstream: cur_prompt[8:]
    two = dict(rec, boxes=[[1.23456, 0, 0, 1, 1, 1], [-2.0004, 3.14159, 1.0, 1, 1, 1]])
    p2 = d.build_prompt(two, "scan2cap")
    assert "object at <boxes>, <boxes> in" in p2.prompt and p2.clicks == [[1.235, 0.0, 0.0], [-2.0, 3.142, 1.0]]


def test_template_equals_the_checkouts_llava_v1():
    pytest.importorskip("transformers")
    from tests.hosts import upstream

    tree = upstream.tree_or_skip("LLaVA-3D")
    spec = importlib.util.spec_from_file_location("l3d_conversation", tree.path / "llava" / "conversation.py")
    conv_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv_mod)
    conv = conv_mod.conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is it?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == f"{d.LLAVA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"


def _train_files(tmp_path):
    scanqa = [{"question_id": f"train-{s}-{i}", "scene_id": s, "question": f"q{i} in {s}?", "answers": ["a"]}
              for s in ("scene0000_00", "scene0001_00", "scene0011_00") for i in range(10)]
    sqa = {"questions": [{"question_id": 100 + i, "scene_id": "scene0002_00", "situation": "I sit.",
                          "question": f"Which {i}?"} for i in range(10)]}
    a, b = tmp_path / "ScanQA_v1.0_train.json", tmp_path / "v1_balanced_questions_train_scannetv2.json"
    a.write_text(json.dumps(scanqa))
    b.write_text(json.dumps(sqa))
    return [str(a), str(b)]


def test_calibration_records(tmp_path):
    files = _train_files(tmp_path)
    recs = d.calibration_records(files, k=12, seed=3, exclude_scenes=["scannet/scene0011_00"])
    assert len(recs) == 12 and len({r["question_id"] for r in recs}) == 12
    assert all(r["scene_id"] != "scene0011_00" for r in recs)
    assert recs == d.calibration_records(files, k=12, seed=3, exclude_scenes=["scene0011_00"])  # deterministic
    assert recs != d.calibration_records(files, k=12, seed=4, exclude_scenes=["scene0011_00"])
    pool = [r["question_id"] for r in d.calibration_records(files, k=30, seed=0, exclude_scenes=["scene0011_00"])]
    assert [r["question_id"] for r in recs] == [q for q in pool if q in {r["question_id"] for r in recs}]  # file order
    sqa = [r for r in recs if r["task"] == "sqa3d"]
    assert sqa and all(r["text"] == f"I sit. {r['question']}" and r["type"] == 4 for r in sqa)
    assert all(r["task"] == "scanqa" and r["text"] == r["question"] for r in recs if r not in sqa)
    with pytest.raises(ValueError, match="only 30 questions"):
        d.calibration_records(files, k=31, exclude_scenes=["scene0011_00"])
    with pytest.raises(ValueError, match="k"):
        d.calibration_records(files, k=0)


def test_decoding_kwargs():
    assert d.decoding_kwargs() == {"do_sample": False, "temperature": 0.0, "top_p": None, "num_beams": 1,
                                   "max_new_tokens": 512, "use_cache": True}
    assert d.decoding_kwargs(0.2)["do_sample"] is True
    assert d.generate_inputs({"input_ids": 1, "images": 2}) == {"inputs": 1, "images": 2}
