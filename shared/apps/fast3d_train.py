"""Train Fast3D's GAP network on extracted attention targets, and write its predictions.

    accelerate launch -m shared.apps.fast3d_train --config gap.yaml [--resume auto]
    python -m shared.apps.fast3d_train --annotation-root annotations --targets-root targets \\
        --roberta-path roberta-base --output-dir out/gap
    python -m shared.apps.fast3d_train predict --checkpoint out/gap/gap_best.pth --roberta-path roberta-base \\
        --annotation-root annotations --split val --out-dir out/gap/pred

Defaults are the authors' recipe (``fast3d/config/train.yaml``): KL(target ‖ softmax(logits)), AdamW
lr 8e-4 (RoBERTa 8e-5), weight decay 0.01 (none on biases and 1-D parameters), cosine schedule with
0.1 epoch of warm-up and a floor of 1e-3 × lr, 50 epochs, batch 64 per process, gradient clipping
5.0, seed 42, validation every epoch with top-k (5/10/20) set F1. The checkpoint is selected on a
split held out from train by scene (``--select-on heldout``, the default); ``--select-on val`` is the
authors' protocol (selection on the evaluation split) and is labelled as such in every output.
A ``--config`` file (YAML or JSON) may use this tool's names or the authors' train.yaml keys.

Outputs in ``--output-dir``: ``gap_best.pth`` / ``gap_last.pth`` (the authors' checkpoint format,
``{"model_state_dict", "gap_config", "step", ...}``), ``selection.json``, ``heldout_scenes.json``,
``metrics.jsonl``, ``checkpoints/`` (accelerate states for ``--resume``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from ..datasets.fast3d_gap import (
    FAST3D_SETS,
    GapCollator,
    SceneFeatures,
    load_split,
    parse_sets,
    split_by_scene,
)
from ..methods.fast3d_gap import GAPConfig, build_gap, gap_kl_loss, load_gap, topk_set_f1

AUTHORS_VAL_LABEL = "val (authors' protocol; tuned on the evaluation split)"


@dataclass
class TrainConfig:
    """Training run settings (defaults: the authors' recipe, see the module docstring)."""

    annotation_root: str = "annotations"
    targets_root: str = "outputs/infer_attn_maps"
    roberta_path: str = "roberta-base"
    output_dir: str = "outputs/gap"
    feat_file: str = ""  # default: {annotation_root}/scannet_mask3d_uni3d_feats.pt
    img_feat_file: str = ""  # default: {annotation_root}/scannet_mask3d_videofeats.pt
    train_sets: str = "#".join(FAST3D_SETS)
    val_sets: str = "#".join(FAST3D_SETS)
    target_key: str = "a_map"
    select_on: str = "heldout"
    heldout_fraction: float = 0.1
    heldout_seed: int = 0
    select_set: str = "scanrefer"
    select_metric: str = "topk_5_f1_score"
    report_val: bool = False
    topk: Tuple[int, ...] = (5, 10, 20)
    seed: int = 42
    batch_size: int = 64
    eval_batch_size: int = 64
    num_workers: int = 4
    gradient_accumulation_steps: int = 1
    epochs: int = 50
    warmup_epochs: float = 0.1
    lr: float = 8e-4
    text_lr: float = 8e-5
    weight_decay: float = 0.01
    min_lr_multi: float = 1e-3
    max_grad_norm: float = 5.0
    train_text_encoder: bool = True
    save_every_steps: int = 0  # 0: save the resumable state at the end of every epoch only
    stop_after_steps: int = 0  # 0: run to the end; N: save and stop after N optimiser steps (time-boxed jobs)
    gap: Dict[str, Any] = field(default_factory=dict)  # GAPConfig overrides (sizes, max_obj_num)

    def __post_init__(self) -> None:
        if self.select_on not in ("heldout", "val"):
            raise ValueError(f"select_on: expected 'heldout' or 'val', got {self.select_on!r}")
        if self.target_key not in ("a_map", "a_map_ori"):
            raise ValueError(f"target_key: expected 'a_map' or 'a_map_ori', got {self.target_key!r}")
        self.topk = tuple(int(k) for k in self.topk)
        for name in ("batch_size", "eval_batch_size", "epochs", "gradient_accumulation_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.select_on == "heldout" and not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: expected a fraction in (0, 1), got {self.heldout_fraction!r}")

    @property
    def selected_on(self) -> str:
        if self.select_on == "val":
            return AUTHORS_VAL_LABEL
        return f"heldout ({self.heldout_fraction:g} of the training scenes, seed {self.heldout_seed})"


#: The authors' train.yaml keys → this tool's (None: accepted only with the value this tool implements).
AUTHORS_KEYS: Dict[str, Any] = {
    "train_tags": "train_sets", "val_tags": "val_sets", "attn_maps_root": "targets_root",
    "train_batch_size": "batch_size", "max_epoch": "epochs",
    "eval_only": ("eval_only", False), "use_spatial_dec": ("use_spatial_dec", True),
    "val_interval": ("val_interval", 1.0), "eval_train_set": ("eval_train_set", False),
    "logging_steps": None, "use_mentioned_oids_in_answers": None,  # logging cadence / unused by the loss
}


def config_from_mapping(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Translate a config mapping (this tool's names or the authors' train.yaml keys) to TrainConfig fields."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: Dict[str, Any] = {}
    for k, v in raw.items():
        if k in names:
            out[k] = v
        elif k == "use_ori_attn_maps":
            out["target_key"] = "a_map_ori" if v else "a_map"
        elif k in AUTHORS_KEYS:
            m = AUTHORS_KEYS[k]
            if isinstance(m, str):
                out[m] = v
            elif isinstance(m, tuple) and v != m[1]:
                hint = " (use the `predict` command)" if k == "eval_only" else ""
                raise ValueError(f"{k}: only {m[1]!r} is supported, got {v!r}{hint}")
        else:
            raise ValueError(f"config: unknown key {k!r}; known: {', '.join(sorted(names | set(AUTHORS_KEYS)))}")
    return out


def _read_config_file(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        return json.loads(text)
    import yaml  # pyyaml: installed with transformers

    return yaml.safe_load(text) or {}


# ------------------------------------------------------------------------------------ schedule
def cosine_with_floor(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_multi: float
                      ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base lr over ``warmup_steps``, then a half cosine to 0 at ``total_steps``;
    the multiplier never goes below ``min_lr_multi`` (the authors' schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return max(min_lr_multi, step / max(1, warmup_steps))
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(min_lr_multi, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: torch.nn.Module, lr: float, text_lr: float, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: RoBERTa at ``text_lr``, the rest at ``lr``; no decay on biases and 1-D tensors."""
    groups: Dict[Tuple[bool, bool], List[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("text_encoder" in name, p.dim() == 1 or name.endswith(".bias"))
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": text_lr if is_text else lr, "weight_decay": 0.0 if no_decay else weight_decay}
            for (is_text, no_decay), ps in sorted(groups.items())]


class EpochSampler(Sampler):
    """A seeded permutation per epoch (``set_epoch``), independent of the global RNG, so a resumed run
    sees the same batches as an uninterrupted one."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Any, topk: Sequence[int]) -> Dict[str, float]:
    """Mean per-sample KL loss and top-k set F1 over ``loader`` (all processes gathered)."""
    was = model.training
    model.eval()
    parts: Dict[str, List[torch.Tensor]] = {}
    for batch in loader:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["obj_feats"], batch["obj_img_feats"],
                       batch["locs"]).float()
        t = batch["target"].float()
        t = t / (t.sum(-1, keepdim=True) + 1e-8)
        kl = (t * (torch.log(t.clamp(min=1e-30)) - torch.log(torch.softmax(logits, -1) + 1e-8))).sum(-1)
        vals = {"loss": kl}
        for k in topk:
            vals[f"topk_{k}_f1_score"] = topk_set_f1(logits, batch["target"], k)
        for name, v in vals.items():
            parts.setdefault(name, []).append(accelerator.gather_for_metrics(v).cpu())
    model.train(was)
    return {k: float(torch.cat(v).mean()) for k, v in parts.items()}


# ------------------------------------------------------------------------------------ training
def _features(cfg: TrainConfig, n_obj: int) -> SceneFeatures:
    feat = cfg.feat_file or os.path.join(cfg.annotation_root, "scannet_mask3d_uni3d_feats.pt")
    img = cfg.img_feat_file or os.path.join(cfg.annotation_root, "scannet_mask3d_videofeats.pt")
    return SceneFeatures(feat, img, n_obj)


def _export(model: torch.nn.Module, path: str, extra: Dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    torch.save(dict(extra, model_state_dict=state, gap_config=model.config.to_dict()), tmp)
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _latest_state(output_dir: str) -> Optional[str]:
    pointer = os.path.join(output_dir, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(output_dir, "checkpoints", f.read().strip())


def train(cfg: TrainConfig, resume: Optional[str] = None) -> Dict[str, Any]:
    """Run (or resume) a training; returns the summary written to ``selection.json``.

    resume: None (fresh; refuses an output dir that already holds states), "auto" (the latest state
    in ``output_dir``, fresh if none) or a state directory (``output_dir/checkpoints/step_N``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    os.makedirs(cfg.output_dir, exist_ok=True)
    state_dir = _latest_state(cfg.output_dir) if resume == "auto" else resume
    if resume is None and _latest_state(cfg.output_dir) is not None:
        raise ValueError(f"output_dir: {cfg.output_dir} already holds a training state; pass --resume auto "
                         f"to continue it or choose another directory")
    set_seed(cfg.seed)

    gap_cfg = GAPConfig.from_dict(cfg.gap) if cfg.gap else None
    model, tokenizer = build_gap(cfg.roberta_path, gap_cfg)
    model.set_text_encoder_trainable(cfg.train_text_encoder)
    n_obj = model.config.max_obj_num
    features = _features(cfg, n_obj)
    train_sets = load_split(cfg.annotation_root, cfg.train_sets, "train", features, cfg.targets_root, cfg.target_key)
    heldout_scenes: List[str] = []
    evals: Dict[str, Dict[str, Any]] = {}
    if cfg.select_on == "heldout":
        train_sets, held, heldout_scenes = split_by_scene(train_sets, cfg.heldout_fraction, cfg.heldout_seed)
        evals["heldout"] = held
    if cfg.select_on == "val" or cfg.report_val:
        evals["val"] = load_split(cfg.annotation_root, cfg.val_sets, "val", features, cfg.targets_root, cfg.target_key)
    select_split = cfg.select_on
    if cfg.select_set not in evals[select_split]:
        raise ValueError(f"select_set: {cfg.select_set!r} is not among the {select_split} sets "
                         f"{sorted(evals[select_split])}")
    for k in cfg.topk:
        if not 1 <= k <= n_obj:
            raise ValueError(f"topk: k={k} outside [1, {n_obj}] (max_obj_num)")

    collate = GapCollator(tokenizer)
    train_data = ConcatDataset(list(train_sets.values()))
    sampler = EpochSampler(len(train_data), cfg.seed)
    # a private generator: creating a loader iterator must not draw from the global RNG (exact resumes)
    train_loader = DataLoader(train_data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                              num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    eval_loaders = {f"{split}_{name}": DataLoader(d, batch_size=cfg.eval_batch_size, collate_fn=collate,
                                                  num_workers=cfg.num_workers)
                    for split, sets in evals.items() for name, d in sets.items() if len(d)}

    use_fused = torch.cuda.is_available() and accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.text_lr, cfg.weight_decay), betas=(0.9, 0.999),
                                  **({"fused": True} if use_fused else {}))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = cosine_with_floor(optimizer, int(cfg.warmup_epochs * steps_per_epoch), total_steps, cfg.min_lr_multi)
    accelerator.register_for_checkpointing(scheduler)

    step, best, history = 0, None, []  # type: int, Optional[Dict[str, Any]], List[Dict[str, Any]]
    loss_sum, loss_n = 0.0, 0  # running training loss of the current epoch
    if state_dir is not None:
        accelerator.load_state(state_dir)
        with open(os.path.join(state_dir, "trainer_state.json")) as f:
            saved = json.load(f)
        step, best, history = saved["step"], saved["best"], saved["history"]
        loss_sum, loss_n = saved["epoch_loss"]
        if saved["steps_per_epoch"] != steps_per_epoch or saved["config"] != _jsonable(cfg):
            raise ValueError(f"resume: {state_dir} was written by a run with other settings or data; resume it with "
                             f"the same config")
    if main:
        _write_json(os.path.join(cfg.output_dir, "heldout_scenes.json"), heldout_scenes)
    select_key = f"{select_split}_{cfg.select_set}_{cfg.select_metric}"
    unwrapped = accelerator.unwrap_model(model)

    def save_state() -> None:
        name = f"step_{step}"
        path = os.path.join(cfg.output_dir, "checkpoints", name)
        accelerator.save_state(path)
        if main:
            _write_json(os.path.join(path, "trainer_state.json"), {
                "step": step, "steps_per_epoch": steps_per_epoch, "best": best, "history": history,
                "epoch_loss": [loss_sum, loss_n], "config": _jsonable(cfg)})
            old = _latest_state(cfg.output_dir)
            with open(os.path.join(cfg.output_dir, "checkpoints", "latest.tmp"), "w") as f:
                f.write(name)
            os.replace(os.path.join(cfg.output_dir, "checkpoints", "latest.tmp"),
                       os.path.join(cfg.output_dir, "checkpoints", "latest"))
            if old is not None and os.path.abspath(old) != os.path.abspath(path):
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def summary() -> Dict[str, Any]:
        return {"selected_on": cfg.selected_on, "metric": select_key, "best": best, "steps": step,
                "total_steps": total_steps, "heldout_scenes": len(heldout_scenes), "history": history}

    progress = tqdm(total=total_steps, initial=step, disable=not main, desc="GAP training")
    model.train()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        skip = (step - epoch * steps_per_epoch) * cfg.gradient_accumulation_steps
        if skip == 0:
            set_seed(cfg.seed + epoch)  # as the authors (per-epoch reseed); mid-epoch resumes restore the RNG
        train_loader.set_epoch(epoch)  # accelerate's loader passes the epoch on to the sampler
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(batch["input_ids"], batch["attention_mask"], batch["obj_feats"],
                                   batch["obj_img_feats"], batch["locs"])
                loss = gap_kl_loss(logits, batch["target"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}", epoch=epoch + 1)
            loss_sum += float(accelerator.gather(loss.detach()).mean())
            loss_n += 1
            at_epoch_end = step % steps_per_epoch == 0
            if at_epoch_end:
                metrics = {f"{name}_{k}": v for name, loader_ in eval_loaders.items()
                           for k, v in evaluate(model, loader_, accelerator, cfg.topk).items()}
                record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, loss_n), **metrics}
                history.append(record)
                loss_sum, loss_n = 0.0, 0
                if select_key not in metrics:
                    raise ValueError(f"select_metric: {select_key} was not computed; metrics: {sorted(metrics)}")
                extra = {"step": step, "epoch": epoch + 1, "selected_on": cfg.selected_on, "metric": select_key}
                if best is None or metrics[select_key] > best["value"]:
                    best = {"value": metrics[select_key], "step": step, "epoch": epoch + 1}
                    if main:
                        _export(unwrapped, os.path.join(cfg.output_dir, "gap_best.pth"),
                                dict(extra, value=metrics[select_key]))
                if main:
                    _export(unwrapped, os.path.join(cfg.output_dir, "gap_last.pth"), extra)
                    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                    _write_json(os.path.join(cfg.output_dir, "selection.json"), summary())
            stop = cfg.stop_after_steps and step >= cfg.stop_after_steps
            if at_epoch_end or stop or (cfg.save_every_steps and step % cfg.save_every_steps == 0):
                save_state()
            if stop:
                progress.close()
                return summary()
    progress.close()
    accelerator.end_training()
    return summary()


def _jsonable(cfg: TrainConfig) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["topk"] = list(cfg.topk)
    for k in ("output_dir", "stop_after_steps", "save_every_steps", "num_workers"):  # may change on resume
        d.pop(k)
    return d


# ------------------------------------------------------------------------------------- predict
@torch.no_grad()
def predict(checkpoint: str, roberta_path: str, annotation_root: str, sets: Any, split: str, out_dir: str,
            name: Optional[str] = None, scenes: Optional[Sequence[str]] = None, batch_size: int = 64,
            device: str = "cpu", feat_file: str = "", img_feat_file: str = "") -> Dict[str, str]:
    """GAP logits for every sample of ``split`` (optionally only ``scenes``), one file pair per set:
    ``infer_attn_maps_{name}_{set}.pt`` — the authors' format ``{anno_index: {"a_map": logits (n_obj,)}}`` —
    and ``….by_key.pt`` — ``{key: {"a_map": logits, "index": anno_index}}`` (stable keys). name defaults
    to ``split``. Returns {set: path of the authors'-format file}."""
    from tqdm.auto import tqdm

    model, tokenizer = load_gap(checkpoint, roberta_path, device=device)
    cfg = TrainConfig(annotation_root=annotation_root, feat_file=feat_file, img_feat_file=img_feat_file)
    features = _features(cfg, model.config.max_obj_num)
    datasets = load_split(annotation_root, sets, split, features, scenes=scenes)
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    collate = GapCollator(tokenizer)
    for set_name, data in datasets.items():
        by_index, by_key = {}, {}
        loader = DataLoader(data, batch_size=batch_size, collate_fn=collate)
        for batch in tqdm(loader, desc=f"GAP {split}/{set_name}"):
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                           batch["obj_feats"].to(device), batch["obj_img_feats"].to(device),
                           batch["locs"].to(device)).float().cpu()
            for i, key, row in zip(batch["index"].tolist(), batch["keys"], logits):
                by_index[i] = {"a_map": row.clone()}
                by_key[key] = {"a_map": row.clone(), "index": i}
        path = os.path.join(out_dir, f"infer_attn_maps_{name or split}_{set_name}.pt")
        torch.save(by_index, path)
        torch.save(by_key, path[:-3] + ".by_key.pt")
        written[set_name] = path
    return written


# ------------------------------------------------------------------------------------------ CLI
def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shared.apps.fast3d_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML/JSON file of settings (this tool's names or the authors' train.yaml keys)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest state in --output-dir (or from the given state directory)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "gap":
            p.add_argument(flag, type=json.loads, help="GAPConfig overrides as JSON, e.g. '{\"max_obj_num\": 100}'")
        elif f.name == "topk":
            p.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 5,10,20")
        elif f.type in ("bool", bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), metavar="BOOL")
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, type=typ)
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shared.apps.fast3d_train predict",
                                description="Write GAP logits per sample (authors' inference file format + by key).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--roberta-path", required=True)
    p.add_argument("--annotation-root", required=True)
    p.add_argument("--sets", default="#".join(FAST3D_SETS))
    p.add_argument("--split", default="val")
    p.add_argument("--name", default=None, help="file tag (default: the split), e.g. 'calib'")
    p.add_argument("--scenes", default=None, help="JSON list of scene ids to keep (e.g. heldout_scenes.json)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--feat-file", default="")
    p.add_argument("--img-feat-file", default="")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        a = _predict_parser().parse_args(argv[1:])
        scenes = None
        if a.scenes:
            with open(a.scenes) as f:
                scenes = json.load(f)
        out = predict(a.checkpoint, a.roberta_path, a.annotation_root, a.sets, a.split, a.out_dir, a.name, scenes,
                      a.batch_size, a.device, a.feat_file, a.img_feat_file)
        print(json.dumps(out, indent=1))
        return 0
    if argv and argv[0] == "train":
        argv = argv[1:]
    args = _train_parser().parse_args(argv)
    values: Dict[str, Any] = config_from_mapping(_read_config_file(args.config)) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    summary = train(TrainConfig(**values), resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # one copy under `accelerate launch`
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
