"""The Fast3D demo (``python -m shared.apps.demo_fast3d``) end to end at small settings: its PNG is a valid
image, the printed k* is SAP's budget on the printed logits (also worked out by hand), the kept objects are
the top-k* of those logits, the visual tokens per layer are the methods' schedules, and the vanilla FLOPs
at Vicuna-7B dims follow the formula from the printed token counts."""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from shared.methods import FastV  # noqa: E402
from shared.methods.fast3d import Fast3D, sap_object_counts  # noqa: E402

SLOTS, LAYERS, K, R = 20, 3, 1, 6
ARGS = ["--slots", str(SLOTS), "--objects", "16", "--layers", str(LAYERS), "--hidden", "64", "--repeats", "1",
        "--max-new-tokens", "3", "--authors-gap", "skip", "--layer", str(K), "--keep", str(R)]


def _blocks(text: str):
    """{run name: its lines} from the ``[name]`` blocks."""
    out = {}
    for m in re.finditer(r"^\[(.+?)\]\n((?:  .*\n)+)", text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def test_demo_fast3d_outputs_agree_with_sap_and_the_schedules(tmp_path, capsys):
    from PIL import Image

    from shared.apps import demo_fast3d

    out = tmp_path / "fast3d_demo"
    assert demo_fast3d.main(["--out", str(out)] + ARGS) == 0
    text = capsys.readouterr().out

    png = out / "kept_objects.png"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (825, 682)  # figsize 7.5 x 6.2 in at 110 dpi

    rows = re.findall(r"^ +\d+: ((?:-?\d+\.\d{4} ?)+)$", text, re.M)
    logits = torch.tensor([float(v) for r in rows for v in r.split()])
    assert logits.shape == (SLOTS,)
    m = re.search(r"^SAP: alpha = ([0-9.]+) \(.*\); k\* = (\d+) objects \(R = (\d+) tokens", text, re.M)
    alpha, k_star, budget = float(m.group(1)), int(m.group(2)), int(m.group(3))
    assert k_star == int(sap_object_counts(logits, alpha))
    # by hand: the fewest objects whose softmax mass reaches alpha; the demo aims at 10% of the slots
    p = sorted(torch.softmax(logits.double(), 0).tolist(), reverse=True)
    assert k_star == next(k for k in range(1, SLOTS + 1) if sum(p[:k]) >= alpha) == 2
    assert budget == 3 * k_star
    kept = [int(v) for v in re.search(r"kept object ids: \[([\d, ]+)\]", text).group(1).split(",")]
    order = torch.argsort(logits, descending=True).tolist()
    if logits[order[k_star - 1]] != logits[order[k_star]]:  # no tie at the cut after rounding to 4 decimals
        assert kept == sorted(order[:k_star])
    ratio = float(re.search(r"per-sample pruning ratio ([0-9.]+)", text).group(1))
    assert ratio == pytest.approx(1 - budget / (3 * SLOTS), abs=1e-4)

    blocks = _blocks(text)
    vis = {name: [int(v) for v in re.search(r"visual tokens per layer: \[([\d, ]+)\]", b).group(1).split(",")]
           for name, b in blocks.items()}
    n = 3 * SLOTS
    sap = f"Fast3D SAP K=0 alpha={m.group(1)}"
    assert vis["vanilla"] == [n] * LAYERS
    assert vis[sap] == Fast3D(layer=0, alpha=alpha).schedule(n, LAYERS, kept=budget) == [budget] * LAYERS
    assert vis[f"FastV K={K} R={R}"] == FastV(layer=K, keep=R).schedule(n, LAYERS) == [n, R, R]
    assert vis[f"Fast3D GAP K={K} R={R}"] == Fast3D(layer=K, keep=R).schedule(n, LAYERS) == [n, R, R]
    # GAP keeps whole object triplets; each run generated the requested 3 tokens at most
    gap_pos = [int(v) for v in re.search(r"kept visual positions: \[([\d, ]+)\]", blocks[f"Fast3D GAP K={K} R={R}"])
               .group(1).split(",")]
    assert len(gap_pos) == R
    for i in range(0, R, 3):  # 45 system tokens, then slot j's triplet at 45 + 3j .. 45 + 3j + 2
        assert (gap_pos[i] - 45) % 3 == 0 and gap_pos[i:i + 3] == [gap_pos[i], gap_pos[i] + 1, gap_pos[i] + 2]
    for b in blocks.values():
        ids = re.search(r"generated ids: \[([\d, ]*)\]", b).group(1)
        assert 1 <= len(ids.split(",")) <= 3

    # vanilla prefill FLOPs at Vicuna-7B dims, from the printed layout: 32 x (4nd² + 2n²d + 2ndm)
    total = int(re.search(r"\] = (\d+) tokens", text).group(1))
    d, mlp = 4096, 11008
    want = 32 * (4 * total * d * d + 2 * total * total * d + 2 * total * d * mlp) / 1e12
    got = float(re.search(r"at Vicuna-7B dims: ([0-9.]+) TFLOPs", blocks["vanilla"]).group(1))
    assert got == pytest.approx(want, abs=5e-4)
