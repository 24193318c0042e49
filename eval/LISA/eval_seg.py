#!/usr/bin/env python
"""LISA referring / reasoning segmentation under visual-token pruning (LVLM_CSP and its baselines).

A standalone replacement for ``train_ds.py --eval_only`` (no deepspeed, no HybridDataset, no LoRA
wrap): one process per GPU loads the merged LISA checkpoint as ``chat.py`` does, builds LISA's own
``ValDataset`` + ``collate_fn`` exactly as ``train_ds.py`` does, and runs ``model(**input_dict)``
(teacher-forced ``model_forward(inference=True)``: one forward over prompt + ``[SEG].</s>`` for all
expressions of an image) with the pruning configuration passed as ``pruner=`` (the patched
``model/LISA.py`` hands it to ``shared.hosts.lisa``). Needs the LISA submodule with
``patches/LISA`` applied (``scripts/apply_patches.sh LISA``).

Per expression (key ``<image id>:<sentence index>``) one JSONL record: LISA's per-class intersection
and union, the foreground IoU, the visual tokens each decoder layer saw, N_avg, and prefill TFLOPs
(LVLM_CSP's convention, 2 × Eq. 11) measured and at the paper's fixed text length T. Runs resume
(finished expressions are skipped), shard over ``torchrun``/``accelerate`` ranks, and merge
deterministically. gIoU ("mIoU" in the LVLM_CSP paper) and cIoU are LISA's ``validate`` formulas.

    python eval/LISA/eval_seg.py --version xinlai/LISA-7B-v1 --dataset-dir ./dataset --out out/csp \\
        --prune csp --csp-preset 7b-224/8-64-6-16 --csp-cluster uniform
    python eval/LISA/eval_seg.py table --runs out/none out/csp out/fastv --out out/table
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from shared.accounting import CONVENTIONS, DIMS, DecoderDims, from_stats, prefill_flops  # noqa: E402
from shared.hosts.lisa import QUERIES, LisaPruner, LisaRecord  # noqa: E402
from shared.metrics.segmentation import SegmentationMeter, expression_iou, intersection_union  # noqa: E402
from shared.runio import ResultWriter, dist_info, merge_shards, read_results, shard_path, shard_paths, shard_slice  # noqa: E402

PRUNE_CHOICES = ("none", "csp", "fastv", "pdrop", "prumerge", "prumerge_plus", "visionzip")
DEFAULT_VAL = ("refcoco|unc|val", "refcoco+|unc|val", "refcocog|umd|val", "ReasonSeg|val")
#: LVLM_CSP's TFLOPs are reproduced with T = 62 text tokens (7B-224, 13B-224) and 59 (7B-336).
PAPER_TEXT_TOKENS = 62
CONVENTION = CONVENTIONS["lvlm_csp"]
KEY = "key"
MARKER = "shared_lisa"  # present in the patched model/LISA.py


# ------------------------------------------------------------------------------------------ CLI
def expand_val_datasets(specs: Sequence[str]) -> List[str]:
    """``refcoco+|unc|val|testA`` → [``refcoco+|unc|val``, ``refcoco+|unc|testA``]; ``ReasonSeg|val|test``
    → [``ReasonSeg|val``, ``ReasonSeg|test``]. Names follow LISA's ``--val_dataset``."""
    out: List[str] = []
    for spec in specs:
        parts = [p for p in spec.split("|")]
        if any(not p for p in parts):
            raise ValueError(f"val_dataset: empty field in {spec!r}")
        if parts[0] == "ReasonSeg":
            if len(parts) < 2:
                raise ValueError(f"val_dataset: expected ReasonSeg|<split>[|<split>...], got {spec!r}")
            out += [f"ReasonSeg|{s}" for s in parts[1:]]
        elif parts[0] in ("refcoco", "refcoco+", "refcocog", "refclef"):
            if len(parts) < 3:
                raise ValueError(f"val_dataset: expected {parts[0]}|<splitBy>|<split>[|<split>...], got {spec!r}")
            out += [f"{parts[0]}|{parts[1]}|{s}" for s in parts[2:]]
        else:
            raise ValueError(
                f"val_dataset: expected ReasonSeg|split or refcoco|refcoco+|refcocog|refclef|splitBy|split, got {spec!r}"
            )
    seen = set()
    dup = [d for d in out if d in seen or seen.add(d)]
    if dup:
        raise ValueError(f"val_dataset: listed twice: {dup}")
    return out


_PRETTY = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg", "refclef": "RefCLEF"}


def dataset_title(val_dataset: str) -> str:
    """Table name of a dataset: ``refcoco+|unc|testA`` → ``RefCOCO+ testA``, ``ReasonSeg|val`` → ``ReasonSeg val``."""
    parts = val_dataset.split("|")
    return f"{_PRETTY.get(parts[0], parts[0])} {parts[-1]}"


def dataset_tag(val_dataset: str) -> str:
    """File-name form of a dataset name: ``refcoco+|unc|val`` → ``refcoco+_unc_val``."""
    return val_dataset.replace("|", "_")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data (as LISA's chat.py / train_ds.py)")
    g.add_argument("--version", help="LISA checkpoint (local dir or HF id), e.g. xinlai/LISA-7B-v1")
    g.add_argument("--dataset-dir", help="LISA's --dataset_dir in its README layout (reason_seg/ReasonSeg/, refer_seg/)")
    g.add_argument("--refer-seg-dir", default=None,
                   help="root of refcoco*/ and images/mscoco/ (default <dataset-dir>/refer_seg, see eval/LISA/README.md)")
    g.add_argument("--val-dataset", nargs="+", default=list(DEFAULT_VAL),
                   help="LISA names; several splits may share a prefix: 'refcoco+|unc|val|testA|testB'")
    g.add_argument("--vision-tower", default=None,
                   help="CLIP tower (local dir or HF id); default: the checkpoint's config.vision_tower")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    g.add_argument("--image-size", type=int, default=1024, help="SAM input size (LISA: 1024)")
    g.add_argument("--model-max-length", type=int, default=512)
    g.add_argument("--conv-type", default="llava_v1", choices=("llava_v1", "llava_llama_2"))
    g.add_argument("--lisa-root", default=str(REPO / "LISA"), help="the patched LISA checkout (default: the submodule)")
    g.add_argument("--device", default=None, help="default cuda:<LOCAL_RANK>")
    g.add_argument("--limit", type=int, default=None, help="only the first N images of each dataset (smoke runs)")

    g = p.add_argument_group("pruning")
    g.add_argument("--prune", default="none", choices=PRUNE_CHOICES)
    g.add_argument("--query", default="pre_seg", choices=QUERIES,
                   help="scoring query of FastV/PDrop: the token before [SEG] (last prompt token), [SEG], or </s>")
    g.add_argument("--csp-preset", default=None, help="e.g. 7b-224/8-64-6-16 (shared.methods.lvlm_csp.PRESETS)")
    g.add_argument("--csp", nargs=4, type=int, metavar=("LC", "NC", "LS", "NP"), default=None)
    g.add_argument("--csp-cluster", default="uniform", choices=("random", "uniform", "cls", "seg_first"))
    g.add_argument("--csp-uniform", default="literal", choices=("literal", "grid"))
    g.add_argument("--seg-query", default="seg", choices=("seg", "pre_seg"))
    g.add_argument("--yolo-weights", default=None, help="local yolo11n-seg.pt (Seg-First; never downloaded)")
    g.add_argument("--yolo-device", default=None, help="default: the model's device")
    g.add_argument("--mask-threshold", type=float, default=0.5, help="Seg-First patch coverage threshold")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fastv-k", type=int, default=2)
    g.add_argument("--fastv-r", type=int, default=64)
    g.add_argument("--fastv-ratio", type=float, default=None, help="instead of --fastv-r: R/N")
    g.add_argument("--pdrop-layers", nargs="+", type=int, default=[8, 16, 24])
    g.add_argument("--pdrop-ratio", type=float, default=0.5)
    g.add_argument("--visionzip-tokens", type=int, default=64, choices=(64, 128, 192))
    g.add_argument("--prumerge-fixed-ratio", type=float, default=None,
                   help="non-adaptive PruMerge(+) keeping this fraction (default: the adaptive IQR rule)")

    g = p.add_argument_group("output and accounting")
    g.add_argument("--out", required=True, help="run directory (results, summary.json, table.md/.csv)")
    g.add_argument("--dims", default="auto", choices=("auto",) + tuple(DIMS),
                   help="decoder dims for TFLOPs (auto: from the checkpoint's config)")
    g.add_argument("--paper-t", type=int, default=PAPER_TEXT_TOKENS,
                   help="fixed text tokens T of the paper-style TFLOPs column")
    g.add_argument("--merge-only", action="store_true",
                   help="only merge the shard files of a finished multi-process run and write the summary")
    g.add_argument("--no-progress", action="store_true")
    return p


# ------------------------------------------------------------------------------------- pruning
def build_pruner(args: argparse.Namespace, device: Optional[str] = None) -> Tuple[LisaPruner, str, str]:
    """(LisaPruner, method name, configuration string) from the CLI flags."""
    prune = args.prune
    if prune == "none":
        return LisaPruner(), "LISA", "-"
    if prune == "csp":
        from shared.methods.lvlm_csp import LVLMCSP, preset

        opts = dict(clustering=args.csp_cluster, uniform_layout=args.csp_uniform, seed=args.seed, seg_query=args.seg_query)
        if args.csp is not None and args.csp_preset is not None:
            raise ValueError("csp/csp_preset: give one of --csp LC NC LS NP or --csp-preset")
        if args.csp is not None:
            method = LVLMCSP(*args.csp, **opts)
        else:
            method = preset(args.csp_preset or "7b-224/8-64-6-16", **opts)
        mask_source = None
        if args.csp_cluster == "seg_first":
            if not args.yolo_weights:
                raise ValueError("yolo_weights: --csp-cluster seg_first needs --yolo-weights <local yolo11n-seg.pt>")
            from shared.segfirst import YoloMaskSource

            mask_source = YoloMaskSource(weights=args.yolo_weights, device=args.yolo_device or device or "cpu")
        lc, nc, ls, np_ = method.paper_tuple
        config = f"({lc},{nc},{ls},{np_}) {args.csp_cluster}"
        if args.csp_cluster == "uniform":
            config += f"/{args.csp_uniform}"
        if args.seg_query != "seg":
            config += f" q={args.seg_query}"
        pruner = LisaPruner(method=method, mask_source=mask_source, query=args.query, mask_threshold=args.mask_threshold)
        return pruner, "LVLM_CSP", config
    if prune == "fastv":
        from shared.methods.fastv import FastV

        if args.fastv_ratio is not None:
            method = FastV(layer=args.fastv_k, keep_ratio=args.fastv_ratio)
            config = f"K={args.fastv_k} R={args.fastv_ratio:g}N"
        else:
            method = FastV(layer=args.fastv_k, keep=args.fastv_r)
            config = f"K={args.fastv_k} R={args.fastv_r}"
        return LisaPruner(method=method, query=args.query), "FastV", config + _query_note(args.query)
    if prune == "pdrop":
        from shared.methods.pyramid_drop import PyramidDrop

        method = PyramidDrop(layers=tuple(args.pdrop_layers), ratio=args.pdrop_ratio)
        config = f"layers={','.join(map(str, method.layers))} λ={args.pdrop_ratio:g}"
        return LisaPruner(method=method, query=args.query), "PyramidDrop", config + _query_note(args.query)
    if prune in ("prumerge", "prumerge_plus"):
        from shared.methods.prumerge import PruMerge, PruMergePlus

        cls = PruMergePlus if prune == "prumerge_plus" else PruMerge
        if args.prumerge_fixed_ratio is not None:
            reducer = cls(adaptive=False, reduction_ratio=args.prumerge_fixed_ratio)
            config = f"ratio={args.prumerge_fixed_ratio:g}"
        else:
            reducer = cls()
            config = "adaptive (IQR)"
        return LisaPruner(reducer=reducer), "PruMerge+" if prune == "prumerge_plus" else "PruMerge", config
    if prune == "visionzip":
        from shared.methods.visionzip import VisionZip

        reducer = VisionZip(tokens=args.visionzip_tokens)
        return LisaPruner(reducer=reducer), "VisionZip", f"{reducer.dominant}+{reducer.contextual}"
    raise ValueError(f"prune: expected one of {PRUNE_CHOICES}, got {prune!r}")


def _query_note(query: str) -> str:
    return "" if query == "pre_seg" else f" q={query}"


# -------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class Expression:
    """One expression of a ValDataset image: its result key and text (in ValDataset's order)."""

    key: str
    image_id: Any
    sent_idx: int
    sentence: str


def expression_keys(dataset: Any, idx: int) -> List[Expression]:
    """The expressions ``ValDataset[idx]`` yields, in its order, without loading the image.

    refer_seg: every sentence of every ref of the image (``img2refs`` order), lowercased and stripped
    as ValDataset does; ReasonSeg: the first sentence only (image id = the file stem).
    """
    if dataset.data_type == "refer_seg":
        ds = dataset.refer_seg_ds
        info = ds["images"][idx]
        image_id = info["id"]
        sents = [s["sent"].strip().lower() for ref in ds["img2refs"][image_id] for s in ref["sentences"]]
        return [Expression(f"{image_id}:{j}", image_id, j, s) for j, s in enumerate(sents)]
    path = dataset.images[idx]
    stem = Path(path).stem
    return [Expression(f"{stem}:0", stem, 0, "")]


def all_expressions(dataset: Any, limit: Optional[int] = None) -> List[Tuple[int, List[Expression]]]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [(i, expression_keys(dataset, i)) for i in range(n)]


def to_device(batch: Dict[str, Any], device: Any, image_dtype: torch.dtype) -> Dict[str, Any]:
    """Tensors (and lists of tensors) to ``device``; ``images``/``images_clip`` to ``image_dtype``
    (LISA's ``validate``: ``dict_to_cuda`` then ``.bfloat16()``/``.half()``/``.float()``)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            v = [t.to(device, non_blocking=True) for t in v]
        out[k] = v
    for k in ("images", "images_clip"):
        if k in out:
            out[k] = out[k].to(image_dtype)
    return out


# ----------------------------------------------------------------------------------- evaluation
def row_efficiency(record: LisaRecord, dims: DecoderDims, paper_t: int) -> List[Dict[str, Any]]:
    """Per expression row: visual tokens per layer, text tokens, N_avg, TFLOPs (measured and at T)."""
    effs = from_stats(record.stats, dims, CONVENTION)
    rows = []
    for b, e in enumerate(effs):
        vis = [int(v) for v in e.visual_per_layer]
        rows.append(
            {
                "visual_per_layer": vis,
                "text_tokens": int(e.text_tokens),
                "image_tokens": int(record.image_tokens),
                "n_avg": e.n_avg,
                "tflops": e.tflops,
                "tflops_paper_t": prefill_flops([v + paper_t for v in vis], dims, CONVENTION) / 1e12,
                "selected": None if record.selected is None else int(record.selected[b]),
            }
        )
    return rows


def evaluate_dataset(
    model: Callable[..., Dict[str, Any]],
    dataset: Any,
    collate: Callable[[List[Any]], Dict[str, Any]],
    pruner: LisaPruner,
    writer: ResultWriter,
    items: Sequence[Tuple[int, List[Expression]]],
    dims: DecoderDims,
    device: Any = "cpu",
    image_dtype: torch.dtype = torch.float32,
    paper_t: int = PAPER_TEXT_TOKENS,
    progress: bool = True,
    desc: str = "",
) -> int:
    """Run the model on the images of ``items`` whose expressions are not all in ``writer`` yet and
    write one record per missing expression. Returns the number of records written."""
    from tqdm import tqdm

    written = 0
    todo_items = [(i, exprs) for i, exprs in items if any(e.key not in writer.done for e in exprs)]
    skipped = len(items) - len(todo_items)
    bar = tqdm(todo_items, desc=desc, disable=not progress, unit="img")
    if skipped and progress:
        bar.write(f"[eval_seg] {desc}: {skipped} of {len(items)} images already done (resumed)")
    for idx, exprs in bar:
        item = dataset[idx]
        batch = collate([item])
        rows = int(batch["input_ids"].shape[0])
        if rows != len(exprs):
            raise RuntimeError(
                f"dataset: image {idx} gave {rows} expression rows but its annotation lists {len(exprs)}; "
                f"the key enumeration no longer matches ValDataset"
            )
        batch = to_device(batch, device, image_dtype)
        n_before = len(pruner.records)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(**batch, pruner=pruner)
        if device is not None and str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        if len(pruner.records) != n_before + 1:
            raise RuntimeError(
                "model: the forward did not record its token counts; is the LISA checkout patched? "
                "(scripts/apply_patches.sh LISA)"
            )
        record = pruner.records.pop()
        eff = row_efficiency(record, dims, paper_t)
        pred = out["pred_masks"][0]
        gt = out["gt_masks"][0]
        if pred.shape[0] != rows or gt.shape[0] != rows:
            raise RuntimeError(f"model: expected {rows} masks for image {idx}, got {pred.shape[0]} / {gt.shape[0]}")
        image_path = batch["image_paths"][0]
        for r, e in enumerate(exprs):
            if e.key in writer.done:
                continue
            inter, union = intersection_union(pred[r] > 0, gt[r].int())
            rec = {
                KEY: e.key,
                "image_id": e.image_id,
                "sent_idx": e.sent_idx,
                "sentence": e.sentence,
                "image": os.path.basename(str(image_path)),
                "intersection": [int(v) for v in inter],
                "union": [int(v) for v in union],
                "iou": float(expression_iou(inter, union)[1]),
                "image_seconds": seconds,
                "image_rows": rows,
                **eff[r],
            }
            if record.info:
                rec["info"] = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in record.info.items()}
            writer.write(rec)
            written += 1
    return written


def summarize(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """gIoU/cIoU (percent) with LISA's formulas, mean N_avg / TFLOPs, text tokens and |S|."""
    meter = SegmentationMeter()
    for r in records:
        meter.add(r["intersection"], r["union"])
    n = len(records)
    out: Dict[str, Any] = dict(meter.summary())
    for k in ("n_avg", "tflops", "tflops_paper_t", "text_tokens", "image_tokens"):
        out[k] = math.fsum(float(r[k]) for r in records) / n
    sel = [r["selected"] for r in records if r.get("selected") is not None]
    out["selected"] = math.fsum(sel) / len(sel) if sel else None
    fb = [r for r in records if r.get("info", {}).get("fallback_used")]
    if any("info" in r for r in records):
        out["seg_first_fallbacks"] = len(fb)
    return out


# -------------------------------------------------------------------------------------- tables
def table_rows(summaries: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """The LVLM_CSP paper's layout: method, config, N_avg, TFLOPs, then per dataset mIoU (gIoU), cIoU."""
    datasets: List[str] = []
    for s in summaries:
        for d in s["datasets"]:
            if d not in datasets:
                datasets.append(d)
    header = ["method", "config", "N_avg", "TFLOPs", f"TFLOPs@T={summaries[0]['paper_t']}" if summaries else "TFLOPs@T"]
    for d in datasets:
        header += [f"{dataset_title(d)} mIoU", f"{dataset_title(d)} cIoU"]
    rows = []
    for s in summaries:
        row = [s["method"], s["config"], f"{s['n_avg']:.1f}", f"{s['tflops']:.3f}", f"{s['tflops_paper_t']:.3f}"]
        for d in datasets:
            m = s["datasets"].get(d)
            row += ["" if m is None else f"{m['gIoU']:.1f}", "" if m is None else f"{m['cIoU']:.1f}"]
        rows.append(row)
    return header, rows


def write_tables(summaries: Sequence[Dict[str, Any]], base: Path) -> Tuple[Path, Path]:
    header, rows = table_rows(summaries)
    md = base.with_suffix(".md")
    cs = base.with_suffix(".csv")
    base.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = (
        "\nmIoU = gIoU (mean per-expression IoU), cIoU = cumulative I / cumulative U (LISA's validate). "
        "N_avg: visual tokens per decoder layer averaged over layers and expressions (the paper prints floor). "
        "TFLOPs: 2 × Eq. 11 per expression at its measured token counts; TFLOPs@T: the same at T text tokens.\n"
    )
    md.write_text("\n".join(lines) + "\n" + notes, encoding="utf-8")
    with open(cs, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return md, cs


def run_summary(out_dir: Path, meta: Dict[str, Any], per_dataset: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """summary.json of a run: per dataset metrics and the pooled N_avg/TFLOPs over all expressions."""
    allrec = [r for recs in per_dataset.values() for r in recs]
    pooled = summarize(allrec) if allrec else {}
    s = dict(meta)
    s.update(
        datasets={d: summarize(recs) for d, recs in per_dataset.items() if recs},
        n_avg=pooled.get("n_avg", float("nan")),
        tflops=pooled.get("tflops", float("nan")),
        tflops_paper_t=pooled.get("tflops_paper_t", float("nan")),
        expressions=len(allrec),
    )
    (out_dir / "summary.json").write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
    write_tables([s], out_dir / "table")
    return s


# ------------------------------------------------------------------------------------- the run
def _check_meta(out_dir: Path, meta: Dict[str, Any], write: bool = True) -> None:
    """Refuse to mix configurations in one run directory (run.json); rank 0 writes it."""
    path = out_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), meta[k]) for k in meta if old.get(k) != meta[k]}
        if diff:
            raise ValueError(
                f"out: {out_dir} holds a run with another configuration {diff}; use a new --out directory"
            )
    elif write:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def result_path(out_dir: Path, val: str) -> Path:
    return out_dir / f"{dataset_tag(val)}.jsonl"


def finish_dataset(out_dir: Path, val: str, order: Sequence[str], world: int) -> List[Dict[str, Any]]:
    """The complete, ordered records of one dataset: merge the shards (world > 1) or check the file."""
    base = result_path(out_dir, val)
    if world > 1:
        return merge_shards(shard_paths(base, world), base, key=KEY, order=order)
    recs = read_results(base, KEY)
    have = {r[KEY] for r in recs}
    missing = [k for k in order if k not in have]
    if missing:
        raise ValueError(f"out: {base} lacks {len(missing)} expressions, e.g. {missing[:3]}; rerun to resume")
    pos = {k: i for i, k in enumerate(order)}
    return sorted(recs, key=lambda r: pos[r[KEY]])


def run(
    args: argparse.Namespace,
    model: Any,
    make_dataset: Callable[[str], Any],
    collate: Callable[[List[Any]], Dict[str, Any]],
    dims: DecoderDims,
    device: Any,
    image_dtype: torch.dtype,
    env: Optional[Dict[str, str]] = None,
) -> Optional[Dict[str, Any]]:
    """Evaluate every ``--val-dataset`` on this rank's shard; on a single process (or with
    ``--merge-only``) merge and write summary.json / table.md / table.csv. Returns the summary."""
    info = dist_info(env)
    out_dir = Path(args.out)
    pruner, method_name, config = build_pruner(args, device=str(device))
    vals = expand_val_datasets(args.val_dataset)
    meta = {
        "method": method_name,
        "config": config,
        "prune": args.prune,
        "version": args.version,
        "val_datasets": vals,
        "paper_t": args.paper_t,
        "dims": [dims.hidden, dims.intermediate, dims.layers],
        "limit": args.limit,
    }
    _check_meta(out_dir, meta, write=info.is_main)
    datasets = {val: make_dataset(val) for val in vals}  # all annotations load before any GPU work
    per_dataset: Dict[str, List[Dict[str, Any]]] = {}
    for val in vals:
        dataset = datasets[val]
        items = all_expressions(dataset, args.limit)
        order = [e.key for _, exprs in items for e in exprs]
        if len(set(order)) != len(order):
            raise ValueError(f"val_dataset: {val} yields duplicate expression keys")
        if not args.merge_only:
            mine = shard_slice(items, info.rank, info.world_size)
            path = shard_path(result_path(out_dir, val), info.rank, info.world_size)
            out_dir.mkdir(parents=True, exist_ok=True)
            with ResultWriter(path, key=KEY) as writer:
                evaluate_dataset(
                    model, dataset, collate, pruner, writer, mine, dims, device=device, image_dtype=image_dtype,
                    paper_t=args.paper_t, progress=not args.no_progress,
                    desc=f"{val} [{info.rank + 1}/{info.world_size}]",
                )
        if args.merge_only or info.world_size == 1:
            world = info.world_size if not args.merge_only else _shard_world(out_dir, val)
            per_dataset[val] = finish_dataset(out_dir, val, order, world)
    if per_dataset:
        summary = run_summary(out_dir, meta, per_dataset)
        for val in vals:
            s = summary["datasets"][val]
            print(f"[eval_seg] {val}: gIoU {s['gIoU']:.2f}  cIoU {s['cIoU']:.2f}  N_avg {s['n_avg']:.1f}  "
                  f"TFLOPs {s['tflops']:.4g}  ({s['n']} expressions)")
        return summary
    return None


def _shard_world(out_dir: Path, val: str) -> int:
    """World size of the shard files of ``val`` in ``out_dir`` (1 when the unsharded file exists)."""
    base = result_path(out_dir, val)
    worlds = set()
    for p in out_dir.glob(f"{base.stem}.rank*-of-*{base.suffix}"):
        tail = p.name[len(base.stem) + len(".rank"):-len(base.suffix)]
        try:
            worlds.add(int(tail.split("-of-")[1]))
        except (IndexError, ValueError):
            continue
    if len(worlds) > 1:
        raise ValueError(f"out: {out_dir} holds {val} shards of several world sizes {sorted(worlds)}")
    if worlds:
        return worlds.pop()
    if base.exists():
        return 1
    raise ValueError(f"out: no results for {val} in {out_dir}")


# ---------------------------------------------------------------------------------- LISA loading
def _lisa_path(root: str) -> Path:
    lisa = Path(root).resolve()
    src = lisa / "model" / "LISA.py"
    if not src.exists():
        raise ValueError(
            f"lisa_root: {lisa} has no model/LISA.py; initialise and patch the submodule: "
            f"bash scripts/apply_patches.sh LISA"
        )
    if MARKER not in src.read_text(encoding="utf-8"):
        raise ValueError(f"lisa_root: {src} is not patched; run: bash scripts/apply_patches.sh LISA")
    return lisa


def dataset_root(args: argparse.Namespace, val: str) -> str:
    """The ``base_image_dir`` LISA's ValDataset needs for ``val``.

    ValDataset reads ReasonSeg from ``<base>/reason_seg/ReasonSeg/<split>`` but RefCOCO* from
    ``<base>/<refcoco*>/refs(<splitBy>).p`` with images under ``<base>/images/mscoco/images/train2014``,
    while LISA's README puts them under ``<dataset>/refer_seg/``: one ``--dataset_dir`` cannot serve both.
    ReasonSeg gets ``--dataset-dir``, the referring sets ``--refer-seg-dir`` (default ``<dataset-dir>/refer_seg``).
    """
    if val.startswith("ReasonSeg|"):
        return args.dataset_dir
    return args.refer_seg_dir or os.path.join(args.dataset_dir, "refer_seg")


def _import_lisa(root: str) -> Path:
    lisa = _lisa_path(root)
    if str(lisa) not in sys.path:
        sys.path.insert(0, str(lisa))
    return lisa


def load_data(args: argparse.Namespace):
    """Tokenizer, LISA config, ValDataset factory and collate_fn exactly as train_ds.py builds them."""
    _import_lisa(args.lisa_root)
    import transformers
    from functools import partial

    from model.llava import conversation as conversation_lib
    from model.llava.model.language_model.llava_llama import LlavaConfig
    from utils.dataset import ValDataset, collate_fn
    from utils.utils import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        args.version, model_max_length=args.model_max_length, padding_side="right", use_fast=False
    )
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.add_tokens("[SEG]")  # train_ds.py; already in the released tokenizers (no-op)
    seg_token_idx = tokenizer("[SEG]", add_special_tokens=False).input_ids[0]
    tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)

    config = LlavaConfig.from_pretrained(args.version)
    if args.vision_tower:  # LISAForCausalLM reads the tower from the config of a released checkpoint
        config.vision_tower = config.mm_vision_tower = args.vision_tower
    conversation_lib.default_conversation = conversation_lib.conv_templates[args.conv_type]
    vision_tower = config.vision_tower

    def make_dataset(val: str):
        return ValDataset(dataset_root(args, val), tokenizer, vision_tower, val, args.image_size)

    collate = partial(collate_fn, tokenizer=tokenizer, conv_type=args.conv_type, use_mm_start_end=True,
                      local_rank=dist_info().local_rank)
    dims = DecoderDims.from_config(config) if args.dims == "auto" else DIMS[args.dims]
    return tokenizer, seg_token_idx, config, make_dataset, collate, dims


def load_model(args: argparse.Namespace, config: Any, tokenizer: Any, seg_token_idx: int, device: torch.device):
    """LISAForCausalLM as chat.py loads it (bf16/fp16/fp32, no LoRA wrap, no deepspeed)."""
    from model.LISA import LISAForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.half, "fp32": torch.float32}[args.precision]
    model = LISAForCausalLM.from_pretrained(
        args.version, config=config, torch_dtype=dtype, low_cpu_mem_usage=True,
        vision_tower=config.vision_tower, seg_token_idx=seg_token_idx,
    )
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(
            f"version: the tokenizer has {len(tokenizer)} tokens but the checkpoint's embeddings {vocab}; "
            f"expected a merged LISA checkpoint that already contains [SEG], <im_start>, <im_end>"
        )
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.get_model().initialize_vision_modules(model.get_model().config)
    model.get_model().get_vision_tower().to(dtype=dtype)
    model = model.to(dtype=dtype, device=device).eval()
    model.get_model().get_vision_tower().to(device=device)
    return model, dtype


# ---------------------------------------------------------------------------------------- mains
def main_table(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(description="Combine the summary.json of several runs into one paper-style table")
    p.add_argument("--runs", nargs="+", required=True, help="run directories (each with summary.json)")
    p.add_argument("--out", required=True, help="output base path: writes <out>.md and <out>.csv")
    a = p.parse_args(argv)
    summaries = []
    for d in a.runs:
        f = Path(d) / "summary.json"
        if not f.exists():
            raise ValueError(f"runs: {d} has no summary.json (run or --merge-only it first)")
        summaries.append(json.loads(f.read_text(encoding="utf-8")))
    md, cs = write_tables(summaries, Path(a.out))
    print(md.read_text(encoding="utf-8"))
    print(f"[eval_seg] wrote {md} and {cs}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "table":
        main_table(argv[1:])
        return
    args = build_parser().parse_args(argv)
    if not args.version or not args.dataset_dir:
        raise SystemExit("eval_seg.py: --version and --dataset-dir are required")
    info = dist_info()
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank)
    elif args.merge_only:
        device = torch.device("cpu")
    else:
        raise SystemExit("eval_seg.py: LISA's model_forward needs a CUDA device (it calls .cuda()); none found")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    tokenizer, seg_token_idx, config, make_dataset, collate, dims = load_data(args)
    if args.merge_only:
        model, dtype = None, torch.float32
    else:
        model, dtype = load_model(args, config, tokenizer, seg_token_idx, device)
    run(args, model, make_dataset, collate, dims, device, dtype)


if __name__ == "__main__":
    main()
