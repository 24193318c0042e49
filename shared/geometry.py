"""Camera geometry for 3D-aware token pruning: square canvases, intrinsics, back-projection, patches.

Conventions (used everywhere in ``shared``):

- **Camera**: OpenCV pinhole, x right, y down, z forward. ``cam2world`` (4×4) maps camera
  coordinates to world coordinates; depth is the z coordinate in the camera frame, in metres.
- **Pixels**: integer pixel indices are pixel *centres*: pixel (u, v) (column u, row v) covers
  [u−½, u+½] × [v−½, v+½]. Intrinsics K use the same convention, so the centre of a W×H image is
  ((W−1)/2, (H−1)/2) (ScanNet's default depth K has cx = 319.5 for 640 px). A resize by s maps a
  centre u to s·(u+½)−½; a pad by p adds p.
- **Batching**: tensors carry a leading view axis V. Results are float64 when any input is
  float64, float32 otherwise.

The square canvas of the vision tower (384×384 for LLaVA-OneVision's SigLIP) comes from one of two
pipelines, both modelled exactly by :class:`SquareTransform`:

- ``"pad_then_resize"`` — upstream LLaVA-OneVision multi-image: pad the image to a square of side
  L = max(H, W) (LLaVA-NeXT ``expand2square`` / HF ``pad_to_square``: offset ``(L−W)//2``,
  ``(L−H)//2``, mean-colour fill), then resize L×L → size×size (bicubic for RGB). Scale size/L on
  both axes; the pad offset in output pixels is ``s·((L−W)//2)`` (fractional in general).
- ``"resize_then_pad"`` — SeGPruner's ``resize_and_pad_image``: with s_w = size/W, s_h = size/H,
  the longer side becomes ``size`` and the other ``min(ceil(side·s), size)`` (float arithmetic as
  in the script), resized with NEAREST, pasted at ``((size−w')//2, (size−h')//2)`` on black. The
  per-axis scales are w'/W and h'/H (they differ slightly when ceil rounds: 968 px → 287).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

ORDERS = ("resize_then_pad", "pad_then_resize")

TensorLike = Union[torch.Tensor, np.ndarray, Sequence]


@dataclass(frozen=True)
class SquareTransform:
    """Map from an H×W image onto a size×size square canvas (see the module docstring).

    Pixel-centre coordinates map as ``u' = scale_x·(u+½) − ½ + pad_x`` (same for v with the y
    fields). ``pad_x``/``pad_y`` are the canvas coordinates (edge convention) of the image's
    top-left corner; ``resized_width``/``resized_height`` the size the image is resized to (for
    ``pad_then_resize`` the padded square's output size, i.e. ``size``); ``pre_pad_x``/
    ``pre_pad_y`` the integer pad added before resizing (``pad_then_resize`` only, else 0).
    """

    height: int
    width: int
    size: int
    order: str
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    resized_width: int
    resized_height: int
    pre_pad_x: int = 0
    pre_pad_y: int = 0

    @property
    def scale(self) -> float:
        """Nominal scale size / max(H, W) (the exact per-axis scales are scale_x, scale_y)."""
        return self.size / max(self.height, self.width)

    @property
    def content_box(self) -> Tuple[float, float, float, float]:
        """(x0, y0, x1, y1): the image's extent on the canvas, edge coordinates."""
        return (
            self.pad_x,
            self.pad_y,
            self.pad_x + self.scale_x * self.width,
            self.pad_y + self.scale_y * self.height,
        )

    def to_canvas(self, u: TensorLike, v: TensorLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image pixel-centre coordinates (u, v) → canvas pixel-centre coordinates."""
        u = torch.as_tensor(u, dtype=torch.float64)
        v = torch.as_tensor(v, dtype=torch.float64)
        return (self.scale_x * (u + 0.5) - 0.5 + self.pad_x, self.scale_y * (v + 0.5) - 0.5 + self.pad_y)

    def from_canvas(self, u: TensorLike, v: TensorLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Canvas pixel-centre coordinates → image pixel-centre coordinates (inverse of to_canvas)."""
        u = torch.as_tensor(u, dtype=torch.float64)
        v = torch.as_tensor(v, dtype=torch.float64)
        return ((u + 0.5 - self.pad_x) / self.scale_x - 0.5, (v + 0.5 - self.pad_y) / self.scale_y - 0.5)

    def content_mask(self) -> torch.Tensor:
        """(size, size) bool: canvas pixels whose centre lies inside the image (not padding)."""
        x0, y0, x1, y1 = self.content_box
        c = torch.arange(self.size, dtype=torch.float64) + 0.5
        inx = (c >= x0) & (c < x1)
        iny = (c >= y0) & (c < y1)
        return iny[:, None] & inx[None, :]


def square_transform(height: int, width: int, size: int = 384, order: str = "pad_then_resize") -> SquareTransform:
    """The exact :class:`SquareTransform` of an H×W image for ``order`` (see the module docstring)."""
    for name, val in (("height", height), ("width", width), ("size", size)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    height, width, size = int(height), int(width), int(size)
    if order == "resize_then_pad":
        scale_w = size / width
        scale_h = size / height
        if scale_w < scale_h:
            new_w, new_h = size, min(math.ceil(height * scale_w), size)
        else:
            new_h, new_w = size, min(math.ceil(width * scale_h), size)
        return SquareTransform(
            height=height, width=width, size=size, order=order,
            scale_x=new_w / width, scale_y=new_h / height,
            pad_x=float((size - new_w) // 2), pad_y=float((size - new_h) // 2),
            resized_width=new_w, resized_height=new_h,
        )
    if order == "pad_then_resize":
        side = max(height, width)
        px, py = (side - width) // 2, (side - height) // 2
        s = size / side
        return SquareTransform(
            height=height, width=width, size=size, order=order,
            scale_x=s, scale_y=s, pad_x=px * s, pad_y=py * s,
            resized_width=size, resized_height=size, pre_pad_x=px, pre_pad_y=py,
        )
    raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _as_tensor(name: str, x, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: expected a tensor or array, got {type(x).__name__}") from exc
    if not (t.is_floating_point() or t.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)):
        raise TypeError(f"{name}: expected a real-valued tensor, got dtype {t.dtype}")
    if dtype is not None:
        t = t.to(dtype)
    return t


def _check_K(K: torch.Tensor, views: Optional[int], name: str = "K") -> None:
    ok = K.shape[-2:] == (3, 3) and (K.dim() == 2 or (K.dim() == 3 and (views is None or K.shape[0] == views)))
    if not ok:
        want = "(3, 3)" if views is None else f"(3, 3) or (V, 3, 3) with V={views}"
        raise ValueError(f"{name}: expected {want}, got shape {tuple(K.shape)}")
    Kd = K.to(torch.float64)
    last = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    if not bool(torch.isfinite(Kd).all()) or not bool((Kd[..., 2, :] == last).all()):
        raise ValueError(f"{name}: expected finite pinhole intrinsics with last row [0, 0, 1]")
    if not bool((Kd[..., 0, 0] > 0).all() and (Kd[..., 1, 1] > 0).all()):
        raise ValueError(f"{name}: expected positive focal lengths fx = K[0, 0] and fy = K[1, 1]")


def resize_intrinsics(K: TensorLike, in_size: Tuple[int, int], out_size: Tuple[int, int]) -> torch.Tensor:
    """K of an image resized from ``in_size`` = (H, W) to ``out_size`` = (H', W') (no padding).

    ``K``: (..., 3, 3). Pixel-centre convention: ``K' = A·K`` with
    ``A = [[s_x, 0, s_x/2 − ½], [0, s_y, s_y/2 − ½], [0, 0, 1]]``, s = out/in per axis.
    """
    K = _as_tensor("K", K)
    if K.dim() < 2 or K.shape[-2:] != (3, 3):
        raise ValueError(f"K: expected (..., 3, 3), got shape {tuple(K.shape)}")
    (h, w), (h2, w2) = in_size, out_size
    if min(h, w, h2, w2) < 1:
        raise ValueError(f"in_size/out_size: expected positive (H, W), got {in_size} and {out_size}")
    return _apply_affine(K, w2 / w, h2 / h, 0.0, 0.0)


def _apply_affine(K: torch.Tensor, sx: float, sy: float, px: float, py: float) -> torch.Tensor:
    dt = torch.float64 if K.dtype == torch.float64 else torch.float32
    A = torch.tensor(
        [[sx, 0.0, 0.5 * sx - 0.5 + px], [0.0, sy, 0.5 * sy - 0.5 + py], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    return (A @ K.to(torch.float64)).to(dt)


def transform_intrinsics(
    K: TensorLike, tf: Union[SquareTransform, Sequence[SquareTransform]]
) -> torch.Tensor:
    """Intrinsics of the square canvas: fx, fy (and skew) scaled, cx, cy scaled and shifted.

    ``K``: (3, 3) or (V, 3, 3) for the *original* image; ``tf``: one transform, or V of them.
    ``K' = A·K`` with ``A = [[s_x, 0, s_x/2 − ½ + pad_x], [0, s_y, s_y/2 − ½ + pad_y], [0, 0, 1]]``
    (pixel-centre convention; see the module docstring). Returns K' in K's float dtype.
    """
    K = _as_tensor("K", K)
    if not K.is_floating_point():
        K = K.to(torch.float64)
    if isinstance(tf, SquareTransform):
        _check_K(K, None if K.dim() == 2 else K.shape[0])
        return _apply_affine(K, tf.scale_x, tf.scale_y, tf.pad_x, tf.pad_y)
    tfs = list(tf)
    if not tfs or not all(isinstance(t, SquareTransform) for t in tfs):
        raise TypeError("tf: expected a SquareTransform or a non-empty sequence of them")
    _check_K(K, len(tfs))
    Ks = K if K.dim() == 3 else K.expand(len(tfs), 3, 3)
    return torch.stack([_apply_affine(Ks[i], t.scale_x, t.scale_y, t.pad_x, t.pad_y) for i, t in enumerate(tfs)])


def check_poses(cam2world: TensorLike, on_invalid: str = "raise", atol: float = 1e-3) -> torch.Tensor:
    """(V,) bool: which poses are usable rigid camera-to-world transforms.

    A pose is invalid when an entry is non-finite (ScanNet marks failed tracking with ``-inf``),
    its last row is not [0, 0, 0, 1], or its rotation is not orthonormal with det +1 (within
    ``atol``). ``on_invalid="raise"`` raises ValueError naming the first bad view;
    ``"exclude"`` returns False for it instead.
    """
    if on_invalid not in ("raise", "exclude"):
        raise ValueError(f"on_invalid: expected 'raise' or 'exclude', got {on_invalid!r}")
    T = _as_tensor("cam2world", cam2world)
    if T.dim() != 3 or T.shape[-2:] != (4, 4):
        raise ValueError(f"cam2world: expected (V, 4, 4), got shape {tuple(T.shape)}")
    T = T.to(torch.float64)
    finite = torch.isfinite(T).flatten(1).all(dim=1)
    Tf = torch.where(finite[:, None, None], T, torch.eye(4, dtype=torch.float64).expand_as(T))
    bottom = (Tf[:, 3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)).abs().amax(dim=1) <= atol
    R = Tf[:, :3, :3]
    ortho = (R.transpose(1, 2) @ R - torch.eye(3, dtype=torch.float64)).abs().flatten(1).amax(dim=1) <= atol
    proper = (torch.linalg.det(R) - 1.0).abs() <= atol
    ok = finite & bottom & ortho & proper
    if on_invalid == "raise" and not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        if not bool(finite[i]):
            why = "has non-finite entries (ScanNet marks failed tracking with -inf)"
        elif not bool(bottom[i]):
            why = f"has last row {T[i, 3].tolist()}, expected [0, 0, 0, 1]"
        else:
            why = "is not a rigid transform (rotation not orthonormal with det +1)"
        raise ValueError(
            f"cam2world: view {i} {why}; pass on_invalid='exclude' to drop such views "
            f"({int((~ok).sum())} of {T.shape[0]} invalid)"
        )
    return ok


def opengl_to_opencv(cam2world: TensorLike) -> torch.Tensor:
    """Convert cam2world from an OpenGL camera (x right, y up, −z forward: Habitat/HM3D) to OpenCV.

    Flips the camera's y and z axes: ``T_cv = T_gl · diag(1, −1, −1, 1)`` (its own inverse).
    ``cam2world``: (..., 4, 4); returns the same shape and float dtype.
    """
    T = _as_tensor("cam2world", cam2world)
    if T.dim() < 2 or T.shape[-2:] != (4, 4):
        raise ValueError(f"cam2world: expected (..., 4, 4), got shape {tuple(T.shape)}")
    if not T.is_floating_point():
        T = T.to(torch.float64)
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=T.dtype)
    return T * flip  # scales the columns: the camera axes


def backproject(
    depth: TensorLike,
    K: TensorLike,
    cam2world: Optional[TensorLike] = None,
    on_invalid_pose: str = "raise",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Back-project depth maps to 3D points.

    ``depth``: (V, H, W) metres (z along the optical axis); ``K``: (3, 3) or (V, 3, 3) for this
    depth image (pixel-centre convention); ``cam2world``: (V, 4, 4) OpenCV camera-to-world, or
    None for camera coordinates. Returns ``points`` (V, H, W, 3) and ``valid`` (V, H, W) bool:
    valid = finite and > 0 depth (and a valid pose). Invalid pixels hold exactly 0 (never NaN).
    ``on_invalid_pose``: "raise" (default) or "exclude" (the view's pixels are all invalid); see
    :func:`check_poses`.
    """
    D = _as_tensor("depth", depth)
    if D.dim() != 3:
        raise ValueError(f"depth: expected (V, H, W) metres, got shape {tuple(D.shape)}")
    V, H, W = D.shape
    Kt = _as_tensor("K", K)
    _check_K(Kt, V)
    tensors = [D, Kt]
    T = None
    if cam2world is not None:
        T = _as_tensor("cam2world", cam2world)
        if T.shape != (V, 4, 4):
            raise ValueError(f"cam2world: expected (V, 4, 4) with V={V} (depth's views), got shape {tuple(T.shape)}")
        tensors.append(T)
    dt = _float_dtype(*[t for t in tensors if t.is_floating_point()])
    D = D.to(dt)
    valid = torch.isfinite(D) & (D > 0)
    if T is not None:
        pose_ok = check_poses(T, on_invalid=on_invalid_pose)
        valid &= pose_ok[:, None, None]
    z = torch.where(valid, D, torch.zeros((), dtype=dt))
    Kinv = torch.linalg.inv(Kt.to(torch.float64)).to(dt)
    if Kinv.dim() == 2:
        Kinv = Kinv.expand(V, 3, 3)
    u = torch.arange(W, dtype=dt).view(1, 1, W)
    v = torch.arange(H, dtype=dt).view(1, H, 1)
    k = Kinv.reshape(V, 3, 3, 1, 1)
    # camera point = z · K⁻¹ [u, v, 1]ᵀ (its z component is z since K's last row is [0, 0, 1])
    cam = [(k[:, r, 0] * u + k[:, r, 1] * v + k[:, r, 2]) * z for r in range(3)]
    if T is not None:
        Tf = torch.where(pose_ok[:, None, None], T.to(dt), torch.eye(4, dtype=dt).expand(V, 4, 4)).view(V, 4, 4, 1, 1)
        cam = [Tf[:, a, 0] * cam[0] + Tf[:, a, 1] * cam[1] + Tf[:, a, 2] * cam[2] + Tf[:, a, 3] for a in range(3)]
    pts = torch.stack(cam, dim=-1)
    pts = torch.where(valid[..., None], pts, torch.zeros((), dtype=dt))
    return pts, valid


def _patch_view(x: torch.Tensor, patch: int, grid: int) -> torch.Tensor:
    """(V, H, W, ...) → (V, grid, patch, grid, patch, ...) over the top-left grid·patch square."""
    V = x.shape[0]
    side = grid * patch
    x = x[:, :side, :side]
    return x.reshape(V, grid, patch, grid, patch, *x.shape[3:])


def _check_patch_args(name_shape: Tuple[int, int], patch: int, grid: int) -> None:
    for name, val in (("patch", patch), ("grid", grid)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    H, W = name_shape
    if H < grid * patch or W < grid * patch:
        raise ValueError(
            f"grid: {grid}×{grid} patches of {patch} px need a {grid * patch}×{grid * patch} image, got {H}×{W}"
        )


def patch_centroids(
    points: torch.Tensor,
    valid: torch.Tensor,
    patch: int = 14,
    grid: int = 27,
    compat_released: bool = False,
    camera_centers: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean 3D point of each patch of the vision tower's stride-``patch`` grid.

    ``points`` (V, H, W, 3), ``valid`` (V, H, W) from :func:`backproject`. Patches tile the
    top-left ``grid·patch`` square (pixels 0..377 for SigLIP's 27×27 grid of 14 px on 384 px),
    row-major like SigLIP's tokens (token = row·grid + col). Returns ``centroids`` (V, grid², 3)
    and ``patch_valid`` (V, grid²) bool.

    Default: the mean over the patch's *valid* pixels; a patch without one is invalid (centroid 0).
    ``compat_released=True`` reproduces SeGPruner's released ``patch_word``: every invalid pixel
    counts as a zero-depth point, i.e. the camera centre (``camera_centers`` (V, 3); default 0,
    right for camera-frame points; pass ``cam2world[:, :3, 3]`` for world points), and the sum is
    divided by patch² (196). (The released code would propagate NaN/inf depth; ScanNet's uint16
    depth has none.) ``patch_valid`` is the same in both modes.
    """
    if points.dim() != 4 or points.shape[-1] != 3:
        raise ValueError(f"points: expected (V, H, W, 3), got shape {tuple(points.shape)}")
    if valid.shape != points.shape[:3] or valid.dtype != torch.bool:
        raise ValueError(f"valid: expected a bool tensor of shape {tuple(points.shape[:3])}, got {valid.dtype} {tuple(valid.shape)}")
    V = points.shape[0]
    _check_patch_args(points.shape[1:3], patch, grid)
    m = _patch_view(valid, patch, grid)
    p = _patch_view(torch.where(valid[..., None], points, torch.zeros((), dtype=points.dtype)), patch, grid)
    sums = p.sum(dim=(2, 4)).reshape(V, grid * grid, 3)
    counts = m.sum(dim=(2, 4)).reshape(V, grid * grid)
    patch_valid = counts > 0
    if compat_released:
        if camera_centers is None:
            centres = torch.zeros(V, 3, dtype=points.dtype)
        else:
            centres = torch.as_tensor(camera_centers).to(points.dtype)
            if centres.shape != (V, 3):
                raise ValueError(f"camera_centers: expected (V, 3) with V={V}, got shape {tuple(centres.shape)}")
        missing = (patch * patch - counts).to(points.dtype)
        return (sums + missing[..., None] * centres[:, None, :]) / float(patch * patch), patch_valid
    cent = sums / counts.clamp(min=1)[..., None].to(points.dtype)
    return cent, patch_valid


def patch_valid_fraction(valid: torch.Tensor, patch: int = 14, grid: int = 27) -> torch.Tensor:
    """(V, grid²) float: the share of valid pixels in each patch (0 = padding/holes only)."""
    if valid.dim() != 3 or valid.dtype != torch.bool:
        raise ValueError(f"valid: expected a (V, H, W) bool tensor, got {valid.dtype} {tuple(valid.shape)}")
    _check_patch_args(valid.shape[1:3], patch, grid)
    m = _patch_view(valid, patch, grid)
    return m.sum(dim=(2, 4)).reshape(valid.shape[0], grid * grid).to(torch.float32) / float(patch * patch)


__all__ = [
    "ORDERS",
    "SquareTransform",
    "backproject",
    "check_poses",
    "opengl_to_opencv",
    "patch_centroids",
    "patch_valid_fraction",
    "resize_intrinsics",
    "square_transform",
    "transform_intrinsics",
]
