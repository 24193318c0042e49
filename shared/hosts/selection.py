"""Pre-LLM visual-token selection shared by the LLaVA-NeXT fork and the native transformers host.

Two concepts live here:

- **Running a selector on one sample's views** (``run_selector``): the saliency and pre-projector
  features the host captured, and the views' geometry the user passed as the ``views=`` option of
  ``shared.prune`` (``geometry_per_sample``).
- **The token layout of a single-crop view.** LLaVA-OneVision turns one square crop into
  ``grid²`` row-major SigLIP tokens (27² = 729 at 384 px / 14 px) followed by one
  ``image_newline``: 730 tokens. Pruning keeps a subset of the grid, in row-major order, and always
  keeps the newline (T + 1 tokens). Multi-crop (anyres) images and videos have other layouts and
  are refused with ``NotImplementedError``.

Selector protocol (``shared.methods.segpruner.SeGPruner``)::

    keep = pruner.select(saliency, features, centroids, geo_valid)
    # saliency (V, P) float, features (V, P, C) pre-projector, centroids (V, P, 3) or None,
    # geo_valid (V, P) bool or None  ->  keep (V, P) bool
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

#: SigLIP-so400m at 384 px with 14 px patches (LLaVA-OneVision): 27 x 27 tokens per crop.
DEFAULT_GRID = 27
DEFAULT_PATCH = 14


# --------------------------------------------------------------------------------------- layout
def grid_side(num_grid_tokens: int) -> int:
    """Side of a square token grid: 729 -> 27. Raises if ``num_grid_tokens`` is not a square."""
    side = int(round(math.sqrt(num_grid_tokens)))
    if num_grid_tokens <= 0 or side * side != num_grid_tokens:
        raise ValueError(f"num_grid_tokens: expected a square number of grid tokens (e.g. 729 = 27²), got {num_grid_tokens}")
    return side


def check_single_crop(crops_per_image: Sequence[int], video_images: Sequence[int] = ()) -> None:
    """Refuse inputs the single-crop layout does not describe.

    crops_per_image: number of crops each image was split into (1 = one square crop per view).
    video_images: indices of images that are videos.
    """
    if len(video_images) > 0:
        raise NotImplementedError(
            f"images: pre-LLM selection supports single-crop still images only; inputs {list(video_images)} are "
            "videos (pooled frame grids). Pass the frames as separate single-crop images, or run without a pruner."
        )
    multi = [(i, int(n)) for i, n in enumerate(crops_per_image) if int(n) != 1]
    if multi:
        i, n = multi[0]
        raise NotImplementedError(
            f"images: pre-LLM selection supports single-crop images only (one square crop per view: grid² tokens "
            f"+ 1 newline); image {i} has {n} crops (anyres multi-crop). Give each view as one square crop "
            "(LLaVA-NeXT: a list of (3, 384, 384) tensors; transformers: nested image lists [[v1, ..., vV]], "
            "which turns off anyres patching), or run without a pruner."
        )


def check_view_tokens(features: Sequence[torch.Tensor], grid: int, newline: bool) -> None:
    """Check that every view's merged features are (grid² + newline, D)."""
    expected = grid * grid + int(newline)
    for i, f in enumerate(features):
        if f.dim() != 2 or f.shape[0] != expected:
            raise ValueError(
                f"image_features[{i}]: expected ({expected}, D) = {grid}x{grid} grid tokens"
                f"{' + 1 newline' if newline else ''} of a single-crop view, got {tuple(f.shape)}"
            )


def keep_rows(keep: torch.Tensor, newline: bool) -> torch.Tensor:
    """Row mask over a view's merged tokens: the kept grid tokens (P,) plus the newline if present."""
    if not newline:
        return keep
    return torch.cat([keep, keep.new_ones(1)])


def compact_view(feature: torch.Tensor, keep: torch.Tensor, newline: bool = True) -> torch.Tensor:
    """One view's merged tokens (P + newline, D) -> kept grid tokens in row-major order (+ newline).

    keep: (P,) bool over the grid. Returns (keep.sum() + newline, D).
    """
    if keep.dtype != torch.bool or keep.dim() != 1:
        raise ValueError(f"keep: expected a (P,) bool mask, got {keep.dtype} {tuple(keep.shape)}")
    if feature.dim() != 2 or feature.shape[0] != keep.shape[0] + int(newline):
        raise ValueError(
            f"feature: expected ({keep.shape[0] + int(newline)}, D) for {keep.shape[0]} grid tokens"
            f"{' + newline' if newline else ''}, got {tuple(feature.shape)}"
        )
    return feature[keep_rows(keep.to(feature.device), newline)]


# ------------------------------------------------------------------------------------- geometry
@dataclass
class SceneGeometry:
    """Per-token 3D positions of one sample's views.

    centroids: (V, P, 3) float, mean 3D point of each grid token's pixel patch (world frame, metres).
    valid: (V, P) bool or None, tokens whose patch holds enough valid depth (padding, holes and
    non-finite poses excluded).
    """

    centroids: torch.Tensor
    valid: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        c = self.centroids
        if not isinstance(c, torch.Tensor):
            c = torch.as_tensor(c)
        if c.dim() != 3 or c.shape[-1] != 3:
            raise ValueError(f"centroids: expected (V, P, 3), got {tuple(c.shape)}")
        self.centroids = c if c.is_floating_point() else c.float()
        if self.valid is not None:
            v = torch.as_tensor(self.valid)
            if v.dtype != torch.bool or tuple(v.shape) != tuple(c.shape[:2]):
                raise ValueError(f"valid: expected a bool tensor of shape {tuple(c.shape[:2])}, got {v.dtype} {tuple(v.shape)}")
            self.valid = v

    @property
    def num_views(self) -> int:
        return int(self.centroids.shape[0])


def geometry_from_views(
    views: Any,
    grid: int = DEFAULT_GRID,
    patch: int = DEFAULT_PATCH,
    compat_released: bool = False,
    on_invalid_pose: str = "raise",
) -> SceneGeometry:
    """Per-token patch centroids of prepared views (``shared.datasets.PreparedViews``: depth on the
    tower's square canvas, its intrinsics, cam-to-world poses).

    Patches tile the top-left grid·patch square row-major, like the tower's tokens. Default: the
    mean of each patch's valid depth pixels, patches without one invalid. ``compat_released=True``:
    SeGPruner's released patch mean (missing depth counted as the camera centre, divided by patch²)
    and, as released, every token of a view with a usable pose stays a diversifier candidate (padding
    and holes included). ``on_invalid_pose``: "raise" or "exclude" (that view's tokens get no geometry).
    """
    fn = getattr(views, "patch_centroids", None)
    if not callable(fn):
        raise TypeError(f"views: expected a PreparedViews (with patch_centroids), got {type(views).__name__}")
    size = int(views.depth.shape[-1])
    if size < grid * patch:
        raise ValueError(
            f"views: the {size}x{size} canvas is smaller than the token grid ({grid} x {patch} px); prepare the "
            "views at the vision tower's input size"
        )
    centroids, valid = fn(patch=patch, grid=grid, compat_released=compat_released, on_invalid_pose=on_invalid_pose)
    if compat_released:
        from ..geometry import check_poses

        pose_ok = check_poses(views.cam2world, on_invalid="exclude")
        valid = pose_ok[:, None].expand_as(valid).clone()
    return SceneGeometry(centroids=centroids, valid=valid)


def _as_geometry(views: Any, grid: int, patch: int, **options: Any) -> Optional[SceneGeometry]:
    if views is None or isinstance(views, SceneGeometry):
        return views
    return geometry_from_views(views, grid=grid, patch=patch, **options)


# ------------------------------------------------------------------------------------ selection
def geometry_per_sample(views: Any, samples: int, grid: int, patch: int = DEFAULT_PATCH,
                        **options: Any) -> List[Optional[SceneGeometry]]:
    """The ``views=`` host option as one ``SceneGeometry`` (or None) per sample: a list with an entry per
    sample (``PreparedViews``, ``SceneGeometry`` or None), or a single entry for a batch of one."""
    if isinstance(views, (list, tuple)):
        entries = list(views)
    else:
        entries = [] if views is None else [views]
    if entries and len(entries) != samples:
        raise ValueError(
            f"views: geometry was given for {len(entries)} sample(s), but the batch has {samples}; pass one "
            f"views entry per sample"
        )
    if not entries:
        return [None] * samples
    return [_as_geometry(v, grid, patch, **options) for v in entries]


def run_selector(selector: Any, saliency: torch.Tensor, features: torch.Tensor,
                 geometry: Optional[SceneGeometry], grid: Optional[int] = None) -> torch.Tensor:
    """Run a pre-LLM selector (``SeGPruner.select``) on one sample's views.

    saliency: (V, P) float; features: (V, P, C) pre-projector; geometry: the sample's views (or None
    for selectors that do not read it). Returns keep (V, P) bool on ``features.device``.
    """
    if saliency.dim() != 2 or features.dim() != 3 or tuple(saliency.shape) != tuple(features.shape[:2]):
        raise ValueError(
            f"saliency/features: expected (V, P) and (V, P, C), got {tuple(saliency.shape)} and {tuple(features.shape)}"
        )
    v, p = saliency.shape
    if grid is not None and p != grid * grid:
        raise ValueError(f"features: expected {grid}x{grid} = {grid ** 2} tokens per view, got {p}")
    if geometry is not None:
        if geometry.num_views != v:
            raise ValueError(f"views: the sample has {v} images in the prompt but its geometry has {geometry.num_views} views")
        if geometry.centroids.shape[1] != p:
            raise ValueError(
                f"views: geometry has {geometry.centroids.shape[1]} patch centroids per view, the vision tower {p} "
                "tokens; prepare the views with the tower's grid and patch size"
            )
        centroids = geometry.centroids.to(features.device)
        valid = geometry.valid.to(features.device) if geometry.valid is not None else None
    else:
        if getattr(selector, "diverse_count", 0) > 0:
            raise ValueError(
                f"views: {type(selector).__name__} picks {selector.diverse_count} tokens by 3D distance and needs "
                "each view's geometry; pass views= (PreparedViews or SceneGeometry per sample)"
            )
        # saliency-only setting (important_ratio = 1): geometry is never read
        centroids = torch.zeros(v, p, 3, dtype=torch.float32, device=features.device)
        valid = torch.zeros(v, p, dtype=torch.bool, device=features.device)
    keep = torch.as_tensor(selector.select(saliency, features, centroids, valid))
    if keep.dtype != torch.bool or tuple(keep.shape) != (v, p):
        raise ValueError(f"pruner: select() must return a ({v}, {p}) bool mask, got {keep.dtype} {tuple(keep.shape)}")
    return keep.to(features.device)


def selection_record(keep: torch.Tensor, saliency: torch.Tensor, newline: bool = True) -> Dict[str, Any]:
    """What a session records per sample for a view selection: keep (V, P), saliency (V, P), counts."""
    keep = keep.detach().cpu()
    return {
        "keep": keep, "saliency": saliency.detach().float().cpu(), "per_view": [int(k) for k in keep.sum(1)],
        "tokens": int(keep.sum()) + int(newline) * int(keep.shape[0]), "newline": newline,
    }


__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_PATCH",
    "SceneGeometry",
    "check_single_crop",
    "check_view_tokens",
    "compact_view",
    "geometry_from_views",
    "geometry_per_sample",
    "grid_side",
    "keep_rows",
    "run_selector",
    "selection_record",
]
