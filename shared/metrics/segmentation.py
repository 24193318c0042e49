"""Referring/reasoning segmentation metrics as LISA's ``validate`` computes them: gIoU and cIoU.

dvlab-research/LISA @ 3cb2d43, ``utils/utils.py::intersectionAndUnionGPU(output, target, K=2,
ignore_index=255)`` and ``train_ds.py::validate``:

- per expression, the prediction is ``pred_logits > 0`` at the original resolution; pixels whose target
  is 255 are excluded from both classes; I and U are per-class vectors [background, foreground];
- ``IoU_i = I_i / (U_i + 1e-5)`` per class, and a class with an empty union counts 1.0 (an empty
  target predicted empty);
- **gIoU** = mean over expressions of the foreground IoU (LISA's ``acc_iou_meter.avg[1]``; LISA's
  ``all_reduce`` divides the sum by ``count + 1e-5``, a relative difference of 1e-5/N not kept here);
- **cIoU** = Σ_i I_i[fg] / (Σ_i U_i[fg] + 1e-10) over the split.

``SegmentationMeter`` accumulates both, saves/restores its state as a JSON-able dict (resumable runs)
and merges meters of several shards into exactly the meter of one unsharded run.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

_STATE_VERSION = 1


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name}: expected a numpy array or torch tensor of shape (H, W), got {type(x).__name__}")


def intersection_union(pred: ArrayLike, target: ArrayLike, ignore_index: int = 255) -> Tuple[np.ndarray, np.ndarray]:
    """Per-class pixel intersection and union of one binary mask, as LISA's ``intersectionAndUnionGPU``.

    pred: (H, W) bool, the predicted foreground (threshold logits with ``> 0`` as LISA does).
    target: (H, W) integer mask, 0 = background, 1 = foreground, ``ignore_index`` = not evaluated.
    Returns ``(I, U)``, each an int64 array (2,) = [background, foreground] pixel counts over the
    non-ignored pixels. Runs on the inputs' device when they are tensors.
    """
    p = _as_tensor(pred, "pred")
    t = _as_tensor(target, "target")
    if p.dim() != 2:
        raise ValueError(f"pred: expected a 2-D (H, W) mask, got shape {tuple(p.shape)}")
    if p.dtype != torch.bool:
        raise TypeError(f"pred: expected a bool mask (e.g. logits > 0), got dtype {p.dtype}")
    if t.shape != p.shape:
        raise ValueError(f"target: expected shape {tuple(p.shape)} like pred, got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"target: expected an integer mask with values 0, 1, {ignore_index}, got dtype {t.dtype}")
    t = t.to(p.device)
    valid = t != ignore_index
    bad = valid & (t != 0) & (t != 1)
    if bool(bad.any()):
        values = torch.unique(t[bad])[:5].tolist()
        raise ValueError(f"target: expected values 0, 1 or {ignore_index}, found {values}")
    fg_t = (t == 1) & valid
    fg_p = p & valid
    bg_t = (t == 0) & valid
    bg_p = ~p & valid
    inter = torch.stack([(bg_p & bg_t).sum(), (fg_p & fg_t).sum()])
    union = torch.stack([(bg_p | bg_t).sum(), (fg_p | fg_t).sum()])
    return inter.cpu().numpy().astype(np.int64), union.cpu().numpy().astype(np.int64)


def expression_iou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """LISA's per-expression IoU (2,): ``I / (U + 1e-5)``, plus 1.0 where ``U == 0``."""
    i = np.asarray(intersection, dtype=np.float64)
    u = np.asarray(union, dtype=np.float64)
    iou = i / (u + 1e-5)
    iou[u == 0] += 1.0
    return iou


class SegmentationMeter:
    """Accumulates gIoU/cIoU over expressions; state is exact and mergeable.

    Keeps the foreground IoU of every expression (for an order-independent gIoU) and the integer
    sums of the per-class intersections and unions (for cIoU).
    """

    def __init__(self) -> None:
        self.intersection = np.zeros(2, dtype=np.int64)
        self.union = np.zeros(2, dtype=np.int64)
        self.ious: List[float] = []

    @property
    def count(self) -> int:
        """Expressions seen."""
        return len(self.ious)

    def update(self, pred: ArrayLike, target: ArrayLike, ignore_index: int = 255) -> float:
        """Add one expression's mask pair (see ``intersection_union``); returns its foreground IoU."""
        inter, union = intersection_union(pred, target, ignore_index)
        return self.add(inter, union)

    def add(self, intersection: Iterable[int], union: Iterable[int]) -> float:
        """Add one expression from its (2,) intersection and union counts; returns its foreground IoU."""
        i = np.asarray(list(intersection), dtype=np.int64)
        u = np.asarray(list(union), dtype=np.int64)
        if i.shape != (2,) or u.shape != (2,):
            raise ValueError(f"intersection: expected two (2,) count vectors, got shapes {i.shape} and {u.shape}")
        if (i < 0).any() or (i > u).any():
            raise ValueError(f"intersection: expected 0 <= I <= U per class, got I={i.tolist()} U={u.tolist()}")
        fg = float(expression_iou(i, u)[1])
        self.intersection += i
        self.union += u
        self.ious.append(fg)
        return fg

    @property
    def giou(self) -> float:
        """Mean foreground IoU over expressions (in [0, 1])."""
        if not self.ious:
            raise ValueError("giou: no expression has been added")
        return math.fsum(self.ious) / len(self.ious)

    @property
    def ciou(self) -> float:
        """Cumulative foreground intersection over cumulative foreground union (in [0, 1])."""
        if not self.ious:
            raise ValueError("ciou: no expression has been added")
        return float(self.intersection[1]) / (float(self.union[1]) + 1e-10)

    def summary(self) -> Dict[str, float]:
        """``{"gIoU", "cIoU"}`` in percent and ``n`` expressions."""
        return {"gIoU": 100.0 * self.giou, "cIoU": 100.0 * self.ciou, "n": self.count}

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state (ints and floats only)."""
        return {
            "version": _STATE_VERSION,
            "intersection": [int(v) for v in self.intersection],
            "union": [int(v) for v in self.union],
            "ious": [float(v) for v in self.ious],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> "SegmentationMeter":
        """Replace this meter's state by ``state`` (from ``state_dict``); returns self."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"state: expected a SegmentationMeter state of version {_STATE_VERSION}, got {state!r:.200}")
        inter = np.asarray(state["intersection"], dtype=np.int64)
        union = np.asarray(state["union"], dtype=np.int64)
        ious = [float(v) for v in state["ious"]]
        if inter.shape != (2,) or union.shape != (2,) or (inter > union).any() or (inter < 0).any():
            raise ValueError(f"state: inconsistent intersection/union {state['intersection']}/{state['union']}")
        if any(not 0.0 <= v <= 1.0 + 1e-9 for v in ious):
            raise ValueError("state: IoU values outside [0, 1]")
        self.intersection, self.union, self.ious = inter, union, ious
        return self

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "SegmentationMeter":
        return cls().load_state_dict(state)

    @classmethod
    def merge(cls, meters: Iterable["SegmentationMeter"]) -> "SegmentationMeter":
        """One meter holding the expressions of all ``meters`` (e.g. one per shard), in order."""
        out = cls()
        for m in meters:
            if not isinstance(m, SegmentationMeter):
                raise TypeError(f"meters: expected SegmentationMeter items, got {type(m).__name__}")
            out.intersection = out.intersection + m.intersection
            out.union = out.union + m.union
            out.ious.extend(m.ious)
        return out


__all__ = ["SegmentationMeter", "expression_iou", "intersection_union"]
