#!/usr/bin/env python
"""ScanQA / SQA3D / Scan2Cap evaluation of LLaVA-3D, unpruned or with a pruning method (AdaToken-3D, PDrop, FastV).

    python eval/LLaVA-3D/eval_llava3d.py scanqa --model-path LLaVA-3D-7B --data-root playground/data --out runs/sq
    python eval/LLaVA-3D/eval_llava3d.py sqa3d ... --method adatoken3d --method-args fitted=schedule_r10.json
    python eval/LLaVA-3D/eval_llava3d.py scanqa ... --method pdrop --method-args ratio=0.5
    python eval/LLaVA-3D/eval_llava3d.py table runs/sq runs/sq_ada --out runs/table

LLaVA-3D's protocol (``llava/eval/model_{scanqa,sqa3d,scan2cap}.py`` @ 91d979d): its question/answer files
under ``--data-root`` (``playground/data``: ``annotations/llava-3d-*.json``, scenes in ``LLaVA-3D-Pretrain``,
camera data in ``annotations/embodiedscan_infos_full.json``), its prompt (``llava_v1``; ``"<image>\\n" + text``;
Scan2Cap: ``<video>`` -> ``<image>``, one ``<boxes>`` click per target box = box centre to 3 dp), batch 1,
``max_new_tokens`` 512, ``num_beams`` 1. Deliberate differences, each a flag: greedy decoding by default
(``--temperature 0``; upstream's default 0.2 *samples*, so its runs are not repeatable: pass
``--temperature 0.2`` for that), a seeded > 2560 voxel subsample (``--subsample-seed``, host option; upstream
draws from the unseeded global RNG), the model's own dtype for the scene tensors (bfloat16 as upstream when
loaded with ``--dtype bfloat16``), a deterministic ``answer_id`` (upstream: a random shortuuid).

``--compat adatoken`` feeds SQA3D's question without the situation, as junkerman2004/Adatoken-3D's
``model_sqa3d.py`` does (needs the original SQA3D question file: ``--question-file
v1_balanced_questions_test_scannetv2.json``). Its evaluator also forces every SQA3D sample to type 0; that is
*not* reproduced (the per-type scores stay; their "type 0" equals the overall EM). ``--scene-subset
adatoken_public19|adatoken_public22`` keeps the scenes of their code (``shared.datasets.llava3d.SCENE_SUBSETS``);
default ``full``.

Methods through ``shared.evalkit`` (``--method``/``--method-args``; host ``llava_3d``): e.g. ``fastv``,
``pdrop`` (``ratio=0.5`` canonical; ``ratio=r**(1/3)`` to keep r at the last stage), ``adatoken3d``
(``fitted=<schedule.json>``). Run settings (``run.json``; a resume with other settings is refused), resume,
sharding (``torchrun``: one shard file per rank, rank 0 merges; else ``--merge-only``), progress, ``--on-error
skip`` and the accounting (visual tokens per layer, N_avg, prefill TFLOPs in the FastV/PDrop convention and
exactly, from the session's records) are evalkit's.

Output (``--out``): ``<task>.jsonl`` (one record per question), ``<task>_pred.jsonl`` (LLaVA-3D's prediction
format: ``{question_id, prompt, text, answer_id, model_id, metadata}``, Scan2Cap adds ``answer``, in question-file
order), ``summary.json``, ``table.md``/``table.csv`` (EM1/EM1_refined, B-1..4, METEOR, ROUGE-L, CIDEr ×100;
SQA3D per type; N_avg, TFLOPs). Metrics: ``shared.metrics.llava3d`` (LLaVA-3D's evaluators; caption metrics
need Java, ``--use-java no`` skips them; SPICE with ``--spice``). Scan2Cap: caption metrics only, no IoU
(LLaVA-3D has no Scan2Cap protocol; not comparable to C@0.5).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:
    import shared
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    import shared
from shared import evalkit  # noqa: E402
from shared.datasets import llava3d as data  # noqa: E402
from shared.metrics.llava3d import SQA3D_TYPE_NAMES  # noqa: E402

TASKS = data.TASKS
TITLES = {"scanqa": "ScanQA", "sqa3d": "SQA3D", "scan2cap": "Scan2Cap"}
HOST = "llava_3d"
CAPTION = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
CAPTION_HEAD = ("B-1", "B-2", "B-3", "B-4", "METEOR", "ROUGE-L", "CIDEr")


# ------------------------------------------------------------------------------------- model
class Model:
    """Tokenizer, model and processor (``shared.datasets.llava3d.load_llava3d`` or given, e.g. by a test)."""

    def __init__(self, tokenizer: Any, model: Any, processor: Any, name: str) -> None:
        self.tokenizer, self.model, self.processor, self.name = tokenizer, model, processor, name

    @classmethod
    def load(cls, args: argparse.Namespace) -> "Model":
        import torch

        try:
            import llava  # noqa: F401
        except ImportError as exc:
            raise ImportError("LLaVA-3D is not importable: bash eval/setup_env.sh LLaVA-3D, or put the patched "
                              "checkout on PYTHONPATH (eval/LLaVA-3D/eval.sh does)") from exc
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
        tok, model, proc = data.load_llava3d(args.model_path, args.model_base, device=args.device_resolved,
                                             dtype=dtype, data_root=args.data_root)
        return cls(tok, model, proc, os.path.basename(os.path.normpath(args.model_path)))


def _sync(device: Any):
    import torch

    if getattr(device, "type", str(device)) == "cuda" or str(device).startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# ------------------------------------------------------------------------------------- benchmark
class LLaVA3DBenchmark(evalkit.Benchmark):
    """One job per question (Scan2Cap: per sample), answered by ``model.generate`` under ``shared.prune``."""

    def __init__(self, args: argparse.Namespace, records: List[Dict[str, Any]], methods: Sequence[Any]) -> None:
        self.name, self.title = args.task, TITLES[args.task]
        self.args, self.records, self.methods = args, records, list(methods)
        self.m: Optional[Model] = None

    def jobs(self) -> List[evalkit.Job]:
        return [evalkit.Job([str(r["question_id"])], payload=r, label=r["scene_id"]) for r in self.records]

    def run(self, job: evalkit.Job) -> evalkit.JobOutput:
        import torch

        a, r, m = self.args, job.payload, self.m
        kw = data.build_inputs(r, a.task, m.tokenizer, m.model, m.processor, compat=a.compat)
        gen = data.decoding_kwargs(a.temperature, a.top_p, a.num_beams, a.max_new_tokens)
        sync = _sync(m.model.device)
        with torch.inference_mode(), shared.prune(m.model, *self.methods, host=HOST,
                                                  subsample_seed=a.subsample_seed) as session:
            sync()
            t0 = time.perf_counter()
            out = m.model.generate(**data.generate_inputs(kw), **gen)
            sync()
            t1 = time.perf_counter()
        text = m.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()
        parts = data.build_prompt(r, a.task, a.compat, mm_use_im_start_end=bool(
            getattr(m.model.config, "mm_use_im_start_end", False)))
        qid = r["question_id"]
        rec: Dict[str, Any] = {
            evalkit.KEY: str(qid), "question_id": qid, "scene_id": r["scene_id"], "prompt": parts.recorded_prompt,
            "text": text, "answers": r.get("answers"), "type": r.get("type"), "new_tokens": int(out.shape[1]),
            "latency_s": t1 - t0,
            "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{m.name}/{a.task}/{qid}").hex[:22],
            "model_id": m.name,
        }
        if a.task == "scan2cap":
            rec.update(answer=r["answer"], video=r["video"], boxes=r["boxes"], question=r["text"])
        return evalkit.JobOutput([rec], session.last, t1 - t0)

    def metrics(self, records: List[Dict[str, Any]]) -> Dict[str, Any]:
        return task_metrics(self.args, records)


# ------------------------------------------------------------------------------------- metrics
def task_metrics(args: argparse.Namespace, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    from shared.metrics import llava3d as metrics
    from shared.metrics.qa import java_available

    use_java = java_available() if args.use_java == "auto" else args.use_java == "yes"
    preds = [{"question_id": r["question_id"], "text": r["text"]} for r in records]
    if args.task == "scanqa":
        gts = [{"question_id": r["question_id"], "text": r["answers"]} for r in records]
        out = metrics.scanqa_score(preds, gts, spice=args.spice, caption_metrics=use_java)
    elif args.task == "sqa3d":
        gts = [{"question_id": r["question_id"], "text": r["answers"][0] if len(r["answers"]) == 1 else r["answers"],
                "type": r["type"]} for r in records]
        out = metrics.sqa3d_score(preds, gts)
    else:
        if not use_java:
            return {"note": "Scan2Cap caption metrics need Java (--use-java no given or java missing)"}
        samples = [{"id": r["question_id"], "video": r["video"], "target": {"boxes": r["boxes"]},
                    "conversations": [{"value": r["question"]}, {"value": r["answer"]}]} for r in records]
        out = metrics.scan2cap_score(preds, samples, spice=args.spice)
    if not use_java and args.task == "scanqa":
        out["note"] = "caption metrics skipped (no Java)"
    out["latency_s"] = evalkit.mean_of(records, "latency_s")
    return out


def write_predictions(args: argparse.Namespace, records: List[Dict[str, Any]]) -> Path:
    """``<out>/<task>_pred.jsonl`` in LLaVA-3D's format (skipped questions left out)."""
    path = Path(args.out) / f"{args.task}_pred.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            if "skipped" in r:
                continue
            rec = {"question_id": r["question_id"], "prompt": r["prompt"], "text": r["text"]}
            if args.task == "scan2cap":
                rec["answer"] = r["answer"]
            rec.update(answer_id=r["answer_id"], model_id=r["model_id"], metadata={})
            f.write(json.dumps(rec) + "\n")
    return path


# ------------------------------------------------------------------------------------- table
def table(summaries: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]], List[str]]:
    """Header, rows and notes of the papers' table for runs of one task (metrics ×100)."""
    task = summaries[0]["settings"]["task"]
    p = f"[{task}] "
    if task == "sqa3d":
        keys = ["EM1", "EM1_refined"] + [f"EM_type{t}" for t in range(6)]
        heads = ["EM@1", "EM@1-refined", *SQA3D_TYPE_NAMES]
    elif task == "scanqa":
        keys, heads = ["EM1", "EM1_refined", *CAPTION], ["EM@1", "EM@1-refined", *CAPTION_HEAD]
    else:
        keys, heads = list(CAPTION), list(CAPTION_HEAD)
    header = ["Method", "Protocol", *heads, "N_avg", "Prefill TFLOPs", "Latency s", "n", "Skipped"]
    rows, notes = [], []
    for s in summaries:
        st = s["settings"]
        if st["task"] != task:
            raise ValueError(f"runs: mixes {task} and {st['task']} results; make one table per task")
        b = s["benchmarks"][task]
        mt, e = b["metrics"], b["efficiency"]
        vals = [evalkit.fmt(None if mt.get(p + k) is None else 100.0 * mt[p + k]) for k in keys]
        if "note" in mt:
            notes.append(f"{st['label']}: {mt['note']}")
        rows.append([st["label"], st["protocol"], *vals, evalkit.fmt(e["n_avg"], 1), evalkit.fmt(e["tflops"]),
                     evalkit.fmt(mt.get("latency_s"), 3), str(b["n"]), str(b["skipped"])])
    dims = summaries[0]["settings"]["dims"]
    notes.append(f"Prefill TFLOPs (FastV/PDrop convention, 4nd²+2n²d+2ndm per layer over the measured tokens, "
                 f"{dims[2]} layers, d={dims[0]}, m={dims[1]}); N_avg: visual tokens averaged over layers")
    notes.append("Protocol: subset / decoding / compat. Scores: LLaVA-3D's evaluators (shared.metrics.llava3d), ×100")
    if task == "scan2cap":
        notes.append("Scan2Cap: captions given the GT box centre as a click; no IoU, not comparable to C@0.5")
    return header, rows, notes


# ------------------------------------------------------------------------------------- driver
def settings(args: argparse.Namespace, methods: Sequence[Any], files: Dict[str, Optional[str]]) -> Dict[str, Any]:
    keys = ("task", "compat", "scene_subset", "temperature", "top_p", "num_beams", "max_new_tokens", "subsample_seed",
            "seed", "limit", "dtype", "protocol")
    d: Dict[str, Any] = {k: getattr(args, k) for k in keys}
    d.update(files)
    d.update(model_path=None if args.model_path is None else os.path.abspath(args.model_path),
             methods=evalkit.method_settings(methods),
             label="LLaVA-3D" + (" (unpruned)" if not methods else " + " + evalkit.method_label(methods)))
    return d


def load_records(args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], Dict[str, Optional[str]]]:
    root = data.resolve_data_root(args.data_root)
    q = args.question_file or str(root / data.QUESTION_FILES[args.task])
    a = None if args.task == "scan2cap" else (args.answer_file or str(root / data.ANSWER_FILES[args.task]))
    v = args.video_folder or str(root / data.VIDEO_FOLDER)
    recs = data.load_task(args.task, root, q, a, v)
    recs = data.filter_scenes(recs, args.scene_subset)
    if args.limit is not None:
        recs = recs[: args.limit]
    files = {"questions": os.path.abspath(q), "answers": None if a is None else os.path.abspath(a),
             "video_folder": os.path.abspath(v)}
    return recs, files


def evaluate(args: argparse.Namespace, loaded: Optional[Model] = None, env: Optional[Dict[str, str]] = None) -> int:
    """Run (or resume) this rank's share, merge, score. ``loaded``: a ready ``Model`` (tests)."""
    import torch

    from shared.accounting import DecoderDims

    methods = evalkit.methods_from_args(args)
    records, files = load_records(args)
    if not records:
        raise SystemExit(f"--scene-subset {args.scene_subset}: no questions left to evaluate")
    if args.compat == "adatoken" and args.task == "sqa3d":
        for r in records:
            data.question_text(r, "sqa3d", "adatoken")  # refuses joined situation+question files up front
    bench = LLaVA3DBenchmark(args, records, methods)
    info = shared.runio.dist_info(env)
    if args.device == "auto":
        args.device_resolved = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    else:
        args.device_resolved = args.device
    torch.manual_seed(args.seed)
    run_settings = settings(args, methods, files)
    runner = None
    dims: Optional[List[int]] = None
    if not args.merge_only:
        m = loaded if loaded is not None else Model.load(args)
        bench.m = m
        d = DecoderDims.from_config(m.model.config)
        dims = [d.hidden, d.intermediate, d.layers, d.heads, d.kv_heads or d.heads]
    else:
        old = Path(args.out) / "run.json"
        if not old.exists():
            raise SystemExit(f"--out: {args.out} holds no run to merge; run the evaluation first")
        dims = json.loads(old.read_text(encoding="utf-8"))["dims"]
    run_settings["dims"] = dims
    runner = evalkit.Run(args.out, run_settings, [bench], evalkit.Accounting(DecoderDims(*dims), "fastv"),
                         on_error=args.on_error, progress=not args.no_progress, env=env)
    runner.prepare()
    if not args.merge_only:
        runner.evaluate()
        if info.world_size > 1:
            if not runner.barrier():
                print(f"rank {info.rank}: shard written; run again with --merge-only once every rank has finished")
                return 0
            if not info.is_main:
                return 0
    if args.skip_metrics:
        return 0
    summary = runner.finish()
    write_predictions(args, runner.records(bench))
    header, rows, notes = table([summary])
    print(evalkit.write_table(header, rows, notes, Path(args.out) / "table"))
    return 0


def combine(args: argparse.Namespace) -> int:
    header, rows, notes = table(evalkit.load_summaries(args.runs))
    print(evalkit.write_table(header, rows, notes, Path(args.out) / "table"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    for task in TASKS:
        p = sub.add_parser(task, help=f"evaluate on {TITLES[task]}")
        p.add_argument("--model-path", help="LLaVA-3D checkpoint folder (its name must contain 'llava')")
        p.add_argument("--model-base", default=None)
        p.add_argument("--data-root", required=True, help="LLaVA-3D's playground/data (or the folder holding playground/)")
        p.add_argument("--question-file", help=f"default: <data-root>/{data.QUESTION_FILES[task]}")
        if task != "scan2cap":
            p.add_argument("--answer-file", help=f"default: <data-root>/{data.ANSWER_FILES[task]}")
        p.add_argument("--video-folder", help=f"default: <data-root>/{data.VIDEO_FOLDER}")
        p.add_argument("--out", required=True, help="run directory")
        evalkit.add_method_args(p)
        p.add_argument("--compat", choices=data.COMPAT, default=None,
                       help="adatoken: SQA3D question without the situation, as the unofficial AdaToken-3D code")
        p.add_argument("--scene-subset", default="full", choices=("full", *sorted(data.SCENE_SUBSETS)))
        p.add_argument("--temperature", type=float, default=0.0,
                       help="0 = greedy (default); upstream's default 0.2 samples (do_sample=True)")
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--num-beams", type=int, default=1)
        p.add_argument("--max-new-tokens", type=int, default=512)
        p.add_argument("--subsample-seed", type=int, default=0,
                       help="seed of the > 2560 voxel subsample (host option); -1 = upstream's unseeded draw")
        p.add_argument("--seed", type=int, default=0, help="torch's global seed")
        p.add_argument("--limit", type=int, help="first N questions only")
        p.add_argument("--device", default="auto", help="auto: cuda:<LOCAL_RANK> if available, else cpu")
        p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
        p.add_argument("--on-error", default="raise", choices=evalkit.runner.ON_ERROR)
        p.add_argument("--merge-only", action="store_true", help="merge the shard files and score only")
        p.add_argument("--skip-metrics", action="store_true")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--use-java", choices=("auto", "yes", "no"), default="auto",
                       help="caption metrics (PTBTokenizer, METEOR) need Java")
        p.add_argument("--spice", action="store_true", help="also SPICE (downloads Stanford CoreNLP on first use)")
    t = sub.add_parser("table", help="one table from several finished runs of one task")
    t.add_argument("runs", nargs="+")
    t.add_argument("--out", required=True)
    return ap


def parse_args(argv: Optional[Sequence[str]] = None, need_model: bool = True) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.task == "table":
        return args
    if not hasattr(args, "answer_file"):
        args.answer_file = None
    parts = ["full" if args.scene_subset == "full" else args.scene_subset,
             "greedy" if args.temperature == 0 else f"T={args.temperature}"]
    if args.compat:
        parts.append(f"compat={args.compat}")
    args.protocol = " / ".join(parts)
    if args.subsample_seed == -1:
        args.subsample_seed = None
    elif args.subsample_seed < -1:
        ap.error("--subsample-seed: expected a non-negative int, or -1 for upstream's unseeded draw")
    if args.max_new_tokens < 1 or args.num_beams != 1:
        ap.error("--max-new-tokens: expected >= 1; --num-beams: only 1 (batch 1, no beam search, as upstream)")
    if args.temperature < 0:
        ap.error("--temperature: expected >= 0")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit: expected a positive int")
    if need_model and not args.merge_only and args.model_path is None:
        ap.error("--model-path: required (except with --merge-only)")
    try:
        evalkit.methods_from_args(args)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return combine(args) if args.task == "table" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
