#!/usr/bin/env python
"""Chat-Scene on ScanRefer / Multi3dRefer / Scan2Cap / ScanQA / SQA3D under visual-token pruning (Fast3D, FastV).

A standalone replacement for ``tasks/train.py`` with ``evaluate=True`` (no Slurm, no DDP wrap, no
optimizer): one process per GPU builds Chat-Scene's config from its own ``scripts/config.py`` with the
values of ``scripts/run.sh`` (``utils.config.Config``), builds ``Chat3D(config)`` (the vendored Vicuna
loaded by Chat3D's own ``__init__``: LoRA r=16, ``<OBJ000>``.. ``<OBJ{max_obj_num-1}>`` added), loads the
Chat-Scene checkpoint as ``tasks/shared_utils.py::setup_model`` does, reads each benchmark with
Chat-Scene's ``ValDataset`` + ``val_collate_fn``, and answers every annotation with
``model(**batch, is_eval=True)`` (``Chat3D.evaluate``: beam 5, ``max_txt_len`` new tokens) inside
``shared.prune(model, *methods, host="chat_scene")`` (the patched ``models/modeling_llama.py`` runs the
decoder under the session). Needs the Chat-Scene submodule with ``patches/Chat-Scene`` applied
(``scripts/apply_patches.sh Chat-Scene``).

This file holds only what is Chat-Scene's: config, model and checkpoint loading, the datasets, the model
call, the prediction records (``tasks/train.py::evaluate``'s ``save_preds`` fields) and the metric calls
(``shared.metrics.chat_scene``, Chat-Scene's ``utils/eval.py``). Methods by name, run settings, resume,
sharding (contiguous slices, merged in annotation order: no padded duplicates, unlike upstream's
``DistributedSampler``), progress, ``--on-error skip`` and the accounting (visual tokens per decoder layer
from the session's records, FastV/Fast3D FLOPs convention, Fast3D's layer-averaged pruning ratio) come from
``shared.evalkit``.

    python eval/Chat-Scene/eval_chatscene.py --tasks scanrefer scanqa --llm llm/vicuna-7b-v1.5 \\
        --ckpt ckpt/ckpt_01_3446.pth --anno-root annotations --out out/vanilla
    python eval/Chat-Scene/eval_chatscene.py --tasks all ... --out out/fastv --method fastv --method-args layer=2 keep=15
    python eval/Chat-Scene/eval_chatscene.py --tasks scanrefer ... --out out/gap --preset fast3d --method fast3d \
        --method-args layer=2 keep=15 --object-scores scanrefer=infer_attn_maps_val_scanrefer.pt
    python eval/Chat-Scene/eval_chatscene.py table --runs out/vanilla out/fastv --out out/table
    python eval/Chat-Scene/eval_chatscene.py targets --tasks all --split train --llm llm/vicuna-7b-v1.5 \
        --ckpt ckpt/ckpt_01_3446.pth --anno-root annotations --out out/targets [--preset fast3d] [--chunk 64]

``targets`` writes GAP's training targets (Fast3D's ``extract_attn_maps``) from the frozen LLM:
``<out>/infer_attn_maps_<split>_<task>.pt``, a list of ``{key, index, a_map, a_map_ori}`` in object order
(see ``target_sample`` / ``teacher_forced_input`` / ``object_targets``); resumable, one file per rank under
torchrun, merged by ``--merge-only``.

``--preset fast3d`` is Fast3D's protocol: identity object ids and eager attention (its README numbers
also come from its transformers 4.31 fork, which this does not use). ``--object-scores TASK=PATH`` hands the
host per-object scores for every annotation (Fast3D's GAP prediction files, a list over the annotation file
of ``{'a_map': (100,)}``), keyed ``"<task>:<annotation index>"`` (``sample_keys``).

Object ids: Chat-Scene's ``BaseDataset.get_anno`` permutes the object slots (``torch.randperm``) and
``recover_caption`` replaces an out-of-range id with ``random.randint``; upstream draws both from the
global RNGs, so its figures depend on the seed, the world size and the DataLoader workers. Here both RNGs
are seeded per annotation from (``--seed``, benchmark, annotation index) right before the sample is read, so
a sharded or resumed run gives exactly the single-process result. ``--identity-object-ids`` is Fast3D's
protocol (slot i holds object i).

Per annotation (key: its index in the annotation file) one JSONL record: Chat-Scene's prediction fields
(``scene_id, gt_id, pred_id, qid, prompt, pred, ref_captions, type_info``), the slot permutation, and the
accounting of the prefill (visual tokens per layer, text tokens, N_avg, pruning ratio, TFLOPs). ``finish``
also writes ``preds_<task>.json`` in Chat-Scene's format (sorted as ``tasks/train.py`` sorts them).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from shared import evalkit  # noqa: E402
from shared.accounting import DecoderDims  # noqa: E402
from shared.runio import dist_info  # noqa: E402

TASKS = ("scanrefer", "multi3dref", "scan2cap", "scanqa", "sqa3d")
TITLES = {"scanrefer": "ScanRefer", "multi3dref": "Multi3dRefer", "scan2cap": "Scan2Cap", "scanqa": "ScanQA",
          "sqa3d": "SQA3D"}
#: the table's columns per benchmark: (heading, metric key) — Chat-Scene's README columns
COLUMNS = {
    "scanrefer": (("Acc@0.25", "[scanrefer] Acc@0.25"), ("Acc@0.5", "[scanrefer] Acc@0.50")),
    "multi3dref": (("F1@0.25", "[multi3dref] all F1@0.25"), ("F1@0.5", "[multi3dref] all F1@0.50")),
    "scan2cap": (("C@0.5", "[scan2cap] CIDEr@0.50"), ("B-4@0.5", "[scan2cap] Bleu_4@0.50")),
    "scanqa": (("C", "[scanqa] CIDEr"), ("B-4", "[scanqa] Bleu_4")),
    "sqa3d": (("EM", "[sqa3d] EM1"), ("EM-R", "[sqa3d] EM1_refined")),
}
#: ``scripts/run.sh`` values (the released checkpoint's training and eval settings), as
#: ``Config.merge_list`` options; ``--max-obj-num``, ``--lora-r``, ``--lora-alpha`` override theirs.
RUN_SH = {
    "model.add_scene_token": "False", "model.add_img_token": "True", "model.train_emb": "True",
    "model.train_img_proj": "True", "model.no_obj": "False", "model.input_dim": "1024", "model.bidirection": "False",
    "model.add_pos_emb": "False", "model.feat_fusion": "False", "model.fuse_with_id": "False",
    "model.use_location_token": "False", "evaluate": "True", "debug": "False",
}
ATTN = ("flash_attention_2", "sdpa", "eager")
MARKER = "shared_chat_scene"  # the patched models/modeling_llama.py and models/chat3d.py call it
#: ``--preset``: Fast3D's evaluation protocol (its ValDataset forces identity slots; eager attention on its
#: transformers 4.31 fork, here on Chat-Scene's vendored 4.39 LLaMA).
PRESETS = {"fast3d": {"identity_object_ids": True, "attn_implementation": "eager"}}
SAMPLE_KEY = "sample_key"  # the batch field carrying the record key to the host (shared.hosts.chat_scene)


# ------------------------------------------------------------------------------------------ CLI
def expand_tasks(tasks: Sequence[str]) -> List[str]:
    """``all`` → the five benchmarks; otherwise the names in the order given (no repeats)."""
    out: List[str] = []
    for t in tasks:
        names = list(TASKS) if t == "all" else [t]
        for n in names:
            if n not in TASKS:
                raise ValueError(f"tasks: expected {', '.join(TASKS)} or all, got {t!r}")
            if n in out:
                raise ValueError(f"tasks: {n} listed twice")
            out.append(n)
    return out


def add_model_args(p: argparse.ArgumentParser, generation: bool = True) -> None:
    """The model and data flags (Chat-Scene's config, checkpoint, LLM loading, seed), shared by the commands
    (``generation``: also ``--max-new-tokens``)."""
    g = p.add_argument_group("model and data (Chat-Scene's scripts/config.py + scripts/run.sh)")
    g.add_argument("--tasks", nargs="+", default=["all"], help=f"{', '.join(TASKS)} or all")
    g.add_argument("--llm", help="the Vicuna-7B v1.5 folder (model.llama_model_path)")
    g.add_argument("--ckpt", help="the Chat-Scene checkpoint (pretrained_path), e.g. ckpt_01_3446.pth")
    g.add_argument("--anno-root", help="Chat-Scene's annotations/ folder (features, attributes, val json files)")
    g.add_argument("--chat-scene-root", default=str(REPO / "Chat-Scene"),
                   help="the patched Chat-Scene checkout (default: the submodule)")
    g.add_argument("--max-obj-num", type=int, default=100, help="object slots (run.sh: 100; 3 tokens each)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the checkpoint (run.sh: 16)")
    g.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (run.sh: 16)")
    if generation:
        g.add_argument("--max-new-tokens", type=int, default=64, help="model.max_txt_len (generate's max_new_tokens)")
    else:
        p.set_defaults(max_new_tokens=64)  # model.max_txt_len; no generation here
    g.add_argument("--attn-implementation", default="flash_attention_2", choices=ATTN,
                   help="the LLM's attention (Chat3D hard-codes flash_attention_2; eager is Fast3D's)")
    g.add_argument("--llm-dtype", default="bf16", choices=("bf16", "fp32"),
                   help="the LLM's weights (Chat3D loads bf16; projectors, embeddings and lm_head stay fp32)")
    g.add_argument("--ignore-unexpected-keys", action="store_true",
                   help="load a checkpoint holding keys the model lacks (listed on stderr) instead of refusing it")
    g.add_argument("--device", default=None, help="default cuda:<LOCAL_RANK>")
    g.add_argument("--limit", type=int, default=None, help="only the first N annotations of each benchmark")
    g.add_argument("--seed", type=int, default=42, help="per-annotation seeds of the slot permutation (config: 42)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    evalkit.add_method_args(p)
    g = p.add_argument_group("protocol and host options (shared.hosts.chat_scene)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="fast3d: Fast3D's protocol (identity object ids, eager attention)")
    g.add_argument("--identity-object-ids", action="store_true",
                   help="slot i holds object i (Fast3D's protocol) instead of Chat-Scene's random permutation")
    g.add_argument("--object-scores", nargs="*", default=[], metavar="TASK=PATH",
                   help="per-object scores of each annotation for --method fast3d (e.g. GAP predictions): a torch "
                        "file holding a list over the annotation file, each a (n,) tensor or Fast3D's {'a_map': ...}")
    g.add_argument("--gap-checkpoint", default=None,
                   help="run GAP online for --method fast3d: a GAP checkpoint (shared.apps.fast3d_train output or the "
                        "authors' checkpoint_best.pth); its time is inside each sample's measured seconds")
    g.add_argument("--roberta", default=None, help="the local roberta-base folder GAP's text encoder loads")
    g.add_argument("--scores-field", default="a_map", help="the field of Fast3D-style prediction dicts (a_map)")
    g.add_argument("--scanqa-ref-overwrite", action="store_true",
                   help="reproduce upstream's ScanQA bug: references cleaned, then overwritten by the raw ones, so EM "
                        "and caption metrics compare a cleaned prediction with raw references (set by --compat fast3d)")
    g.add_argument("--compat", default=None, choices=("fast3d",),
                   help="fast3d: the authors' semantics exactly: --preset fast3d (identity object ids, eager attention) "
                        "+ key masking with per-step re-selection from beam 0 (shared.methods.fast3d_compat; no compute "
                        "saved) + upstream's ScanQA reference bug. Only the canonical mode (default) saves compute")

    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="run directory (results, summary.json, table.md/.csv)")
    g.add_argument("--on-error", default="raise", choices=evalkit.runner.ON_ERROR,
                   help="skip: record an annotation that fails with the reason and go on")
    g.add_argument("--merge-only", action="store_true",
                   help="only merge the shard files of a finished multi-process run and write the summary")
    g.add_argument("--no-progress", action="store_true")
    return p


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: Sequence[str]) -> None:
    """Expand ``--tasks`` and check the flags that must be >= 1 (``positive``, and ``--limit`` when given)."""
    try:
        args.tasks = expand_tasks(args.tasks)
    except ValueError as e:
        parser.error(str(e))
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit: expected >= 1, got {args.limit}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common(parser, args, ("max_obj_num", "lora_r", "lora_alpha", "max_new_tokens"))
    try:
        args.object_scores_files = evalkit.parse_kv(args.object_scores, "--object-scores")
    except ValueError as e:
        parser.error(str(e))
    bad = [t for t in args.object_scores_files if t not in args.tasks]
    if bad:
        parser.error(f"--object-scores: {bad} are not among --tasks {args.tasks}")
    if (args.gap_checkpoint is None) != (args.roberta is None):
        parser.error("--gap-checkpoint/--roberta: give both (the GAP checkpoint and the local roberta-base folder)")
    if args.object_scores_files and args.method not in ("fast3d",):
        parser.error(f"--object-scores: per-object scores are read by --method fast3d only, not {args.method!r}")
    if args.gap_checkpoint and args.object_scores_files:
        parser.error("--gap-checkpoint/--object-scores: give one source of Fast3D's object scores")
    if args.compat == "fast3d":
        if args.preset not in (None, "fast3d"):
            parser.error(f"--compat fast3d: runs Fast3D's protocol; --preset {args.preset} contradicts it")
        args.preset = "fast3d"
        args.scanqa_ref_overwrite = True
    args.protocol, _ = evalkit.apply_preset(args, parser, PRESETS, args.preset)
    if args.compat:
        args.protocol = f"compat-{args.compat}" + ("*" if args.protocol.endswith("*") else "")
    return args


# ---------------------------------------------------------------------------- Chat-Scene code
def _tree(root: str, require_patch: bool = True) -> Path:
    tree = Path(root).resolve()
    if not (tree / "models" / "chat3d.py").exists():
        raise ValueError(f"chat_scene_root: {tree} has no models/chat3d.py; initialise and patch the submodule: "
                         f"bash scripts/apply_patches.sh Chat-Scene")
    if require_patch and MARKER not in (tree / "models" / "modeling_llama.py").read_text(encoding="utf-8"):
        raise ValueError(f"chat_scene_root: {tree}/models/modeling_llama.py is not patched; run: "
                         f"bash scripts/apply_patches.sh Chat-Scene")
    return tree


def import_chat_scene(root: str, require_patch: bool = True) -> Path:
    """Put the Chat-Scene tree first on ``sys.path`` (its ``models``, ``dataset``, ``utils``, ``prompts``)."""
    tree = _tree(root, require_patch)
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    return tree


def chat_scene_config(args: argparse.Namespace, tree: Path):
    """Chat-Scene's config exactly as ``tasks/train.py`` builds it: ``Config.from_file(scripts/config.py)``,
    the ``run.sh`` options merged with ``Config.merge_list``, leaves evaluated (``eval_dict_leaf``); then the
    paths made absolute: the prompts under the tree, the annotation files under ``--anno-root`` (their names
    unchanged)."""
    from utils.config import Config, eval_dict_leaf

    cfg = Config.from_file(str(tree / "scripts" / "config.py"))
    opts = dict(RUN_SH)
    opts.update({"model.max_obj_num": str(args.max_obj_num), "lora.lora_r": str(args.lora_r),
                 "lora.lora_alpha": str(args.lora_alpha), "model.max_txt_len": str(args.max_new_tokens),
                 "seed": str(args.seed)})
    flat: List[str] = []
    for k, v in opts.items():
        flat += [k, v]
    cfg = eval_dict_leaf(Config.merge_list(cfg, flat))
    # strings that must not go through eval_dict_leaf (paths)
    cfg.model.llama_model_path = args.llm or ""
    cfg.pretrained_path = args.ckpt or ""
    cfg.model.system_path = str(tree / cfg.model.system_path)
    cfg.model.instruction_path = str(tree / cfg.model.instruction_path)
    old_root = cfg.anno_root.rstrip("/") + "/"
    new_root = str(Path(args.anno_root).resolve()) if args.anno_root else old_root.rstrip("/")
    for table in (cfg.val_file_dict, cfg.train_file_dict):
        for name, files in table.items():
            table[name] = [new_root + "/" + f[len(old_root):] if isinstance(f, str) and f.startswith(old_root)
                           else f for f in files]
    cfg.anno_root = new_root
    cfg.distributed = False
    return cfg


@contextlib.contextmanager
def llm_loading(chat3d_module: Any, attn_implementation: str, dtype: torch.dtype) -> Iterator[None]:
    """Inside: ``Chat3D.__init__``'s ``LlamaForCausalLM.from_pretrained(..., torch_dtype=bfloat16,
    attn_implementation="flash_attention_2")`` loads with ``dtype`` / ``attn_implementation`` instead (the
    module-level name ``models.chat3d.LlamaForCausalLM`` is swapped for a loader; restored on exit)."""
    real = chat3d_module.LlamaForCausalLM

    class _Loader:
        @staticmethod
        def from_pretrained(*a: Any, **kw: Any) -> Any:
            kw["torch_dtype"] = dtype
            kw["attn_implementation"] = attn_implementation
            return real.from_pretrained(*a, **kw)

    chat3d_module.LlamaForCausalLM = _Loader
    try:
        yield
    finally:
        chat3d_module.LlamaForCausalLM = real


def build_chat3d(cfg: Any, attn_implementation: str = "flash_attention_2", llm_dtype: str = "bf16") -> Any:
    """``Chat3D(config=cfg)`` (Chat-Scene's own constructor) with the LLM loaded as asked, in eval mode with
    the KV cache on (``tasks/train.py::evaluate_all``)."""
    import models.chat3d as chat3d

    if attn_implementation not in ATTN:
        raise ValueError(f"attn_implementation: expected one of {', '.join(ATTN)}, got {attn_implementation!r}")
    if llm_dtype not in ("bf16", "fp32"):
        raise ValueError(f"llm_dtype: expected bf16 or fp32, got {llm_dtype!r}")
    if not cfg.model.llama_model_path or not os.path.isdir(cfg.model.llama_model_path):
        raise ValueError(f"llm: expected the Vicuna folder, got {cfg.model.llama_model_path!r}")
    dtype = torch.bfloat16 if llm_dtype == "bf16" else torch.float32
    with llm_loading(chat3d, attn_implementation, dtype):
        model = chat3d.Chat3D(config=cfg)
    model.llama_model.config.use_cache = True
    return model.eval()


def load_checkpoint(model: Any, path: str, ignore_unexpected: bool = False) -> Dict[str, Any]:
    """Load a Chat-Scene checkpoint (``{"model": state dict of the trainable parameters, "config", "epoch",
    "global_step"}``, as ``tasks/train.py`` saves it) the way ``setup_model`` does (``load_state_dict(...,
    strict=False)``), but refusing what it would silently drop: tensors whose shape differs from the model's
    (another ``max_obj_num`` or LoRA rank), trainable parameters the file lacks (they would stay random) and,
    unless ``ignore_unexpected``, keys the model does not have. The file pickles Chat-Scene's config object,
    so it is read with ``weights_only=False``: load only checkpoints you trust. Returns what was loaded."""
    if not os.path.isfile(path):
        raise ValueError(f"ckpt: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except TypeError:  # torch < 1.13 has no weights_only (and loads everything)
        ckpt = torch.load(path, map_location="cpu")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"ckpt: {path} is not a Chat-Scene checkpoint (expected a dict with a 'model' state dict)")
    state = ckpt["model"]
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in state]
    if mismatched:
        raise ValueError(f"ckpt: {len(mismatched)} tensors of {path} do not fit the model (another --max-obj-num, "
                         f"--lora-r or LLM?): {mismatched[:4]}")
    if missing:
        raise ValueError(f"ckpt: {path} lacks {len(missing)} trainable parameters of the model, e.g. {missing[:4]}")
    if unexpected:
        msg = f"ckpt: {path} holds {len(unexpected)} keys the model does not have, e.g. {unexpected[:4]}"
        if not ignore_unexpected:
            raise ValueError(msg + " (--ignore-unexpected-keys loads it anyway)")
        print(f"warning: {msg}; ignored", file=sys.stderr)
        state = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(state, strict=False)
    return {"loaded": len(state), "unexpected": unexpected, "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step")}


def llm_dims(llm: str) -> DecoderDims:
    """Decoder sizes from the Vicuna folder's config.json (no weights loaded)."""
    path = Path(llm or "") / "config.json"
    if not path.is_file():
        raise ValueError(f"llm: {path} does not exist; expected the Vicuna folder")
    c = json.loads(path.read_text(encoding="utf-8"))
    return DecoderDims(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                       c.get("num_key_value_heads"))



# -------------------------------------------------------------------------------------- dataset
def load_data(args: argparse.Namespace, require_patch: bool = True):
    """Chat-Scene's config, a ``ValDataset`` factory (``task -> dataset``, checking its files first) and
    ``val_collate_fn``, as ``dataset/__init__.py::create_dataset`` builds them."""
    tree = import_chat_scene(args.chat_scene_root, require_patch)
    cfg = chat_scene_config(args, tree)
    from dataset.dataset_val import ValDataset, val_collate_fn

    slots = int(cfg.model.max_obj_num)

    def make_dataset(task: str):
        files = cfg.val_file_dict[task]
        for f in files:
            if not os.path.isfile(f):
                raise ValueError(f"anno_root: {task} needs {f}, which does not exist")
        # ValDataset caches the scene features per file path in a class attribute (shared by the tasks); an
        # entry built for another max_obj_num would hand this model the wrong number of slots: drop it
        cached = ValDataset.cached_feats.get(files[0])
        if cached is not None and cached[0] and next(iter(cached[0].values())).shape[0] != slots:
            ValDataset.cached_feats.pop(files[0], None)
            ValDataset.cached_feats.pop(files[1], None)
        ds = ValDataset(ann_list=files, dataset_name=task, config=cfg)
        ds.ann_list = list(files)  # [features, image features, instance attributes, annotations]: for the metric
        return ds

    return cfg, make_dataset, val_collate_fn


def sample_seed(seed: int, task: str, index: int) -> int:
    """The seed of annotation ``index`` of ``task``: sha256 of (seed, task, index), 63 bits."""
    digest = hashlib.sha256(f"{seed}\x00{task}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def to_device(batch: Dict[str, Any], device: Any) -> Dict[str, Any]:
    """Tensors to ``device`` (``tasks/train.py::evaluate``), everything else as is."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def sample_key(batch: Dict[str, Any], i: int) -> str:
    """The host's per-sample key (``sample_keys`` option): ``"<task>:<annotation index>"``."""
    if SAMPLE_KEY not in batch:
        raise ValueError(f"sample_keys: the batch has no {SAMPLE_KEY!r} (build batches with ChatSceneTask.batch)")
    return str(batch[SAMPLE_KEY][i])


def load_object_scores(task: str, path: str, n: int, field: str = "a_map") -> Dict[str, torch.Tensor]:
    """``{"<task>:<i>": (objects,) float scores}`` from a torch file holding one entry per annotation of
    ``task`` (``n`` of them): a list in annotation order of tensors or dicts with ``field``, a dict keyed by
    annotation index (GAP inference files, ``infer_attn_maps_val_<tag>.pt``: ``{i: {'a_map': logits}}``, the
    authors' and ``shared.apps.fast3d_train predict``'s), or a (n, objects) tensor."""
    if not os.path.isfile(path):
        raise ValueError(f"object_scores: {path} ({task}) does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13
        data = torch.load(path, map_location="cpu")
    if isinstance(data, torch.Tensor):
        data = list(data)
    if isinstance(data, dict):  # GAP inference files: {anno_index: {"a_map": logits}} (the authors', ours)
        bad = sorted(k for k in data if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n)
        if bad:
            raise ValueError(f"object_scores: {path} has keys that are not annotation indices of {task} (0..{n - 1}): "
                             f"{bad[:5]}")
        missing = [i for i in range(n) if i not in data]
        if missing:
            raise ValueError(f"object_scores: {path} has no scores for {len(missing)} {task} annotations, e.g. "
                             f"{missing[:5]}")
        data = [data[i] for i in range(n)]
    if not isinstance(data, (list, tuple)) or len(data) != n:
        raise ValueError(f"object_scores: {path} must hold one entry per {task} annotation ({n}), got "
                         f"{len(data) if isinstance(data, (list, tuple)) else type(data).__name__}")
    out = {}
    for i, item in enumerate(data):
        if isinstance(item, dict):
            if field not in item:
                raise ValueError(f"object_scores: entry {i} of {path} has no {field!r} (fields: {sorted(item)})")
            item = item[field]
        t = torch.as_tensor(item)
        if t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"object_scores: entry {i} of {path} is not a (objects,) float tensor: {tuple(t.shape)} {t.dtype}")
        out[f"{task}:{i}"] = t.float()
    return out


def prediction_record(batch: Dict[str, Any], pred: str) -> Dict[str, Any]:
    """``tasks/train.py::evaluate``'s ``save_preds`` entry of a one-sample batch."""
    qid = batch["qid"][0]
    return {"scene_id": batch["scene_id"][0], "gt_id": int(batch["obj_ids"][0]), "pred_id": int(batch["pred_ids"][0]),
            "qid": qid.item() if isinstance(qid, torch.Tensor) else qid, "prompt": batch["custom_prompt"][0],
            "pred": pred, "ref_captions": list(batch["ref_captions"][0]), "type_info": batch["type_infos"][0]}


class _Prefill:
    """The session's record of one sample's prefill, one row: ``generate`` runs the 5 beams of a sample as
    one batch whose rows are the same prompt, so their counts must agree; one of them is the sample's."""

    def __init__(self, record: Any) -> None:
        self.record = record

    def efficiency(self, dims: DecoderDims, conv: Any) -> List[Any]:
        rows = self.record.efficiency(dims, conv)
        first = rows[0]
        if any(r.visual_per_layer != first.visual_per_layer or r.text_tokens != first.text_tokens for r in rows[1:]):
            raise RuntimeError("model: the beams of one sample saw different token counts at prefill")
        return [first]


class ChatSceneTask(evalkit.Benchmark):
    """One benchmark: a job per annotation, one ``Chat3D.evaluate`` call on a one-sample batch."""

    def __init__(self, task: str, dataset: Any, collate: Callable, model: Any, methods: Sequence[Any],
                 host_options: Dict[str, Any], device: Any, seed: int, limit: Optional[int],
                 identity_object_ids: bool = False, scanqa_ref_overwrite: bool = False,
                 anno_root: Optional[str] = None) -> None:
        self.name, self.title = task, TITLES[task]
        self.dataset, self.collate, self.model = dataset, collate, model
        self.methods, self.host_options = list(methods), dict(host_options)
        self.device, self.seed, self.limit = device, seed, limit
        self.identity_object_ids, self.scanqa_ref_overwrite, self.anno_root = identity_object_ids, scanqa_ref_overwrite, anno_root
        self.host_options.setdefault("sample_keys", sample_key)
        self.scorers: Optional[CaptionScorers] = None  # set by run(): one METEOR JVM for every benchmark

    def jobs(self) -> List[evalkit.Job]:
        n = len(self.dataset) if self.limit is None else min(self.limit, len(self.dataset))
        return [evalkit.Job([str(i)], payload=i, label=f"{self.name}:{i}:{self.dataset.anno[i]['scene_id']}")
                for i in range(n)]

    def batch(self, index: int) -> Dict[str, Any]:
        """The one-sample batch of annotation ``index``: RNGs seeded first (the slot permutation; with
        ``identity_object_ids`` slot i holds object i, as Fast3D's ValDataset sets it), plus the record key
        under ``SAMPLE_KEY`` (Chat3D.evaluate hands its extra keyword arguments to the host)."""
        seed = sample_seed(self.seed, self.name, index)
        torch.manual_seed(seed)
        random.seed(seed)
        batch = self.collate([self.dataset[index]])
        if self.identity_object_ids:
            batch["assigned_ids"] = torch.arange(batch["assigned_ids"].shape[1]).unsqueeze(0)
        batch[SAMPLE_KEY] = [f"{self.name}:{index}"]
        return batch

    def run(self, job: evalkit.Job) -> evalkit.JobOutput:
        import shared

        index = job.payload
        batch = to_device(self.batch(index), self.device)
        sync = torch.cuda.synchronize if str(self.device).startswith("cuda") else (lambda *a: None)
        with torch.no_grad(), shared.prune(self.model, *self.methods, host="chat_scene", **self.host_options) as session:
            t0 = time.perf_counter()
            preds = self.model(**batch, is_eval=True)
            sync()
            seconds = time.perf_counter() - t0
        if not isinstance(preds, list) or len(preds) != 1:
            raise RuntimeError(f"model: expected one prediction for annotation {index}, got {preds!r}")
        if session.last is None:
            raise RuntimeError("model: the forward reported nothing to the session; is the Chat-Scene checkout "
                               "patched? (scripts/apply_patches.sh Chat-Scene)")
        rec = {evalkit.KEY: job.keys[0], "index": index, **prediction_record(batch, preds[0]),
               "assigned_ids": [int(v) for v in batch["assigned_ids"][0].tolist()]}
        info = session.last.info[0] if session.last.info else {}
        if info:  # what the method decided (Fast3D: objects kept, budget, GAP seconds; timed inside `seconds`)
            rec["selection"] = {k: (float(v) if isinstance(v, float) else v) for k, v in info.items()
                                if isinstance(v, (int, float, str, bool))}
        return evalkit.JobOutput([rec], _Prefill(session.last), seconds)

    def metrics(self, records: List[Dict[str, Any]]) -> Dict[str, Any]:
        files = getattr(self.dataset, "ann_list", None)
        return task_metrics(self.name, records, self.anno_root, files[2] if files else None, self.scanqa_ref_overwrite,
                            self.scorers)


# -------------------------------------------------------------------------------------- metrics
PRED_FIELDS = ("scene_id", "gt_id", "pred_id", "qid", "prompt", "pred", "ref_captions", "type_info")


def save_preds(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records as ``tasks/train.py`` writes ``preds_*.json``: its fields, sorted by
    ``f"{scene_id}_{gt_id:03}_{qid}"`` (a stable sort: ties stay in annotation order)."""
    preds = [{k: r[k] for k in PRED_FIELDS} for r in records]
    return sorted(preds, key=lambda x: f"{x['scene_id']}_{x['gt_id']:03}_{x['qid']}")


class CaptionScorers:
    """``shared.metrics.chat_scene.CaptionScorers`` started on first use (Java), shared by the benchmarks
    of a run and closed after its summary."""

    def __init__(self) -> None:
        self._scorers: Any = None

    def get(self) -> Any:
        if self._scorers is None:
            from shared.metrics.chat_scene import CaptionScorers as Scorers

            self._scorers = Scorers()
        return self._scorers

    def close(self) -> None:
        if self._scorers is not None:
            self._scorers.close()
            self._scorers = None


def task_metrics(task: str, records: Sequence[Dict[str, Any]], anno_root: Optional[str],
                 instance_attributes: Optional[str] = None, scanqa_ref_overwrite: bool = False,
                 scorers: Optional[CaptionScorers] = None) -> Dict[str, Any]:
    """Chat-Scene's ``utils/eval.py`` score of ``task`` (``shared.metrics.chat_scene``) on the records, in
    percent, with Chat-Scene's keys (``[scanrefer] Acc@0.50``, ...). The files ``utils/eval.py`` reads under
    ``annotations/`` are read under ``anno_root``; the Mask3D boxes from ``instance_attributes`` (the task's
    ``val_file_dict`` entry, as upstream) or ``anno_root``."""
    from shared.metrics import chat_scene as m

    root = Path(anno_root or "")
    at = lambda name: root / Path(name).name  # noqa: E731  ("annotations/x" -> <anno_root>/x)
    preds = save_preds(records)
    inst = Path(instance_attributes) if instance_attributes else at(m.INSTANCE_ATTRIBUTES)
    gt = at(m.SCANNET_ATTRIBUTES)
    holder = scorers if scorers is not None else CaptionScorers()
    try:
        if task == "scanrefer":
            scores = m.score_scanrefer(preds, inst, gt, at(m.UNIQUE_MULTIPLE_LOOKUP))
        elif task == "multi3dref":
            scores = m.score_multi3dref(preds, inst, gt)
        elif task == "scan2cap":
            scores = m.score_scan2cap(preds, inst, gt, at(m.SCAN2CAP_CORPUS), scorers=holder.get())
        elif task == "scanqa":
            scores = m.score_scanqa(preds, scorers=holder.get(), compat_ref_overwrite=scanqa_ref_overwrite)
        elif task == "sqa3d":
            scores = m.score_sqa3d(preds, scorers=holder.get())
        else:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    finally:
        if scorers is None:
            holder.close()
    return {k: 100.0 * float(v) for k, v in scores.items()}


# --------------------------------------------------------------------------------------- tables
def table(summaries: Sequence[Dict[str, Any]]):
    """Chat-Scene's README layout (per benchmark its two columns, percent) with Fast3D's efficiency
    columns: the layer-averaged visual-token pruning ratio, N_avg and prefill TFLOPs (FastV convention)."""
    tasks = [t for t in TASKS if any(t in s["benchmarks"] for s in summaries)]
    header = ["method", "protocol", "object ids", "pruned %", "N_avg", "TFLOPs", "skipped"]
    for t in tasks:
        header += [f"{TITLES[t]} {h}" for h, _ in COLUMNS[t]]
    rows = []
    for s in summaries:
        eff, st = s["efficiency"], s["settings"]
        ratio = eff.get("pruning_ratio")
        skipped = sum(b["skipped"] for b in s["benchmarks"].values())
        row = [st["label"], st["protocol"], "identity" if st["identity_object_ids"] else "random",
               evalkit.fmt(None if ratio is None else 100.0 * ratio, 1), evalkit.fmt(eff.get("n_avg"), 1),
               evalkit.fmt(eff.get("tflops"), 3), str(skipped)]
        for t in tasks:
            m = s["benchmarks"].get(t, {}).get("metrics") or {}
            row += [evalkit.fmt(m.get(k), 2) for _, k in COLUMNS[t]]
        rows.append(row)
    notes = [
        "metrics: Chat-Scene's utils/eval.py (shared.metrics.chat_scene), percent; ScanQA references cleaned, or raw "
        "as upstream's bug under --scanqa-ref-overwrite / --compat fast3d (protocol column)",
        "pruned %: visual tokens removed, averaged over decoder layers and samples (Fast3D's ratio, 1 - N_avg / 300)",
        "N_avg: visual tokens per decoder layer (mean); TFLOPs: prefill, FastV convention, at the measured counts",
        "object ids: random = Chat-Scene's per-sample slot permutation (seeded per annotation), identity = Fast3D's",
    ]
    return header, rows, notes


#: Fast3D README headline columns: (heading, benchmark, metric key, paper_figures column)
FAST3D_COLUMNS = (
    ("ScanRefer Acc@0.5", "scanrefer", "[scanrefer] Acc@0.50", "scanrefer_acc50"),
    ("Multi3dRefer F1@0.5", "multi3dref", "[multi3dref] all F1@0.50", "multi3dref_f1_50"),
    ("Scan2Cap B-4@0.5", "scan2cap", "[scan2cap] Bleu_4@0.50", "scan2cap_b4_50"),
    ("ScanQA B-4", "scanqa", "[scanqa] Bleu_4", "scanqa_b4"),
    ("SQA3D EM-R", "sqa3d", "[sqa3d] EM1_refined", "sqa3d_emr"),
)


def paper_row(settings: Dict[str, Any]) -> Optional[Dict[str, str]]:
    """The Fast3D README row of the same configuration (vanilla, FastV/GAP at K/R, GAP+SAP), or None."""
    from shared import paper_figures

    rows = paper_figures.load("fast3d_scores")
    methods = list(settings.get("methods") or [])
    if not methods:
        return next(r for r in rows if r["method"] == "vanilla")
    if len(methods) != 1:
        return None
    m = methods[0]
    name, params = m.get("name"), m
    if name == "fast3d_compat":  # the compat config of FastV (rule fastv) or GAP / GAP+SAP (rule oracle)
        name = {"fastv": "fastv", "oracle": "fast3d"}.get(params.get("rule"))
    if name == "fast3d" and params.get("score_kind", "logits") != "logits":
        return None  # extracted attention maps (oracle), not GAP: the README has no such row
    kind = {"fastv": "fastv", "fast3d": "fast3d-gap+sap" if params.get("alpha") is not None else "fast3d-gap"}.get(name)
    for r in rows:
        if r["method"] != kind:
            continue
        if kind == "fast3d-gap+sap" or (str(params.get("layer")) == r["k"] and str(params.get("keep")) == r["r"]):
            return r
    return None


def per_sample_pruning(run_dir: Path) -> Optional[Dict[str, float]]:
    """Over the run's records: min / max of the per-sample pruning ratio (percent) and the mean FLOPs of
    the online GAP forward (``gap_flops``, FlopCounterMode: 2 per multiply-add; absent without online
    GAP). None without records."""
    vals, gap = [], []
    for f in sorted(Path(run_dir).glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("pruning_ratio") is not None:
                vals.append(100.0 * float(r["pruning_ratio"]))
            if (r.get("selection") or {}).get("gap_flops") is not None:
                gap.append(float(r["selection"]["gap_flops"]))
    if not vals:
        return None
    out = {"min": min(vals), "max": max(vals)}
    if gap:
        out["gap_flops"] = sum(gap) / len(gap)
    return out


def fast3d_table(summaries: Sequence[Dict[str, Any]], per_sample: Optional[Sequence[Optional[Dict[str, float]]]] = None):
    """Fast3D's README layout: the five headline metrics and the Score Ratio (mean of metric / vanilla) of
    each run against OUR vanilla run (the run without a method; needs one among ``summaries``), each row
    followed by the README's own figures for the same configuration (Score Ratio recomputed from them),
    plus the efficiency columns: pruned % (layer-averaged), the per-sample pruning-ratio range (SAP),
    prefill TFLOPs and the measured seconds per sample (GAP included: it runs inside the forward)."""
    from shared.apps.paper_tables import score_ratio

    def headline(s: Dict[str, Any]) -> Dict[str, Optional[float]]:
        out = {}
        for _, task, key, col in FAST3D_COLUMNS:
            v = ((s["benchmarks"].get(task) or {}).get("metrics") or {}).get(key)
            out[col] = None if v is None else float(v)
        return out

    def protocol(st: Dict[str, Any]) -> tuple:
        return tuple(st.get(k) for k in ("identity_object_ids", "attn_implementation", "scanqa_ref_overwrite",
                                           "max_new_tokens", "tasks"))

    vanillas = [s for s in summaries if not (s["settings"].get("methods") or [])]
    paper_vanilla = next(r for r in __import__("shared").paper_figures.load("fast3d_scores") if r["method"] == "vanilla")
    header = ["method", "protocol"] + [c[0] for c in FAST3D_COLUMNS] + [
        "Score Ratio %", "pruned %", "per-sample pruned %", "TFLOPs (+GAP)", "s/sample"]
    rows = []
    for i, s in enumerate(summaries):
        h = headline(s)
        eff, st = s["efficiency"], s["settings"]
        # our vanilla under the same protocol: object ids, attention, ScanQA scoring, decoding, benchmarks
        same = [v for v in vanillas if protocol(v["settings"]) == protocol(st)]
        base = headline(same[0]) if same else None
        ok = base is not None and all(h[c] is not None and base[c] for c in h)
        ratio = score_ratio(h, base) if ok else None
        per = (per_sample[i] if per_sample is not None else None) or {}
        span = f"{per['min']:.1f}-{per['max']:.1f}" if per else "—"
        tflops = eff.get("tflops")
        if tflops is not None and per.get("gap_flops") is not None:
            tflops = tflops + per["gap_flops"] / 2e12  # the FastV convention counts a multiply-add once
        rows.append([st["label"], st["protocol"]] + [evalkit.fmt(h[c[3]], 2) for c in FAST3D_COLUMNS] + [
            evalkit.fmt(ratio, 2), evalkit.fmt(None if eff.get("pruning_ratio") is None else 100 * eff["pruning_ratio"], 1),
            span, evalkit.fmt(tflops, 3), evalkit.fmt(eff.get("seconds"), 3)])
        paper = paper_row(st)
        if paper is not None:
            rows.append([f"  Fast3D README: {paper['label']}", "paper"] + [paper[c[3]] for c in FAST3D_COLUMNS] + [
                f"{score_ratio(paper, paper_vanilla):.2f}", "", "", "", ""])
    notes = [
        "Score Ratio: mean over the five metrics of run / our vanilla run (README rows: / the README's Chat-Scene row, "
        "recomputed from its figures); a run's vanilla is the method-less run with the same object ids, attention, "
        "ScanQA scoring, decoding and benchmarks ('–' when there is none)",
        "ScanQA B-4 follows the run's protocol: the README's figures come from upstream's raw-reference scoring, "
        "reproduced only by --compat fast3d / --scanqa-ref-overwrite",
        "pruned %: 1 - N_avg / 300 over decoder layers and samples (the README's ratio); per-sample pruned %: min-max "
        "over samples (SAP's adaptive budget)",
        "TFLOPs: the LLM prefill (FastV convention) plus, with online GAP, GAP's own counted FLOPs; s/sample: measured "
        "wall time of Chat3D.evaluate per annotation (beam 5 generation), GAP included",
        "canonical rows drop tokens at prefill; compat rows (protocol compat-fast3d) mask keys and save no compute",
    ]
    return header, rows, notes


# ------------------------------------------------------------------------------------- the run
def settings(args: argparse.Namespace, methods: Sequence[Any], dims: DecoderDims) -> Dict[str, Any]:
    """Every setting that changes the results (run.json: a resume with other values is refused). An online GAP
    scorer is recorded by its checkpoint (``gap_checkpoint``), so a ``--merge-only`` call, which loads no GAP,
    describes the same run."""
    import dataclasses

    ab = lambda p: os.path.abspath(p) if p else None  # noqa: E731
    unscored = [dataclasses.replace(m, scorer=None) if getattr(m, "scorer", None) is not None else m for m in methods]
    return {
        "host": "chat_scene", "tasks": list(args.tasks), "llm": ab(args.llm), "ckpt": ab(args.ckpt),
        "anno_root": ab(args.anno_root), "max_obj_num": args.max_obj_num, "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha, "max_new_tokens": args.max_new_tokens,
        "attn_implementation": args.attn_implementation, "llm_dtype": args.llm_dtype, "limit": args.limit,
        "seed": args.seed, "identity_object_ids": args.identity_object_ids,
        "object_scores": {t: os.path.abspath(p) for t, p in sorted(args.object_scores_files.items())},
        "gap_checkpoint": ab(getattr(args, "gap_checkpoint", None)), "roberta": ab(getattr(args, "roberta", None)),
        "scores_field": args.scores_field, "scanqa_ref_overwrite": args.scanqa_ref_overwrite, "compat": args.compat,
        "methods": evalkit.method_settings(unscored),
        "label": "Chat-Scene" + ("" if not methods else " + " + evalkit.method_label(unscored)
                                 + (" [GAP online]" if getattr(args, "gap_checkpoint", None) else "")),
        "protocol": args.protocol, "dims": [dims.hidden, dims.intermediate, dims.layers, dims.heads],
    }


def with_gap_scorer(methods: Sequence[Any], checkpoint: str, roberta: str, device: Any) -> List[Any]:
    """The Fast3D methods given an online GAP scorer (``shared.methods.fast3d_gap``) loaded from a local
    checkpoint and RoBERTa folder; refuses a run without a Fast3D method."""
    import dataclasses

    from shared.methods.fast3d import Fast3D
    from shared.methods.fast3d_gap import GapScorer, load_gap

    if not any(isinstance(m, Fast3D) for m in methods):
        raise ValueError("gap_checkpoint: GAP scores only Fast3D; add --method fast3d")
    model, tokenizer = load_gap(checkpoint, roberta, device=device)
    scorer = GapScorer(model.eval(), tokenizer, count_flops=True)  # its FLOPs join the table's
    return [dataclasses.replace(m, scorer=scorer) if isinstance(m, Fast3D) else m for m in methods]


def host_options(args: argparse.Namespace, task: str, dataset: Any) -> Dict[str, Any]:
    """Options of ``shared.prune(..., host="chat_scene")`` for ``task``: the sample keys, and the per-object
    scores of ``--object-scores`` (keyed the same way)."""
    opts: Dict[str, Any] = {"sample_keys": sample_key}
    if task in args.object_scores_files:
        opts["object_scores"] = load_object_scores(task, str(args.object_scores_files[task]), len(dataset.anno),
                                                   args.scores_field)
    return opts


def run(args: argparse.Namespace, model: Any, make_dataset: Callable[[str], Any], collate: Callable,
        device: Any, env: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    """Evaluate every ``--tasks`` benchmark on this rank's shard; on a single process (or with
    ``--merge-only``) merge and write summary.json / preds_<task>.json / table.md / table.csv."""
    methods = evalkit.methods_from_args(args)
    if getattr(args, "gap_checkpoint", None) and not args.merge_only:
        methods = with_gap_scorer(methods, args.gap_checkpoint, args.roberta, device)
    if getattr(args, "compat", None) == "fast3d":
        from shared.methods.fast3d_compat import compat

        methods = [compat(m) if getattr(m, "stage", "") == "llm" else m for m in methods]
    dims = llm_dims(args.llm)
    datasets = {t: make_dataset(t) for t in args.tasks}  # every benchmark loads (and is checked) before the model runs
    benches = [ChatSceneTask(t, datasets[t], collate, model, methods,
                             host_options(args, t, datasets[t]) if not args.merge_only else {}, device, args.seed, args.limit,
                             args.identity_object_ids, args.scanqa_ref_overwrite, args.anno_root) for t in args.tasks]
    runner = evalkit.Run(args.out, settings(args, methods, dims), benches, evalkit.Accounting(dims, "fastv"),
                         on_error=args.on_error, progress=not args.no_progress, env=env)
    runner.prepare()
    if not args.merge_only:
        runner.evaluate()
    if not args.merge_only and runner.info.world_size > 1:
        if not runner.barrier():
            print(f"[eval_chatscene] rank {runner.info.rank}: shard done; run --merge-only once every rank has finished")
            return None
        if not runner.info.is_main:
            return None
    scorers = CaptionScorers()
    for b in benches:
        b.scorers = scorers
    try:
        summary = runner.finish()
    finally:
        scorers.close()
    for b in benches:
        done = [r for r in runner.records(b) if "skipped" not in r]
        (Path(args.out) / f"preds_{b.name}.json").write_text(json.dumps(save_preds(done), indent=1) + "\n",
                                                             encoding="utf-8")
    header, rows, notes = table([summary])
    print(evalkit.write_table(header, rows, notes, Path(args.out) / "table"))
    return summary


def pending(args: argparse.Namespace, make_dataset: Callable[[str], Any], env: Optional[Dict[str, str]] = None) -> int:
    """Annotations of this rank's shard without a result yet (0: nothing to run, the model is not loaded)."""
    from shared.runio import ResultWriter, shard_path, shard_slice

    info = dist_info(env)
    todo = 0
    for t in args.tasks:
        n = len(make_dataset(t))
        n = n if args.limit is None else min(n, args.limit)
        mine = shard_slice([str(i) for i in range(n)], info.rank, info.world_size)
        path = shard_path(Path(args.out) / f"{t}.jsonl", info.rank, info.world_size)
        if not path.exists():
            todo += len(mine)
            continue
        with ResultWriter(path, key=evalkit.KEY) as w:
            todo += sum(1 for k in mine if k not in w.done)
    return todo


def load_model(args: argparse.Namespace, cfg: Any, device: torch.device) -> Any:
    """Chat3D built and loaded as ``setup_model`` does (``Chat3D(config).to(device)``, then the checkpoint)."""
    model = build_chat3d(cfg, args.attn_implementation, args.llm_dtype).to(device)
    if args.ckpt:
        load_checkpoint(model, args.ckpt, args.ignore_unexpected_keys)
    else:
        print("warning: no --ckpt: the projectors, LoRA and <OBJ> embeddings are untrained", file=sys.stderr)
    return model.eval()


# ----------------------------------------------------------------------------- GAP training targets
TARGET_SPLITS = ("train", "val")
#: settings that change the targets (``--out``/targets.json: a resume with other values is refused)
TARGET_SETTINGS = ("llm", "ckpt", "anno_root", "max_obj_num", "lora_r", "lora_alpha", "attn_implementation",
                   "llm_dtype", "seed", "identity_object_ids")


def build_targets_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_chatscene.py targets",
        description="GAP training targets from the frozen Chat-Scene LLM (Fast3D's extract_attn_maps): per annotation "
                    "the layer- and head-mean attention of the text after the object list to each object's 3 tokens "
                    "(shared.methods.fast3d_targets), written to <out>/infer_attn_maps_<split>_<task>.pt")
    add_model_args(p, generation=False)
    g = p.add_argument_group("targets")
    g.add_argument("--split", required=True, choices=TARGET_SPLITS,
                   help="train: the annotations' caption is the teacher-forced answer; val: a reference, as Fast3D")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="fast3d: Fast3D's protocol (identity object ids, eager attention)")
    g.add_argument("--identity-object-ids", action="store_true",
                   help="slot i holds object i (Fast3D's datasets) instead of Chat-Scene's seeded random permutation")
    g.add_argument("--chunk", type=int, default=64, help="query rows scored at once per layer (memory only)")
    g.add_argument("--out", required=True, help="output folder (targets.json + infer_attn_maps_<split>_<task>.pt)")
    g.add_argument("--merge-only", action="store_true", help="only merge the rank files of a multi-process run")
    return p


def parse_targets_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_targets_parser()
    args = parser.parse_args(list(argv))
    check_common(parser, args, ("max_obj_num", "lora_r", "lora_alpha", "chunk"))
    args.protocol, _ = evalkit.apply_preset(args, parser, PRESETS, args.preset)
    return args


def load_target_data(args: argparse.Namespace, require_patch: bool = True):
    """Chat-Scene's config and a dataset factory for ``args.split``: ``ValDataset`` on ``val_file_dict[task]``
    or ``TrainDataset`` on ``train_file_dict[task]`` (``{set}_mask3d_train.json`` etc.), files checked first."""
    tree = import_chat_scene(args.chat_scene_root, require_patch)
    cfg = chat_scene_config(args, tree)
    from dataset.dataset_train import TrainDataset
    from dataset.dataset_val import ValDataset

    cls = ValDataset if args.split == "val" else TrainDataset
    table = cfg.val_file_dict if args.split == "val" else cfg.train_file_dict
    slots = int(cfg.model.max_obj_num)

    def make_dataset(task: str):
        files = table[task]
        for f in files[:4]:
            if not os.path.isfile(f):
                raise ValueError(f"anno_root: {task} ({args.split}) needs {f}, which does not exist")
        cached = cls.cached_feats.get(files[0])  # built for another max_obj_num: drop (see load_data)
        if cached is not None and cached[0] and next(iter(cached[0].values())).shape[0] != slots:
            cls.cached_feats.pop(files[0], None)
            cls.cached_feats.pop(files[1], None)
        ds = cls(ann_list=files[:4], dataset_name=task, config=cfg)
        ds.ann_list = list(files[:4])
        if args.split == "train":  # TrainDataset answers an annotation of a scene without boxes with a random other one
            missing = sorted({a["scene_id"] for a in ds.anno} - set(ds.attributes or {}))
            if missing:
                raise ValueError(f"anno_root: {files[3]} has annotations of {len(missing)} scenes missing from "
                                 f"{files[2]}, e.g. {missing[:3]}")
        return ds

    return cfg, make_dataset


def teacher_caption(task: str, ref_captions: Sequence[Any]) -> str:
    """The teacher-forced answer of a val annotation (Fast3D's ValDataset, by benchmark): ScanQA / SQA3D a
    reference capitalised + ".", ScanRefer / Scan2Cap a reference as is, Multi3dRefer "" (its references are
    object ids). Draws from ``random`` (seeded per annotation by the caller)."""
    if task == "multi3dref":
        return ""
    if not ref_captions:
        raise ValueError(f"ref_captions: a {task} val annotation without references has no answer to teacher-force")
    if task in ("scanqa", "sqa3d"):
        return random.choice(list(ref_captions)).capitalize() + "."
    if task in ("scanrefer", "scan2cap"):
        return random.choice(list(ref_captions))
    raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")


def target_sample(dataset: Any, split: str, task: str, index: int, seed: int,
                  identity_object_ids: bool = False) -> Dict[str, Any]:
    """Annotation ``index`` read by Chat-Scene's dataset with the RNGs seeded from (seed, task[, train], index):
    scene features (n, 1024) ×2, boxes, mask, the slot permutation ``assigned_ids`` (n,) (identity with
    ``identity_object_ids``), and the prompt and answer in OBJECT id space."""
    seed_i = sample_seed(seed, task if split == "val" else f"{task}:train", index)
    torch.manual_seed(seed_i)
    random.seed(seed_i)
    item = dataset[index]
    if split == "val":
        feat, img, mask, locs, obj_id, assigned, prompt, refs = item[:8]
        caption = teacher_caption(task, refs)
    else:
        from dataset.base_dataset import recover_caption

        feat, img, mask, locs, obj_id, assigned, caption, question = item
        anno = dataset.anno[index]
        prompt = anno["prompt"] if "prompt" in anno else recover_caption(question, assigned.tolist())
        caption = anno["caption"]
    if identity_object_ids:
        assigned = torch.arange(assigned.shape[0])
    return {"scene_feat": feat, "scene_img_feat": img, "scene_mask": mask, "scene_locs": locs,
            "obj_id": obj_id, "assigned_ids": assigned, "prompt": prompt, "caption": caption}


def teacher_forced_input(model: Any, sample: Dict[str, Any]):
    """Fast3D's ``get_attn_maps`` input, built with Chat3D's own methods (``encode_object_feat``,
    ``object_proj`` / ``object_img_proj``, ``get_object_list_embed``, ``get_text_emb``) and ``update_caption``:
    ``[p_0, object list, p_1, " {prompt} ASSISTANT: {caption}"]`` with object ids as slot ids. Returns
    (inputs_embeds (1, L, d), layout dict: visual_start, slots, group, query_start, question_rows)."""
    from dataset.base_dataset import update_caption

    if model.add_scene_token or model.add_pos_emb or model.bidirection:
        raise ValueError("model: targets follow the released config (add_scene_token, add_pos_emb and bidirection "
                         "off, scripts/run.sh); this Chat3D has one of them on")
    device = model.device
    assigned = sample["assigned_ids"].to(device)
    feat, img = model.encode_object_feat(sample["scene_feat"][None].to(device), sample["scene_img_feat"][None].to(device),
                                         sample["scene_locs"][None].to(device))
    proj, proj_img = model.object_proj(feat), model.object_img_proj(img)
    objects = model.get_object_list_embed(proj[0], proj_img[0] if model.add_img_token else None, None,
                                          sample["scene_mask"].to(device).bool(), sample["obj_id"], assigned)
    slots = int(assigned.shape[0])
    if sorted(assigned.tolist()) != list(range(slots)) or objects.shape[0] % slots:
        raise ValueError(f"assigned_ids: expected a permutation of the {slots} slots, each slot a group of tokens")
    question = update_caption(f" {sample['prompt']} ", assigned)
    text = update_caption(f" {sample['prompt']} {model.role[1]}: {sample['caption']}", assigned)
    p_0, p_1 = model.p_0_embed.to(device), model.p_1_embed.to(device)
    text_embed = model.get_text_emb(text, device=device)[0]
    embeds = torch.cat([p_0, objects, p_1, text_embed], dim=0)[None]  # as Chat3D.evaluate
    layout = {"visual_start": int(p_0.shape[0]), "slots": slots, "group": int(objects.shape[0]) // slots,
              "query_start": int(p_0.shape[0] + objects.shape[0] + p_1.shape[0]),
              "question_rows": int(model.get_text_emb(question, device=device).shape[1])}
    return embeds, layout


def object_targets(model: Any, sample: Dict[str, Any], chunk: int = 64):
    """(a_map, a_map_ori), (n,) float32 each, in OBJECT order: object o's value is that of the slot holding it
    (slot s holds object ``assigned_ids[s]``; with identity ids slot order = object order, Fast3D's files)."""
    from shared.hosts.chat_scene import inner_llama
    from shared.methods.fast3d_targets import object_attention_targets

    with torch.no_grad(), model.maybe_autocast():
        embeds, lay = teacher_forced_input(model, sample)
        a_map, a_map_ori = object_attention_targets(
            inner_llama(model), embeds, lay["visual_start"], lay["slots"], lay["group"], lay["query_start"],
            embeds.shape[1], lay["question_rows"], chunk=chunk)
    assigned = sample["assigned_ids"].long().cpu()
    out = []
    for slot_map in (a_map[0].float().cpu(), a_map_ori[0].float().cpu()):
        obj_map = torch.empty_like(slot_map)
        obj_map[assigned] = slot_map
        out.append(obj_map)
    return out[0], out[1]


def target_path(out: Any, split: str, task: str) -> Path:
    return Path(out) / f"infer_attn_maps_{split}_{task}.pt"


def _annotations(dataset: Any) -> List[Dict[str, Any]]:
    with open(dataset.ann_list[3], encoding="utf-8") as f:
        return json.load(f)


def check_target_settings(args: argparse.Namespace) -> None:
    """Write ``<out>/targets.json`` (the settings of TARGET_SETTINGS) or refuse an ``--out`` made with others."""
    ab = lambda p: os.path.abspath(p) if p else None  # noqa: E731
    now = {k: (ab(getattr(args, k)) if k in ("llm", "ckpt", "anno_root") else getattr(args, k)) for k in TARGET_SETTINGS}
    path = Path(args.out) / "targets.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), now[k]) for k in now if old.get(k) != now[k]}
        if diff:
            raise ValueError(f"out: {args.out} holds targets made with other settings {diff} (was, now); use another --out")
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"targets.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(now, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def target_jobs(args: argparse.Namespace, make_dataset: Callable[[str], Any], env: Optional[Dict[str, str]] = None):
    """Per task: (task, dataset, keys, this rank's indices still to do, this rank's file, its share)."""
    from shared.methods.fast3d_targets import annotation_keys, completed_keys
    from shared.runio import shard_path, shard_slice

    info = dist_info(env)
    out = []
    for task in args.tasks:
        ds = make_dataset(task)
        keys = annotation_keys(task, _annotations(ds))
        n = len(keys) if args.limit is None else min(args.limit, len(keys))
        mine = shard_slice(list(range(n)), info.rank, info.world_size)
        path = shard_path(target_path(args.out, args.split, task), info.rank, info.world_size)
        done = completed_keys(path)
        out.append((task, ds, keys, [i for i in mine if keys[i] not in done], path, len(mine)))
    return out


def extract_targets(args: argparse.Namespace, model: Any, make_dataset: Callable[[str], Any],
                    env: Optional[Dict[str, str]] = None) -> List[Path]:
    """Targets of every ``--tasks`` annotation of this rank's shard (contiguous slice), appended to its file
    (resumable: keys already there are skipped); returns the files written."""
    from shared.methods.fast3d_targets import write_targets

    check_target_settings(args)
    written = []
    for task, ds, keys, todo, path, share in target_jobs(args, make_dataset, env):
        def records(ds=ds, keys=keys, todo=todo, task=task):
            for i in todo:
                sample = target_sample(ds, args.split, task, i, args.seed, args.identity_object_ids)
                a_map, a_map_ori = object_targets(model, sample, args.chunk)
                yield {"key": keys[i], "index": i, "a_map": a_map, "a_map_ori": a_map_ori}

        write_targets(records(), path, total=share)
        written.append(path)
    return written


def merge_targets(args: argparse.Namespace, make_dataset: Callable[[str], Any]) -> List[Path]:
    """Merge the rank files ``infer_attn_maps_<split>_<task>.rankR-of-W.pt`` of a multi-process run into
    ``infer_attn_maps_<split>_<task>.pt`` (in annotation order); refuses missing ranks or annotations."""
    import re

    from shared.methods.fast3d_targets import annotation_keys, load_targets, write_targets

    done = []
    for task in args.tasks:
        final = target_path(args.out, args.split, task)
        shards = sorted(final.parent.glob(f"{final.stem}.rank*-of-*{final.suffix}"))
        if not shards:
            if final.exists():
                done.append(final)
                continue
            raise ValueError(f"out: no rank files of {final.name} in {args.out}")
        worlds = {int(re.search(r"-of-(\d+)", p.name).group(1)) for p in shards}
        if len(worlds) != 1 or len(shards) != next(iter(worlds)):
            raise ValueError(f"out: {final.name}: expected one rank file per process, found {[p.name for p in shards]}")
        keys = annotation_keys(task, _annotations(make_dataset(task)))
        n = len(keys) if args.limit is None else min(args.limit, len(keys))
        recs = sorted(load_targets(shards), key=lambda r: r["index"])
        lacking = sorted(set(keys[:n]) - {r["key"] for r in recs})
        if lacking:
            raise ValueError(f"out: {final.name}: {len(lacking)} of {n} annotations have no target yet (rerun the "
                             f"ranks), e.g. {lacking[:3]}")
        write_targets(recs, final, total=len(recs))
        for p in shards:
            p.unlink()
        done.append(final)
    return done


def main_targets(argv: Sequence[str], env: Optional[Dict[str, str]] = None, require_patch: bool = True) -> List[Path]:
    """``eval_chatscene.py targets ...``: extract (or, with ``--merge-only``, merge) and return the files."""
    args = parse_targets_args(argv)
    if not args.llm or not args.anno_root:
        raise SystemExit("eval_chatscene.py targets: --llm and --anno-root are required")
    cfg, make_dataset = load_target_data(args, require_patch)
    check_target_settings(args)
    if args.merge_only:
        return merge_targets(args, make_dataset)
    info = dist_info(env)
    model = None
    if any(j[3] for j in target_jobs(args, make_dataset, env)):
        model = load_model(args, cfg, _device(args.device, info))
    else:  # the files are finished (a .partial holding everything is finalised without the model)
        print(f"[eval_chatscene targets] every target is in {args.out} already; nothing to compute")
    written = extract_targets(args, model, make_dataset, env)
    if info.world_size > 1:
        print(f"[eval_chatscene targets] rank {info.rank}: shard done; run with --merge-only once every rank has finished")
    return written


def _device(name: Optional[str], info: Any) -> torch.device:
    """``name``, else cuda:<LOCAL_RANK> when CUDA is there, else the CPU (made current when CUDA)."""
    if name:
        device = torch.device(name)
    elif torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------------------------- mains
def main_table(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(description="Combine the summary.json of several runs into one table")
    p.add_argument("--runs", nargs="+", required=True, help="run directories (each with summary.json)")
    p.add_argument("--out", required=True, help="output base path: writes <out>.md and <out>.csv")
    a = p.parse_args(argv)
    summaries = evalkit.load_summaries(a.runs)
    header, rows, notes = table(summaries)
    print(evalkit.write_table(header, rows, notes, Path(a.out)))
    header, rows, notes = fast3d_table(summaries, [per_sample_pruning(Path(d)) for d in a.runs])
    print(evalkit.write_table(header, rows, notes, Path(str(a.out) + "_fast3d")))


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "table":
        main_table(argv[1:])
        return
    if argv and argv[0] == "targets":
        main_targets(argv[1:])
        return
    args = parse_args(argv)
    if not args.llm or not args.anno_root:
        raise SystemExit("eval_chatscene.py: --llm and --anno-root are required")
    info = dist_info()
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg, make_dataset, collate = load_data(args)
    model = None
    if not args.merge_only and pending(args, make_dataset):
        model = load_model(args, cfg, device)
    run(args, model, make_dataset, collate, device)


if __name__ == "__main__":
    main()
