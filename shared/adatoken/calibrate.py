"""AdaToken-3D calibration run and schedule fit (the library behind ``python -m shared.adatoken``).

``run_calibration(source, state_path)`` runs the unpruned prefill of each calibration prompt through
``shared.prune(model, AdaTokenCalibration())`` on the source's host and appends the prompt's span-block sums to
the state file (resuming: prompts already there are skipped). ``fit_state(state, r_values, ...)`` adds the sums
over prompts, forms Eq.1–4 (``information_flow``), Eq.6 and fits Eq.5 under Eq.7 (λ = 1) with SLSQP for each r
(``fit_schedule``), with the provenance described in ``shared/adatoken/__init__.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..methods.adatoken import (A1, A2, ALPHA_I, EPS, GAMMA, SIGMA, CODE_LINEAR_WEIGHTS, AdaTokenSchedule,
                                fit_schedule, information_flow)
from ..methods.adatoken_calibration import AdaTokenCalibration
from .state import CalibrationState, utc_now

#: LLaVA-3D's annotation files under ``--data-root`` (``playground/data`` in the LLaVA-3D checkout)
TRAIN_QUESTION_FILES = ("annotations/llava-3d-scanqa_train_question.json",
                        "annotations/llava-3d-sqa3d_train_question.json")
EVAL_QUESTION_FILES = ("annotations/llava-3d-scanqa_val_question.json",
                       "annotations/llava-3d-sqa3d_test_question.json")


def keys_digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


@dataclass
class Source:
    """Calibration prompts and the host that runs them.

    settings: what identifies the calibration (stored in the state file and the schedule's provenance);
    records: the prompts, in order; key(record) -> its unique key; load() -> the host model (only called when
    some prompt is left to run); inputs(model, record) -> the forward kwargs of one prompt."""

    name: str
    settings: Dict[str, Any]
    records: List[Dict[str, Any]]
    key: Callable[[Dict[str, Any]], str]
    load: Callable[[], nn.Module]
    inputs: Callable[[nn.Module, Dict[str, Any]], Dict[str, Any]]
    model: Optional[nn.Module] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        keys = [self.key(r) for r in self.records]
        if len(set(keys)) != len(keys):
            raise ValueError("records: calibration prompts must have unique keys")
        self.keys = keys
        self.settings = {**self.settings, "source": self.name, "prompts": len(keys), "prompt_keys_sha256": keys_digest(keys)}


def tiny_source(k: int = 64, seed: int = 0, spec: Any = None) -> Source:
    """``--source tiny``: K synthetic LLaVA-3D-shaped prompts on a tiny random hf_llava host (``shared.adatoken.tiny``)."""
    from .tiny import TinySpec, tiny_inputs, tiny_model, tiny_records

    spec = spec or TinySpec()
    return Source(
        name="tiny",
        settings={"model_path": "tiny-random", "model": spec.describe(), "k": k, "seed": seed, "dtype": "float32"},
        records=tiny_records(k, seed),
        key=lambda r: r["key"],
        load=lambda: tiny_model(spec),
        inputs=lambda model, r: tiny_inputs(r, spec),
    )


def _scenes(path: str) -> List[str]:
    """The scenes of an eval question file (its records' ``video`` / ``scene_id``), as given and as base names."""
    with open(path, "r", encoding="utf-8") as fh:
        data = json.load(fh)
    out = set()
    for rec in data if isinstance(data, list) else data.values():
        v = rec.get("video") or rec.get("scene_id")
        if v:
            out.update({str(v), os.path.basename(str(v))})
    return sorted(out)


def _record_key(rec: Dict[str, Any]) -> str:
    for name in ("key", "question_id", "id"):
        if rec.get(name) is not None:
            return str(rec[name])
    raise ValueError(f"records: a calibration record has no key/question_id/id field: {sorted(rec)}")


def _record_task(rec: Dict[str, Any]) -> str:
    task = rec.get("task")
    if task is None:
        raise ValueError(f"records: calibration record {_record_key(rec)!r} names no task (scanqa/sqa3d); "
                         f"shared.datasets.llava3d.calibration_records sets it")
    return str(task)


def llava3d_source(model_path: str, data_root: Optional[str] = None, question_files: Sequence[str] = (),
                   exclude_from: Optional[Sequence[str]] = None, k: int = 64, seed: int = 0,
                   model_base: Optional[str] = None, device: str = "cuda", dtype: str = "bfloat16",
                   compat: Optional[str] = None, video_folder: Optional[str] = None) -> Source:
    """``--source llava3d``: K prompts from ScanQA-train + SQA3D-train (scenes of the eval files excluded) on
    LLaVA-3D (``shared.datasets.llava3d``: ``load_llava3d``, ``calibration_records``, ``build_inputs``).

    data_root: LLaVA-3D's ``playground/data`` (or a folder holding it; ``resolve_data_root``): the default
    question files, the eval files whose scenes are excluded, and the ``embodiedscan_infos_full.json`` the
    video processor opens while the model loads. video_folder: where ``record["video"]`` (``scannet/sceneXXXX_XX``)
    lives (default ``<data_root>/LLaVA-3D-Pretrain``, as the eval scripts)."""
    try:
        from ..datasets import llava3d as data
    except ImportError as e:
        raise RuntimeError(f"--source llava3d: shared.datasets.llava3d could not be imported ({e})") from None
    if not model_path:
        raise ValueError("--model-path: --source llava3d needs the LLaVA-3D checkpoint folder")
    if data_root:
        data_root = str(data.resolve_data_root(data_root))
    if video_folder is None:
        if not data_root:
            raise ValueError("--video-folder: give the folder holding scannet/<scene> (or --data-root, whose "
                             f"{data.VIDEO_FOLDER} is the default)")
        video_folder = os.path.join(data_root, data.VIDEO_FOLDER)
    if not os.path.isdir(video_folder):
        raise FileNotFoundError(f"--video-folder: no folder at {video_folder}")
    video_folder = os.path.abspath(video_folder)
    files = list(question_files)
    if not files:
        if not data_root:
            raise ValueError("--data-root: give LLaVA-3D's playground/data folder, or --question-files")
        files = [os.path.join(data_root, f) for f in TRAIN_QUESTION_FILES]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--question-files: no question file at {f}")
    if exclude_from is None:
        exclude_from = [os.path.join(data_root, f) for f in EVAL_QUESTION_FILES] if data_root else []
        exclude_from = [f for f in exclude_from if os.path.isfile(f)]
    for f in exclude_from:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--exclude-scenes-from: no question file at {f}")
    exclude = sorted({s for f in exclude_from for s in _scenes(f)})
    records = list(data.calibration_records([os.path.abspath(f) for f in files], k=k, seed=seed,
                                            exclude_scenes=tuple(exclude)))
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    loaded: Dict[str, Any] = {}

    def load() -> nn.Module:
        tok, model, proc = data.load_llava3d(model_path, model_base=model_base, device=device, dtype=torch_dtype,
                                             data_root=data_root)
        loaded.update(tokenizer=tok, processor=proc)
        return model

    def inputs(model: nn.Module, rec: Dict[str, Any]) -> Dict[str, Any]:
        return data.build_inputs(rec, _record_task(rec), loaded["tokenizer"], model, loaded["processor"],
                                 compat=compat, video_folder=video_folder)

    return Source(
        name="llava3d",
        settings={"model_path": os.path.abspath(model_path), "model_base": model_base, "dtype": dtype, "k": k,
                  "seed": seed, "question_files": [os.path.abspath(f) for f in files],
                  "exclude_scenes_from": [os.path.abspath(f) for f in exclude_from],
                  "excluded_scenes_sha256": keys_digest(exclude), "compat": compat, "video_folder": video_folder},
        records=records, key=_record_key, load=load, inputs=inputs,
    )


def _to_device(kwargs: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    dev = next(model.parameters()).device
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def run_calibration(source: Source, state_path: str, chunk: int = 64, stop_after: Optional[int] = None,
                    progress: bool = True) -> CalibrationState:
    """Calibrate every prompt of ``source`` not yet in the state file (``stop_after``: at most that many new
    ones this run). Returns the state; its rows are complete when ``len(rows) == len(source.records)``."""
    import shared
    from tqdm import tqdm

    settings = {**source.settings, "chunk": int(chunk)}
    state = CalibrationState.open(state_path, settings)
    stray = state.done - set(source.keys)
    if stray:
        raise ValueError(f"--state: {state_path} holds prompts that are not calibration prompts now "
                         f"({sorted(stray)[:3]} ...)")
    todo = [(i, r, key) for i, (r, key) in enumerate(zip(source.records, source.keys)) if key not in state.done]
    if stop_after is not None:
        todo = todo[:stop_after]
    if not todo:
        return state
    if source.model is None:
        source.model = source.load()
    model = source.model
    bar = tqdm(total=len(source.records), initial=len(state.rows), desc="AdaToken-3D calibration", unit="prompt",
               disable=not progress, file=sys.stderr)
    try:
        with torch.no_grad(), shared.prune(model, AdaTokenCalibration(chunk=chunk)) as session:
            for i, rec, key in todo:
                kwargs = _to_device(source.inputs(model, rec), model)
                t0 = time.perf_counter()
                model(**kwargs)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                runner = session.engine
                if len(runner.last) != 1:
                    raise RuntimeError(f"records: prompt {key!r} ran as {len(runner.last)} prefill rows; expected one")
                sys_, _, prm = runner.last_spans
                state.append(i, key, runner.last[0], sys_tokens=int(sys_[0, 1] - sys_[0, 0]),
                             length=int(prm[0, 1] - sys_[0, 0]), seconds=round(seconds, 6))
                bar.update(1)
    finally:
        bar.close()
    return state


def _software() -> Dict[str, Any]:
    import numpy
    import scipy

    from .. import __version__

    out: Dict[str, Any] = {"shared": __version__, "python": platform.python_version(), "torch": torch.__version__,
                           "numpy": numpy.__version__, "scipy": scipy.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - always installed where calibration runs
        pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def fit_state(state: CalibrationState, r_values: Sequence[float], variant: str = "paper", scale: str = "row_mean",
              visual_tokens: Optional[int] = None, partial: bool = False) -> List[AdaTokenSchedule]:
    """One fitted schedule per r from the state's summed block sums (see the module docstring).

    visual_tokens: N of the stored budgets (default: the calibration prompts' mean N, rounded); partial: allow
    a state with fewer prompts than the calibration set."""
    want = int(state.settings.get("prompts", 0))
    if len(state.rows) < want and not partial:
        raise ValueError(f"--state: {len(state.rows)} of {want} calibration prompts are done; run calibrate again "
                         f"(it resumes), or pass --partial to fit on what is there")
    total = state.total()
    terms = information_flow(total, variant=variant, scale=scale)
    n_stat = state.stat("spa_rows")
    if visual_tokens is None:
        visual_tokens = int(round(n_stat["mean"]))
    rows = sorted(state.rows, key=lambda r: r["index"])
    keys = [r["key"] for r in rows]
    prov = {
        "method": "AdaToken-3D (shared reconstruction, notes §6)",
        "calibration": {**state.settings, "prompts_used": len(rows), "used_keys_sha256": keys_digest(keys),
                        "layers": total.num_layers, "visual_tokens": n_stat, "sys_tokens": state.stat("sys_tokens"),
                        "prm_tokens": state.stat("prm_rows"), "prefill_tokens": state.stat("length")},
        "information": {"variant": variant, "scale": scale,
                        "constants": {"sigma": SIGMA, "gamma": GAMMA if variant == "paper" else 1.0, "a1": A1,
                                      "a2": A2, "alpha_i": ALPHA_I, "eps": EPS,
                                      "code_linear_weights": list(CODE_LINEAR_WEIGHTS)},
                        "s_self": terms.s_self.tolist(), "f": terms.f.tolist(), "s_cross": terms.s_cross.tolist(),
                        "inf": terms.inf.tolist()},
        "block_sums": {"spa_spa": total.spa_spa.tolist(), "prm_spa": total.prm_spa.tolist(),
                       "spa_sys": total.spa_sys.tolist(), "spa_rows": total.spa_rows, "prm_rows": total.prm_rows},
        "software": _software(),
        "run": {"calibration_started": state.created, "calibration_finished": max(r["time"] for r in rows),
                "fitted": utc_now(),
                "seconds_per_prompt": state.stat("seconds") if all("seconds" in r for r in rows) else None},
    }
    return [fit_schedule(terms.inf, r, visual_tokens, lam=1.0, provenance=json.loads(json.dumps(prov)))
            for r in r_values]


def schedule_name(r: float) -> str:
    return f"schedule_r{r:g}.json"


def write_schedules(schedules: Sequence[AdaTokenSchedule], out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for s in schedules:
        path = os.path.join(out_dir, schedule_name(s.r))
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(s.to_json() + "\n")
        paths.append(path)
    return paths


__all__ = ["EVAL_QUESTION_FILES", "Source", "TRAIN_QUESTION_FILES", "fit_state", "keys_digest", "llava3d_source",
           "run_calibration", "schedule_name", "tiny_source", "write_schedules"]
