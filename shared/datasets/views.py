"""Multi-view RGB-D scenes and their preparation for the vision tower's square canvas.

:class:`SceneViews` holds V posed RGB-D frames as read from disk (any sizes). :func:`prepare_views`
puts every frame on the size×size canvas the vision tower sees (384×384 for LLaVA-OneVision) and
brings the depth and its intrinsics onto the *same* canvas, so that SigLIP patch (r, c) and the
depth pixels under it describe the same rays.

RGB and depth may have different sizes and intrinsics (ScanNet: colour 1296×968 with
``intrinsic_color``, depth 640×480 with ``intrinsic_depth``). Each image gets its own
:class:`~shared.geometry.SquareTransform`; with ``register="reproject"`` (default) each canvas
pixel's ray (colour canvas intrinsics) is projected into the original depth image and takes the
depth of the nearest pixel there (round half up, as PIL's NEAREST), so the returned depth and K are
those of the colour canvas. This assumes colour and depth share the optical centre and orientation
(as ScanNet's and OpenEQA's exports treat them; the small colour–depth baseline is ignored). When
both images have the same size and intrinsics this equals resizing the depth like the image.
``register="independent"`` resizes the depth on its own (NEAREST) and returns the depth canvas's
K: SeGPruner's released behaviour, where the two canvases only roughly coincide.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..geometry import (
    ORDERS,
    SquareTransform,
    backproject,
    check_poses,
    patch_centroids,
    resize_intrinsics,
    square_transform,
    transform_intrinsics,
)

PADDINGS = ("mean", "black")
RESAMPLES = ("nearest", "bilinear", "bicubic")


def _require_pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("image I/O and resizing need Pillow: pip install pillow") from exc
    return Image


@dataclass
class SceneViews:
    """V posed RGB-D frames of one scene.

    ``rgb``: V arrays (H_c, W_c, 3) uint8. ``depth``: (V, H_d, W_d) float32 metres, z along the
    optical axis; 0, NaN or inf = missing. ``K``: (V, 3, 3) intrinsics of the *depth* image
    (pixel-centre convention, see ``shared.geometry``). ``cam2world``: (V, 4, 4) OpenCV
    camera-to-world. ``frame_ids``: V ids (file stems). ``K_color``: (V, 3, 3) intrinsics of the
    colour image, or None when colour and depth come from the same camera: then the colour K is
    the depth K resized to the colour image's size. ``scene_id``: a label.
    """

    rgb: List[np.ndarray]
    depth: torch.Tensor
    K: torch.Tensor
    cam2world: torch.Tensor
    frame_ids: List[str]
    K_color: Optional[torch.Tensor] = None
    scene_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.depth, torch.Tensor):
            self.depth = torch.as_tensor(np.asarray(self.depth))
        if self.depth.dim() != 3:
            raise ValueError(f"depth: expected (V, H, W) metres, got shape {tuple(self.depth.shape)}")
        if not self.depth.is_floating_point():
            raise TypeError(f"depth: expected a float tensor in metres, got {self.depth.dtype}")
        V = self.depth.shape[0]
        if len(self.rgb) != V:
            raise ValueError(f"rgb: expected {V} images (one per depth map), got {len(self.rgb)}")
        for i, im in enumerate(self.rgb):
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                desc = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
                raise ValueError(f"rgb: image {i}: expected an (H, W, 3) uint8 array, got {desc}")
        self.K = torch.as_tensor(self.K, dtype=torch.float64)
        if self.K.shape != (V, 3, 3):
            raise ValueError(f"K: expected (V, 3, 3) with V={V}, got shape {tuple(self.K.shape)}")
        self.cam2world = torch.as_tensor(self.cam2world, dtype=torch.float64)
        if self.cam2world.shape != (V, 4, 4):
            raise ValueError(f"cam2world: expected (V, 4, 4) with V={V}, got shape {tuple(self.cam2world.shape)}")
        if self.K_color is not None:
            self.K_color = torch.as_tensor(self.K_color, dtype=torch.float64)
            if self.K_color.shape != (V, 3, 3):
                raise ValueError(f"K_color: expected (V, 3, 3) with V={V}, got shape {tuple(self.K_color.shape)}")
        self.frame_ids = [str(f) for f in self.frame_ids]
        if len(self.frame_ids) != V:
            raise ValueError(f"frame_ids: expected {V} ids, got {len(self.frame_ids)}")

    def __len__(self) -> int:
        return self.depth.shape[0]

    def color_intrinsics(self) -> torch.Tensor:
        """(V, 3, 3) intrinsics of the colour images (``K_color``, or K resized to the colour size)."""
        if self.K_color is not None:
            return self.K_color
        hd, wd = self.depth.shape[1:]
        return torch.stack(
            [resize_intrinsics(self.K[i], (hd, wd), im.shape[:2]) for i, im in enumerate(self.rgb)]
        )

    def select(self, index: Sequence[int]) -> "SceneViews":
        """The views at ``index`` (in that order)."""
        idx = [int(i) for i in index]
        return SceneViews(
            rgb=[self.rgb[i] for i in idx],
            depth=self.depth[idx],
            K=self.K[idx],
            cam2world=self.cam2world[idx],
            frame_ids=[self.frame_ids[i] for i in idx],
            K_color=None if self.K_color is None else self.K_color[idx],
            scene_id=self.scene_id,
        )

    def drop_invalid_poses(self) -> Tuple["SceneViews", List[str]]:
        """(views with a valid pose, the frame ids removed); see ``shared.geometry.check_poses``."""
        ok = check_poses(self.cam2world, on_invalid="exclude")
        removed = [f for f, k in zip(self.frame_ids, ok.tolist()) if not k]
        return self.select([i for i, k in enumerate(ok.tolist()) if k]), removed


@dataclass
class PreparedViews:
    """Views on the square canvas.

    ``images``: V arrays (S, S, 3) uint8, ready for the model's image processor (whose pad and
    resize are then no-ops) or for :meth:`pixel_values`. ``depth``: (V, S, S) float32 metres on
    the same canvas, 0 in the padding. ``K``: (V, 3, 3) float64 intrinsics of ``depth``.
    ``cam2world`` (V, 4, 4), ``frame_ids``; ``image_transforms``/``depth_transforms``: the
    per-view :class:`~shared.geometry.SquareTransform` of the colour and depth images.
    """

    images: List[np.ndarray]
    depth: torch.Tensor
    K: torch.Tensor
    cam2world: torch.Tensor
    frame_ids: List[str]
    image_transforms: List[SquareTransform]
    depth_transforms: List[SquareTransform]
    padding: str
    order: str
    register: str
    scene_id: str = ""
    fill: Tuple[int, int, int] = field(default=(0, 0, 0))

    @property
    def size(self) -> int:
        return self.depth.shape[-1]

    def pixel_values(
        self,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> torch.Tensor:
        """(V, 3, S, S) float32: ``(x/255 − mean)/std`` (SigLIP: mean = std = 0.5)."""
        x = torch.from_numpy(np.stack(self.images)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        m = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        return (x - m) / s

    def content_mask(self) -> torch.Tensor:
        """(V, S, S) bool: canvas pixels inside the colour image (not padding)."""
        return torch.stack([t.content_mask() for t in self.image_transforms])

    def backproject(self, on_invalid_pose: str = "raise") -> Tuple[torch.Tensor, torch.Tensor]:
        """World points (V, S, S, 3) and validity (V, S, S) of the canvas depth."""
        return backproject(self.depth, self.K, self.cam2world, on_invalid_pose=on_invalid_pose)

    def patch_centroids(
        self, patch: int = 14, grid: Optional[int] = None, compat_released: bool = False, on_invalid_pose: str = "raise"
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token world centroids (V, grid², 3) and validity (V, grid²); grid = S // patch."""
        pts, valid = self.backproject(on_invalid_pose=on_invalid_pose)
        g = self.size // patch if grid is None else grid
        return patch_centroids(
            pts, valid, patch=patch, grid=g, compat_released=compat_released,
            camera_centers=self.cam2world[:, :3, 3].to(pts.dtype),
        )


def _pil_resample(Image, name: str):
    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[name]


def square_image(image: np.ndarray, tf: SquareTransform, fill, resample: str):
    """Apply ``tf`` to an (H, W, 3) uint8 or (H, W) float32 array with PIL; returns (S, S[, 3])."""
    Image = _require_pil()
    mode_rgb = image.ndim == 3
    pil = Image.fromarray(image if mode_rgb else image.astype(np.float32))
    if not mode_rgb and pil.mode != "F":
        pil = pil.convert("F")
    rs = _pil_resample(Image, resample)
    fill_v = tuple(int(c) for c in fill) if mode_rgb else float(fill)
    if tf.order == "resize_then_pad":
        resized = pil.resize((tf.resized_width, tf.resized_height), resample=rs)
        canvas = Image.new(pil.mode, (tf.size, tf.size), fill_v)
        canvas.paste(resized, (int(tf.pad_x), int(tf.pad_y)))
    else:
        side = max(tf.height, tf.width)
        if side != min(tf.height, tf.width):
            sq = Image.new(pil.mode, (side, side), fill_v)
            sq.paste(pil, (tf.pre_pad_x, tf.pre_pad_y))
        else:
            sq = pil
        canvas = sq.resize((tf.size, tf.size), resample=rs)
    return np.asarray(canvas)


def _reproject_depth(
    depth: torch.Tensor, K_depth: torch.Tensor, K_canvas: torch.Tensor, content: torch.Tensor
) -> torch.Tensor:
    """Depth (H_d, W_d) sampled at the rays of a canvas with intrinsics K_canvas (nearest pixel)."""
    S = content.shape[0]
    Hd, Wd = depth.shape
    M = (K_depth.to(torch.float64) @ torch.linalg.inv(K_canvas.to(torch.float64)))
    c = torch.arange(S, dtype=torch.float64)
    uu, vv = c[None, :].expand(S, S), c[:, None].expand(S, S)
    pd = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1) @ M.T
    ud, vd = pd[..., 0] / pd[..., 2], pd[..., 1] / pd[..., 2]
    iu, iv = torch.floor(ud + 0.5).long(), torch.floor(vd + 0.5).long()
    inside = content & (iu >= 0) & (iu < Wd) & (iv >= 0) & (iv < Hd)
    out = torch.zeros(S, S, dtype=torch.float32)
    out[inside] = depth[iv[inside], iu[inside]].to(torch.float32)
    return out


def prepare_views(
    views: SceneViews,
    size: int = 384,
    padding: str = "mean",
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    order: Optional[str] = None,
    resample: Optional[str] = None,
    register: str = "reproject",
) -> PreparedViews:
    """Put every view on the size×size canvas; depth and K follow the image (see module doc).

    ``padding="mean"``: upstream LLaVA-OneVision (fill ``int(255·mean)`` = 127 for SigLIP; default
    ``order="pad_then_resize"``, ``resample="bicubic"``; the pixels equal LLaVA-NeXT's
    ``expand2square`` + SigLIP resize; HF's ``LlavaOnevisionImageProcessor`` pads the same way and
    resizes with its backend's bicubic kernel: same geometry, pixel values may differ slightly).
    ``padding="black"``: SeGPruner's ``resize_and_pad_image``
    (default ``order="resize_then_pad"``, ``resample="nearest"``). Depth is always resized with
    NEAREST (never interpolated across edges), padding 0. ``register``: "reproject" or
    "independent" (module docstring).
    """
    if not isinstance(views, SceneViews):
        raise TypeError(f"views: expected a SceneViews, got {type(views).__name__}")
    if padding not in PADDINGS:
        raise ValueError(f"padding: expected one of {PADDINGS}, got {padding!r}")
    if order is None:
        order = "pad_then_resize" if padding == "mean" else "resize_then_pad"
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    if resample is None:
        resample = "bicubic" if padding == "mean" else "nearest"
    if resample not in RESAMPLES:
        raise ValueError(f"resample: expected one of {RESAMPLES}, got {resample!r}")
    if register not in ("reproject", "independent"):
        raise ValueError(f"register: expected 'reproject' or 'independent', got {register!r}")
    if len(image_mean) != 3:
        raise ValueError(f"image_mean: expected 3 floats in [0, 1], got {image_mean!r}")
    fill = (0, 0, 0) if padding == "black" else tuple(int(x * 255) for x in image_mean)

    Kc = views.color_intrinsics()
    Hd, Wd = views.depth.shape[1:]
    images, depths, Ks, itfs, dtfs = [], [], [], [], []
    for i, im in enumerate(views.rgb):
        itf = square_transform(im.shape[0], im.shape[1], size, order)
        dtf = square_transform(Hd, Wd, size, order)
        images.append(square_image(im, itf, fill, resample))
        Kc_sq = transform_intrinsics(Kc[i], itf)
        Kd_sq = transform_intrinsics(views.K[i], dtf)
        same = torch.allclose(Kc_sq, Kd_sq, rtol=0, atol=1e-9) and itf.content_box == dtf.content_box
        if register == "independent" or same:
            d = square_image(views.depth[i].to(torch.float32).numpy(), dtf, 0.0, "nearest")
            depths.append(torch.from_numpy(np.array(d, dtype=np.float32)))
            Ks.append(Kd_sq if register == "independent" else Kc_sq)
        else:
            depths.append(_reproject_depth(views.depth[i], views.K[i], Kc_sq, itf.content_mask()))
            Ks.append(Kc_sq)
        itfs.append(itf)
        dtfs.append(dtf)
    return PreparedViews(
        images=images,
        depth=torch.stack(depths),
        K=torch.stack(Ks).to(torch.float64),
        cam2world=views.cam2world.clone(),
        frame_ids=list(views.frame_ids),
        image_transforms=itfs,
        depth_transforms=dtfs,
        padding=padding,
        order=order,
        register=register,
        scene_id=views.scene_id,
        fill=fill,
    )


__all__ = ["PADDINGS", "PreparedViews", "SceneViews", "prepare_views", "square_image"]
