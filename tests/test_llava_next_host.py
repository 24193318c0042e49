"""LLaVA-NeXT host pieces that need no fork checkout: the patch series' shape and P2's visual mask.
The real patched fork (tiny random weights) runs SeGPruner, FastV and both stacked through P1-P3 in
``tests/hosts/test_llava_next_fork.py`` (transformers 4.40)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from shared.hosts import llava_next

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches" / "LLaVA-NeXT").glob("*.patch"))
PATCHED_FILES = ("llava/model/__init__.py", "llava/model/llava_arch.py", "llava/model/language_model/llava_qwen.py")


# ----------------------------------------------------------------------------------- the series
def test_series_is_thin_and_annotated():
    assert [p.name[:4] for p in PATCHES] == ["0001", "0002", "0003", "0004"]
    touched = set()
    for p in PATCHES:
        text = p.read_text()
        assert re.search(r"^Subject: \[PATCH \d/4\] Pruner P\d:", text, re.M), p.name
        files = re.findall(r"^diff --git a/(\S+) b/", text, re.M)
        touched.update(files)
        body = text.split("\ndiff --git", 1)[1]
        removed = [ln for ln in body.splitlines() if ln.startswith("-") and not ln.startswith("---")]
        assert removed == [], f"{p.name} removes upstream lines: {removed}"
        for hunk in re.split(r"^@@", body, flags=re.M)[1:]:
            assert "[Pruner]" in hunk, f"{p.name}: a hunk without a [Pruner] marker"
    assert touched == set(PATCHED_FILES)
    calls = "".join(p.read_text() for p in PATCHES)
    for fn in ("select_image_tokens", "segment_mask", "publish_visual_mask", "qwen2_forward"):
        assert f"pruner_glue.{fn}(" in calls and hasattr(llava_next, fn)


# ------------------------------------------------------------------------------- P2 mask
def test_segment_mask_alternates_text_and_image():
    segs = [torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(2, 2), torch.zeros(1, 2), torch.zeros(0, 2)]
    assert llava_next.segment_mask(segs).tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 1]
    assert llava_next.segment_mask([torch.zeros(3, 2)]).tolist() == [False] * 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_visual_mask_honours_truncation_and_padding(side):
    # sample 0: text 3, image 4, text 2 = 9 tokens truncated to 7; sample 1: text 2, image 3, text 1 = 6
    m0 = llava_next.segment_mask([torch.zeros(3, 1), torch.zeros(4, 1), torch.zeros(2, 1)])
    m1 = llava_next.segment_mask([torch.zeros(2, 1), torch.zeros(3, 1), torch.zeros(1, 1)])
    am = torch.zeros(2, 7, dtype=torch.bool)
    am[0] = True
    if side == "left":
        am[1, 1:] = True
        expect1 = [0, 0, 0, 1, 1, 1, 0]
    else:
        am[1, :6] = True
        expect1 = [0, 0, 1, 1, 1, 0, 0]
    vm = llava_next.padded_visual_mask([m0, m1], am)
    assert vm[0].tolist() == [False, False, False, True, True, True, True]
    assert vm[1].int().tolist() == expect1
    with pytest.raises(ValueError, match=r"^masks: expected 2 .*modalities"):
        llava_next.padded_visual_mask([m0], am)
