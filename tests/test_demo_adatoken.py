"""The AdaToken-3D demo (``python -m shared.apps.demo_adatoken``) end to end at small settings: the visual tokens
per layer it reads from the session record are the written schedule's budgets, those budgets are ⌊O(i)·N⌋
(running minimum) of the written retention curve, worked out here, the PNG is a valid image of the expected
size, and the output says that the model is tiny and random."""
from __future__ import annotations

import json
import math
import re

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the demo's tiny host is transformers 5.x's native LLaVA", allow_module_level=True)


def test_demo_adatoken(tmp_path, capsys):
    from PIL import Image

    from shared.apps import demo_adatoken

    out = tmp_path / "adatoken_demo"
    assert demo_adatoken.main(["--out", str(out), "--k", "3", "--layers", "6", "--visual-tokens", "16",
                               "--max-new-tokens", "2", "--r", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "TINY RANDOM model" in text and "not LLaVA-3D's information flow" in text

    sched = json.loads((out / "schedule_r0.25.json").read_text())
    o, n = sched["retention"], sched["visual_tokens"]
    assert n == 16 and len(o) == 6 and o[0] == 1.0 and o[-1] == 0.25
    by_hand = []
    for x in o:
        k = max(1, math.floor(x * n))
        by_hand.append(k if not by_hand else min(by_hand[-1], k))
    assert sched["budgets"] == by_hand and by_hand[-1] == 4

    seen = [int(v) for v in re.search(r"visual tokens per layer \(session record\): \[([\d, ]+)\]", text)
            .group(1).split(",")]
    assert seen == sched["budgets"]
    tokens = [int(v) for v in re.search(r"  tokens per layer: \[([\d, ]+)\]", text).group(1).split(",")]
    assert [t - v for t, v in zip(tokens, seen)] == [tokens[0] - 16] * 6  # only visual tokens are dropped
    assert "kept exactly the schedule's budgets" in text

    state = (out / "calibration_state.jsonl").read_text().splitlines()
    assert len(state) == 1 + 3
    png = out / "schedule.png"
    assert png.stat().st_size > 20_000
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1350, 400)  # figsize 13.5 x 4 in at 100 dpi
