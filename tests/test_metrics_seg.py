"""gIoU/cIoU as LISA's validate computes them; meter state and merging."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.metrics.segmentation import SegmentationMeter, expression_iou, intersection_union

X = 255  # ignore

PRED_A = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
TGT_A = np.array([[1, 0, 0, 0], [1, 1, X, 0], [0, X, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
# 14 valid pixels; fg: pred 4, target 3, both 3 -> I 3, U 4; bg: pred 10, target 11, both 10 -> I 10, U 11
PRED_B = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
TGT_B = np.array([[X, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
# the ignored pixel is predicted fg and must not count; 15 valid; fg: pred 3, target 2, both 1 -> I 1, U 4;
# bg: pred 12, target 13, both 11 -> I 11, U 14
PRED_C = np.zeros((4, 4), dtype=bool)
TGT_C = np.zeros((4, 4), dtype=np.uint8)
TGT_C[3, 3] = X
# empty target predicted empty: fg I 0, U 0 -> IoU counts 1.0; bg I = U = 15


def test_intersection_union_by_hand():
    i, u = intersection_union(PRED_A, TGT_A)
    assert i.tolist() == [10, 3] and u.tolist() == [11, 4] and i.dtype == np.int64
    i, u = intersection_union(PRED_B, TGT_B)
    assert i.tolist() == [11, 1] and u.tolist() == [14, 4]
    i, u = intersection_union(PRED_C, TGT_C)
    assert i.tolist() == [15, 0] and u.tolist() == [15, 0]
    # torch tensors give the same counts
    i, u = intersection_union(torch.from_numpy(PRED_B), torch.from_numpy(TGT_B).long())
    assert i.tolist() == [11, 1] and u.tolist() == [14, 4]


def _lisa_histc_reference(pred, target):
    """LISA's algorithm written from its description: ignored pixels set to 255 in the prediction,
    intersection = pixels where prediction == target, histograms over bins [0, 1] (255 falls outside)."""
    out = torch.from_numpy(pred.astype(np.int64)).float().view(-1)
    tgt = torch.from_numpy(target.astype(np.int64)).float().view(-1)
    out[tgt == 255] = 255
    inter = out[out == tgt]
    a_i = torch.histc(inter, bins=2, min=0, max=1)
    a_o = torch.histc(out, bins=2, min=0, max=1)
    a_t = torch.histc(tgt, bins=2, min=0, max=1)
    return a_i, a_o + a_t - a_i


def test_matches_histogram_formulation_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = rng.integers(1, 40, size=2)
        pred = rng.random((h, w)) < rng.random()
        target = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        target[rng.random((h, w)) < 0.2] = 255
        i, u = intersection_union(pred, target)
        ri, ru = _lisa_histc_reference(pred, target)
        assert i.tolist() == ri.long().tolist() and u.tolist() == ru.long().tolist()


def test_giou_ciou_over_three_expressions():
    meter = SegmentationMeter()
    ious = [meter.update(p, t) for p, t in ((PRED_A, TGT_A), (PRED_B, TGT_B), (PRED_C, TGT_C))]
    assert ious == [3 / (4 + 1e-5), 1 / (4 + 1e-5), 1.0]
    assert meter.count == 3
    assert meter.giou == pytest.approx((3 / (4 + 1e-5) + 1 / (4 + 1e-5) + 1.0) / 3, rel=1e-15)
    assert meter.ciou == pytest.approx((3 + 1 + 0) / (4 + 4 + 0 + 1e-10), rel=1e-15)
    s = meter.summary()
    assert s["gIoU"] == pytest.approx(100 * meter.giou) and s["cIoU"] == pytest.approx(50.0) and s["n"] == 3
    # an empty target with a false-positive prediction is IoU 0, not 1
    fp = PRED_C.copy()
    fp[0, 0] = True
    assert SegmentationMeter().update(fp, TGT_C) == 0.0
    assert expression_iou([15, 0], [15, 0]).tolist() == [15 / (15 + 1e-5), 1.0]


def _random_pairs(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pred = rng.random((9, 7)) < 0.4
        target = (rng.random((9, 7)) < 0.3).astype(np.uint8)
        target[rng.random((9, 7)) < 0.1] = 255
        if rng.random() < 0.15:
            pred[:] = False
            target[target == 1] = 0
        out.append((pred, target))
    return out


def test_meter_merge_equals_single_meter_and_state_round_trip():
    pairs = _random_pairs(23, seed=1)
    single = SegmentationMeter()
    for p, t in pairs:
        single.update(p, t)
    shards = [SegmentationMeter() for _ in range(3)]
    for k, (p, t) in enumerate(pairs):  # contiguous blocks of 8, 8, 7
        shards[min(k // 8, 2)].update(p, t)
    restored = [SegmentationMeter.from_state(json.loads(json.dumps(m.state_dict()))) for m in shards]
    merged = SegmentationMeter.merge(restored)
    assert merged.state_dict() == single.state_dict()
    assert merged.giou == single.giou and merged.ciou == single.ciou
    # order of shards does not change gIoU (exact summation) or cIoU (integer sums)
    rev = SegmentationMeter.merge(restored[::-1])
    assert rev.giou == single.giou and rev.ciou == single.ciou


def test_resume_from_state_continues_identically():
    pairs = _random_pairs(10, seed=2)
    full = SegmentationMeter()
    for p, t in pairs:
        full.update(p, t)
    first = SegmentationMeter()
    for p, t in pairs[:4]:
        first.update(p, t)
    resumed = SegmentationMeter().load_state_dict(json.loads(json.dumps(first.state_dict())))
    for p, t in pairs[4:]:
        resumed.update(p, t)
    assert resumed.state_dict() == full.state_dict()


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="pred: expected a bool mask"):
        intersection_union(PRED_A.astype(np.float32), TGT_A)
    with pytest.raises(ValueError, match="target: expected shape"):
        intersection_union(PRED_A, TGT_A[:3])
    bad = TGT_A.copy()
    bad[0, 0] = 2
    with pytest.raises(ValueError, match=r"target: expected values 0, 1 or 255, found \[2\]"):
        intersection_union(PRED_A, bad)
    with pytest.raises(TypeError, match="target: expected an integer mask"):
        intersection_union(PRED_A, TGT_A.astype(np.float32))
    with pytest.raises(ValueError, match="giou: no expression"):
        SegmentationMeter().giou
    with pytest.raises(ValueError, match="state: expected a SegmentationMeter state"):
        SegmentationMeter.from_state({"version": 99})
    with pytest.raises(ValueError, match="intersection: expected 0 <= I <= U"):
        SegmentationMeter().add([5, 1], [4, 1])
