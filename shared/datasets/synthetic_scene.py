"""A synthetic posed RGB-D scene with exact geometry, for tests and demos without datasets.

A closed box-shaped room (floor, four walls, ceiling; world z up, metres) holds axis-aligned
coloured boxes standing on the floor. Cameras sit on a horizontal circle and look at a point
above the room's centre, so neighbouring views overlap. Depth is exact ray casting (vectorised
numpy slab tests), so back-projecting it with the returned K and cam2world puts every pixel on
the surface it saw. Colours use Lambert shading plus a floor checkerboard and wall stripes, so
image features vary across the scene. Everything is deterministic under ``seed``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

from .scannet import write_depth_png, write_matrix, write_rgb, write_scannet_intrinsics
from .views import SceneViews

#: faces per box: (axis, side) with side 0 = the low bound, 1 = the high bound.
_FACES = [(a, s) for a in range(3) for s in range(2)]


@dataclass(frozen=True)
class RoomGeometry:
    """Room bounds ``room_lo``/``room_hi`` (3,), boxes ``box_lo``/``box_hi`` (B, 3), RGB in [0, 1].

    Face labels: the room's faces are 0..5 and box b's faces are 6 + 6b .. 11 + 6b, ordered
    (x low, x high, y low, y high, z low, z high).
    """

    room_lo: np.ndarray
    room_hi: np.ndarray
    box_lo: np.ndarray
    box_hi: np.ndarray
    box_colors: np.ndarray
    wall_colors: np.ndarray

    @property
    def num_faces(self) -> int:
        return 6 * (1 + len(self.box_lo))

    def face_planes(self) -> np.ndarray:
        """(F, 4): face f lies on the plane {x : n·x = c} with row (n_x, n_y, n_z, c)."""
        rows = []
        for lo, hi in [(self.room_lo, self.room_hi)] + list(zip(self.box_lo, self.box_hi)):
            for axis, side in _FACES:
                n = np.zeros(3)
                n[axis] = 1.0
                rows.append([*n, (hi if side else lo)[axis]])
        return np.asarray(rows, dtype=np.float64)

    def cast(self, origin: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Nearest hit along ``origin + t·dirs`` (dirs (3, N), any length): (t (N,), face label (N,)).

        ``origin`` must lie inside the room and outside every box; every ray hits the closed room.
        Works axis by axis on (N,) arrays (slab tests), which keeps numpy fast.
        """
        o = np.asarray(origin, dtype=np.float64)
        d = np.asarray(dirs, dtype=np.float64)
        if d.ndim != 2 or d.shape[0] != 3:
            raise ValueError(f"dirs: expected (3, N) ray directions, got shape {d.shape}")
        n = d.shape[1]
        t_best = np.full(n, np.inf)
        label = np.zeros(n, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv = 1.0 / d
            for a in range(3):  # the room from inside: leave through the face the ray points at
                pos = d[a] > 0
                ta = np.where(pos, (self.room_hi[a] - o[a]) * inv[a], (self.room_lo[a] - o[a]) * inv[a])
                ta = np.where(d[a] == 0, np.inf, ta)
                better = ta < t_best
                t_best = np.where(better, ta, t_best)
                label = np.where(better, 2 * a + pos, label)
            for b in range(len(self.box_lo)):
                near = np.full(n, -np.inf)
                far = np.full(n, np.inf)
                face = np.zeros(n, dtype=np.int64)
                for a in range(3):
                    t1 = (self.box_lo[b, a] - o[a]) * inv[a]
                    t2 = (self.box_hi[b, a] - o[a]) * inv[a]
                    tmin = np.fmin(t1, t2)
                    upd = tmin > near
                    # entering through the low face when moving +, the high face when moving −
                    face = np.where(upd, 2 * a + (d[a] < 0), face)
                    near = np.fmax(near, tmin)
                    far = np.fmin(far, np.fmax(t1, t2))
                hit = (near <= far) & (near > 0) & (near < t_best)
                t_best = np.where(hit, near, t_best)
                label = np.where(hit, 6 + 6 * b + face, label)
        return t_best, label

    def _normals_and_base(self) -> Tuple[np.ndarray, np.ndarray]:
        normals = np.zeros((self.num_faces, 3))
        base = np.zeros((self.num_faces, 3))
        base[:6] = self.wall_colors
        shades = np.array([0.92, 1.0, 0.85, 0.97, 0.8, 1.05])[:, None]
        for f in range(self.num_faces):
            axis, side = _FACES[f % 6]
            if f < 6:  # room faces face inwards, box faces outwards
                normals[f, axis] = -1.0 if side else 1.0
            else:
                normals[f, axis] = 1.0 if side else -1.0
        for b in range(len(self.box_lo)):
            base[6 + 6 * b: 12 + 6 * b] = np.clip(self.box_colors[b][None, :] * shades, 0, 1)
        return normals, base

    def shade(self, points: np.ndarray, label: np.ndarray) -> np.ndarray:
        """(N, 3) uint8 colours of surface ``points`` (3, N) with face ``label`` (N,)."""
        normals, base = self._normals_and_base()
        light = np.array([0.35, 0.55, 1.0])
        light = light / np.linalg.norm(light)
        lam = 0.45 + 0.55 * np.abs(normals @ light)  # per face
        x, y, z = points
        factor = lam[label]
        # floor checkerboard (0.5 m squares), stripes on the walls, rings on the boxes
        check = (np.floor(x / 0.5) + np.floor(y / 0.5)) % 2
        factor = np.where(label == 4, factor * (0.7 + 0.3 * check), factor)
        along = np.where(label < 2, y, x)
        factor = np.where(label < 4, factor * (0.85 + 0.15 * np.sin(along * 6.0 + z * 2.0)), factor)
        factor = np.where(label >= 6, factor * (0.9 + 0.1 * np.cos(z * 25.0)), factor)
        col = base[label] * factor[:, None]
        return np.clip(np.round(col * 255.0), 0, 255).astype(np.uint8)

    def render(self, K: np.ndarray, cam2world: np.ndarray, height: int, width: int):
        """One OpenCV camera: (rgb (H, W, 3) uint8, depth (H, W) float64 metres, label (H, W))."""
        Ki = np.linalg.inv(np.asarray(K, dtype=np.float64))
        u = np.tile(np.arange(width, dtype=np.float64), height)
        v = np.repeat(np.arange(height, dtype=np.float64), width)
        cam = [Ki[r, 0] * u + Ki[r, 1] * v + Ki[r, 2] for r in range(3)]  # camera z = 1: t is the z-depth
        R, t = np.asarray(cam2world, dtype=np.float64)[:3, :3], np.asarray(cam2world, dtype=np.float64)[:3, 3]
        dirs = np.stack([R[a, 0] * cam[0] + R[a, 1] * cam[1] + R[a, 2] * cam[2] for a in range(3)])
        depth, label = self.cast(t, dirs)
        pts = t[:, None] + depth[None, :] * dirs
        rgb = self.shade(pts, label)
        return rgb.reshape(height, width, 3), depth.reshape(height, width), label.reshape(height, width)


def room_geometry(seed: int = 0, n_boxes: int = 4) -> RoomGeometry:
    """The room of :func:`make_room_scene` for ``seed`` and ``n_boxes`` (deterministic)."""
    if isinstance(n_boxes, bool) or not isinstance(n_boxes, int) or not 0 <= n_boxes <= 16:
        raise ValueError(f"n_boxes: expected an int in [0, 16], got {n_boxes!r}")
    rng = np.random.default_rng(seed)
    room_lo = np.array([-3.0, -2.6, 0.0])
    room_hi = np.array([3.0, 2.6, 2.8])
    ang = rng.uniform(0, 2 * np.pi, n_boxes)
    rad = rng.uniform(0.0, 1.0, n_boxes)
    centre = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    half = rng.uniform(0.15, 0.4, (n_boxes, 2))
    h = rng.uniform(0.3, 1.0, n_boxes)
    box_lo = np.concatenate([centre - half, np.zeros((n_boxes, 1))], axis=1)
    box_hi = np.concatenate([centre + half, h[:, None]], axis=1)
    box_colors = rng.uniform(0.15, 0.95, (n_boxes, 3))
    wall_colors = np.array(
        [[0.85, 0.78, 0.70], [0.70, 0.80, 0.88], [0.80, 0.86, 0.72], [0.88, 0.74, 0.80], [0.62, 0.55, 0.48], [0.93, 0.93, 0.90]]
    )
    return RoomGeometry(room_lo, room_hi, box_lo.reshape(-1, 3), box_hi.reshape(-1, 3), box_colors.reshape(-1, 3), wall_colors)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """4×4 OpenCV cam2world of a camera at ``eye`` looking at ``target`` (x right, y down, z forward)."""
    fwd = np.asarray(target, dtype=np.float64) - np.asarray(eye, dtype=np.float64)
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, up)
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = right, down, fwd, eye
    return T


def make_room_scene(
    n_views: int = 12,
    height: int = 288,
    width: int = 384,
    seed: int = 0,
    n_boxes: int = 4,
    hfov_deg: float = 70.0,
    radius: float = 2.0,
    camera_height: float = 1.5,
    frame_step: int = 10,
) -> SceneViews:
    """V views of :func:`room_geometry` from cameras on a circle, looking at (0, 0, 0.5).

    Returns :class:`SceneViews` with rgb (H, W, 3) uint8, exact z-depth (V, H, W) float32 metres,
    K (V, 3, 3) (fx = fy from ``hfov_deg``, centred principal point), OpenCV cam2world, and frame
    ids ``0, frame_step, 2·frame_step, …`` (strings).
    """
    for name, val in (("n_views", n_views), ("height", height), ("width", width)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    if not 10.0 <= float(hfov_deg) <= 150.0:
        raise ValueError(f"hfov_deg: expected a horizontal field of view in [10, 150] degrees, got {hfov_deg!r}")
    if not 1.6 <= float(radius) <= 2.4:
        raise ValueError(f"radius: expected a camera circle radius in [1.6, 2.4] m (inside the room, outside the boxes), got {radius!r}")
    if not 1.05 <= float(camera_height) <= 2.7:
        raise ValueError(f"camera_height: expected metres in [1.05, 2.7] (above the boxes, below the ceiling), got {camera_height!r}")
    room = room_geometry(seed, n_boxes)
    f = (width / 2.0) / np.tan(np.deg2rad(hfov_deg) / 2.0)
    K = np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])
    target = np.array([0.0, 0.0, 0.5])
    rgbs, depths, poses = [], [], []
    for i in range(n_views):
        a = 2.0 * np.pi * i / n_views
        eye = np.array([radius * np.cos(a), radius * np.sin(a), camera_height])
        T = look_at(eye, target)
        rgb, depth, _ = room.render(K, T, height, width)
        rgbs.append(rgb)
        depths.append(depth.astype(np.float32))
        poses.append(T)
    return SceneViews(
        rgb=rgbs,
        depth=torch.from_numpy(np.stack(depths)),
        K=torch.from_numpy(np.stack([K] * n_views)),
        cam2world=torch.from_numpy(np.stack(poses)),
        frame_ids=[str(frame_step * i) for i in range(n_views)],
        scene_id=f"synthetic_room_s{seed}",
    )


def write_scannet_layout(
    scene: SceneViews, root: str, scene_id: str, color_ext: str = "jpg", jpeg_quality: int = 95
) -> str:
    """Write ``scene`` as ``<root>/<scene_id>/{color,depth,pose,intrinsic}`` (ScanNet format).

    Colour as JPEG (``quality``, no chroma subsampling; lossy) or PNG (``color_ext="png"``,
    exact); depth as uint16 millimetres (0 = missing); poses with 17 significant digits;
    ``intrinsic_depth.txt`` (and ``intrinsic_color.txt`` when ``scene.K_color`` is set): one K for
    all views. Returns the scene folder. Read it back with ``shared.datasets.load_scannet_scene``.
    """
    if color_ext not in ("jpg", "png"):
        raise ValueError(f"color_ext: expected 'jpg' or 'png', got {color_ext!r}")
    if not scene_id or "/" in scene_id or "\\" in scene_id:
        raise ValueError(f"scene_id: expected a folder name, got {scene_id!r}")
    if not bool((scene.K == scene.K[:1]).all()):
        raise ValueError("scene: the ScanNet layout stores one depth K per scene; views have different K")
    if scene.K_color is not None and not bool((scene.K_color == scene.K_color[:1]).all()):
        raise ValueError("scene: the ScanNet layout stores one colour K per scene; views have different K_color")
    out = os.path.join(root, scene_id)
    for sub in ("color", "depth", "pose"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for i, fid in enumerate(scene.frame_ids):
        write_rgb(os.path.join(out, "color", f"{fid}.{color_ext}"), scene.rgb[i], quality=jpeg_quality)
        write_depth_png(os.path.join(out, "depth", f"{fid}.png"), scene.depth[i].numpy())
        write_matrix(os.path.join(out, "pose", f"{fid}.txt"), scene.cam2world[i].numpy())
    write_scannet_intrinsics(
        out, scene.K[0].numpy(), None if scene.K_color is None else scene.K_color[0].numpy()
    )
    return out


__all__ = ["RoomGeometry", "look_at", "make_room_scene", "room_geometry", "write_scannet_layout"]
