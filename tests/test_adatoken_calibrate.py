"""AdaToken-3D calibration through the session and the ``python -m shared.adatoken`` command.

- The session runner (``AdaTokenCalibration``) on a stock LLaMA (engine entry, every transformers pin) and on
  the native transformers 5.x LLaVA host: its per-sample block sums equal ``span_block_sums`` (a separate
  implementation, itself tested against eager attention maps) and an eager ``output_attentions`` reference
  computed here; the outputs inside the session equal the stock model's; bad layouts are refused.
- The command on ``--source tiny`` (5.x): end to end, resume after ``--stop-after`` / a KeyboardInterrupt /
  a torn last line gives the same schedule JSON as an uninterrupted run (up to ``provenance.run``, the
  timestamps and timings), other settings are refused, ``fit`` from the state equals calibrate's own fit
  and a fit by hand from the state's per-prompt rows, and bad flags are named.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
TF5 = int(transformers.__version__.split(".")[0]) >= 5
needs_tf5 = pytest.mark.skipif(not TF5, reason="the native LLaVA host and --source tiny are transformers 5.x")

from shared.engine import pruning  # noqa: E402
from shared.methods.adatoken import fit_schedule, information_flow  # noqa: E402
from shared.methods.adatoken_calibration import (AdaTokenCalibration, span_block_sums,  # noqa: E402
                                                 span_block_sums_per_sample, spans_from_mask)

from .engine import tiny  # noqa: E402


def _arrays(s):
    return np.stack([s.spa_spa, s.prm_spa, s.spa_sys])


def eager_reference(decoder, embeds, mask, sys_, spa, prm):
    """(3, L) [spa_spa, prm_spa, spa_sys] of one sample from the stock eager attention maps (rows = queries)."""
    with torch.no_grad():
        att = decoder(inputs_embeds=embeds, attention_mask=mask, output_attentions=True).attentions
    out = np.zeros((3, len(att)))
    for i, a in enumerate(att):
        m = a[0].double().mean(0)
        out[0, i] = float(torch.tril(m[slice(*spa), slice(*spa)], diagonal=-1).sum())
        out[1, i] = float(m[slice(*prm), slice(*spa)].sum())
        out[2, i] = float(m[slice(*spa), slice(*sys_)].sum())
    return out


# ------------------------------------------------------------------------------------ the runner
def test_engine_entry_equals_span_block_sums_and_stock_outputs():
    """Stock LlamaModel (any pin): a right-padded batch of two prompts, forward and greedy generate."""
    model = tiny.build("llama", "eager", layers=3)
    dec = model.model
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 24, 64, generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 20:] = 0
    spans = [(4, 15), (3, 12)]
    with torch.no_grad():
        ref = dec(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        with pruning(dec, AdaTokenCalibration(chunk=5)) as runner:
            runner.prepare(visual_spans=spans)
            out = dec(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert torch.allclose(out[valid], ref[valid], atol=1e-6, rtol=0)
    want = span_block_sums_per_sample(dec, embeds, torch.tensor([[0, 4], [0, 3]]), torch.tensor(spans),
                                      torch.tensor([[15, 24], [12, 20]]), attention_mask=mask, chunk=64)
    assert len(runner.last) == 2
    for got, w in zip(runner.last, want):
        np.testing.assert_allclose(_arrays(got), _arrays(w), atol=1e-6, rtol=1e-6)
        assert (got.spa_rows, got.prm_rows) == (w.spa_rows, w.prm_rows)
    b0 = eager_reference(dec, embeds[:1], mask[:1], (0, 4), (4, 15), (15, 24))
    np.testing.assert_allclose(_arrays(runner.last[0]), b0, atol=1e-5, rtol=0)
    assert (b0 > 0.05).all()
    assert runner.total.spa_rows == 11 + 9 and runner.total.prm_rows == 9 + 8

    # greedy generate: only the prompt's prefill is measured; tokens equal the stock model's
    ids = torch.randint(3, 100, (1, 20), generator=g)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        stock = model.generate(input_ids=ids, **kw)
        with pruning(dec, AdaTokenCalibration()) as runner:
            with runner.generation():
                runner.prepare(visual_spans=[(5, 12)])
                got = model.generate(input_ids=ids, **kw)
    assert torch.equal(stock, got) and len(runner.history) == 1
    single = span_block_sums(dec, dec.embed_tokens(ids), (0, 5), (5, 12), (12, 20))
    np.testing.assert_allclose(_arrays(runner.total), _arrays(single), atol=1e-6, rtol=1e-6)


def test_layouts_that_are_refused():
    valid = torch.ones(1, 12, dtype=torch.bool)

    def vm(*idx):
        m = torch.zeros(1, 12, dtype=torch.bool)
        m[0, list(idx)] = True
        return m

    sys_, spa, prm = spans_from_mask(vm(3, 4, 5), valid)
    assert (sys_.tolist(), spa.tolist(), prm.tolist()) == ([[0, 3]], [[3, 6]], [[6, 12]])
    left = valid.clone()
    left[0, :2] = False  # left padding: SYS starts at the first token
    assert spans_from_mask(vm(3, 4), left)[0].tolist() == [[2, 3]]
    with pytest.raises(ValueError, match="visual_mask: sample 0: the visual tokens form 2 separate runs"):
        spans_from_mask(vm(3, 4, 7), valid)
    with pytest.raises(ValueError, match="SYS is empty"):
        spans_from_mask(vm(0, 1), valid)
    with pytest.raises(ValueError, match="SYS is empty"):
        spans_from_mask(vm(2, 3), left)
    with pytest.raises(ValueError, match="PRM is empty"):
        spans_from_mask(vm(10, 11), valid)
    with pytest.raises(ValueError, match="sample 0 has no visual tokens"):
        spans_from_mask(vm(), valid)
    with pytest.raises(ValueError, match="chunk"):
        AdaTokenCalibration(chunk=0)
    dec = tiny.build("llama", "eager", layers=1).model
    with pruning(dec, AdaTokenCalibration()) as runner, pytest.raises(ValueError, match="visual_mask: no visual"):
        dec(inputs_embeds=torch.randn(1, 12, 64))
    with pruning(dec, AdaTokenCalibration()) as runner, pytest.raises(ValueError, match="PRM is empty"):
        runner.prepare(visual_spans=[(4, 12)])
        dec(inputs_embeds=torch.randn(1, 12, 64))


def _tiny_llava(layers=3):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=4, projection_dim=32)
    tc = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
                     initializer_range=0.15)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=127, image_seq_length=16)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


@needs_tf5
def test_native_llava_session_equals_span_block_sums_eager_and_stock_logits():
    import shared

    model = _tiny_llava()
    g = torch.Generator().manual_seed(1)
    # two prompts, left padded: [pad pad | SYS 5 | 16 image tokens | PRM 7] and [SYS 7 | image | PRM 7]
    ids = torch.cat([torch.randint(1, 99, (2, 7), generator=g), torch.full((2, 16), 127),
                     torch.randint(1, 99, (2, 7), generator=g)], dim=1)
    ids[0, :2] = 0
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    px = torch.randn(2, 3, 16, 16, generator=g)
    seen = {}

    def grab(_m, _a, kw):
        seen["embeds"] = kw["inputs_embeds"].detach().clone()

    dec = model.model.language_model
    with torch.no_grad():
        h = dec.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            ref = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        finally:
            h.remove()
        with shared.prune(model, AdaTokenCalibration(chunk=3)) as session:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert torch.equal(ref, out)
    assert session.host.name == "hf_llava" and len(session.records) == 1
    runner = session.engine
    assert [s.tolist() for s in runner.last_spans] == [[[2, 7], [0, 7]], [[7, 23], [7, 23]], [[23, 30], [23, 30]]]
    want = span_block_sums_per_sample(dec, seen["embeds"], torch.tensor([[2, 7], [0, 7]]), (7, 23), (23, 30),
                                      attention_mask=mask, chunk=64)
    for got, w in zip(runner.last, want):
        np.testing.assert_allclose(_arrays(got), _arrays(w), atol=1e-6, rtol=1e-6)
    b1 = eager_reference(dec, seen["embeds"][1:], mask[1:], (0, 7), (7, 23), (23, 30))
    np.testing.assert_allclose(_arrays(runner.last[1]), b1, atol=1e-5, rtol=0)
    assert session.last.stats.visual[0].tolist() == [16, 16, 16]  # nothing pruned
    # a second prompt accumulates
    with torch.no_grad(), shared.prune(model, AdaTokenCalibration()) as session:
        model(input_ids=ids[1:], pixel_values=px[1:])
        model(input_ids=ids[1:], pixel_values=px[1:])
    np.testing.assert_allclose(_arrays(session.engine.total), 2 * _arrays(want[1]), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------- the command
TINY = ["--source", "tiny", "--k", "5", "--seed", "3", "--tiny-layers", "6", "--tiny-visual-tokens", "16",
        "--no-progress"]


def _cli(args, capsys):
    from shared.adatoken.__main__ import main

    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _load(path):
    with open(path) as fh:
        return json.load(fh)


def _without_run(d):
    d = json.loads(json.dumps(d))
    d["provenance"].pop("run")
    return d


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted calibrate at r = 0.1 and 0.3."""
    from shared.adatoken.__main__ import main

    out = tmp_path_factory.mktemp("ref")
    assert main(["calibrate", "--out", str(out), "--r", "0.1", "0.3"] + TINY) == 0
    return out


@needs_tf5
def test_cli_end_to_end(reference_run):
    out = reference_run
    d = _load(out / "schedule_r0.1.json")
    assert d["r"] == 0.1 and len(d["retention"]) == 6 and d["retention"][0] == 1.0 and d["retention"][-1] == 0.1
    assert d["visual_tokens"] == 16 and d["budgets"][0] == 16 and d["budgets"][-1] == 1
    prov = d["provenance"]
    cal = prov["calibration"]
    assert cal["source"] == "tiny" and cal["k"] == 5 and cal["seed"] == 3 and cal["prompts_used"] == 5
    assert cal["sys_tokens"] == {"mean": 35.0, "min": 35.0, "max": 35.0}
    assert 32 <= cal["prm_tokens"]["min"] <= cal["prm_tokens"]["max"] <= 40
    assert set(prov) >= {"calibration", "information", "block_sums", "fit", "software", "run"}
    assert prov["information"]["variant"] == "paper" and len(prov["information"]["inf"]) == 6
    assert prov["block_sums"]["spa_rows"] == 5 * 16
    assert "git_commit" in prov["software"] and prov["run"]["seconds_per_prompt"]["mean"] > 0
    assert _load(out / "schedule_r0.3.json")["retention"][-1] == 0.3
    # the state file: a settings line and one line per prompt
    with open(out / "calibration_state.jsonl") as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["settings"]["prompts"] == 5


@needs_tf5
def test_resume_gives_the_same_schedule(reference_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    rc, text, _ = _cli(["calibrate", "--out", str(out), "--stop-after", "2", "--r", "0.1", "0.3"] + TINY, capsys)
    assert rc == 0 and "calibrated 2 of 5 prompts" in text and not (out / "schedule_r0.1.json").exists()
    # an interrupt during the next prompt's forward, then a kill in the middle of writing a line
    from shared.adatoken import run_calibration, tiny_source
    from shared.adatoken.tiny import TinySpec

    src = tiny_source(k=5, seed=3, spec=TinySpec(layers=6, visual_tokens=16))
    inputs, calls = src.inputs, []

    def interrupted(model, rec):
        calls.append(rec["key"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return inputs(model, rec)

    src.inputs = interrupted
    with pytest.raises(KeyboardInterrupt):
        run_calibration(src, str(out / "calibration_state.jsonl"), progress=False)
    state = out / "calibration_state.jsonl"
    with open(state) as fh:
        assert len(fh.read().splitlines()) == 1 + 3
    with open(state, "a") as fh:
        fh.write('{"index": 4, "key": "tiny-3-00')  # torn write
    rc, text, _ = _cli(["calibrate", "--out", str(out), "--r", "0.1", "0.3"] + TINY, capsys)
    assert rc == 0 and "calibrated 5 prompts" in text
    for name in ("schedule_r0.1.json", "schedule_r0.3.json"):
        assert _without_run(_load(out / name)) == _without_run(_load(reference_run / name))
    with open(state) as fh:
        assert len(fh.read().splitlines()) == 6


@needs_tf5
def test_other_settings_are_refused(reference_run, capsys):
    state = str(reference_run / "calibration_state.jsonl")
    args = [a if a != "3" else "4" for a in TINY]  # --seed 4
    rc, _, err = _cli(["calibrate", "--out", str(reference_run), "--state", state] + args, capsys)
    assert rc == 2 and "--state:" in err and "other settings" in err and "seed: 3 in the file, 4 now" in err
    rc, text, _ = _cli(["calibrate", "--out", str(reference_run), "--r", "0.2"] + TINY, capsys)
    assert rc == 0 and "calibrated 5 prompts" in text  # the same settings: nothing left to run, a new fit
    assert _load(reference_run / "schedule_r0.2.json")["retention"][-1] == 0.2
    rc, _, err = _cli(["calibrate", "--out", str(reference_run)] + TINY + ["--tiny-layers", "5"], capsys)
    assert rc == 2 and "--state:" in err and "model:" in err


@needs_tf5
def test_fit_from_state_equals_calibrate_and_a_fit_by_hand(reference_run, tmp_path, capsys):
    state = reference_run / "calibration_state.jsonl"
    rc, _, _ = _cli(["fit", "--state", str(state), "--out", str(tmp_path), "--r", "0.1"], capsys)
    assert rc == 0
    got = _load(tmp_path / "schedule_r0.1.json")
    assert _without_run(got) == _without_run(_load(reference_run / "schedule_r0.1.json"))
    # by hand: add the per-prompt rows, Eq.1-4 with per-row means, fit
    with open(state) as fh:
        rows = [json.loads(x) for x in fh.read().splitlines()[1:]]
    arr = {k: np.sum([r[k] for r in rows], axis=0) for k in ("spa_spa", "prm_spa", "spa_sys", "spa_rows", "prm_rows")}
    assert arr["spa_rows"] == 80
    s_self = arr["spa_spa"] / arr["spa_rows"]
    cross = 0.3 * arr["prm_spa"] / arr["prm_rows"] + 0.7 * arr["spa_sys"] / arr["spa_rows"]
    f, prev = [], 0.0
    for s in s_self:
        prev = 0.73 * s + 0.27 * prev
        f.append(prev)
    inf = np.exp(cross) + 0.3 * np.array(f) + np.log1p(s_self)
    np.testing.assert_allclose(got["provenance"]["information"]["inf"], inf, rtol=1e-12)
    by_hand = fit_schedule(inf, 0.1, 16)
    np.testing.assert_allclose(got["retention"], by_hand.retention, atol=1e-9)
    # the code_linear variant differs and is recorded
    rc, _, _ = _cli(["fit", "--state", str(state), "--out", str(tmp_path / "lin"), "--r", "0.1", "--variant",
                     "code_linear", "--visual-tokens", "1000"], capsys)
    lin = _load(tmp_path / "lin" / "schedule_r0.1.json")
    assert rc == 0 and lin["provenance"]["information"]["variant"] == "code_linear" and lin["visual_tokens"] == 1000
    from shared.methods.adatoken import SpanBlockSums

    terms = information_flow(SpanBlockSums(arr["spa_spa"], arr["prm_spa"], arr["spa_sys"], 80, int(arr["prm_rows"])),
                             variant="code_linear")
    np.testing.assert_allclose(lin["provenance"]["information"]["inf"], terms.inf, rtol=1e-12)


def test_bad_flags_are_named(tmp_path, capsys):
    from shared.adatoken.__main__ import main

    for args, flag in ((["calibrate", "--out", "x", "--r", "1.5"], "--r"),
                       (["calibrate", "--out", "x", "--k", "0"], "--k"),
                       (["calibrate", "--out", "x", "--variant", "linear"], "--variant"),
                       (["fit", "--out", "x"], "--state")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and flag in capsys.readouterr().err
    rc, _, err = _cli(["fit", "--state", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)], capsys)
    assert rc == 2 and "--state: no calibration state file" in err
    if TF5:
        rc, _, err = _cli(["calibrate", "--out", str(tmp_path), "--source", "tiny", "--tiny-visual-tokens", "10"],
                          capsys)
        assert rc == 2 and "--tiny-visual-tokens: the tiny CLIP grid is square" in err
    rc, _, err = _cli(["calibrate", "--out", str(tmp_path), "--source", "llava3d"], capsys)
    assert rc == 2 and ("--model-path" in err or "shared.datasets.llava3d" in err)
