"""OpenEQA episode histories (HM3D and ScanNet) and OpenEQA questions.

Episode folder ``<frames>/<episode_history>/``, as OpenEQA's ``extract-frames.py`` scripts write
it (run *without* ``--rgb-only``; the downloadable HM3D frames are RGB only)::

    000000-rgb.png     colour (HM3D 1920×1080; ScanNet 1296×968)
    000000-depth.png   uint16 depth (HM3D 1920×1080; ScanNet 640×480)
    000000.txt         4×4 camera-to-world
    intrinsic_color.txt, intrinsic_depth.txt   4×4

``episode_history`` names the source: ``hm3d-v0/000-hm3d-BFRyYbPCCPE`` or
``scannet-v0/002-scannet-scene0709_00``.

**HM3D** (Habitat): depth was saved as ``(depth / 10 · 65535).astype(uint16)``, so metres =
v · 10/65535 (not v/1000; depths beyond 10 m overflowed the cast when written and cannot be
recovered). Poses are Habitat ``absolute_transformation()`` of the RGB sensor: an OpenGL camera
(x right, y up, looking along −z); they are converted to OpenCV. The intrinsic file has
``fx = W/(2·tan(hfov/2))`` = 960 and ``fy`` from the linear approximation vfov = hfov·H/W
(1141.7). Habitat renders with square pixels (the vertical field of view follows from the aspect
ratio: tan(vfov/2) = tan(hfov/2)·H/W), so the true fy equals fx; ``square_pixels=True`` (default)
sets fy := fx. The file's principal point (W/2, H/2) is the image centre in edge coordinates;
in our pixel-centre convention it is (W/2 − ½, H/2 − ½).

**ScanNet** episodes follow ScanNet's conventions: depth in mm, OpenCV cam2world (failed
tracking = -inf), calibrated ``intrinsic_depth``/``intrinsic_color`` taken as they are.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..geometry import opengl_to_opencv
from .frames import sort_frame_ids
from .scannet import (
    SCANNET_DEPTH_SCALE,
    _check_principal_point,
    apply_pose_policy,
    intrinsics_3x3,
    question_entries,
    read_depth_png,
    read_matrix,
    read_rgb,
)
from .views import SceneViews

SOURCES = ("scannet", "hm3d")
#: metres per unit of OpenEQA-HM3D depth PNGs.
HM3D_DEPTH_SCALE = 10.0 / 65535.0

_POSE = re.compile(r"^(\d+)\.txt$")
_RGB = re.compile(r"^(\d+)-rgb\.png$")
_DEPTH = re.compile(r"^(\d+)-depth\.png$")


def episode_source(episode_history: str) -> str:
    """"scannet" or "hm3d" for an OpenEQA ``episode_history`` (or its folder path)."""
    parts = [p for p in str(episode_history).replace("\\", "/").split("/") if p]
    for p in reversed(parts):
        low = p.lower()
        if low.startswith("hm3d") or "-hm3d-" in low:
            return "hm3d"
        if low.startswith("scannet") or "-scannet-" in low:
            return "scannet"
    raise ValueError(
        f"episode_history: cannot tell HM3D from ScanNet in {episode_history!r} "
        f"(expected e.g. 'hm3d-v0/000-hm3d-<id>' or 'scannet-v0/002-scannet-sceneXXXX_XX')"
    )


def episode_scene_id(episode_history: str) -> str:
    """The scene name: 'scannet-v0/002-scannet-scene0709_00' → 'scene0709_00', HM3D → 'BFRyYbPCCPE'."""
    last = [p for p in str(episode_history).replace("\\", "/").split("/") if p][-1]
    return last.split("-")[-1]


def list_openeqa_frames(episode_dir: str) -> List[str]:
    """Frame ids (e.g. '000000') with colour, depth and pose, numeric order; they must agree."""
    if not os.path.isdir(episode_dir):
        raise FileNotFoundError(f"episode_dir: not a directory: {episode_dir}")
    names = os.listdir(episode_dir)
    rgb = {m.group(1) for m in map(_RGB.match, names) if m}
    depth = {m.group(1) for m in map(_DEPTH.match, names) if m}
    pose = {m.group(1) for m in map(_POSE.match, names) if m}
    if not rgb:
        raise FileNotFoundError(f"episode_dir: no '<id>-rgb.png' frames in {episode_dir}")
    if not depth or not pose:
        raise FileNotFoundError(
            f"episode_dir: {episode_dir} has colour frames only; depth and poses come from OpenEQA's "
            f"extract-frames.py run without --rgb-only"
        )
    if not rgb == depth == pose:
        union = rgb | depth | pose
        missing = {k: sorted(union - v)[:5] for k, v in (("rgb", rgb), ("depth", depth), ("pose", pose)) if union - v}
        raise ValueError(f"episode_dir: {episode_dir}: colour, depth and pose frames differ; missing {missing}")
    return sort_frame_ids(list(rgb))


def hm3d_intrinsics(path: str, square_pixels: bool = True) -> np.ndarray:
    """3×3 K from OpenEQA-HM3D's intrinsic file: principal point −½ (pixel centres), fy := fx."""
    K = intrinsics_3x3(read_matrix(path), path)
    K[0, 2] -= 0.5
    K[1, 2] -= 0.5
    if square_pixels:
        K[1, 1] = K[0, 0]
    return K


def load_openeqa_episode(
    episode_dir: str,
    source: Optional[str] = None,
    frame_ids: Optional[Sequence[str]] = None,
    on_invalid_pose: str = "raise",
    square_pixels: bool = True,
) -> SceneViews:
    """Read an OpenEQA episode folder into :class:`SceneViews` in our conventions (module doc).

    ``source``: "hm3d" or "scannet" (default: from the folder name). ``frame_ids``: a subset
    (default all). ``on_invalid_pose``: "raise", "exclude" or "keep".
    """
    if source is None:
        source = episode_source(episode_dir)
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    all_ids = list_openeqa_frames(episode_dir)
    ids = all_ids if frame_ids is None else [str(f) for f in frame_ids]
    unknown = sorted(set(ids) - set(all_ids))
    if unknown:
        raise ValueError(f"frame_ids: {unknown[:5]} not in {episode_dir}")
    scale = HM3D_DEPTH_SCALE if source == "hm3d" else SCANNET_DEPTH_SCALE
    rgb = [read_rgb(os.path.join(episode_dir, f"{f}-rgb.png")) for f in ids]
    depth = [read_depth_png(os.path.join(episode_dir, f"{f}-depth.png"), scale) for f in ids]
    poses = np.stack([read_matrix(os.path.join(episode_dir, f"{f}.txt")) for f in ids])
    for what, arrs in (("depth", [d.shape for d in depth]), ("colour", [im.shape[:2] for im in rgb])):
        if len(set(arrs)) != 1:
            raise ValueError(f"episode_dir: {episode_dir}: {what} images of different sizes {sorted(set(arrs))}")
    V = len(ids)
    cam2world = torch.from_numpy(poses)
    if source == "hm3d":
        path = os.path.join(episode_dir, "intrinsic_color.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"episode_dir: {episode_dir} lacks intrinsic_color.txt (written by extract-frames.py)")
        K = hm3d_intrinsics(path, square_pixels)
        _check_principal_point(K, depth[0].shape, path)
        if rgb[0].shape[:2] != depth[0].shape:
            raise ValueError(
                f"episode_dir: {episode_dir}: HM3D colour {rgb[0].shape[:2]} and depth {depth[0].shape} differ in size"
            )
        finite = torch.isfinite(cam2world).flatten(1).all(dim=1)
        cam2world = torch.where(finite[:, None, None], opengl_to_opencv(cam2world), cam2world)
        Kd, Kc = K, None
    else:
        pd = os.path.join(episode_dir, "intrinsic_depth.txt")
        pc = os.path.join(episode_dir, "intrinsic_color.txt")
        for p in (pd, pc):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"episode_dir: {episode_dir} lacks {os.path.basename(p)}")
        Kd = intrinsics_3x3(read_matrix(pd), pd)
        Kc = intrinsics_3x3(read_matrix(pc), pc)
        _check_principal_point(Kd, depth[0].shape, pd)
        _check_principal_point(Kc, rgb[0].shape[:2], pc)
    views = SceneViews(
        rgb=rgb,
        depth=torch.from_numpy(np.stack(depth)),
        K=torch.from_numpy(Kd).expand(V, 3, 3).clone(),
        cam2world=cam2world,
        frame_ids=ids,
        K_color=None if Kc is None else torch.from_numpy(Kc).expand(V, 3, 3).clone(),
        scene_id=os.path.basename(os.path.normpath(episode_dir)),
    )
    return apply_pose_policy(views, on_invalid_pose)


@dataclass(frozen=True)
class OpenEQAQuestion:
    """One OpenEQA question; ``extra_answers`` is None when the entry has none."""

    question_id: str
    question: str
    answer: str
    category: str
    episode_history: str
    extra_answers: Optional[Tuple[str, ...]] = None

    @property
    def source(self) -> str:
        """"scannet" or "hm3d"."""
        return episode_source(self.episode_history)

    @property
    def scene_id(self) -> str:
        return episode_scene_id(self.episode_history)

    @property
    def answers(self) -> Tuple[str, ...]:
        """``answer`` followed by ``extra_answers``."""
        return (self.answer,) + (self.extra_answers or ())


def load_openeqa(path: str) -> List[OpenEQAQuestion]:
    """OpenEQA JSON (a list of {question, answer, category, question_id, episode_history[, extra_answers]})."""
    out = []
    for where, e in question_entries(path, ("question", "answer", "category", "question_id", "episode_history")):
        extra = e.get("extra_answers")
        if extra is not None:
            if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
                raise ValueError(f"{where}: 'extra_answers' must be a list of strings, got {extra!r}")
            extra = tuple(extra)
        episode_source(e["episode_history"])  # validates the source early
        out.append(
            OpenEQAQuestion(
                question_id=e["question_id"],
                question=e["question"],
                answer=e["answer"],
                category=e["category"],
                episode_history=e["episode_history"],
                extra_answers=extra,
            )
        )
    return out


__all__ = [
    "HM3D_DEPTH_SCALE",
    "OpenEQAQuestion",
    "SOURCES",
    "episode_scene_id",
    "episode_source",
    "hm3d_intrinsics",
    "list_openeqa_frames",
    "load_openeqa",
    "load_openeqa_episode",
]
