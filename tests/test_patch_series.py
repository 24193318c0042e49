"""Every host's patch series stays thin: only annotated calls into shared (each hunk carries a
[Pruner] marker) and at most 30 added lines per host."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOSTS = sorted(p.name for p in (ROOT / "patches").iterdir() if p.is_dir() and any(p.glob("*.patch")))


def test_the_series_that_exist():
    assert HOSTS == ["Chat-Scene", "LISA", "LLaVA-3D", "LLaVA-NeXT"]


@pytest.mark.parametrize("host", HOSTS)
def test_series_is_thin_and_annotated(host):
    added = 0
    for p in sorted((ROOT / "patches" / host).glob("*.patch")):
        text = p.read_text()
        body = text.split("\ndiff --git", 1)[1]
        for hunk in re.split(r"^@@", body, flags=re.M)[1:]:
            assert "[Pruner]" in hunk, f"{p.name}: a hunk without a [Pruner] marker"
        lines = [ln for ln in body.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        added += sum(1 for ln in lines if ln[1:].strip())
        assert re.search(r"^From: Pruner <pruner@localhost>$", text, re.M), p.name
    assert added <= 30, f"{host}: {added} added lines"
