"""eval/LLaVA-NeXT/eval_3dqa.py end to end, offline: a tiny random LLaVA-OneVision saved as a transformers
folder (byte-level tokenizer built with `tokenizers`, PIL image processor), synthetic ray-cast scenes
written in ScanNet layout, ScanQA/OpenEQA question files, --backend hf on CPU.

(LlavaOnevisionProcessor itself cannot be built here: its video processor needs torchvision, which
this environment lacks; the driver only needs the tokenizer and the image processor.)
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the driver's hf backend is tested on transformers 5.x", allow_module_level=True)
pytest.importorskip("PIL")
pytest.importorskip("pycocoevalcap.bleu.bleu")

from shared.datasets import make_room_scene, write_scannet_layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE, GRID = 56, 4
_spec = importlib.util.spec_from_file_location("eval_3dqa", ROOT / "eval" / "LLaVA-NeXT" / "eval_3dqa.py")
ev = importlib.util.module_from_spec(_spec)
sys.modules["eval_3dqa"] = ev  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(ev)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>", "<video>"]})
    return fast


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    base = tmp_path_factory.mktemp("eval3dqa")
    model_dir = base / "tiny-llava-onevision-qwen2"
    tok = tiny_tokenizer()
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=SIZE, patch_size=14, vision_use_head=False)
    tc = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=272, max_position_embeddings=4096,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                               vision_feature_select_strategy="full", image_grid_pinpoints=[[SIZE, SIZE], [SIZE, 2 * SIZE]])
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    LlavaOnevisionImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                    image_grid_pinpoints=[[SIZE, SIZE], [SIZE, 2 * SIZE]]).save_pretrained(model_dir)

    frames = base / "frames"
    for seed, scene in enumerate(("scene0000_00", "scene0001_00")):
        write_scannet_layout(make_room_scene(n_views=10, height=42, width=56, seed=seed), str(frames), scene)
    write_scannet_layout(make_room_scene(n_views=6, height=42, width=56, seed=2), str(frames / "scannet-v0"),
                         "002-scannet-scene0709_00")
    write_scannet_layout(make_room_scene(n_views=6, height=42, width=56, seed=3), str(frames / "hm3d-v0"),
                         "000-hm3d-BFRyYbPCCPE")
    scanqa = base / "ScanQA_v1.0_val.json"
    scanqa.write_text(json.dumps([
        {"question_id": f"q{i}", "scene_id": s, "question": q, "answers": a, "object_ids": [1], "object_names": ["x"]}
        for i, (s, q, a) in enumerate([("scene0000_00", "What is on the floor?", ["box"]),
                                       ("scene0000_00", "What color is the wall?", ["white", "gray"]),
                                       ("scene0001_00", "Where is the box?", ["in corner"])])]))
    openeqa = base / "open-eqa-v0.json"
    openeqa.write_text(json.dumps([
        {"question_id": "e0", "question": "What is left of the box?", "answer": "a wall", "category": "spatial",
         "episode_history": "scannet-v0/002-scannet-scene0709_00"},
        {"question_id": "e1", "question": "How many boxes?", "answer": "two", "extra_answers": ["2"],
         "category": "counting", "episode_history": "hm3d-v0/000-hm3d-BFRyYbPCCPE"}]))
    return dict(base=base, model=str(model_dir), frames=str(frames), scanqa=str(scanqa), openeqa=str(openeqa), tok=tok)


def argv(w, out, *extra, task="scanqa"):
    return [task, "--backend", "hf", "--model-path", w["model"], "--data-root", w[task], "--frames-root", w["frames"],
            "--out", str(out), "--num-views", "4", "--max-new-tokens", "3", "--device", "cpu",
            "--dtype", "float32", "--attn", "eager", "--use-java", "no", "--no-progress", *extra]


def seg(*fields):
    return ("--method", "segpruner", "--method-args", *fields)


T6 = seg("tokens=6", "important_ratio=0.5", "lam=0.5")


def records(out, task="scanqa"):
    return [json.loads(line) for line in (Path(out) / f"{task}.jsonl").read_text().splitlines()]


def summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


@pytest.fixture(scope="module")
def pruned_run(world):
    out = world["base"] / "run_t6"
    assert ev.main(argv(world, out, *T6)) == 0
    return out


def tiny_tflops(tokens_per_layer):
    """Σ over the tiny decoder's layers of 4nd² + 2n²d + 2ndm (d = 64, m = 128), in TFLOPs."""
    d, m = 64, 128
    return sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens_per_layer) / 1e12


def test_scanqa_run_records_tokens_flops_and_metrics(world, pruned_run):
    recs = records(pruned_run)
    assert [r["question_id"] for r in recs] == ["q0", "q1", "q2"]
    # released sampler on 10 frames (ids 0, 10, ..., 90): round(i·9/4) for i < 4 -> 0, 2, 4, 7
    assert recs[0]["frames"] == ["0", "20", "40", "70"]
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<image><image><image><image>What is on the floor? \n\n<|im_end|>\n<|im_start|>assistant\n")
    n_text = len(world["tok"](prompt, add_special_tokens=False)["input_ids"]) - 4
    r = recs[0]
    assert r["kept_per_view"] == [6, 6, 6, 6] and r["visual_per_layer"] == [4 * 7] * 2
    assert r["visual_tokens"] == 4 * 17 and r["text_tokens"] == n_text
    assert r["tflops"] == pytest.approx(tiny_tflops([28 + n_text] * 2), rel=1e-12)
    assert r["tflops_exact"] > r["tflops"] and r["pruning_ratio"] == pytest.approx(1 - 28 / 68)
    assert r["latency_s"] > 0 and 0 < r["ttft_s"] <= r["latency_s"] and 1 <= r["new_tokens"] <= 3
    assert r["answers"] == ["box"] and isinstance(r["prediction"], str)
    b = summary(pruned_run)["benchmarks"]["scanqa"]
    m = b["metrics"]
    assert b["n"] == 3 and b["skipped"] == 0 and m["official"] is False and "BLEU-1 (non-official)" in m
    assert m["kept_per_view"] == 6 and m["reduction_pct"] == pytest.approx(100 * (1 - 6 / 16))
    table = (pruned_run / "table.md").read_text()
    assert "| LLaVA-OV + SeGPruner(tokens=6, important_ratio=0.5) | custom | 6.0 | 62.5 |" in table
    assert (pruned_run / "table.csv").read_text().splitlines()[0].startswith("Method,Protocol,Tokens/view")


def test_keeping_every_token_matches_the_unpruned_run(world):
    base, full = world["base"] / "run_none", world["base"] / "run_all"
    assert ev.main(argv(world, base)) == 0
    assert ev.main(argv(world, full, *seg("tokens=16", "important_ratio=1.0"))) == 0
    a, b = records(base), records(full)
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    assert [r["visual_per_layer"] for r in a] == [r["visual_per_layer"] for r in b] == [[4 * 17] * 2] * 3
    assert a[0]["kept_per_view"] == [16] * 4
    out = world["base"] / "table"
    assert ev.main(["table", str(base), str(world["base"] / "run_t6"), "--out", str(out)]) == 0
    lines = (out / "table.md").read_text().splitlines()
    assert lines[2].startswith("| LLaVA-OV (unpruned) | custom | 16.0 | 0.0 |")
    assert lines[3].startswith("| LLaVA-OV + SeGPruner(tokens=6")


def test_any_method_the_host_supports_runs_and_stacks(world):
    out = world["base"] / "run_fastv"
    assert ev.main(argv(world, out, "--pre", "segpruner", "--pre-args", "tokens=6", "important_ratio=0.5",
                        "--method", "fastv", "--method-args", "layer=1", "keep=10")) == 0
    r = records(out)[0]
    assert r["kept_per_view"] == [6] * 4 and r["visual_per_layer"] == [28, 10]
    with pytest.raises(SystemExit):  # a bad field is refused naming it
        ev.main(argv(world, world["base"] / "bad", "--method", "fastv", "--method-args", "layer=1", "keep=-3"))
    with pytest.raises(ValueError, match=r"^method: prumerge needs 'cls_token'"):
        ev.main(argv(world, world["base"] / "bad2", "--method", "prumerge"))


def test_paper_preset_is_recorded_and_printed(world):
    out = world["base"] / "run_paper"
    assert ev.main(argv(world, out, "--preset", "paper", "--method-args", "tokens=6", "important_ratio=0.0",
                        "lam=0.5", "mode=per_view", "--dtype", "float32")) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["padding"], run["frame_rule"], run["compat_released_geometry"]) == ("black", "released", True)
    assert run["protocol"] == "paper*"  # --method-args and --dtype override the preset's
    assert "| paper* |" in (out / "table.md").read_text()


def test_resume_after_an_interrupted_run_without_duplicates(world, pruned_run, monkeypatch):
    out = world["base"] / "run_resume"
    calls = []
    original = ev.HFBackend.answer

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(ev.HFBackend, "answer", flaky)
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv(world, out, *T6))
    first = (out / "scanqa.jsonl").read_text()
    assert len(first.splitlines()) == 1
    with open(out / "scanqa.jsonl", "a") as fh:  # a crash in the middle of writing the next line
        fh.write('{"key": "q1", "predic')
    calls.clear()
    monkeypatch.setattr(ev.HFBackend, "answer", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with pytest.warns(RuntimeWarning, match="truncated record"):
        assert ev.main(argv(world, out, *T6)) == 0
    assert len(calls) == 2  # q0 was not redone
    text = (out / "scanqa.jsonl").read_text()
    assert text.startswith(first)
    recs = records(out)
    assert [r["question_id"] for r in recs] == ["q0", "q1", "q2"]
    assert [r["prediction"] for r in recs] == [r["prediction"] for r in records(pruned_run)]
    with pytest.raises(ValueError, match=r"^out: .*other settings .*'methods'"):
        ev.main(argv(world, out, *seg("tokens=5", "important_ratio=0.5", "lam=0.5")))
    with pytest.raises(ValueError, match=r"^out: .*other settings .*'seed': \(0, 1\)"):
        ev.main(argv(world, out, *T6, "--seed", "1"))
    with pytest.raises(ValueError, match=r"^out: .*other settings .*'dtype'"):
        ev.main(argv(world, out, *T6, "--dtype", "bfloat16"))


def test_on_error_skip_records_the_reason_and_counts_it(world, tmp_path):
    bad = tmp_path / "scanqa.json"
    rows = json.loads(Path(world["scanqa"]).read_text())
    rows.insert(1, dict(rows[0], question_id="qx", scene_id="scene9999_00"))  # no such scene folder
    bad.write_text(json.dumps(rows))
    w = dict(world, scanqa=str(bad))
    with pytest.raises(FileNotFoundError, match="^--frames-root: no folder for scene 'scene9999_00'"):
        ev.main(argv(w, tmp_path / "raise", *T6))
    out = tmp_path / "skip"
    assert ev.main(argv(w, out, *T6, "--on-error", "skip")) == 0
    recs = records(out)
    assert [r["key"] for r in recs] == ["q0", "qx", "q1", "q2"]
    assert recs[1]["skipped"].startswith("FileNotFoundError: --frames-root: no folder for scene 'scene9999_00'")
    b = summary(out)["benchmarks"]["scanqa"]
    assert b["n"] == 3 and b["skipped"] == 1 and "qx" in b["skipped_reasons"]
    assert (out / "table.md").read_text().splitlines()[2].rstrip().endswith("| 1 |")


def test_sharded_run_merges_in_dataset_order(world, pruned_run, monkeypatch, capsys):
    out = world["base"] / "run_sharded"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "0" if rank == 0 else "1")
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        assert ev.main(argv(world, out, *T6)) == 0
        assert "run again with --merge-only" in capsys.readouterr().out
    assert not (out / "scanqa.jsonl").exists()
    assert [r["question_id"] for r in records_of(out / "scanqa.rank00000-of-00002.jsonl")] == ["q0", "q1"]
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    assert ev.main(argv(world, out, *T6, "--merge-only")) == 0
    merged = records(out)
    assert [r["question_id"] for r in merged] == ["q0", "q1", "q2"]
    assert [r["prediction"] for r in merged] == [r["prediction"] for r in records(pruned_run)]
    assert summary(out)["benchmarks"]["scanqa"]["n"] == 3


def records_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_openeqa_per_scene_with_offline_proxies(world):
    out = world["base"] / "run_openeqa"
    assert ev.main(argv(world, out, *seg("tokens=20", "important_ratio=0.25", "mode=per_scene"), task="openeqa")) == 0
    recs = records(out, "openeqa")
    assert [(r["question_id"], r["source"]) for r in recs] == [("e0", "scannet"), ("e1", "hm3d")]
    assert recs[1]["answers"] == ["two", "2"] and recs[1]["extra_answers"] == ["2"]
    assert recs[0]["extra_answers"] is None  # absent, not an empty list: the judge's plain prompt
    for r in recs:
        assert sum(r["kept_per_view"]) == 20 and r["visual_per_layer"][0] == 20 + 4
    m = summary(out)["benchmarks"]["openeqa"]["metrics"]
    assert m["metric"] == "offline proxy" and "not LLM-Match" in m["label"]
    assert {"proxy-EM All", "proxy-EM ScanNet", "proxy-EM HM3D"} <= set(m)
    assert "| Method | Protocol | Tokens/view | Reduction % | ScanNet | HM3D | All |" in (out / "table.md").read_text()


def test_an_empty_extra_answers_list_stays_a_list(tmp_path):
    """OpenEQA's judge uses its extra-answers prompt whenever the field exists, even empty."""
    f = tmp_path / "q.json"
    f.write_text(json.dumps([{"question_id": "a", "question": "Q?", "answer": "x", "category": "c",
                              "episode_history": "scannet-v0/s", "extra_answers": []},
                             {"question_id": "b", "question": "Q?", "answer": "x", "category": "c",
                              "episode_history": "scannet-v0/s"}]))
    items = ev.load_items("openeqa", str(f))
    assert items[0].extra["extra_answers"] == [] and items[1].extra["extra_answers"] is None


def test_prompt_and_judge_parsing():
    assert ev.build_prompt("Q?", 2, instruction=True).endswith(
        "user\n<image><image>Q?\nAnswer the question using a single word or phrase. \n\n<|im_end|>\n<|im_start|>assistant\n")
    j = ev.parse_judge("openai:http://localhost:8000/v1:qwen2.5-72b")
    assert (j.base_url, j.model) == ("http://localhost:8000/v1", "qwen2.5-72b")
    assert ev.parse_judge("openai::gpt-4-1106-preview").base_url == "https://api.openai.com/v1"
    with pytest.raises(ValueError, match="^--judge: "):
        ev.parse_judge("gpt4")
    with pytest.raises(SystemExit):
        ev.parse_args(["scanqa", "--model-path", "m", "--data-root", "d", "--frames-root", "f", "--out", "o",
                       "--method", "segpruner", "--method-args", "tokens=8", "important_ratio=1.5"])
