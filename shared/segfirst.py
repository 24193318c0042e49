"""Seg-First masks: instance masks on the original image → token sets on the CLIP patch grid.

LVLM_CSP's Seg-First sampler (Eq. 4-5) segments the ORIGINAL image (YOLO11n-seg), maps every
instance mask through the same geometry as LISA's ``CLIPImageProcessor`` (transformers 4.31:
resize the shortest edge to S, long side ``int(S·long/short)``, then centre crop S×S with
top = (H_r − S)//2, left = (W_r − S)//2), and pools the crop over the 14-px patches.

Mask resize rule: centre-aligned nearest neighbour, resized pixel (y, x) takes the original pixel
(⌊(y + ½)·H/H_r⌋, ⌊(x + ½)·W/W_r⌋) (PIL's ``NEAREST``, torch's ``"nearest-exact"``), computed in
exact integer arithmetic and only for the S×S crop. Nearest keeps the masks binary, so the area of
Eq. 4 is a pixel count; a bilinear resize would give fractional areas and a threshold-dependent
boundary, for no gain at patch (14 px) resolution.

The detectors are optional: ``YoloMaskSource`` imports ``ultralytics`` (AGPL-3.0) lazily and never
downloads weights; ``shared.segfirst_sam.SamMaskSource`` does the same with ``segment-anything``
(Apache-2.0), standalone or on a host's own SAM image embeddings; ``mask_source_from_spec`` builds
either from ``yolo:PATH`` / ``sam:PATH`` / ``sam-shared:PATH``. Any callable returning (M, H, W) masks
can be wrapped in ``CallableMaskSource``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Protocol, Union

import numpy as np
import torch
import torch.nn.functional as F

from .methods.lvlm_csp_clustering import SegFirstSelection, seg_first_tokens

ArrayLike = Union[np.ndarray, torch.Tensor]


# ------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class CropGeometry:
    """Where CLIP's S×S input lies on the original image: resized (H_r, W_r), crop offsets top/left."""

    height: int
    width: int
    size: int
    resized_height: int
    resized_width: int
    top: int
    left: int


def _check_pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def clip_crop_geometry(height: int, width: int, size: int = 224) -> CropGeometry:
    """CLIPImageProcessor geometry (transformers 4.31 ``get_resize_output_image_size`` with
    ``default_to_square=False``, then ``center_crop``) for an original ``height`` × ``width`` image."""
    height = _check_pos_int("height", height)
    width = _check_pos_int("width", width)
    size = _check_pos_int("size", size)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # float division then int(), exactly as transformers
    rh, rw = (new_long, size) if width <= height else (size, new_long)
    return CropGeometry(height, width, size, rh, rw, (rh - size) // 2, (rw - size) // 2)


def _nearest_source_index(start: int, count: int, src: int, dst: int) -> torch.Tensor:
    """Original indices ⌊(j + ½)·src/dst⌋ for resized positions j = start … start+count−1."""
    j = torch.arange(start, start + count, dtype=torch.long)
    return ((2 * j + 1) * src // (2 * dst)).clamp(max=src - 1)


# ------------------------------------------------------------------------------------ mask → grid
@dataclass
class GridMasks:
    """Instance masks on the CLIP patch grid.

    token_sets: M LongTensors, T_i = {r·G + c : coverage ≥ threshold} (sorted; the argmax-coverage
    patch if that is empty but the area is > 0; empty when the instance is outside the crop).
    areas: (M,) long, pixels of each mask inside the S×S crop (Eq. 4's area).
    coverage: (M, G, G) float32, fraction of each 14×14 patch the mask covers.
    """

    token_sets: List[torch.Tensor]
    areas: torch.Tensor
    coverage: torch.Tensor
    geometry: CropGeometry

    @property
    def grid(self) -> int:
        return int(self.coverage.shape[-1])

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


def _as_bool_masks(masks: ArrayLike, name: str = "masks") -> torch.Tensor:
    """(M, H, W) bool/integer (nonzero = inside) or 0/1 float masks → CPU bool tensor."""
    if isinstance(masks, np.ndarray):
        if masks.dtype == object:
            raise TypeError(f"{name}: expected a numeric (M, H, W) array, got dtype object")
        t = torch.from_numpy(np.ascontiguousarray(masks))
    elif isinstance(masks, torch.Tensor):
        t = masks.detach().cpu()
    else:
        raise TypeError(f"{name}: expected an (M, H, W) numpy array or torch tensor, got {type(masks).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name}: expected an (M, H, W) stack of instance masks, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"{name}: expected bool, integer or 0/1 float masks, got {t.dtype}")
    if t.is_floating_point():
        if t.numel() and not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name}: float masks must hold only 0 and 1 (threshold soft masks first)")
        return t == 1
    return t != 0


def masks_to_grid(
    masks: ArrayLike, size: int = 224, patch: int = 14, threshold: float = 0.5
) -> GridMasks:
    """Map (M, H, W) instance masks on the original image to the G×G CLIP grid (G = size/patch).

    Steps: centre-aligned nearest resize to (H_r, W_r) (evaluated on the crop only), crop S×S at
    (top, left), area = crop pixel count, coverage = ``avg_pool2d(kernel=patch)``, T_i = coverage ≥
    ``threshold`` (argmax-coverage patch, lowest index on ties, if empty while area > 0).
    size 224 → 16×16 grid, 336 → 24×24.
    """
    size = _check_pos_int("size", size)
    patch = _check_pos_int("patch", patch)
    if size % patch:
        raise ValueError(f"patch: expected a divisor of size={size}, got {patch}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold: expected a coverage fraction in (0, 1], got {threshold!r}")
    m = _as_bool_masks(masks)
    num, h, w = m.shape
    if h < 1 or w < 1:
        raise ValueError(f"masks: expected masks of a non-empty image, got shape {tuple(m.shape)}")
    geo = clip_crop_geometry(h, w, size)
    g = size // patch
    rows = _nearest_source_index(geo.top, size, h, geo.resized_height)
    cols = _nearest_source_index(geo.left, size, w, geo.resized_width)
    crop = m[:, rows][:, :, cols]  # (M, S, S) bool
    areas = crop.reshape(num, size * size).sum(dim=1).to(torch.long)
    if num:
        coverage = F.avg_pool2d(crop[:, None].to(torch.float32), kernel_size=patch, stride=patch)[:, 0]
    else:
        coverage = torch.zeros(0, g, g, dtype=torch.float32)
    flat = coverage.reshape(num, g * g)
    token_sets = []
    for i in range(num):
        t = torch.nonzero(flat[i] >= float(threshold)).reshape(-1)
        if t.numel() == 0 and int(areas[i]) > 0:
            t = torch.argmax(flat[i]).reshape(1)  # first maximum: lowest index on ties
        token_sets.append(t.to(torch.long))
    return GridMasks(token_sets, areas, coverage, geo)


# -------------------------------------------------------------------------------------- sources
class MaskSource(Protocol):
    """Callable(image: (H, W, 3) uint8 RGB ndarray) → (M, H, W) bool ndarray of instance masks."""

    def __call__(self, image: np.ndarray) -> np.ndarray:  # pragma: no cover - protocol
        ...


def check_image(image) -> np.ndarray:
    """Validate an (H, W, 3) uint8 RGB image."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image: expected an (H, W, 3) uint8 RGB numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image: expected an (H, W, 3) uint8 RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image: expected dtype uint8, got {image.dtype}")
    return image


def check_source_output(out, image: np.ndarray) -> np.ndarray:
    """A mask source's output as (M, H, W) bool, checked to be at the size of ``image`` (H, W, 3)."""
    m = _as_bool_masks(out).numpy()
    h, w = image.shape[:2]
    if m.shape[1:] != (h, w):
        raise ValueError(
            f"masks: the mask source returned shape {tuple(m.shape)}, expected (M, {h}, {w}) "
            f"(masks at the original image size)"
        )
    return m


class CallableMaskSource:
    """Wrap any callable image → (M, H, W) masks; its output is checked and returned as bool."""

    def __init__(self, fn: Callable[[np.ndarray], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable image -> (M, H, W) masks, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = check_image(image)
        return check_source_output(self.fn(image), image)


def _import_yolo():
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no hub look-ups, downloads or telemetry
    try:
        import ultralytics
        from ultralytics import YOLO
    except ImportError as e:
        raise ImportError(
            "YoloMaskSource needs the optional package `ultralytics>=8.3` (YOLO11 segmentation) with a "
            "torchvision that matches torch: pip install 'ultralytics>=8.3'. It is AGPL-3.0 licensed, hence "
            f"not a dependency of shared. ({type(e).__name__}: {e})"
        ) from e
    parts = str(getattr(ultralytics, "__version__", "0")).split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        major, minor = 0, 0
    if (major, minor) < (8, 3):
        raise ImportError(
            f"YoloMaskSource needs `ultralytics>=8.3` (YOLO11), found {ultralytics.__version__}: "
            f"pip install -U 'ultralytics>=8.3' (AGPL-3.0)"
        )
    return YOLO


class YoloMaskSource:
    """YOLO11-seg instance masks (ultralytics) at the original image size.

    weights: local path to e.g. ``yolo11n-seg.pt`` (never downloaded: a missing file raises).
    Or ``model=``: an already built ``ultralytics.YOLO`` (or any callable with its predict
    signature). Each call runs ``model(bgr, imgsz, conf, iou, retina_masks=True, verbose=False,
    device)[0]``; the RGB image is flipped to BGR because ultralytics reads numpy arrays as BGR.
    ``retina_masks=True`` returns masks at (H, W) directly. ``last_seconds``: wall time of the last
    model call; ``last_count``: its number of instances.
    """

    def __init__(
        self,
        weights: Optional[str] = None,
        imgsz: int = 640,
        conf: float = 0.25,
        iou: float = 0.7,
        device: str = "cpu",
        model: Any = None,
    ) -> None:
        self.imgsz = _check_pos_int("imgsz", imgsz)
        for name, v in (("conf", conf), ("iou", iou)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name}: expected a float in [0, 1], got {v!r}")
        self.conf, self.iou, self.device = float(conf), float(iou), device
        if (weights is None) == (model is None):
            raise ValueError("weights/model: give exactly one (a local weights path, or a built YOLO model)")
        if model is not None:
            if not callable(model):
                raise TypeError(f"model: expected a callable ultralytics YOLO model, got {type(model).__name__}")
            self.model = model
        else:
            if not isinstance(weights, (str, os.PathLike)):
                raise TypeError(f"weights: expected a path to a local YOLO-seg weights file, got {type(weights).__name__}")
            if not os.path.isfile(weights):
                raise ValueError(
                    f"weights: no file at {os.fspath(weights)!r}; pass the local path of e.g. yolo11n-seg.pt "
                    f"(YoloMaskSource never downloads weights)"
                )
            self.model = _import_yolo()(os.fspath(weights))
        self.last_seconds: Optional[float] = None
        self.last_count: Optional[int] = None

    @classmethod
    def from_yaml(cls, cfg: str = "yolo11n-seg.yaml", **kwargs) -> "YoloMaskSource":
        """An untrained model built from an ultralytics model yaml (bundled ones need no download)."""
        return cls(model=_import_yolo()(cfg), **kwargs)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = check_image(image)
        h, w = image.shape[:2]
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        t0 = time.perf_counter()
        r = self.model(
            bgr, imgsz=self.imgsz, conf=self.conf, iou=self.iou, retina_masks=True, verbose=False, device=self.device
        )[0]
        self.last_seconds = time.perf_counter() - t0
        if r.masks is None:
            self.last_count = 0
            return np.zeros((0, h, w), dtype=bool)
        data = r.masks.data
        if tuple(data.shape[-2:]) != (h, w):
            raise RuntimeError(
                f"YoloMaskSource: masks came back at {tuple(data.shape[-2:])}, expected the original size {(h, w)} "
                f"(retina_masks=True should give original-size masks; check the ultralytics version)"
            )
        data = data.detach().cpu()
        out = (data > 0.5) if data.is_floating_point() else (data != 0)
        self.last_count = int(out.shape[0])
        return out.numpy()


# ------------------------------------------------------------------------------- by name
#: ``KIND:PATH`` forms of ``mask_source_from_spec``: YOLO11-seg weights, a SAM checkpoint run standalone,
#: a SAM checkpoint whose decoder reads the host's own SAM image embeddings (LISA).
MASK_SOURCE_KINDS = ("yolo", "sam", "sam-shared")


def parse_mask_spec(spec: str) -> tuple:
    """``"yolo:PATH"`` / ``"sam:PATH"`` / ``"sam-shared:PATH"`` → (kind, path)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"csp_masks: expected KIND:PATH with KIND one of {', '.join(MASK_SOURCE_KINDS)}, got {spec!r}")
    kind, path = spec.split(":", 1)
    if kind not in MASK_SOURCE_KINDS or not path:
        raise ValueError(f"csp_masks: expected KIND:PATH with KIND one of {', '.join(MASK_SOURCE_KINDS)}, got {spec!r}")
    return kind, path


def mask_source_from_spec(spec: str, device: str = "cpu", **params: Any):
    """The mask source a ``KIND:PATH`` spec names, with its parameters (``YoloMaskSource``: imgsz, conf,
    iou; ``shared.segfirst_sam.SamMaskSource``: points_per_side, points_per_batch, pred_iou_thresh,
    stability_score_thresh, box_nms_thresh, min_mask_region_area, model_type)."""
    import inspect

    kind, path = parse_mask_spec(spec)
    if kind == "yolo":
        cls, fixed = YoloMaskSource, {"weights": path}
    else:
        from .segfirst_sam import SamMaskSource

        cls, fixed = SamMaskSource, {"checkpoint": path, "shared_encoder": kind == "sam-shared"}
    allowed = sorted(n for n, p in inspect.signature(cls).parameters.items()
                     if n not in ("model", "device", "weights", "checkpoint", "shared_encoder")
                     and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    for name in params:
        if name not in allowed:
            raise ValueError(f"mask_args: {name!r} is not a parameter of the {kind} mask source; its parameters: "
                             f"{', '.join(allowed)}")
    return cls(device=device, **fixed, **params)


# ------------------------------------------------------------------------------------- pipeline
def seg_first_select(
    image: np.ndarray,
    source: Callable[[np.ndarray], Any],
    nc: int,
    generator: torch.Generator,
    size: int = 224,
    patch: int = 14,
    threshold: float = 0.5,
    budget: str = "paper",
    fallback: str = "uniform",
    fallback_layout: str = "literal",
) -> SegFirstSelection:
    """Seg-First clustering selection for one RGB image: masks from ``source`` → CLIP grid → Eq. 4-5."""
    image = check_image(image)
    if not callable(source):
        raise TypeError(f"source: expected a mask source callable, got {type(source).__name__}")
    masks = check_source_output(source(image), image)
    grid = masks_to_grid(masks, size=size, patch=patch, threshold=threshold)
    return seg_first_tokens(
        grid.token_sets,
        grid.areas,
        nc,
        generator,
        budget=budget,
        fallback=fallback,
        n=grid.num_tokens,
        fallback_layout=fallback_layout,
    )


__all__ = [
    "CallableMaskSource",
    "CropGeometry",
    "GridMasks",
    "MASK_SOURCE_KINDS",
    "MaskSource",
    "YoloMaskSource",
    "check_image",
    "check_source_output",
    "clip_crop_geometry",
    "mask_source_from_spec",
    "masks_to_grid",
    "parse_mask_spec",
    "seg_first_select",
]
