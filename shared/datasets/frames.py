"""Frame ids: numeric ordering and the fixed per-scene frame sampler.

SeGPruner's ``scripts/image_simpling.py`` keeps k = 12 frames per scene, the same for every
question: ``ids[round(i·(n−1)/k)] for i in range(k)`` over the ids in numeric order. The stride
(n−1)/k includes the first frame and never the last (a linspace would divide by k−1), and
Python's ``round`` rounds halves to even (16.5 → 16, 49.5 → 50). With n ≤ k the script keeps all
frames. Its evaluation then lists the copies with a lexicographic ``sorted(glob)``
("1000.jpg" < "200.jpg"); we always use numeric order.
"""
from __future__ import annotations

from typing import List, Sequence, Union

RULES = ("released", "linspace")
SHORT = ("error", "all")

FrameId = Union[str, int]


def frame_number(frame_id: FrameId) -> int:
    """The integer of a frame id: ``"000120"`` → 120, ``"120"`` → 120, 120 → 120."""
    if isinstance(frame_id, bool):
        raise ValueError(f"frame_ids: expected numeric ids, got {frame_id!r}")
    if isinstance(frame_id, int):
        return frame_id
    s = str(frame_id)
    if not s.isdigit():
        raise ValueError(f"frame_ids: expected numeric ids (file stems such as '120' or '000120'), got {s!r}")
    return int(s)


def sort_frame_ids(frame_ids: Sequence[FrameId]) -> List[str]:
    """Ids as strings in numeric order; duplicate numbers ("7" and "007") are an error."""
    ids = [str(f) for f in frame_ids]
    nums = [frame_number(f) for f in ids]
    if len(set(nums)) != len(nums):
        seen, dup = set(), []
        for f, n in zip(ids, nums):
            if n in seen:
                dup.append(f)
            seen.add(n)
        raise ValueError(f"frame_ids: duplicate frame numbers {dup[:5]}")
    return [f for _, f in sorted(zip(nums, ids))]


def sample_indices(n: int, k: int = 12, rule: str = "released", short: str = "error") -> List[int]:
    """Positions (into the numerically sorted ids) of the k frames to keep.

    ``rule="released"``: ``round(i·(n−1)/k)``, i = 0..k−1 (first frame in, last never; Python's
    half-to-even ``round``, as the script). ``rule="linspace"``: ``round(i·(n−1)/(k−1))`` (first and
    last in; k = 1 keeps the first). n == k keeps all n. n < k: ``short="error"`` raises,
    ``short="all"`` keeps all n (what the released script does).
    """
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if short not in SHORT:
        raise ValueError(f"short: expected one of {SHORT}, got {short!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"frame_ids: expected a non-negative count, got {n!r}")
    if n == 0:
        raise ValueError("frame_ids: no frames to sample from")
    if n < k:
        if short == "error":
            raise ValueError(f"k: asked for {k} frames but the scene has only {n} (pass short='all' to keep them all)")
        return list(range(n))
    if n == k:
        return list(range(n))
    if rule == "released":
        return [round(i * (n - 1) / k) for i in range(k)]
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def sample_frames(
    frame_ids: Sequence[FrameId], k: int = 12, rule: str = "released", short: str = "error"
) -> List[str]:
    """The k frame ids to keep, in numeric order (see :func:`sample_indices` for the rules)."""
    ids = sort_frame_ids(frame_ids)
    return [ids[i] for i in sample_indices(len(ids), k, rule, short)]


__all__ = ["RULES", "SHORT", "frame_number", "sample_frames", "sample_indices", "sort_frame_ids"]
