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
(``--attn auto``: flash_attention_2 if importable, else sdpa); selection runs through patch P1.
``hf`` loads a transformers >= 4.53 ``LlavaOnevisionForConditionalGeneration`` folder (tokenizer and
image processor from the same folder) and selects with ``shared.hosts.hf_onevision``.

Output (``--output-dir``): ``predictions.jsonl`` (one record per question, written and fsync'ed as
produced; a rerun skips finished questions and cuts a line truncated by a crash), ``run.json``
(settings; a rerun with different settings is refused), ``metrics.json``, ``table.md``/``table.csv``.
Each record keeps the tokens kept per view, the visual/text tokens the LLM saw, the prefill TFLOPs
of those counts at Qwen2-7B dims (``shared.accounting``; 4nd²+2n²d+2ndm per layer, and the exact
GQA/SwiGLU count), the generate latency and the time to the first token (vision + selection +
prefill). Sharding: under ``torchrun``/``accelerate launch`` each rank takes a contiguous slice
(``shared.runio``), writes its own shard file, and rank 0 merges them in dataset order after a
barrier; without a launcher rendezvous, run ``--merge`` once all shards are done.

Metrics: ScanQA: the official scorer (EM@1, BLEU-1..4, METEOR, ROUGE-L, CIDEr; Java) plus LEO's
cleaned/refined EM (``shared.metrics.qa``; ``--use-java no``: non-official pure-Python tokenizer, no
METEOR, labelled). OpenEQA: LLM-Match with ``--judge openai:<base_url>:<model>`` (empty base_url =
api.openai.com; key from $OPENAI_API_KEY) or ``--judge hf:<local model folder>``, cached; without a
judge, offline EM/F1 proxies labelled "not LLM-Match".
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import glob
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

try:
    import shared  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from shared.accounting import CONVENTIONS, DIMS, Efficiency
from shared.hosts.selection import SceneGeometry, geometry_from_views, scene_context
from shared.methods.segpruner import MODES, SeGPruner
from shared.runio import ResultWriter, dist_info, merge_shards, read_results, shard_path

TASKS = ("scanqa", "openeqa")
PREDICTIONS = "predictions.jsonl"
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant."
ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
DEFAULT_FILES = {"scanqa": ("ScanQA_v1.0_val.json", "qa/ScanQA_v1.0_val.json"),
                 "openeqa": ("open-eqa-v0.json", "data/open-eqa-v0.json")}
#: run.json keys that change what is generated (a resumed run must match them)
RUN_KEYS = ("task", "backend", "model_path", "method", "tokens", "ratio", "lam", "mode", "normalizer", "num_views",
            "frame_rule", "padding", "compat_released_geometry", "answer_instruction", "max_new_tokens", "dtype",
            "questions")


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
                            {"answer": q.answer, "extra_answers": list(q.extra_answers) if q.extra_answers else None,
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
    visual_tokens: int
    text_tokens: int
    kept_per_view: List[int]
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
    """The patched LLaVA-NeXT fork (``load_pretrained_model``); selection through patch P1."""

    def __init__(self, args: argparse.Namespace, device: torch.device, stack: contextlib.ExitStack) -> None:
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
        from shared.hosts import llava_next

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
        self.session = stack.enter_context(llava_next.attach(self.model))

    def answer(self, question: str, scene: LoadedScene, pruner: Optional[SeGPruner], args) -> Answer:
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
        grid = self.size // self.patch
        sync = _sync(self.device)
        first, processors = _timer(sync)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ctx_manager = scene_context(pruner, [scene.geometry], grid=grid) if pruner else contextlib.nullcontext()
        with torch.inference_mode(), ctx_manager as ctx:
            sync()
            t0 = time.perf_counter()
            out = self.model.generate(ids, images=images, image_sizes=sizes, modalities=["image"], do_sample=False,
                                      num_beams=1, max_new_tokens=args.max_new_tokens, pad_token_id=pad,
                                      logits_processor=processors)
            sync()
            t1 = time.perf_counter()
        text = self.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()
        vis = self.session.visual_tokens[0]
        kept = ctx.last.per_view if pruner else [grid * grid] * v
        return Answer(text, vis, self.session.sequence_lengths[0] - vis, kept, int(out.shape[1]), t1 - t0,
                      None if first.t is None else first.t - t0)


class HFBackend:
    """A transformers LlavaOnevisionForConditionalGeneration folder; selection by shared.hosts.hf_onevision."""

    def __init__(self, args: argparse.Namespace, device: torch.device, stack: contextlib.ExitStack) -> None:
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

    def inputs(self, question: str, scene: LoadedScene, instruction: bool) -> Dict[str, torch.Tensor]:
        from PIL import Image

        from shared.hosts.hf_onevision import multiview_inputs

        prompt = build_prompt(question, len(scene.prep.images), instruction)
        return multiview_inputs(self.model, self.tokenizer, self.processor, prompt,
                                [Image.fromarray(im) for im in scene.prep.images])

    def answer(self, question: str, scene: LoadedScene, pruner: Optional[SeGPruner], args) -> Answer:
        from shared.hosts.hf_onevision import segprune_generate

        inputs = self.inputs(question, scene, args.answer_instruction)
        v, grid = len(scene.prep.images), self.size // self.patch
        sync = _sync(self.device)
        first, processors = _timer(sync)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        gen = dict(do_sample=False, num_beams=1, max_new_tokens=args.max_new_tokens, pad_token_id=pad,
                   logits_processor=processors)
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            if pruner is not None:
                res = segprune_generate(self.model, inputs, pruner, [scene.geometry], patch=self.patch, **gen)
                new = res.sequences[0]
            else:
                new = self.model.generate(**inputs, **gen)[0, inputs["input_ids"].shape[1]:]
            sync()
            t1 = time.perf_counter()
        if pruner is not None:
            vis, txt, kept = res.inputs.visual_tokens[0], res.inputs.text_tokens[0], res.inputs.records[0].per_view
        else:
            vis = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
            txt, kept = int(inputs["input_ids"].shape[1]) - vis, [grid * grid] * v
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Answer(text, vis, txt, kept, int(new.shape[0]), t1 - t0, None if first.t is None else first.t - t0)


# ------------------------------------------------------------------------------------- records
def prefill_tflops(visual: int, text: int) -> Tuple[float, float]:
    """(FastV-convention TFLOPs, exact GQA/SwiGLU TFLOPs) of a prefill at Qwen2-7B dims."""
    dims = DIMS["qwen2-7b"]
    out = []
    for conv in ("fastv", "exact"):
        out.append(Efficiency([visual] * dims.layers, text, dims, CONVENTIONS[conv]).tflops)
    return out[0], out[1]


def make_record(item: QAItem, task: str, scene: LoadedScene, ans: Answer) -> Dict[str, Any]:
    tf, tf_exact = prefill_tflops(ans.visual_tokens, ans.text_tokens)
    rec: Dict[str, Any] = {
        "question_id": item.question_id,
        "scene_id": item.scene_key,
        "question": item.question,
        "prediction": ans.text,
        "answers": item.answers,
    }
    if task == "openeqa":
        rec.update({k: item.extra[k] for k in ("answer", "extra_answers", "category", "source")})
    rec.update({
        "frames": scene.frames,
        "views": len(scene.frames),
        "kept_per_view": ans.kept_per_view,
        "visual_tokens": ans.visual_tokens,
        "text_tokens": ans.text_tokens,
        "prefill_tflops": tf,
        "prefill_tflops_exact": tf_exact,
        "new_tokens": ans.new_tokens,
        "latency_s": ans.latency_s,
        "ttft_s": ans.ttft_s,
        "pose_fallback": scene.pose_fallback,
    })
    return rec


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


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def efficiency_summary(records: Sequence[Dict[str, Any]], grid_tokens: int) -> Dict[str, Any]:
    kept = [sum(r["kept_per_view"]) / r["views"] for r in records]
    k = _mean(kept)
    return {
        "kept_per_view": k,
        "reduction_pct": None if k is None else 100.0 * (1.0 - k / grid_tokens),
        "grid_tokens_per_view": grid_tokens,
        "visual_tokens": _mean([r["visual_tokens"] for r in records]),
        "text_tokens": _mean([r["text_tokens"] for r in records]),
        "prefill_tflops": _mean([r["prefill_tflops"] for r in records]),
        "prefill_tflops_exact": _mean([r["prefill_tflops_exact"] for r in records]),
        "latency_s": _mean([r["latency_s"] for r in records]),
        "ttft_s": _mean([r["ttft_s"] for r in records]),
    }


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


def method_label(run: Dict[str, Any]) -> str:
    if run["method"] == "none":
        return "LLaVA-OV (unpruned)"
    return (f"+ SeGPruner T={run['tokens']} r={run['ratio']:g} λ={run['lam']:g} {run['mode']}"
            f"{' dx=' + run['normalizer'] if run['normalizer'] != 'first_centroid' else ''}")


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table(results: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]], List[str]]:
    """Header, rows and footnotes of the paper-style table for results of one task."""
    task = results[0]["run"]["task"]
    notes: List[str] = []
    if task == "scanqa":
        keys = ["EM@1", "EM@1-refined", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
        header = ["Method", "Tokens/view", "Reduction %"] + keys
    else:
        groups = ["ScanNet", "HM3D", "All"]
        header = ["Method", "Tokens/view", "Reduction %"] + groups
    header += ["LLM visual tokens", "Prefill TFLOPs", "Latency s", "TTFT s"]
    rows = []
    for res in results:
        if res["run"]["task"] != task:
            raise ValueError(f"runs: mixes {task} and {res['run']['task']} results; make one table per task")
        m, e = res["metrics"], res["efficiency"]
        row = [method_label(res["run"]), _fmt(e["kept_per_view"], 1), _fmt(e["reduction_pct"], 1)]
        if task == "scanqa":
            for k in keys:
                v = m.get(k, m.get(k + " (non-official)"))
                if k not in m and v is not None:
                    notes.append(f"{k}: pycocoevalcap with the pure-Python tokenizer (non-official)")
                row.append(_fmt(v))
        else:
            name = "LLM-Match" if m.get("metric") == "LLM-Match" else "proxy-EM"
            for g in groups:
                row.append(_fmt(m.get(f"{name} {g}")))
            notes.append(f"OpenEQA: {m.get('judge', m.get('label'))}")
        row += [_fmt(e["visual_tokens"], 1), _fmt(e["prefill_tflops"]), _fmt(e["latency_s"], 3), _fmt(e["ttft_s"], 3)]
        rows.append(row)
    notes.append("Prefill TFLOPs at Qwen2-7B dims (28 layers, d=3584, m=18944), 4nd²+2n²d+2ndm per layer; "
                 "LLM visual tokens include one newline per view; Reduction = 1 − kept/grid tokens per view")
    return header, rows, sorted(set(notes), key=notes.index)


def write_table(results: Sequence[Dict[str, Any]], out_dir: str) -> str:
    header, rows, notes = table(results)
    os.makedirs(out_dir, exist_ok=True)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"- {n}" for n in notes]
    text = "\n".join(md) + "\n"
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.join(out_dir, "table.csv"), "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return text


# ------------------------------------------------------------------------------------- driver
def run_settings(args: argparse.Namespace, questions: str) -> Dict[str, Any]:
    d = {k: getattr(args, k, None) for k in RUN_KEYS if k != "questions"}
    d["questions"] = os.path.abspath(questions)
    d["model_path"] = os.path.abspath(args.model_path)
    return d


def check_run_file(out_dir: str, settings: Dict[str, Any], write: bool) -> None:
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        diff = {k: (old.get(k), settings.get(k)) for k in RUN_KEYS if old.get(k) != settings.get(k)}
        if diff:
            raise SystemExit(f"--output-dir: {out_dir} holds predictions made with other settings {diff}; "
                             "use another --output-dir")
    elif write:
        os.makedirs(out_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(settings, fh, indent=1)
        os.replace(tmp, path)


def make_pruner(args: argparse.Namespace) -> Optional[SeGPruner]:
    if args.method == "none":
        return None
    return SeGPruner(tokens=args.tokens, important_ratio=args.ratio, lam=args.lam, mode=args.mode,
                     normalizer=args.normalizer)


def finish(args: argparse.Namespace, items: List[QAItem], out_dir: str, grid_tokens: int) -> Dict[str, Any]:
    """Metrics, metrics.json and the table over the complete predictions.jsonl."""
    records = read_results(os.path.join(out_dir, PREDICTIONS), key="question_id")
    by_id = {r["question_id"]: r for r in records}
    missing = [it.question_id for it in items if it.question_id not in by_id]
    if missing:
        raise SystemExit(f"{PREDICTIONS}: {len(missing)} questions have no prediction yet (e.g. {missing[:3]}); "
                         "rerun to finish them")
    ordered = [by_id[it.question_id] for it in items]
    with open(os.path.join(out_dir, "run.json"), encoding="utf-8") as fh:
        run = json.load(fh)
    result = {"run": run, "n": len(ordered), "metrics": task_metrics(args.task, ordered, args, out_dir),
              "efficiency": efficiency_summary(ordered, grid_tokens)}
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, ensure_ascii=False)
    print(write_table([result], out_dir))
    return result


def merge(args: argparse.Namespace, items: List[QAItem], out_dir: str) -> None:
    shards = sorted(glob.glob(os.path.join(out_dir, "predictions.rank*-of-*.jsonl")))
    worlds = {os.path.basename(p).rsplit("-of-", 1)[1].split(".")[0] for p in shards}
    if not shards:
        if not os.path.exists(os.path.join(out_dir, PREDICTIONS)):
            raise SystemExit(f"--merge: no shard files and no {PREDICTIONS} in {out_dir}")
        return
    if len(worlds) != 1:
        raise SystemExit(f"--merge: shard files of several world sizes in {out_dir}: {sorted(worlds)}")
    world = int(next(iter(worlds)))
    expected = [str(shard_path(os.path.join(out_dir, PREDICTIONS), r, world)) for r in range(world)]
    absent = [p for p in expected if p not in shards]
    if absent:
        raise SystemExit(f"--merge: missing shard files {absent}")
    merge_shards(expected, os.path.join(out_dir, PREDICTIONS), key="question_id",
                 order=[it.question_id for it in items])


def _barrier(world: int) -> bool:
    """Wait for all ranks when a launcher rendezvous exists; False when there is none."""
    if world == 1:
        return True
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    return True


def evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shared.runio import shard_slice

    questions = question_file(args.task, args.data_root)
    items = load_items(args.task, questions)
    if args.limit is not None:
        items = items[: args.limit]
    if not items:
        raise SystemExit("--data-root: no questions to evaluate")
    out_dir = args.output_dir
    info = dist_info()
    settings = run_settings(args, questions)
    if args.merge:
        check_run_file(out_dir, settings, write=False)
        if not os.path.exists(os.path.join(out_dir, "run.json")):
            raise SystemExit(f"--merge: {out_dir} holds no run.json")
        merge(args, items, out_dir)
        grid = json.load(open(os.path.join(out_dir, "run.json"), encoding="utf-8")).get("grid", 27)
        finish(args, items, out_dir, grid * grid)
        return 0
    if info.is_main:
        check_run_file(out_dir, settings, write=True)
    else:
        os.makedirs(out_dir, exist_ok=True)

    if args.device == "auto":
        device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pruner = make_pruner(args)
    mine = shard_slice(items, info.rank, info.world_size)
    path = shard_path(os.path.join(out_dir, PREDICTIONS), info.rank, info.world_size)
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ResultWriter(path, key="question_id"))
        todo = [it for it in mine if it.question_id not in writer.done]
        grid = None
        if todo:
            backend = (LlavaBackend if args.backend == "llava" else HFBackend)(args, device, stack)
            grid = backend.size // backend.patch
            if info.is_main:
                settings_path = os.path.join(out_dir, "run.json")
                run = json.load(open(settings_path, encoding="utf-8"))
                if run.get("grid") not in (None, grid):
                    raise SystemExit(f"--model-path: grid {grid} differs from the run's {run['grid']}")
                run["grid"] = grid
                with open(settings_path + ".tmp", "w", encoding="utf-8") as fh:
                    json.dump(run, fh, indent=1)
                os.replace(settings_path + ".tmp", settings_path)
            loader = SceneLoader(args.frames_root, args.num_views, args.frame_rule, backend.size, backend.patch, grid,
                                 args.padding, None if pruner is None else args.mode, args.compat_released_geometry)
            bar = tqdm(todo, desc=f"{args.task} rank {info.rank}" if info.world_size > 1 else args.task,
                       unit="q", initial=len(mine) - len(todo), total=len(mine))
            for it in bar:
                scene = loader.get(it.scene_key)
                ans = backend.answer(it.question, scene, pruner, args)
                writer.write(make_record(it, args.task, scene, ans))
                bar.set_postfix(tokens=ans.visual_tokens, s=f"{ans.latency_s:.2f}")
            if loader.short_scenes:
                print(f"note: {len(loader.short_scenes)} scenes had fewer than {args.num_views} frames (all used): "
                      f"{loader.short_scenes[:5]}")
    if not _barrier(info.world_size):
        print(f"rank {info.rank}: shard written to {path}; run again with --merge once every rank has finished")
        return 0
    if not info.is_main:
        return 0
    if info.world_size > 1:
        merge(args, items, out_dir)
    if args.skip_metrics:
        return 0
    run = json.load(open(os.path.join(out_dir, "run.json"), encoding="utf-8"))
    g = run.get("grid") or grid or 27
    finish(args, items, out_dir, g * g)
    return 0


def combine(args: argparse.Namespace) -> int:
    results = []
    for d in args.runs:
        p = os.path.join(d, "metrics.json")
        if not os.path.exists(p):
            raise SystemExit(f"runs: {d} has no metrics.json (finish that run first)")
        with open(p, encoding="utf-8") as fh:
            results.append(json.load(fh))
    print(write_table(results, args.out))
    return 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
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
        p.add_argument("--output-dir", required=True)
        p.add_argument("--method", choices=("segpruner", "none"), default="segpruner", help="none = unpruned baseline")
        p.add_argument("--tokens", type=int, default=64, help="T: kept tokens per view (per_view) or per scene")
        p.add_argument("--ratio", type=float, default=0.0, help="r: important ratio, int(T·r) by saliency (released default 0)")
        p.add_argument("--lam", type=float, default=0.5, help="λ: weight of the 3D distance in the FPS distance")
        p.add_argument("--mode", choices=MODES, default="per_view")
        p.add_argument("--normalizer", choices=("first_centroid", "diameter"), default="first_centroid")
        p.add_argument("--num-views", type=int, default=12)
        p.add_argument("--frame-rule", choices=("released", "linspace"), default="released")
        p.add_argument("--padding", choices=("mean", "black"), default="mean",
                       help="mean: upstream OV pad-then-resize; black: the released resize_and_pad (NEAREST)")
        p.add_argument("--compat-released-geometry", action="store_true",
                       help="patch centroids as released: missing depth counted as the camera centre")
        p.add_argument("--answer-instruction", action="store_true", help=f"append {ANSWER_INSTRUCTION!r}")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--limit", type=int, help="first N questions only")
        p.add_argument("--device", default="auto", help="auto: cuda:<LOCAL_RANK> if available, else cpu")
        p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
        p.add_argument("--attn", choices=("auto", "sdpa", "eager", "flash_attention_2"), default="auto")
        p.add_argument("--merge", action="store_true", help="merge the shard files and compute the metrics only")
        p.add_argument("--skip-metrics", action="store_true")
        p.add_argument("--use-java", choices=("auto", "yes", "no"), default="auto", help="scanqa: official Java tokenizer/METEOR")
        p.add_argument("--judge", help="openeqa: openai:<base_url>:<model> or hf:<local folder>")
        p.add_argument("--judge-device", default="cuda", help="openeqa: device of an hf: judge")
    t = sub.add_parser("table", help="one paper-style table from several finished runs")
    t.add_argument("runs", nargs="+", help="output dirs of finished runs (same task)")
    t.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.task != "table":
        if args.tokens < 1:
            ap.error("--tokens: expected a positive int")
        if args.num_views < 1:
            ap.error("--num-views: expected a positive int")
        if args.limit is not None and args.limit < 1:
            ap.error("--limit: expected a positive int")
        if args.max_new_tokens < 1:
            ap.error("--max-new-tokens: expected a positive int")
        if args.method == "segpruner":
            try:
                make_pruner(args)  # validates tokens/ratio/lam/mode/normalizer
            except ValueError as exc:
                ap.error(f"--{exc}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.task == "table":
        return combine(args)
    return evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
