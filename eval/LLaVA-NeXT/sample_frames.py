"""Sample k frames per scene into ScanNet-format folders (what SeGPruner's evaluation reads).

    python eval/LLaVA-NeXT/sample_frames.py --root /data/scannet/frames_square --out /data/frames12 \\
        --scene-list /data/scannetv2_val.txt
    python eval/LLaVA-NeXT/sample_frames.py --root open-eqa/data/frames --out /data/openeqa12 \\
        --questions open-eqa/data/open-eqa-v0.json

Sources (detected per scene): a ScanNet frame folder ``<scene>/{color,depth,pose}/<id>.*`` (+
``intrinsic/``), or an OpenEQA episode folder ``<episode>/<id>-rgb.png, <id>-depth.png, <id>.txt``
(+ ``intrinsic_*.txt``; HM3D or ScanNet by its name). Output, per scene::

    <out>/<scene>/color/<id>.{jpg,png}  depth/<id>.png (uint16 mm)  pose/<id>.txt (OpenCV cam2world)
    <out>/<scene>/intrinsic/intrinsic_depth.txt [intrinsic_color.txt]   frames.json (what was done)

with the same ids in every folder (fixing the released ``image_simpling.py``, which had to be run
once per modality). Frames are chosen with ``shared.datasets.frames.sample_frames`` (numeric id
order; ``--rule released`` = ids[round(i·(n−1)/k)]). ScanNet files are copied byte for byte.
OpenEQA-HM3D frames are converted to ScanNet conventions: depth v·10/65535 m → uint16 mm, Habitat
OpenGL poses → OpenCV, intrinsics with fy = fx and the principal point in pixel-centre
coordinates; read the output with ``shared.datasets.load_scannet_scene``.

Idempotent and resumable: ``frames.json`` is written last; a scene whose ``frames.json`` records the
same selection, with all its files present, is skipped (``--force`` redoes it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

try:
    from shared.datasets.frames import RULES, sample_frames
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    from shared.datasets.frames import RULES, sample_frames
from shared.datasets.hm3d import HM3D_DEPTH_SCALE, episode_source, hm3d_intrinsics, list_openeqa_frames
from shared.datasets.scannet import (
    COLOR_EXTS,
    _stems,
    list_scannet_frames,
    read_depth_png,
    read_matrix,
    write_depth_png,
    write_matrix,
    write_scannet_intrinsics,
)
from shared.geometry import check_poses, opengl_to_opencv

FORMAT_VERSION = 1
INTRINSIC_FILES = ("intrinsic_color.txt", "intrinsic_depth.txt", "extrinsic_color.txt", "extrinsic_depth.txt")


def detect_layout(scene_dir: str) -> Optional[str]:
    """"scannet" (color/ sub-folder), "openeqa" (<id>-rgb.png files) or None."""
    if os.path.isdir(os.path.join(scene_dir, "color")):
        return "scannet"
    if os.path.isdir(scene_dir) and any(n.endswith("-rgb.png") for n in os.listdir(scene_dir)):
        return "openeqa"
    return None


def discover_scenes(root: str, max_depth: int = 2) -> List[str]:
    """Scene folders under ``root`` (relative paths, sorted), up to ``max_depth`` levels down."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        if depth > 0 and detect_layout(dirpath):
            found.append(rel.replace(os.sep, "/"))
            dirnames[:] = []
            continue
        if depth >= max_depth:
            dirnames[:] = []
        dirnames.sort()
    return sorted(found)


def scenes_from_questions(path: str) -> List[str]:
    """Unique scenes of a ScanQA (``scene_id``) or OpenEQA (``episode_history``) question file."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise ValueError(f"--questions: {path}: expected a non-empty JSON list of question objects")
    key = "episode_history" if "episode_history" in data[0] else "scene_id"
    if key not in data[0]:
        raise ValueError(f"--questions: {path}: entries have neither 'scene_id' nor 'episode_history'")
    return sorted({e[key] for e in data})


def _pose_ok(paths: Sequence[str]) -> List[bool]:
    """Finite rigid poses (the OpenGL→OpenCV flip does not change validity)."""
    T = np.stack([read_matrix(p) for p in paths])
    return check_poses(T, on_invalid="exclude").tolist()


def plan_scene(scene_dir: str, k: int, rule: str, short: str, valid_poses_only: bool) -> Dict:
    """What to write for one scene: layout, source, all ids and the selected ids."""
    layout = detect_layout(scene_dir)
    if layout is None:
        raise FileNotFoundError(f"{scene_dir}: neither a ScanNet frame folder (color/) nor an OpenEQA episode (*-rgb.png)")
    if layout == "scannet":
        ids = list_scannet_frames(scene_dir)
        source = "scannet"
        pose_path = lambda f: os.path.join(scene_dir, "pose", f + ".txt")  # noqa: E731
    else:
        ids = list_openeqa_frames(scene_dir)
        source = episode_source(scene_dir)
        pose_path = lambda f: os.path.join(scene_dir, f + ".txt")  # noqa: E731
    candidates = ids
    if valid_poses_only:
        ok = _pose_ok([pose_path(f) for f in ids])
        candidates = [f for f, good in zip(ids, ok) if good]
    selected = sample_frames(candidates, k=k, rule=rule, short=short)
    return {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "source": source,
        "k": k,
        "rule": rule,
        "valid_poses_only": bool(valid_poses_only),
        "n_frames": len(ids),
        "n_candidates": len(candidates),
        "frame_ids": selected,
    }


def _outputs(plan: Dict, scene_dir: str) -> List[Tuple[str, str]]:
    """(relative output path, kind) for every file a finished scene has."""
    out = []
    color = _stems(os.path.join(scene_dir, "color"), COLOR_EXTS) if plan["layout"] == "scannet" else {}
    for f in plan["frame_ids"]:
        ext = os.path.splitext(color[f])[1] if color else ".png"
        out += [(f"color/{f}{ext}", "color"), (f"depth/{f}.png", "depth"), (f"pose/{f}.txt", "pose")]
    return out


def _copy(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_scene(scene_dir: str, out_dir: str, plan: Dict) -> None:
    """Write the selected frames of one scene (see the module docstring)."""
    for sub in ("color", "depth", "pose"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    conversions = {}
    if plan["layout"] == "scannet":
        color = _stems(os.path.join(scene_dir, "color"), COLOR_EXTS)
        for f in plan["frame_ids"]:
            _copy(os.path.join(scene_dir, "color", color[f]), os.path.join(out_dir, "color", f + os.path.splitext(color[f])[1]))
            _copy(os.path.join(scene_dir, "depth", f + ".png"), os.path.join(out_dir, "depth", f + ".png"))
            _copy(os.path.join(scene_dir, "pose", f + ".txt"), os.path.join(out_dir, "pose", f + ".txt"))
        for name in INTRINSIC_FILES:
            for src in (os.path.join(scene_dir, "intrinsic", name), os.path.join(scene_dir, name)):
                if os.path.isfile(src):
                    os.makedirs(os.path.join(out_dir, "intrinsic"), exist_ok=True)
                    _copy(src, os.path.join(out_dir, "intrinsic", name))
                    break
    elif plan["source"] == "scannet":  # OpenEQA-ScanNet: same conventions, other names
        for f in plan["frame_ids"]:
            _copy(os.path.join(scene_dir, f"{f}-rgb.png"), os.path.join(out_dir, "color", f + ".png"))
            _copy(os.path.join(scene_dir, f"{f}-depth.png"), os.path.join(out_dir, "depth", f + ".png"))
            _copy(os.path.join(scene_dir, f"{f}.txt"), os.path.join(out_dir, "pose", f + ".txt"))
        for name in INTRINSIC_FILES:
            src = os.path.join(scene_dir, name)
            if os.path.isfile(src):
                os.makedirs(os.path.join(out_dir, "intrinsic"), exist_ok=True)
                _copy(src, os.path.join(out_dir, "intrinsic", name))
    else:  # OpenEQA-HM3D: convert to ScanNet conventions
        for f in plan["frame_ids"]:
            _copy(os.path.join(scene_dir, f"{f}-rgb.png"), os.path.join(out_dir, "color", f + ".png"))
            depth = read_depth_png(os.path.join(scene_dir, f"{f}-depth.png"), HM3D_DEPTH_SCALE)
            tmp = os.path.join(out_dir, "depth", f + ".tmp.png")
            write_depth_png(tmp, depth)
            os.replace(tmp, os.path.join(out_dir, "depth", f + ".png"))
            T = read_matrix(os.path.join(scene_dir, f"{f}.txt"))
            if np.isfinite(T).all():
                T = opengl_to_opencv(T).numpy()
            tmp = os.path.join(out_dir, "pose", f + ".tmp")
            write_matrix(tmp, T)
            os.replace(tmp, os.path.join(out_dir, "pose", f + ".txt"))
        K = hm3d_intrinsics(os.path.join(scene_dir, "intrinsic_color.txt"), square_pixels=True)
        write_scannet_intrinsics(out_dir, K, K)
        conversions = {
            "depth": f"uint16 v * {HM3D_DEPTH_SCALE!r} m -> round(metres * 1000) uint16 mm",
            "pose": "Habitat OpenGL camera -> OpenCV (cam2world @ diag(1, -1, -1, 1))",
            "intrinsics": "intrinsic_color.txt with fy := fx and principal point - 0.5 (pixel centres)",
        }
    meta = dict(plan, conversions=conversions, source_dir=os.path.abspath(scene_dir))
    tmp = os.path.join(out_dir, "frames.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(tmp, os.path.join(out_dir, "frames.json"))


def is_done(out_dir: str, plan: Dict, scene_dir: str) -> bool:
    """True when ``out_dir`` holds exactly this selection, complete."""
    path = os.path.join(out_dir, "frames.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    keys = ("format_version", "layout", "source", "k", "rule", "valid_poses_only", "frame_ids")
    if any(meta.get(k) != plan[k] for k in keys):
        return False
    return all(os.path.isfile(os.path.join(out_dir, rel)) for rel, _ in _outputs(plan, scene_dir))


def _clear_frames(out_dir: str) -> None:
    """Remove a previous (other or partial) selection so the folders hold only the new ids."""
    for sub in ("color", "depth", "pose", "intrinsic"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    for name in ("frames.json",):
        p = os.path.join(out_dir, name)
        if os.path.exists(p):
            os.remove(p)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder holding the scene folders")
    ap.add_argument("--out", required=True, help="output folder")
    sel = ap.add_mutually_exclusive_group()
    sel.add_argument("--scenes", nargs="+", help="scene folders relative to --root")
    sel.add_argument("--scene-list", help="text file, one scene per line (e.g. scannetv2_val.txt)")
    sel.add_argument("--questions", help="ScanQA or OpenEQA question JSON: its scenes")
    ap.add_argument("--k", type=int, default=12, help="frames per scene (default 12)")
    ap.add_argument("--rule", choices=RULES, default="released", help="released: ids[round(i(n-1)/k)]; linspace")
    ap.add_argument("--short", choices=("error", "all", "skip"), default="all",
                    help="scene with fewer than k frames: error, keep all (released script), or skip it")
    ap.add_argument("--valid-poses-only", action="store_true",
                    help="sample only among frames with a finite rigid pose (ScanNet marks lost tracking with -inf)")
    ap.add_argument("--skip-missing", action="store_true", help="skip listed scenes absent from --root instead of failing")
    ap.add_argument("--force", action="store_true", help="rewrite scenes that are already complete")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.k < 1:
        raise SystemExit("--k: expected a positive number of frames")
    if not os.path.isdir(args.root):
        raise SystemExit(f"--root: not a directory: {args.root}")
    root_real, out_real = os.path.realpath(args.root), os.path.realpath(args.out)
    if out_real == root_real or out_real.startswith(root_real + os.sep):
        raise SystemExit("--out: must lie outside --root (scenes in --out are rewritten)")
    if args.scenes:
        scenes = list(args.scenes)
    elif args.scene_list:
        with open(args.scene_list, encoding="utf-8") as fh:
            scenes = [line.strip() for line in fh if line.strip()]
    elif args.questions:
        scenes = scenes_from_questions(args.questions)
    else:
        scenes = discover_scenes(args.root)
    if not scenes:
        raise SystemExit(f"--root: no scene folders found under {args.root}")
    try:
        from tqdm import tqdm
    except ImportError as exc:  # pragma: no cover
        raise ImportError("sample_frames.py shows progress with tqdm: pip install tqdm") from exc

    done = skipped = missing = short = 0
    for scene in tqdm(scenes, desc="scenes", unit="scene"):
        scene_dir = os.path.join(args.root, scene)
        if not os.path.isdir(scene_dir):
            if args.skip_missing:
                missing += 1
                continue
            raise SystemExit(f"--root: scene {scene!r} not found under {args.root} (use --skip-missing to skip)")
        try:
            plan = plan_scene(scene_dir, args.k, args.rule, "error" if args.short == "skip" else args.short,
                              args.valid_poses_only)
        except ValueError as exc:
            if args.short == "skip" and str(exc).startswith("k:"):
                short += 1
                continue
            raise
        out_dir = os.path.join(args.out, scene)
        if not args.force and is_done(out_dir, plan, scene_dir):
            skipped += 1
            continue
        _clear_frames(out_dir)
        write_scene(scene_dir, out_dir, plan)
        done += 1
    print(f"sample_frames: {done} written, {skipped} already complete, {missing} missing, {short} too short "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
