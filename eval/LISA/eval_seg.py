#!/usr/bin/env python
"""LISA referring / reasoning segmentation under visual-token pruning (LVLM_CSP and its baselines).

A standalone replacement for ``train_ds.py --eval_only`` (no deepspeed, no HybridDataset, no LoRA
wrap): one process per GPU loads the merged LISA checkpoint as ``chat.py`` does, builds LISA's own
``ValDataset`` + ``collate_fn`` exactly as ``train_ds.py`` does, and runs ``model(**input_dict)``
(teacher-forced ``model_forward(inference=True)``: one forward over prompt + ``[SEG].</s>`` for all
expressions of an image) inside ``shared.prune(model, *methods, host="lisa")`` (the patched
``model/LISA.py`` reports the spliced sequence to the session). Needs the LISA submodule with
``patches/LISA`` applied (``scripts/apply_patches.sh LISA``).

This file holds only what is LISA's: data (ValDataset splits), the model call and the metric
(gIoU/cIoU as LISA's ``validate``). Methods by name, protocol presets, run settings, resume, sharding,
progress, ``--on-error skip`` and the accounting come from ``shared.evalkit``.

    python eval/LISA/eval_seg.py --version xinlai/LISA-7B-v1 --dataset-dir ./dataset --out out/csp \\
        --method lvlm_csp --method-args preset=7b-224/8-64-6-16 clustering=cls
    python eval/LISA/eval_seg.py --preset paper --version ... --dataset-dir ... --out out/paper
    python eval/LISA/eval_seg.py table --runs out/none out/csp out/fastv --out out/table

Per expression (key ``<image id>:<sentence index>``) one JSONL record: LISA's per-class intersection
and union, the foreground IoU, the visual tokens each decoder layer saw, N_avg, and prefill TFLOPs
(LVLM_CSP's convention, 2 × Eq. 11) measured and at the paper's fixed text length T. Seg-First runs
(``--csp-masks yolo:PATH|sam:PATH|sam-shared:PATH``) add the mask source, the measured |S|
(``selected``) and in ``info`` the instances, quotas, ``fallback_used`` and ``mask_seconds``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from shared import evalkit  # noqa: E402
from shared.accounting import CONVENTIONS, DIMS, DecoderDims, prefill_flops  # noqa: E402
from shared.hosts.lisa import QUERIES  # noqa: E402
from shared.metrics.segmentation import SegmentationMeter, expression_iou, intersection_union  # noqa: E402
from shared.runio import dist_info  # noqa: E402

DEFAULT_VAL = ("refcoco|unc|val", "refcoco+|unc|val", "refcocog|umd|val", "ReasonSeg|val")
#: LVLM_CSP's TFLOPs are printed at a fixed text length the paper does not state; T = 62 reproduces its
#: 224-px rows (see shared.paper_tables), a RefCOCO prompt has 59-70 text tokens.
PAPER_TEXT_TOKENS = 62
MARKER = "shared_lisa"  # present in the patched model/LISA.py
#: ``--preset``: the LVLM_CSP paper's main setting on LISA-7B at 224 px (Table 1), bf16 as chat.py.
PRESETS = {
    "paper": {"method": "lvlm_csp", "method_args": ["preset=7b-224/8-64-6-16"], "precision": "bf16",
              "query": "pre_seg", "image_size": 1024, "conv_type": "llava_v1"},
}


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
    g.add_argument("--seed", type=int, default=0, help="torch's global seed (methods take their own seed=)")

    evalkit.add_method_args(p)
    g = p.add_argument_group("LISA host options (shared.hosts.lisa)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS), help="the paper's protocol (see PRESETS)")
    g.add_argument("--query", default="pre_seg", choices=QUERIES,
                   help="scoring query of FastV/PDrop: the token before [SEG] (last prompt token), [SEG], or </s>")
    g.add_argument("--csp-masks", default=None, metavar="KIND:PATH",
                   help="Seg-First instance masks (clustering=seg_first): yolo:<yolo11n-seg.pt>, sam:<sam_vit_*.pth> "
                        "(SAM automatic masks, its own image encoder) or sam-shared:<sam_vit_h_4b8939.pth> (SAM's "
                        "decoder on the embeddings LISA's SAM encoder computes anyway); local files, never downloaded")
    g.add_argument("--mask-args", nargs="*", default=[], metavar="K=V",
                   help="mask source parameters: yolo imgsz/conf/iou; sam points_per_side, points_per_batch, "
                        "pred_iou_thresh, stability_score_thresh, box_nms_thresh, min_mask_region_area, model_type")
    g.add_argument("--mask-device", default=None, help="device of the mask source (default: the model's device)")
    g.add_argument("--mask-threshold", type=float, default=0.5, help="Seg-First patch coverage threshold")
    g.add_argument("--yolo-weights", default=None, help=argparse.SUPPRESS)  # replaced by --csp-masks yolo:PATH
    g.add_argument("--yolo-device", default=None, help=argparse.SUPPRESS)  # replaced by --mask-device

    g = p.add_argument_group("output and accounting")
    g.add_argument("--out", required=True, help="run directory (results, summary.json, table.md/.csv)")
    g.add_argument("--dims", default="auto", choices=("auto",) + tuple(DIMS),
                   help="decoder dims for TFLOPs (auto: from the checkpoint's config)")
    g.add_argument("--paper-t", type=int, default=PAPER_TEXT_TOKENS,
                   help="fixed text tokens T of the paper-style TFLOPs column")
    g.add_argument("--on-error", default="raise", choices=evalkit.runner.ON_ERROR,
                   help="skip: record an image that fails (e.g. a missing file) with the reason and go on")
    g.add_argument("--merge-only", action="store_true",
                   help="only merge the shard files of a finished multi-process run and write the summary")
    g.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.yolo_weights is not None:
        parser.error(f"--yolo-weights was replaced by --csp-masks yolo:PATH (here: --csp-masks yolo:{args.yolo_weights})")
    if args.yolo_device is not None:
        parser.error("--yolo-device was replaced by --mask-device")
    args.mask_kwargs = evalkit.parse_kv(args.mask_args, "--mask-args")
    if args.csp_masks is not None:
        from shared.segfirst import parse_mask_spec

        try:
            parse_mask_spec(args.csp_masks)
        except ValueError as e:
            parser.error(str(e))
    elif args.mask_kwargs:
        parser.error("--mask-args: parameters of a mask source, but no --csp-masks names one")
    args.protocol, _ = evalkit.apply_preset(args, parser, PRESETS, args.preset)
    return args


# -------------------------------------------------------------------------------------- dataset
def expression_keys(dataset: Any, idx: int) -> List[Dict[str, Any]]:
    """The expressions ``ValDataset[idx]`` yields, in its order, without loading the image: key, image
    id, sentence index and text (refer_seg: every sentence of every ref of the image, lowercased and
    stripped as ValDataset does; ReasonSeg: the first sentence only, image id = the file stem)."""
    if dataset.data_type == "refer_seg":
        ds = dataset.refer_seg_ds
        image_id = ds["images"][idx]["id"]
        sents = [s["sent"].strip().lower() for ref in ds["img2refs"][image_id] for s in ref["sentences"]]
        return [{"key": f"{image_id}:{j}", "image_id": image_id, "sent_idx": j, "sentence": s}
                for j, s in enumerate(sents)]
    stem = Path(dataset.images[idx]).stem
    return [{"key": f"{stem}:0", "image_id": stem, "sent_idx": 0, "sentence": ""}]


def image_path(dataset: Any, idx: int) -> str:
    """The file ValDataset will read for item ``idx``."""
    if dataset.data_type == "refer_seg":
        return dataset.refer_seg_ds["images"][idx]["file_name"]
    return dataset.images[idx]


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


class LisaSplit(evalkit.Benchmark):
    """One ValDataset split: a job per image (all its expressions in one teacher-forced forward)."""

    def __init__(self, val: str, dataset: Any, collate: Any, model: Any, methods: Sequence[Any],
                 host_options: Dict[str, Any], device: Any, image_dtype: torch.dtype, limit: Optional[int]) -> None:
        self.name, self.title = dataset_tag(val), dataset_title(val)
        self.val, self.dataset, self.collate = val, dataset, collate
        self.model, self.methods, self.host_options = model, list(methods), host_options
        self.mask_source: Optional[str] = None  # the --csp-masks spec, recorded per Seg-First sample
        self.device, self.image_dtype, self.limit = device, image_dtype, limit

    def jobs(self) -> List[evalkit.Job]:
        n = len(self.dataset) if self.limit is None else min(self.limit, len(self.dataset))
        out = []
        for i in range(n):
            exprs = expression_keys(self.dataset, i)
            out.append(evalkit.Job([e["key"] for e in exprs], payload=(i, exprs), label=image_path(self.dataset, i)))
        return out

    def run(self, job: evalkit.Job) -> evalkit.JobOutput:
        import shared

        idx, exprs = job.payload
        if not os.path.exists(job.label):
            raise FileNotFoundError(f"image: {job.label} does not exist (item {idx} of {self.val})")
        batch = self.collate([self.dataset[idx]])
        rows = int(batch["input_ids"].shape[0])
        if rows != len(exprs):
            raise RuntimeError(
                f"dataset: image {idx} gave {rows} expression rows but its annotation lists {len(exprs)}; "
                f"the key enumeration no longer matches ValDataset"
            )
        batch = to_device(batch, self.device, self.image_dtype)
        sync = torch.cuda.synchronize if str(self.device).startswith("cuda") else (lambda *a: None)
        with torch.no_grad(), shared.prune(self.model, *self.methods, host="lisa", **self.host_options) as session:
            t0 = time.perf_counter()
            out = self.model(**batch)
            sync()
            seconds = time.perf_counter() - t0
        if session.last is None:
            raise RuntimeError("model: the forward reported nothing to the session; is the LISA checkout patched? "
                               "(scripts/apply_patches.sh LISA)")
        pred, gt = out["pred_masks"][0], out["gt_masks"][0]
        if pred.shape[0] != rows or gt.shape[0] != rows:
            raise RuntimeError(f"model: expected {rows} masks for image {idx}, got {pred.shape[0]} / {gt.shape[0]}")
        host = session.last.host
        clustered = _clustered(session.last)
        records = []
        for r, e in enumerate(exprs):
            inter, union = intersection_union(pred[r] > 0, gt[r].int())
            rec = dict(e, image=os.path.basename(job.label), intersection=[int(v) for v in inter],
                       union=[int(v) for v in union], iou=float(expression_iou(inter, union)[1]),
                       image_tokens=int(host["image_tokens"]), selected=clustered[r])
            info = session.last.info[r] if session.last.info else {}
            if info:
                rec["info"] = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in info.items()}
                if host.get("instances") is not None:
                    rec["info"]["instances"] = host["instances"]
                    rec["info"]["mask_seconds"] = host["mask_seconds"]
                    rec["mask_source"] = self.mask_source
            records.append(rec)
        return evalkit.JobOutput(records, session.last, seconds)

    def metrics(self, records: List[Dict[str, Any]]) -> Dict[str, Any]:
        """gIoU/cIoU (percent, LISA's formulas), |S| of a clustering stage, Seg-First fallbacks."""
        meter = SegmentationMeter()
        for r in records:
            meter.add(r["intersection"], r["union"])
        out: Dict[str, Any] = dict(meter.summary())
        sel = [r["selected"] for r in records if r.get("selected") is not None]
        out["selected"] = sum(sel) / len(sel) if sel else None
        out["image_tokens"] = evalkit.mean_of(records, "image_tokens")
        out["tflops_paper_t"] = evalkit.mean_of(records, "tflops_paper_t")
        infos = [r["info"] for r in records if "info" in r]
        if infos:
            out["seg_first_fallbacks"] = sum(1 for i in infos if i.get("fallback_used"))
            out["instances"] = evalkit.mean_of(infos, "instances")
            out["mask_seconds"] = evalkit.mean_of(infos, "mask_seconds")
        return out


def _clustered(forward: Any) -> List[Optional[int]]:
    """Per row, |S| of an LVLM_CSP clustering stage (the visual tokens of layer 0 when fewer than the
    spliced ones), else None."""
    stats = forward.stats
    out = []
    for b in range(stats.visual.shape[0]):
        first, spliced = int(stats.visual[b, 0]), int(forward.host.get("image_tokens", stats.visual_tokens[b]))
        out.append(first if first < spliced and int(stats.visual[b].max()) == spliced else None)
    return out


# -------------------------------------------------------------------------------------- tables
def table(summaries: Sequence[Dict[str, Any]]):
    """The LVLM_CSP paper's layout: method, protocol, N_avg, TFLOPs, TFLOPs@T, per dataset mIoU (gIoU) / cIoU;
    plus the clustering stage's measured |S| (mean over expressions), the Seg-First mask source and the
    expressions whose Seg-First selection fell back to uniform (no instance inside the CLIP crop)."""
    titles: Dict[str, str] = {}
    for s in summaries:
        for name, b in s["benchmarks"].items():
            titles.setdefault(name, b["title"])
    t = summaries[0]["settings"]["paper_t"] if summaries else PAPER_TEXT_TOKENS
    header = ["method", "protocol", "N_avg", "TFLOPs", f"TFLOPs@T={t}", "selected", "masks", "fallbacks", "skipped"]
    for name in titles:
        header += [f"{titles[name]} mIoU", f"{titles[name]} cIoU"]
    rows = []
    for s in summaries:
        eff = s["efficiency"]
        paper_t = evalkit.mean_of([b["metrics"] for b in s["benchmarks"].values() if b["metrics"]], "tflops_paper_t")
        skipped = sum(b["skipped"] for b in s["benchmarks"].values())
        done = [b for b in s["benchmarks"].values() if b["metrics"]]
        sel = [(b["metrics"]["selected"], b["n"]) for b in done if b["metrics"].get("selected") is not None]
        mean_sel = sum(v * n for v, n in sel) / sum(n for _, n in sel) if sel and sum(n for _, n in sel) else None
        falls = [b["metrics"]["seg_first_fallbacks"] for b in done if "seg_first_fallbacks" in b["metrics"]]
        row = [s["settings"]["label"], s["settings"]["protocol"], evalkit.fmt(eff["n_avg"], 1),
               evalkit.fmt(eff["tflops"], 3), evalkit.fmt(paper_t, 3), evalkit.fmt(mean_sel, 1),
               evalkit.fmt(mask_label(s["settings"].get("csp_masks"))), evalkit.fmt(sum(falls) if falls else None),
               str(skipped)]
        for name in titles:
            m = s["benchmarks"].get(name, {}).get("metrics")
            row += [evalkit.fmt(None if not m else m["gIoU"], 1), evalkit.fmt(None if not m else m["cIoU"], 1)]
        rows.append(row)
    notes = [
        "mIoU = gIoU (mean per-expression IoU), cIoU = cumulative I / cumulative U (LISA's validate)",
        "N_avg: visual tokens per decoder layer averaged over layers and expressions (the paper prints floor)",
        "TFLOPs: 2 x Eq. 11 per expression at its measured token counts; TFLOPs@T: the same at T text tokens",
        "protocol: the --preset a row ran under ('*': with flags overridden; custom: none)",
        "selected: |S|, the image tokens the clustering stage kept (measured, mean over expressions; Seg-First's "
        "quotas do not sum to Nc exactly)",
        "masks: the Seg-First mask source (--csp-masks); fallbacks: expressions whose image gave no instance "
        "inside the CLIP crop, so Nc uniform tokens were taken",
    ]
    return header, rows, notes


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


def check_split(args: argparse.Namespace, val: str) -> None:
    """Refuse a split whose data are not where ValDataset will look (before any model work)."""
    root = dataset_root(args, val)
    parts = val.split("|")
    if parts[0] == "ReasonSeg":
        d = os.path.join(root, "reason_seg", "ReasonSeg", parts[1])
        if not os.path.isdir(d) or not any(f.endswith(".jpg") for f in os.listdir(d)):
            raise ValueError(f"val_dataset: {val} has no images in {d}")
    else:
        import pickle

        refs = os.path.join(root, parts[0], f"refs({parts[1]}).p")
        if not os.path.exists(refs):
            raise ValueError(f"val_dataset: {val} needs {refs}, which does not exist")
        with open(refs, "rb") as fh:
            splits = {r.get("split") for r in pickle.load(fh)}
        if parts[2] not in splits:
            raise ValueError(f"val_dataset: {val} has no expressions in {refs} (its splits: {sorted(map(str, splits))})")


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
        check_split(args, val)
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


# ------------------------------------------------------------------------------------- the run
def settings(args: argparse.Namespace, methods: Sequence[Any], dims: DecoderDims) -> Dict[str, Any]:
    """Every setting that changes the results (run.json: a resume with other values is refused)."""
    return {
        "host": "lisa", "version": args.version, "dataset_dir": args.dataset_dir, "refer_seg_dir": args.refer_seg_dir,
        "val_datasets": expand_val_datasets(args.val_dataset), "vision_tower": args.vision_tower,
        "precision": args.precision, "image_size": args.image_size, "model_max_length": args.model_max_length,
        "conv_type": args.conv_type, "limit": args.limit, "seed": args.seed, "query": args.query,
        "csp_masks": args.csp_masks, "mask_args": args.mask_kwargs, "mask_threshold": args.mask_threshold,
        "methods": evalkit.method_settings(methods), "label": "LISA" + (
            "" if not methods else " + " + evalkit.method_label(methods)),
        "protocol": args.protocol, "paper_t": args.paper_t, "dims": [dims.hidden, dims.intermediate, dims.layers],
    }


def host_options(args: argparse.Namespace, methods: Sequence[Any], device: Any) -> Dict[str, Any]:
    opts: Dict[str, Any] = {"query": args.query, "mask_threshold": args.mask_threshold}
    if any("instance_masks" in m.needs() for m in methods):
        if not args.csp_masks:
            raise ValueError("csp_masks: Seg-First clustering needs --csp-masks yolo:PATH|sam:PATH|sam-shared:PATH "
                             "(local weights)")
        from shared import segfirst

        opts["mask_source"] = segfirst.mask_source_from_spec(args.csp_masks, device=args.mask_device or str(device),
                                                             **args.mask_kwargs)
    elif args.csp_masks:
        raise ValueError(f"csp_masks: {args.csp_masks} is for Seg-First clustering (--method lvlm_csp --method-args "
                         f"clustering=seg_first); this run's methods use no instance masks")
    return opts


def mask_label(spec: Optional[str]) -> Optional[str]:
    """Table form of a ``--csp-masks`` spec: ``sam-shared:/ckpt/sam_vit_h_4b8939.pth`` → ``sam-shared:sam_vit_h_4b8939.pth``."""
    if not spec:
        return None
    kind, path = spec.split(":", 1)
    return f"{kind}:{os.path.basename(path)}"


def run(args: argparse.Namespace, model: Any, make_dataset: Any, collate: Any, dims: DecoderDims, device: Any,
        image_dtype: torch.dtype, env: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    """Evaluate every ``--val-dataset`` on this rank's shard; on a single process (or with ``--merge-only``)
    merge and write summary.json / table.md / table.csv. Returns the summary."""
    methods = evalkit.methods_from_args(args)
    vals = expand_val_datasets(args.val_dataset)
    datasets = {val: make_dataset(val) for val in vals}  # every split loads (and is checked) before any GPU work
    opts = host_options(args, methods, device) if not args.merge_only else {}
    benches = [LisaSplit(v, datasets[v], collate, model, methods, opts, device, image_dtype, args.limit) for v in vals]
    for b in benches:
        b.mask_source = args.csp_masks if "mask_source" in opts else None
    conv = CONVENTIONS["lvlm_csp"]

    def at_paper_t(e):
        return {"tflops_paper_t": prefill_flops([v + args.paper_t for v in e.visual_per_layer], dims, conv) / 1e12}

    runner = evalkit.Run(args.out, settings(args, methods, dims), benches,
                         evalkit.Accounting(dims, "lvlm_csp", extra=at_paper_t), on_error=args.on_error,
                         progress=not args.no_progress, env=env)
    runner.prepare()
    if not args.merge_only:
        runner.evaluate()
    if not args.merge_only and runner.info.world_size > 1:
        if not runner.barrier():
            print(f"[eval_seg] rank {runner.info.rank}: shard done; run --merge-only once every rank has finished")
            return None
        if not runner.info.is_main:
            return None
    summary = runner.finish()
    header, rows, notes = table([summary])
    print(evalkit.write_table(header, rows, notes, Path(args.out) / "table"))
    for name, b in summary["benchmarks"].items():
        m = b["metrics"]
        if m:
            print(f"[eval_seg] {b['title']}: gIoU {m['gIoU']:.2f}  cIoU {m['cIoU']:.2f}  ({b['n']} expressions, "
                  f"{b['skipped']} skipped)")
    return summary


# ---------------------------------------------------------------------------------------- mains
def main_table(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(description="Combine the summary.json of several runs into one paper-style table")
    p.add_argument("--runs", nargs="+", required=True, help="run directories (each with summary.json)")
    p.add_argument("--out", required=True, help="output base path: writes <out>.md and <out>.csv")
    a = p.parse_args(argv)
    summaries = evalkit.load_summaries(a.runs)
    header, rows, notes = table(summaries)
    print(evalkit.write_table(header, rows, notes, Path(a.out)))


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "table":
        main_table(argv[1:])
        return
    args = parse_args(argv)
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
