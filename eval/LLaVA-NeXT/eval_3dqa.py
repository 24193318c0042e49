#!/usr/bin/env python
"""ScanQA / OpenEQA evaluation of LLaVA-OneVision with SeGPruner (or unpruned).

    python eval/LLaVA-NeXT/eval_3dqa.py scanqa  --model-path M --data-root ScanQA_v1.0_val.json \\
        --frames-root frames12 --tokens 64 --ratio 0.0 --lam 0.5 --output-dir runs/scanqa_t64
    python eval/LLaVA-NeXT/eval_3dqa.py openeqa --model-path M --data-root open-eqa-v0.json \\
        --frames-root openeqa12 --judge openai::gpt-4-1106-preview --output-dir runs/oeqa_t64
    python eval/LLaVA-NeXT/eval_3dqa.py table runs/scanqa_full runs/scanqa_t64 --out runs/table

Per question: the scene's frames (``--frames-root/<scene_id>`` for ScanQA, ``/<episode_history>``
for OpenEQA; ScanNet layout as ``eval/LLaVA-NeXT/sample_frames.py`` writes it, or a raw OpenEQA
episode folder) are sampled to ``--num-views`` (12; released rule ids[round(i(n-1)/k)] when a
folder holds more), put on the tower's square canvas with depth and intrinsics registered
(``shared.datasets.prepare_views``; ``--padding mean`` = upstream OV, ``black`` = the released
script), back-projected to per-token patch centroids, and answered with the prompt of the released
scripts: ``"<image>" * V + question + " \\n\\n"`` in the ``qwen_1_5`` template, greedy,
``--max-new-tokens`` 128 (``--answer-instruction`` appends "Answer the question using a single word
or phrase."). Predictions are stored as generated (whitespace stripped).

Backends: ``llava`` (default) loads the patched LLaVA-NeXT fork with ``load_pretrained_model``
(``--attn auto``: flash_attention_2 if importable, else sdpa) and prunes through its patch points
(host ``llava_next``). ``hf`` loads a transformers >= 4.53 ``LlavaOnevisionForConditionalGeneration``
folder (tokenizer and image processor from the same folder; host ``hf_onevision``). Either way the
model answers inside ``shared.prune(model, *methods, views=[scene geometry])``: any method the host
provides the needs of runs (``--method``/``--pre``, ``python -m shared.apps.matrix``), e.g. SeGPruner,
FastV, PyramidDrop, or SeGPruner stacked with an in-LLM method.

This file holds only what is 3D QA's: the questions, scenes and prompt, the model call and the
metrics. Methods by name, ``--preset paper`` (the released protocol: black NEAREST padding, released
frame rule and patch geometry, float16, T = 64 per view, r = 0, λ = 0.5), run settings, resume,
sharding, progress, ``--on-error skip`` and the accounting (``shared.accounting`` over the session's
measured tokens per layer, ``--dims auto``: the model's own) come from ``shared.evalkit``.

Output (``--out``): ``scanqa.jsonl`` / ``openeqa.jsonl`` (one record per question, written and
fsync'ed as produced; a rerun skips finished questions and cuts a line truncated by a crash),
``run.json`` (settings; a rerun with different settings is refused), ``summary.json``,
``table.md``/``table.csv`` (with the protocol each row ran under). Each record keeps the frames, the
tokens kept per view, the visual tokens each decoder layer saw, text tokens, N_avg, the prefill
TFLOPs (FastV convention and exact), the generate latency and the time to the first token. A question
that fails (a missing scene, a broken frame) stops the run, or with ``--on-error skip`` is recorded
with its reason and counted in the table. Sharding: under ``torchrun``/``accelerate launch`` each rank
takes a contiguous slice (``shared.runio``), writes its own shard file, and rank 0 merges them in
dataset order after a barrier; without a launcher rendezvous, run ``--merge-only`` once all shards
are done.

Metrics: ScanQA: the official scorer (EM@1, BLEU-1..4, METEOR, ROUGE-L, CIDEr; Java) plus LEO's
cleaned/refined EM (``shared.metrics.qa``; ``--use-java no``: non-official pure-Python tokenizer, no
METEOR, labelled). OpenEQA: LLM-Match with ``--judge openai:<base_url>:<model>`` (empty base_url =
api.openai.com; key from $OPENAI_API_KEY) or ``--judge hf:<local model folder>``, cached; without a
judge, offline EM/F1 proxies labelled "not LLM-Match".
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

try:
    import shared
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    import shared
from shared import evalkit  # noqa: E402
from shared.accounting import DIMS, DecoderDims  # noqa: E402
from shared.hosts.selection import SceneGeometry, geometry_from_views  # noqa: E402

TASKS = ("scanqa", "openeqa")
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant."
ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
DEFAULT_FILES = {"scanqa": ("ScanQA_v1.0_val.json", "qa/ScanQA_v1.0_val.json"),
                 "openeqa": ("open-eqa-v0.json", "data/open-eqa-v0.json")}
#: ``--preset paper``: SeGPruner's released protocol (eval scripts of intcomp/SegPruner): T = 64 per view,
#: r = 0, λ = 0.5, per view; black NEAREST padding; the released frame rule and patch geometry; float16.
PRESETS = {
    "paper": {"method": "segpruner", "method_args": ["tokens=64", "important_ratio=0.0", "lam=0.5", "mode=per_view"],
              "padding": "black", "frame_rule": "released", "compat_released_geometry": True, "dtype": "float16"},
}


# ------------------------------------------------------------------------------------- prompt
def build_prompt(question: str, n_views: int, instruction: bool = False) -> str:
    """The released scripts' prompt: qwen_1_5 template, V image tokens, question, " \\n\\n"."""
    q = f"{question}\n{ANSWER_INSTRUCTION}" if instruction else question
    message = "<image>" * n_views + f"{q} \n\n"
    return f"{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class QAItem:
    question_id: str
    scene_key: str  # folder under --frames-root
    question: str
    answers: List[str]
    extra: Dict[str, Any]


def question_file(task: str, data_root: str) -> str:
    if os.path.isfile(data_root):
        return data_root
    tried = [os.path.join(data_root, f) for f in DEFAULT_FILES[task]]
    for p in tried:
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"--data-root: no question file; tried {data_root} and {tried}")


def load_items(task: str, path: str) -> List[QAItem]:
    from shared.datasets import load_openeqa, load_scanqa

    if task == "scanqa":
        return [QAItem(q.question_id, q.scene_id, q.question, list(q.answers or ()), {}) for q in load_scanqa(path)]
    items = []
    for q in load_openeqa(path):
        items.append(QAItem(q.question_id, q.episode_history, q.question, list(q.answers),
                            {"answer": q.answer, "extra_answers": None if q.extra_answers is None else list(q.extra_answers),
                             "category": q.category, "source": q.source}))
    return items


@dataclasses.dataclass
class LoadedScene:
    prep: Any  # shared.datasets.PreparedViews
    geometry: Optional[SceneGeometry]
    frames: List[str]
    pose_fallback: List[str]


class SceneLoader:
    """Reads, samples, squares and back-projects one scene's views; keeps the last few scenes."""

    def __init__(self, frames_root: str, num_views: int, rule: str, size: int, patch: int, grid: int,
                 padding: str, mode: Optional[str], compat: bool, keep: int = 4) -> None:
        self.frames_root, self.num_views, self.rule = frames_root, num_views, rule
        self.size, self.patch, self.grid, self.padding = size, patch, grid, padding
        self.mode, self.compat, self.keep = mode, compat, keep
        self._cache: Dict[str, LoadedScene] = {}
        self.short_scenes: List[str] = []

    def get(self, key: str) -> LoadedScene:
        if key not in self._cache:
            if len(self._cache) >= self.keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._load(key)
        return self._cache[key]

    def _load(self, key: str) -> LoadedScene:
        from shared.datasets import (list_openeqa_frames, list_scannet_frames, load_openeqa_episode,
                                     load_scannet_scene, prepare_views, sample_indices)
        from shared.geometry import check_poses

        d = os.path.join(self.frames_root, key)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--frames-root: no folder for scene {key!r}: {d}")
        scannet = os.path.isdir(os.path.join(d, "color"))
        ids = list_scannet_frames(d) if scannet else list_openeqa_frames(d)
        if len(ids) < self.num_views:
            self.short_scenes.append(key)
        idx = sample_indices(len(ids), self.num_views, self.rule, short="all")
        chosen = [ids[i] for i in idx]
        load = load_scannet_scene if scannet else load_openeqa_episode
        views = load(d, frame_ids=chosen, on_invalid_pose="keep")
        prep = prepare_views(views, size=self.size, padding=self.padding)
        ok = check_poses(prep.cam2world, on_invalid="exclude")
        fallback = [f for f, good in zip(prep.frame_ids, ok.tolist()) if not good]
        geometry = None
        if self.mode is not None:
            if self.mode == "per_view" and fallback:
                # per-view selection only uses distances inside a view, which a rigid pose does not
                # change: a view without a usable pose is back-projected in its camera frame
                poses = prep.cam2world.clone()
                poses[~ok] = torch.eye(4, dtype=poses.dtype)
                prep = dataclasses.replace(prep, cam2world=poses)
            geometry = geometry_from_views(prep, grid=self.grid, patch=self.patch, compat_released=self.compat,
                                           on_invalid_pose="exclude")
        return LoadedScene(prep=prep, geometry=geometry, frames=list(prep.frame_ids), pose_fallback=fallback)


# ------------------------------------------------------------------------------------- backends
@dataclasses.dataclass
class Answer:
    text: str
    forward: Any  # the session's record of the prefill (shared.ForwardRecord)
    new_tokens: int
    latency_s: float
    ttft_s: Optional[float]


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timer(sync: Callable[[], None]):
    """A logits processor that records when the first token's logits exist (end of the prefill)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        def __init__(self) -> None:
            self.t: Optional[float] = None

        def __call__(self, input_ids, scores):
            if self.t is None:
                sync()
                self.t = time.perf_counter()
            return scores

    ft = FirstToken()
    return ft, LogitsProcessorList([ft])


def resolve_attn(attn: str) -> str:
    if attn != "auto":
        return attn
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "sdpa"


def _dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


class LlavaBackend:
    """The patched LLaVA-NeXT fork (``load_pretrained_model``); pruning through its patch points."""

    host = "llava_next"

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        os.environ.setdefault("LLAVA_STRICT_IMPORT", "1")  # surface import errors of the patched model code
        try:
            import llava.model.llava_arch as arch
            from llava.constants import IMAGE_TOKEN_INDEX
            from llava.conversation import conv_templates
            from llava.mm_utils import get_model_name_from_path, tokenizer_image_token
            from llava.model.builder import load_pretrained_model
        except ImportError as exc:
            raise ImportError("--backend llava: needs the LLaVA-NeXT package (bash eval/setup_env.sh LLaVA-NeXT)") from exc
        if not hasattr(arch, "pruner_glue"):
            raise RuntimeError("--backend llava: LLaVA-NeXT is not patched; run scripts/apply_patches.sh LLaVA-NeXT")
        if args.dtype == "float32":
            raise ValueError("--dtype: the LLaVA-NeXT loader supports float16 or bfloat16")
        name = args.model_name or get_model_name_from_path(args.model_path)
        if "qwen" not in name.lower():
            raise ValueError(f"--model-name: LLaVA-NeXT picks the Qwen2 class by name; {name!r} has no 'qwen' "
                             "(pass --model-name llava-onevision-qwen2-7b-ov)")
        # one process: let accelerate spread the model ("auto"); one process per GPU: keep it on this rank's GPU
        single = int(os.environ.get("WORLD_SIZE", "1")) == 1
        device_map: Any = "auto" if device.type == "cuda" and args.device == "auto" and single else {"": str(device)}
        self.tokenizer, self.model, self.processor, _ = load_pretrained_model(
            args.model_path, None, name, device_map=device_map, torch_dtype=args.dtype,
            attn_implementation=resolve_attn(args.attn), multimodal=True)
        self.model.eval()
        self.conv_templates, self.image_token, self.tokenize = conv_templates, IMAGE_TOKEN_INDEX, tokenizer_image_token
        cfg = self.model.get_vision_tower().config
        self.size, self.patch = int(cfg.image_size), int(cfg.patch_size)
        self.device, self.dtype = next(self.model.parameters()).device, _dtype(args.dtype)
        self.dims = DecoderDims.from_config(self.model.config)

    def answer(self, question: str, scene: "LoadedScene", methods: Sequence[Any], args) -> Answer:
        from PIL import Image

        v = len(scene.prep.images)
        conv = copy.deepcopy(self.conv_templates["qwen_1_5"])
        q = f"{question}\n{ANSWER_INSTRUCTION}" if args.answer_instruction else question
        conv.append_message(conv.roles[0], "<image>" * v + f"{q} \n\n")
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        if prompt != build_prompt(question, v, args.answer_instruction):
            raise RuntimeError("prompt: LLaVA-NeXT's qwen_1_5 template differs from build_prompt; update build_prompt")
        ids = self.tokenize(prompt, self.tokenizer, self.image_token, return_tensors="pt")[None].to(self.device)
        images = [self.processor.preprocess(Image.fromarray(im), return_tensors="pt")["pixel_values"][0]
                  .to(self.device, self.dtype) for im in scene.prep.images]
        sizes = [(t.width, t.height) for t in scene.prep.image_transforms]
        sync = _sync(self.device)
        first, processors = _timer(sync)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode(), shared.prune(self.model, *methods, host=self.host, views=[scene.geometry],
                                                  patch=self.patch) as session:
            sync()
            t0 = time.perf_counter()
            out = self.model.generate(ids, images=images, image_sizes=sizes, modalities=["image"], do_sample=False,
                                      num_beams=1, max_new_tokens=args.max_new_tokens, pad_token_id=pad,
                                      logits_processor=processors)
            sync()
            t1 = time.perf_counter()
        text = self.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()
        return Answer(text, session.last, int(out.shape[1]), t1 - t0, None if first.t is None else first.t - t0)


class HFBackend:
    """A transformers LlavaOnevisionForConditionalGeneration folder (host ``hf_onevision``)."""

    host = "hf_onevision"

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration

        major = int(transformers.__version__.split(".")[0])
        kw = {"dtype" if major >= 5 else "torch_dtype": _dtype(args.dtype)}
        attn = resolve_attn(args.attn)
        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            args.model_path, local_files_only=True, attn_implementation=attn, **kw).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(args.model_path, local_files_only=True)
        self.processor = AutoImageProcessor.from_pretrained(args.model_path, local_files_only=True)
        vc = self.model.config.vision_config
        self.size, self.patch = int(vc.image_size), int(vc.patch_size)
        self.device, self.dtype = device, _dtype(args.dtype)
        self.dims = DecoderDims.from_config(self.model.config.text_config)

    def inputs(self, question: str, scene: "LoadedScene", instruction: bool) -> Dict[str, torch.Tensor]:
        from PIL import Image

        from shared.hosts.hf_onevision import multiview_inputs

        prompt = build_prompt(question, len(scene.prep.images), instruction)
        return multiview_inputs(self.model, self.tokenizer, self.processor, prompt,
                                [Image.fromarray(im) for im in scene.prep.images])

    def answer(self, question: str, scene: "LoadedScene", methods: Sequence[Any], args) -> Answer:
        inputs = self.inputs(question, scene, args.answer_instruction)
        sync = _sync(self.device)
        first, processors = _timer(sync)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode(), shared.prune(self.model, *methods, host=self.host, views=[scene.geometry],
                                                  patch=self.patch) as session:
            sync()
            t0 = time.perf_counter()
            new = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=args.max_new_tokens,
                                      pad_token_id=pad, logits_processor=processors)[0, inputs["input_ids"].shape[1]:]
            sync()
            t1 = time.perf_counter()
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Answer(text, session.last, int(new.shape[0]), t1 - t0, None if first.t is None else first.t - t0)


# ------------------------------------------------------------------------------------ benchmark
class QABenchmark(evalkit.Benchmark):
    """ScanQA or OpenEQA: a job per question, answered from its scene's views."""

    def __init__(self, args: argparse.Namespace, items: List[QAItem], methods: Sequence[Any]) -> None:
        self.name, self.title = args.task, {"scanqa": "ScanQA", "openeqa": "OpenEQA"}[args.task]
        self.args, self.items, self.methods = args, items, list(methods)
        self.backend: Any = None
        self.loader: Optional[SceneLoader] = None
        self.out_dir = args.out

    def jobs(self) -> List[evalkit.Job]:
        return [evalkit.Job([it.question_id], payload=it, label=it.scene_key) for it in self.items]

    def attach(self, backend: Any) -> None:
        a = self.args
        self.backend = backend
        geo = [m for m in self.methods if "geometry" in m.needs()]
        mode = getattr(geo[0], "mode", "per_scene") if geo else None
        self.loader = SceneLoader(a.frames_root, a.num_views, a.frame_rule, backend.size, backend.patch,
                                  backend.size // backend.patch, a.padding, mode, a.compat_released_geometry)

    def run(self, job: evalkit.Job) -> evalkit.JobOutput:
        it: QAItem = job.payload
        scene = self.loader.get(it.scene_key)
        ans = self.backend.answer(it.question, scene, self.methods, self.args)
        grid = (self.backend.size // self.backend.patch) ** 2
        pre = ans.forward.pre_llm[0] if ans.forward is not None and ans.forward.pre_llm else None
        rec: Dict[str, Any] = {evalkit.KEY: it.question_id, "question_id": it.question_id, "scene_id": it.scene_key,
                               "question": it.question, "prediction": ans.text, "answers": it.answers}
        if self.args.task == "openeqa":
            rec.update({k: it.extra[k] for k in ("answer", "extra_answers", "category", "source")})
        rec.update({
            "frames": scene.frames, "views": len(scene.frames),
            "kept_per_view": pre["per_view"] if pre else [grid] * len(scene.frames),
            "new_tokens": ans.new_tokens, "latency_s": ans.latency_s, "ttft_s": ans.ttft_s,
            "pose_fallback": scene.pose_fallback,
        })
        return evalkit.JobOutput([rec], ans.forward)

    def metrics(self, records: List[Dict[str, Any]]) -> Dict[str, Any]:
        out = task_metrics(self.args.task, records, self.args, self.out_dir)
        grid = self.args.grid_tokens
        kept = evalkit.mean_of([{"k": sum(r["kept_per_view"]) / r["views"]} for r in records], "k")
        out["kept_per_view"] = kept
        out["reduction_pct"] = None if kept is None or not grid else 100.0 * (1.0 - kept / grid)
        out["latency_s"] = evalkit.mean_of(records, "latency_s")
        out["ttft_s"] = evalkit.mean_of(records, "ttft_s")
        return out


# ------------------------------------------------------------------------------------- metrics
def parse_judge(spec: str, device: str = "cuda"):
    """``openai:<base_url>:<model>`` (empty base_url = api.openai.com) or ``hf:<local folder>``."""
    from shared.metrics.openeqa import HFJudge, OpenAIJudge

    if spec.startswith("openai:"):
        rest = spec[len("openai:"):]
        if ":" not in rest:
            raise ValueError(f"--judge: expected openai:<base_url>:<model>, got {spec!r}")
        url, model = rest.rsplit(":", 1)
        return OpenAIJudge(url or None, model)
    if spec.startswith("hf:"):
        return HFJudge(spec[3:], device=device)
    raise ValueError(f"--judge: expected openai:<base_url>:<model> or hf:<path>, got {spec!r}")


def task_metrics(task: str, records: List[Dict[str, Any]], args: argparse.Namespace, out_dir: str) -> Dict[str, Any]:
    if task == "scanqa":
        from shared.metrics.qa import java_available, scanqa_scores

        if any(not r["answers"] for r in records):
            return {"note": "no reference answers (test split); predictions only"}
        use_java = java_available() if args.use_java == "auto" else args.use_java == "yes"
        return scanqa_scores({r["question_id"]: r["prediction"] for r in records},
                             {r["question_id"]: r["answers"] for r in records}, use_java=use_java)
    from shared.metrics.openeqa import llm_match, offline_scores, score_to_percent

    recs = [{"question_id": r["question_id"], "question": r["question"], "answer": r["answer"],
             "extra_answers": r["extra_answers"], "prediction": r["prediction"]} for r in records]
    groups = {"All": [r["question_id"] for r in records]}
    for src, label in (("scannet", "ScanNet"), ("hm3d", "HM3D")):
        ids = [r["question_id"] for r in records if r["source"] == src]
        if ids:
            groups[label] = ids
    if args.judge:
        res = llm_match(recs, parse_judge(args.judge, args.judge_device),
                        cache_path=os.path.join(out_dir, "llm_match_cache.json"))
        out = {"metric": "LLM-Match", "judge": res["judge"], "n": res["n"]}
        for label, ids in groups.items():
            out[f"LLM-Match {label}"] = score_to_percent([res["scores"][str(q)] for q in ids])
        return out
    out = {"metric": "offline proxy", "n": len(recs)}
    by_id = {r["question_id"]: r for r in recs}
    for label, ids in groups.items():
        res = offline_scores([by_id[q] for q in ids])
        out[f"proxy-EM {label}"], out[f"proxy-F1 {label}"], out["label"] = res["proxy-EM"], res["proxy-F1"], res["label"]
    return out


# --------------------------------------------------------------------------------------- tables
def table(summaries: Sequence[Dict[str, Any]]):
    """Header, rows and footnotes of the paper-style table for runs of one task."""
    task = summaries[0]["settings"]["task"]
    notes: List[str] = []
    if task == "scanqa":
        keys = ["EM@1", "EM@1-refined", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
        header = ["Method", "Protocol", "Tokens/view", "Reduction %"] + keys
    else:
        groups = ["ScanNet", "HM3D", "All"]
        header = ["Method", "Protocol", "Tokens/view", "Reduction %"] + groups
    header += ["N_avg", "Prefill TFLOPs", "Latency s", "TTFT s", "Skipped"]
    rows = []
    for s in summaries:
        if s["settings"]["task"] != task:
            raise ValueError(f"runs: mixes {task} and {s['settings']['task']} results; make one table per task")
        b = s["benchmarks"][task]
        m, e = b["metrics"], b["efficiency"]
        row = [s["settings"]["label"], s["settings"]["protocol"], evalkit.fmt(m.get("kept_per_view"), 1),
               evalkit.fmt(m.get("reduction_pct"), 1)]
        if task == "scanqa":
            for k in keys:
                v = m.get(k, m.get(k + " (non-official)"))
                if k not in m and v is not None:
                    notes.append(f"{k}: pycocoevalcap with the pure-Python tokenizer (non-official)")
                row.append(evalkit.fmt(v))
        else:
            name = "LLM-Match" if m.get("metric") == "LLM-Match" else "proxy-EM"
            for g in groups:
                row.append(evalkit.fmt(m.get(f"{name} {g}")))
            if m:
                notes.append(f"OpenEQA: {m.get('judge', m.get('label'))}")
        row += [evalkit.fmt(e["n_avg"], 1), evalkit.fmt(e["tflops"]), evalkit.fmt(m.get("latency_s"), 3),
                evalkit.fmt(m.get("ttft_s"), 3), str(b["skipped"])]
        rows.append(row)
    dims = summaries[0]["settings"]["dims"]
    notes.append(f"Prefill TFLOPs at the model's dims ({dims[2]} layers, d={dims[0]}, m={dims[1]}), 4nd²+2n²d+2ndm "
                 "per layer over the measured tokens per layer; N_avg: visual tokens (one newline per view included) "
                 "averaged over layers; Reduction = 1 − kept/grid tokens per view")
    notes.append("Protocol: 'paper' = SeGPruner's released protocol (--preset paper), '*' = with flags overridden, "
                 "custom = the corrected defaults")
    return header, rows, sorted(set(notes), key=notes.index)


# ------------------------------------------------------------------------------------- driver
def question_file_of(args: argparse.Namespace) -> str:
    return question_file(args.task, args.data_root)


def settings(args: argparse.Namespace, methods: Sequence[Any], questions: str) -> Dict[str, Any]:
    """Every setting that changes the results (run.json: a resume with other values is refused)."""
    keys = ("task", "backend", "model_name", "num_views", "frame_rule", "padding", "compat_released_geometry",
            "answer_instruction", "max_new_tokens", "dtype", "attn", "limit", "seed", "protocol")
    d: Dict[str, Any] = {k: getattr(args, k) for k in keys}
    d.update(model_path=os.path.abspath(args.model_path), questions=os.path.abspath(questions),
             frames_root=os.path.abspath(args.frames_root), methods=evalkit.method_settings(methods),
             label="LLaVA-OV" + (" (unpruned)" if not methods else " + " + evalkit.method_label(methods)))
    return d


def _recorded_dims(out: str) -> Optional[List[int]]:
    path = Path(out) / "run.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("dims")


def _todo(out: str, bench: QABenchmark, info: Any) -> int:
    """Questions of this rank's shard without a result yet."""
    from shared.runio import ResultWriter, shard_path, shard_slice

    path = shard_path(Path(out) / f"{bench.name}.jsonl", info.rank, info.world_size)
    mine = shard_slice(bench.jobs(), info.rank, info.world_size)
    if not path.exists():
        return len(mine)
    with ResultWriter(path, key=evalkit.KEY) as w:
        return sum(1 for j in mine if j.keys[0] not in w.done)


def evaluate(args: argparse.Namespace) -> int:
    methods = evalkit.methods_from_args(args)
    questions = question_file_of(args)
    items = load_items(args.task, questions)
    if args.limit is not None:
        items = items[: args.limit]
    if not items:
        raise SystemExit("--data-root: no questions to evaluate")
    bench = QABenchmark(args, items, methods)
    info = shared.runio.dist_info()
    if args.device == "auto":
        device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    run_settings = settings(args, methods, questions)
    dims: Optional[List[int]] = None if args.dims == "auto" else _dims_list(DIMS[args.dims])
    if not args.merge_only and _todo(args.out, bench, info):
        backend = (LlavaBackend if args.backend == "llava" else HFBackend)(args, device)
        bench.attach(backend)
        dims = dims or _dims_list(backend.dims)
    dims = dims or _recorded_dims(args.out)
    if dims is None:
        raise SystemExit(f"--out: {args.out} holds no run to merge or finish; run the evaluation first")
    run_settings["dims"] = dims
    runner = evalkit.Run(args.out, run_settings, [bench], evalkit.Accounting(DecoderDims(*dims), "fastv"),
                         on_error=args.on_error, progress=not args.no_progress)
    runner.prepare()
    if not args.merge_only:
        runner.evaluate()
        if bench.loader is not None and bench.loader.short_scenes:
            print(f"note: {len(bench.loader.short_scenes)} scenes had fewer than {args.num_views} frames (all used): "
                  f"{bench.loader.short_scenes[:5]}")
        if info.world_size > 1:
            if not runner.barrier():
                print(f"rank {info.rank}: shard written; run again with --merge-only once every rank has finished")
                return 0
            if not info.is_main:
                return 0
    if args.skip_metrics:
        return 0
    args.grid_tokens = _grid_tokens(runner, bench)
    summary = runner.finish()
    header, rows, notes = table([summary])
    print(evalkit.write_table(header, rows, notes, Path(args.out) / "table"))
    return 0


def _dims_list(d: DecoderDims) -> List[int]:
    return [d.hidden, d.intermediate, d.layers, d.heads, d.kv_heads or d.heads]


def _grid_tokens(runner: evalkit.Run, bench: QABenchmark) -> Optional[int]:
    """Grid tokens per view: the tower's, else those of a finished run (each view = grid + 1 newline)."""
    if bench.backend is not None:
        return (bench.backend.size // bench.backend.patch) ** 2
    for r in runner.records(bench):
        if "skipped" not in r and r.get("visual_tokens") and r.get("views"):
            return int(r["visual_tokens"]) // int(r["views"]) - 1
    return None


def combine(args: argparse.Namespace) -> int:
    summaries = evalkit.load_summaries(args.runs)
    header, rows, notes = table(summaries)
    print(evalkit.write_table(header, rows, notes, Path(args.out) / "table"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    for task in TASKS:
        p = sub.add_parser(task, help=f"evaluate on {task}")
        p.add_argument("--model-path", required=True, help="local model folder")
        p.add_argument("--model-name", help="llava backend: name for load_pretrained_model (default: folder name)")
        p.add_argument("--backend", choices=("llava", "hf"), default="llava")
        p.add_argument("--data-root", required=True, help="question JSON, or the folder holding it")
        p.add_argument("--frames-root", required=True, help="folder of per-scene frame folders")
        p.add_argument("--out", required=True, help="run directory")
        evalkit.add_method_args(p)
        p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="the paper's released protocol")
        p.add_argument("--num-views", type=int, default=12)
        p.add_argument("--frame-rule", choices=("released", "linspace"), default="released")
        p.add_argument("--padding", choices=("mean", "black"), default="mean",
                       help="mean: upstream OV pad-then-resize; black: the released resize_and_pad (NEAREST)")
        p.add_argument("--compat-released-geometry", action="store_true",
                       help="patch centroids as released: missing depth counted as the camera centre")
        p.add_argument("--answer-instruction", action="store_true", help=f"append {ANSWER_INSTRUCTION!r}")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--limit", type=int, help="first N questions only")
        p.add_argument("--seed", type=int, default=0, help="torch's global seed")
        p.add_argument("--device", default="auto", help="auto: cuda:<LOCAL_RANK> if available, else cpu")
        p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
        p.add_argument("--attn", choices=("auto", "sdpa", "eager", "flash_attention_2"), default="auto")
        p.add_argument("--dims", default="auto", choices=("auto",) + tuple(DIMS),
                       help="decoder dims of the TFLOPs (auto: the model's config)")
        p.add_argument("--on-error", default="raise", choices=evalkit.runner.ON_ERROR,
                       help="skip: record a failing question (e.g. a missing scene) with the reason and go on")
        p.add_argument("--merge-only", action="store_true", help="merge the shard files and compute the metrics only")
        p.add_argument("--skip-metrics", action="store_true")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--use-java", choices=("auto", "yes", "no"), default="auto", help="scanqa: official Java tokenizer/METEOR")
        p.add_argument("--judge", help="openeqa: openai:<base_url>:<model> or hf:<local folder>")
        p.add_argument("--judge-device", default="cuda", help="openeqa: device of an hf: judge")
    t = sub.add_parser("table", help="one paper-style table from several finished runs")
    t.add_argument("runs", nargs="+", help="run directories of finished runs (same task)")
    t.add_argument("--out", required=True)
    return ap


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.task == "table":
        return args
    sub = ap._subparsers._group_actions[0].choices[args.task]  # noqa: SLF001 - the task's own defaults
    args.protocol, _ = evalkit.apply_preset(args, sub, PRESETS, args.preset)
    for flag in ("num_views", "max_new_tokens"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')}: expected a positive int")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit: expected a positive int")
    try:
        evalkit.methods_from_args(args)  # every method validates its fields
    except ValueError as exc:
        ap.error(str(exc))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.task == "table":
        return combine(args)
    return evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
