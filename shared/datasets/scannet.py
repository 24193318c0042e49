"""ScanNet frame folders and ScanQA questions.

Frame folder (ScanNet's ``SensReader`` export, also SeGPruner's ``frames_square`` and the output
of ``eval/LLaVA-NeXT/sample_frames.py``)::

    <scene>/color/<id>.jpg       colour (.jpg or .png), 1296×968 in raw ScanNet
    <scene>/depth/<id>.png       uint16 depth in millimetres (0 = missing), 640×480
    <scene>/pose/<id>.txt        4×4 camera-to-world (OpenCV camera); failed tracking = -inf
    <scene>/intrinsic/intrinsic_depth.txt, intrinsic_color.txt   4×4 (optional; also accepted
                                  directly under <scene>/)

Ids are file stems sorted numerically. Without ``intrinsic_depth.txt`` the depth K is
:data:`SCANNET_DEFAULT_DEPTH_K` (the focal lengths of ScanNet's usual depth calibration with the
principal point at the centre, as SeGPruner hard-codes it), resized to the depth image, with a
warning. Without ``intrinsic_color.txt`` the colour image is taken as the depth camera resized
(``SceneViews.K_color = None``).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..geometry import check_poses, resize_intrinsics
from .frames import sort_frame_ids
from .views import SceneViews, _require_pil

#: ScanNet depth intrinsics for 640×480 used when a scene has no intrinsic_depth.txt:
#: fx, fy of the common calibration (e.g. scene0000_00: 577.590698, 578.729797), centre (319.5, 239.5).
SCANNET_DEFAULT_DEPTH_K = np.array([[577.590698, 0.0, 319.5], [0.0, 578.729797, 239.5], [0.0, 0.0, 1.0]])
SCANNET_DEFAULT_DEPTH_SIZE = (480, 640)
#: metres per unit of ScanNet's uint16 depth PNGs (``depth_shift`` = 1000).
SCANNET_DEPTH_SCALE = 0.001

COLOR_EXTS = (".jpg", ".jpeg", ".png")
POSE_ACTIONS = ("raise", "exclude", "keep")


# ---------------------------------------------------------------- file readers (shared with hm3d)

def read_matrix(path: str, shape: Tuple[int, int] = (4, 4)) -> np.ndarray:
    """A whitespace-separated text matrix (float64); ``-inf``/``nan`` are kept as such."""
    try:
        m = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: expected a {shape[0]}×{shape[1]} text matrix ({exc})") from exc
    if m.shape != shape:
        raise ValueError(f"{path}: expected a {shape[0]}×{shape[1]} matrix, got {m.shape[0]}×{m.shape[1]}")
    return m


def intrinsics_3x3(m: np.ndarray, path: str = "K") -> np.ndarray:
    """The 3×3 pinhole block of a 3×3 or 4×4 intrinsic matrix (ScanNet/OpenEQA write 4×4)."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape not in ((3, 3), (4, 4)):
        raise ValueError(f"{path}: expected a 3×3 or 4×4 intrinsic matrix, got shape {m.shape}")
    K = m[:3, :3].copy()
    if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise ValueError(f"{path}: not a pinhole intrinsic matrix (finite, fx, fy > 0, last row 0 0 1): {K.tolist()}")
    K[2] = [0.0, 0.0, 1.0]
    return K


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8."""
    Image = _require_pil()
    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def read_depth_png(path: str, scale: float) -> np.ndarray:
    """(H, W) float32 metres = stored uint16 value × ``scale`` (0 stays 0 = missing)."""
    Image = _require_pil()
    with Image.open(path) as im:
        raw = np.array(im)
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{path}: expected a single-channel 16-bit depth PNG, got {raw.dtype} {raw.shape}")
    if raw.min() < 0 or raw.max() > 65535:
        raise ValueError(f"{path}: depth values outside uint16 range")
    return (raw.astype(np.float64) * scale).astype(np.float32)


def _check_principal_point(K: np.ndarray, hw: Tuple[int, int], path: str) -> None:
    h, w = hw
    if not (0 <= K[0, 2] <= w and 0 <= K[1, 2] <= h):
        raise ValueError(
            f"{path}: principal point ({K[0, 2]:.1f}, {K[1, 2]:.1f}) lies outside the {w}×{h} image it is "
            f"read for; the file belongs to images of another size"
        )


def apply_pose_policy(views: SceneViews, on_invalid_pose: str) -> SceneViews:
    """``raise`` (error naming the frame), ``exclude`` (drop with a warning) or ``keep``."""
    if on_invalid_pose not in POSE_ACTIONS:
        raise ValueError(f"on_invalid_pose: expected one of {POSE_ACTIONS}, got {on_invalid_pose!r}")
    if on_invalid_pose == "keep":
        return views
    ok = check_poses(views.cam2world, on_invalid="exclude")
    if bool(ok.all()):
        return views
    bad = [f for f, k in zip(views.frame_ids, ok.tolist()) if not k]
    if on_invalid_pose == "raise":
        raise ValueError(
            f"cam2world: scene {views.scene_id!r} frame(s) {bad} have an invalid pose (non-finite or not rigid); "
            f"pass on_invalid_pose='exclude' to drop them or 'keep' to load them as they are"
        )
    if not bool(ok.any()):
        raise ValueError(f"cam2world: scene {views.scene_id!r}: every frame has an invalid pose")
    warnings.warn(f"scene {views.scene_id!r}: dropped frame(s) {bad} with an invalid pose", stacklevel=3)
    return views.select([i for i, k in enumerate(ok.tolist()) if k])


# ---------------------------------------------------------------- writers (ScanNet format)

def write_matrix(path: str, m: np.ndarray) -> None:
    """A text matrix with 17 significant digits (float64 round-trips exactly)."""
    np.savetxt(path, np.asarray(m, dtype=np.float64), fmt="%.17g")


def write_depth_png(path: str, depth_m: np.ndarray, scale: float = SCANNET_DEPTH_SCALE) -> None:
    """Depth in metres → uint16 PNG of round(depth/scale); missing (0, NaN, inf) → 0."""
    Image = _require_pil()
    d = np.asarray(depth_m, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth_m: expected (H, W) metres, got shape {d.shape}")
    ok = np.isfinite(d) & (d > 0)
    v = np.where(ok, np.round(np.where(ok, d, 0.0) / scale), 0.0)
    if v.max(initial=0.0) > 65535:
        raise ValueError(f"depth_m: {d[ok].max():.3f} m exceeds the uint16 range at {scale} m per unit")
    Image.fromarray(v.astype(np.uint16)).save(path)


def write_rgb(path: str, rgb: np.ndarray, quality: int = 95) -> None:
    """(H, W, 3) uint8 → JPEG (``quality``, no chroma subsampling) or PNG by extension."""
    Image = _require_pil()
    im = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    if os.path.splitext(path)[1].lower() in (".jpg", ".jpeg"):
        im.save(path, quality=quality, subsampling=0)
    else:
        im.save(path)


def write_scannet_intrinsics(scene_dir: str, K_depth: np.ndarray, K_color: Optional[np.ndarray] = None) -> None:
    """``<scene>/intrinsic/intrinsic_depth.txt`` (and ``intrinsic_color.txt``) as 4×4 matrices."""
    os.makedirs(os.path.join(scene_dir, "intrinsic"), exist_ok=True)
    for name, K in (("intrinsic_depth.txt", K_depth), ("intrinsic_color.txt", K_color)):
        if K is None:
            continue
        M = np.eye(4)
        M[:3, :3] = np.asarray(K, dtype=np.float64)
        write_matrix(os.path.join(scene_dir, "intrinsic", name), M)


# ---------------------------------------------------------------- ScanNet frame folders

def _stems(folder: str, exts: Sequence[str]) -> dict:
    out = {}
    if not os.path.isdir(folder):
        return out
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext.lower() in exts:
            if stem in out:
                raise ValueError(f"{folder}: frame {stem!r} exists with two extensions")
            out[stem] = name
    return out


def list_scannet_frames(scene_dir: str) -> List[str]:
    """Frame ids of a ScanNet frame folder in numeric order; colour, depth and pose must agree."""
    color = _stems(os.path.join(scene_dir, "color"), COLOR_EXTS)
    depth = _stems(os.path.join(scene_dir, "depth"), (".png",))
    pose = _stems(os.path.join(scene_dir, "pose"), (".txt",))
    if not color:
        raise FileNotFoundError(f"scene_dir: no colour frames in {os.path.join(scene_dir, 'color')}")
    sets = {"color": set(color), "depth": set(depth), "pose": set(pose)}
    if not sets["color"] == sets["depth"] == sets["pose"]:
        union = set().union(*sets.values())
        missing = {k: sorted(union - v)[:5] for k, v in sets.items() if union - v}
        raise ValueError(f"scene_dir: {scene_dir}: colour, depth and pose frames differ; missing {missing}")
    return sort_frame_ids(list(color))


def _find_intrinsic(scene_dir: str, name: str) -> Optional[str]:
    for p in (os.path.join(scene_dir, "intrinsic", name), os.path.join(scene_dir, name)):
        if os.path.isfile(p):
            return p
    return None


def scannet_intrinsics(
    scene_dir: str, depth_hw: Tuple[int, int], color_hw: Tuple[int, int]
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(K_depth 3×3, K_color 3×3 or None) of a ScanNet frame folder (see the module docstring)."""
    pd = _find_intrinsic(scene_dir, "intrinsic_depth.txt")
    if pd is not None:
        Kd = intrinsics_3x3(read_matrix(pd), pd)
        _check_principal_point(Kd, depth_hw, pd)
    else:
        warnings.warn(
            f"{scene_dir}: no intrinsic_depth.txt; using ScanNet's default depth intrinsics "
            f"(fx={SCANNET_DEFAULT_DEPTH_K[0, 0]}, fy={SCANNET_DEFAULT_DEPTH_K[1, 1]}, centred) "
            f"resized from 640×480 to {depth_hw[1]}×{depth_hw[0]}",
            stacklevel=3,
        )
        Kd = resize_intrinsics(torch.from_numpy(SCANNET_DEFAULT_DEPTH_K), SCANNET_DEFAULT_DEPTH_SIZE, depth_hw).numpy()
    pc = _find_intrinsic(scene_dir, "intrinsic_color.txt")
    Kc = None
    if pc is not None:
        Kc = intrinsics_3x3(read_matrix(pc), pc)
        _check_principal_point(Kc, color_hw, pc)
    return Kd, Kc


def load_scannet_scene(
    scene_dir: str,
    frame_ids: Optional[Sequence[str]] = None,
    on_invalid_pose: str = "raise",
    depth_scale: float = SCANNET_DEPTH_SCALE,
) -> SceneViews:
    """Read a ScanNet frame folder into :class:`SceneViews` (all frames, or ``frame_ids``).

    Depth = PNG value × ``depth_scale`` (mm → m). ``on_invalid_pose``: "raise" (default; error
    naming the frames), "exclude" (drop them, with a warning) or "keep".
    """
    if not os.path.isdir(scene_dir):
        raise FileNotFoundError(f"scene_dir: not a directory: {scene_dir}")
    all_ids = list_scannet_frames(scene_dir)
    if frame_ids is None:
        ids = all_ids
    else:
        ids = [str(f) for f in frame_ids]
        unknown = sorted(set(ids) - set(all_ids))
        if unknown:
            raise ValueError(f"frame_ids: {unknown[:5]} not in {scene_dir}")
    color = _stems(os.path.join(scene_dir, "color"), COLOR_EXTS)
    rgb, depth, poses = [], [], []
    for f in ids:
        rgb.append(read_rgb(os.path.join(scene_dir, "color", color[f])))
        depth.append(read_depth_png(os.path.join(scene_dir, "depth", f + ".png"), depth_scale))
        poses.append(read_matrix(os.path.join(scene_dir, "pose", f + ".txt")))
    shapes = {d.shape for d in depth}
    if len(shapes) != 1:
        raise ValueError(f"scene_dir: {scene_dir}: depth images of different sizes {sorted(shapes)}")
    cshapes = {im.shape[:2] for im in rgb}
    if len(cshapes) != 1:
        raise ValueError(f"scene_dir: {scene_dir}: colour images of different sizes {sorted(cshapes)}")
    Kd, Kc = scannet_intrinsics(scene_dir, depth[0].shape, rgb[0].shape[:2])
    V = len(ids)
    views = SceneViews(
        rgb=rgb,
        depth=torch.from_numpy(np.stack(depth)),
        K=torch.from_numpy(Kd).expand(V, 3, 3).clone(),
        cam2world=torch.from_numpy(np.stack(poses)),
        frame_ids=ids,
        K_color=None if Kc is None else torch.from_numpy(Kc).expand(V, 3, 3).clone(),
        scene_id=os.path.basename(os.path.normpath(scene_dir)),
    )
    return apply_pose_policy(views, on_invalid_pose)


# ---------------------------------------------------------------- ScanQA questions

@dataclass(frozen=True)
class ScanQAQuestion:
    """One ScanQA question. ``answers``/``object_ids``/``object_names`` are None where the split
    has none (the test splits)."""

    question_id: str
    scene_id: str
    question: str
    answers: Optional[Tuple[str, ...]] = None
    object_ids: Optional[Tuple[int, ...]] = None
    object_names: Optional[Tuple[str, ...]] = None


def _str_list(entry: dict, key: str, where: str) -> Optional[Tuple[str, ...]]:
    if key not in entry:
        return None
    v = entry[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{where}: '{key}' must be a list of strings, got {v!r}")
    return tuple(v)


def question_entries(path: str, string_keys: Sequence[str]) -> Iterator[Tuple[str, dict]]:
    """(where, entry) for each object of a JSON list of questions, checking that ``string_keys`` are strings."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"path: {path}: expected a JSON list of questions, got {type(data).__name__}")
    for i, e in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected an object, got {type(e).__name__}")
        for key in string_keys:
            if not isinstance(e.get(key), str):
                raise ValueError(f"{where}: '{key}' must be a string, got {e.get(key)!r}")
        yield where, e


def load_scanqa(path: str) -> List[ScanQAQuestion]:
    """ScanQA JSON (a list of {answers, object_ids, object_names, question, question_id, scene_id})."""
    out = []
    for where, e in question_entries(path, ("question", "question_id", "scene_id")):
        ids = None
        if "object_ids" in e:
            ids = e["object_ids"]
            if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
                raise ValueError(f"{where}: 'object_ids' must be a list of ints, got {ids!r}")
            ids = tuple(ids)
        out.append(
            ScanQAQuestion(
                question_id=e["question_id"],
                scene_id=e["scene_id"],
                question=e["question"],
                answers=_str_list(e, "answers", where),
                object_ids=ids,
                object_names=_str_list(e, "object_names", where),
            )
        )
    return out


__all__ = [
    "SCANNET_DEFAULT_DEPTH_K",
    "SCANNET_DEPTH_SCALE",
    "ScanQAQuestion",
    "apply_pose_policy",
    "intrinsics_3x3",
    "list_scannet_frames",
    "load_scanqa",
    "load_scannet_scene",
    "read_depth_png",
    "read_matrix",
    "read_rgb",
    "scannet_intrinsics",
    "write_depth_png",
    "write_matrix",
    "write_rgb",
    "write_scannet_intrinsics",
]
