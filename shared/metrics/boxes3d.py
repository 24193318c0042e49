"""Axis-aligned 3D box IoU as ScanRefer-lineage code computes it (Chat-Scene ``utils/box_utils.py``).

A box is ``(cx, cy, cz, sx, sy, sz)``: centre and full size, metres (the ``locs`` rows of Chat-Scene's
``scannet_*_attributes.pt`` files). Its extent on each axis is ``[c - s/2, c + s/2]`` (a negative size
gives the same interval, as upstream's corner min/max does). The IoU is

    inter / (vol_a + vol_b - inter + 1e-8)

with the upstream epsilon kept (``eps``): boxes whose exact IoU is 0.5 score 0.5 - O(1e-9), i.e. *below*
an ``iou >= 0.5`` threshold. Everything is float64; the results are bit-identical to upstream's
``box3d_iou(construct_bbox_corners(...), construct_bbox_corners(...))`` on the same numbers.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

#: Upstream's denominator epsilon (``utils/box_utils.py::box3d_iou``).
IOU_EPS = 1e-8

ArrayLike = Union[np.ndarray, Sequence[float], Sequence[Sequence[float]]]


def as_boxes(boxes: ArrayLike, name: str = "boxes") -> np.ndarray:
    """``boxes`` (a tensor, array or nested sequence, shape (6,) or (n, 6)) as a float64 array (n, 6).
    Raises ``ValueError`` naming ``name`` for any other shape or non-finite values."""
    if hasattr(boxes, "detach"):  # torch.Tensor without importing torch
        boxes = boxes.detach().cpu().double().numpy()
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 6:
        raise ValueError(f"{name}: expected shape (6,) or (n, 6) (cx, cy, cz, sx, sy, sz), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite numbers, got non-finite values")
    return arr


def box_bounds(boxes: ArrayLike) -> np.ndarray:
    """(n, 6) centre/size boxes -> (n, 2, 3) per-axis ``[min, max]`` (float64)."""
    arr = as_boxes(boxes)
    centre, half = arr[:, :3], arr[:, 3:] / 2
    lo, hi = centre - half, centre + half  # exactly upstream's (-s/2 + c) and (s/2 + c)
    return np.stack([np.minimum(lo, hi), np.maximum(lo, hi)], axis=1)


def box_iou_matrix(boxes_a: ArrayLike, boxes_b: ArrayLike, eps: float = IOU_EPS) -> np.ndarray:
    """IoU of every box in ``boxes_a`` (n, 6) with every box in ``boxes_b`` (m, 6) -> (n, m) float64."""
    a = box_bounds(as_boxes(boxes_a, "boxes_a"))[:, None]  # (n, 1, 2, 3)
    b = box_bounds(as_boxes(boxes_b, "boxes_b"))[None]  # (1, m, 2, 3)
    lo = np.maximum(a[..., 0, :], b[..., 0, :])
    hi = np.minimum(a[..., 1, :], b[..., 1, :])
    side = np.maximum(hi - lo, 0.0)
    inter = side[..., 0] * side[..., 1] * side[..., 2]
    size_a, size_b = a[..., 1, :] - a[..., 0, :], b[..., 1, :] - b[..., 0, :]
    vol_a = size_a[..., 0] * size_a[..., 1] * size_a[..., 2]
    vol_b = size_b[..., 0] * size_b[..., 1] * size_b[..., 2]
    return inter / (vol_a + vol_b - inter + eps)


def box_iou(box_a: ArrayLike, box_b: ArrayLike, eps: float = IOU_EPS) -> float:
    """IoU of two centre/size boxes (6,) as a Python float."""
    return float(box_iou_matrix(box_a, box_b, eps)[0, 0])


__all__ = ["IOU_EPS", "as_boxes", "box_bounds", "box_iou", "box_iou_matrix"]
