"""``shared.metrics.llava3d`` against LLaVA-3D's own evaluators, on fixtures in LLaVA-3D's file formats.

Reference: a transcription (below, ``_ref_*``) of ZCMax/LLaVA-3D @ 91d979d ``llava/eval/scanqa_evaluator.py``
(``clean_answer``, ``answer_match``, ``calc_scanqa_score``) and ``sqa3d_evaluator.py`` (``calc_sqa3d_score``).
The real modules cannot run here: they read hard-coded prediction/answer paths and run the scoring at import
time, and import mmengine (only for ``load``) and pycocoevalcap's SPICE. The transcription keeps their code
line for line (minus prints and tqdm); SPICE is left out of the scorer list. Besides, hand-checked values for
the normalisation cases that matter (digits -> words, typos, articles, refined containment, upstream's empty
prediction quirk) and for the fixtures' EM figures.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared.metrics import llava3d as m
from shared.metrics.qa import java_available

FIX = Path(__file__).parent / "fixtures" / "llava_3d"


# ------------------------------------------------------------------ transcription of upstream (reference)
def _ref_clean_answer(data):
    data = data.lower()
    data = re.sub('[ ]+$', '', data)
    data = re.sub('^[ ]+', '', data)
    data = re.sub(' {2,}', ' ', data)
    data = re.sub(r'\.[ ]{2,}', '. ', data)
    data = re.sub(r'[^a-zA-Z0-9,\'\s\-:]+', '', data)
    data = re.sub('ç', 'c', data)
    data = re.sub('’', '\'', data)
    data = re.sub(r'\bletf\b', 'left', data)
    data = re.sub(r'\blet\b', 'left', data)
    data = re.sub(r'\btehre\b', 'there', data)
    data = re.sub(r'\brigth\b', 'right', data)
    data = re.sub(r'\brght\b', 'right', data)
    data = re.sub(r'\bbehine\b', 'behind', data)
    data = re.sub(r'\btv\b', 'TV', data)
    data = re.sub(r'\bchai\b', 'chair', data)
    data = re.sub(r'\bwasing\b', 'washing', data)
    data = re.sub(r'\bwaslked\b', 'walked', data)
    data = re.sub(r'\boclock\b', 'o\'clock', data)
    data = re.sub(r'\bo\'[ ]+clock\b', 'o\'clock', data)
    data = re.sub(r'\b0\b', 'zero', data)
    data = re.sub(r'\bnone\b', 'zero', data)
    data = re.sub(r'\b1\b', 'one', data)
    data = re.sub(r'\b2\b', 'two', data)
    data = re.sub(r'\b3\b', 'three', data)
    data = re.sub(r'\b4\b', 'four', data)
    data = re.sub(r'\b5\b', 'five', data)
    data = re.sub(r'\b6\b', 'six', data)
    data = re.sub(r'\b7\b', 'seven', data)
    data = re.sub(r'\b8\b', 'eight', data)
    data = re.sub(r'\b9\b', 'nine', data)
    data = re.sub(r'\b10\b', 'ten', data)
    data = re.sub(r'\b11\b', 'eleven', data)
    data = re.sub(r'\b12\b', 'twelve', data)
    data = re.sub(r'\b13\b', 'thirteen', data)
    data = re.sub(r'\b14\b', 'fourteen', data)
    data = re.sub(r'\b15\b', 'fifteen', data)
    data = re.sub(r'\b16\b', 'sixteen', data)
    data = re.sub(r'\b17\b', 'seventeen', data)
    data = re.sub(r'\b18\b', 'eighteen', data)
    data = re.sub(r'\b19\b', 'nineteen', data)
    data = re.sub(r'\b20\b', 'twenty', data)
    data = re.sub(r'\b23\b', 'twenty-three', data)
    data = re.sub(r'\b([a-zA-Z]+)([0-9])\b', r'\g<1>', data)
    data = re.sub(r'\ba\b ([a-zA-Z]+)', r'\g<1>', data)
    data = re.sub(r'\ban\b ([a-zA-Z]+)', r'\g<1>', data)
    data = re.sub(r'\bthe\b ([a-zA-Z]+)', r'\g<1>', data)
    data = re.sub(r'\bbackwards\b', 'backward', data)
    return data


def _ref_answer_match(pred, gts):
    if pred in gts:
        return 1, 1
    for gt in gts:
        if ''.join(pred.split()) in ''.join(gt.split()) or ''.join(gt.split()) in ''.join(pred.split()):
            return 0, 1
    return 0, 0


def _ref_calc_scanqa_score(preds, gts, tokenizer, scorers):
    val_scores = {}
    tmp_preds = {}
    tmp_targets = {}
    acc, refined_acc = 0, 0
    assert len(preds) == len(gts)
    for item_id, (pred, gt) in enumerate(zip(preds, gts)):
        assert pred['question_id'] == gt['question_id']
        pred_answer = _ref_clean_answer(pred['text'])
        ref_captions = [_ref_clean_answer(gt_answer) for gt_answer in gt['text']]
        tmp_acc, tmp_refined_acc = _ref_answer_match(pred_answer, ref_captions)
        acc += tmp_acc
        refined_acc += tmp_refined_acc
        tmp_preds[item_id] = [{'caption': pred_answer}]
        ref_captions = [p.replace("\n", " ").strip() for p in ref_captions]
        tmp_targets[item_id] = [{'caption': caption} for caption in ref_captions]
    tmp_preds = tokenizer.tokenize(tmp_preds)
    tmp_targets = tokenizer.tokenize(tmp_targets)
    val_scores["[scanqa] EM1"] = acc / len(preds)
    val_scores["[scanqa] EM1_refined"] = refined_acc / len(preds)
    for scorer, method in scorers:
        score, scores = scorer.compute_score(tmp_targets, tmp_preds)
        if type(method) == list:
            for sc, scs, mm in zip(score, scores, method):
                val_scores[f"[scanqa] {mm}"] = sc
        else:
            val_scores[f"[scanqa] {method}"] = score
    return val_scores


def _ref_calc_sqa3d_score(preds, gts):
    val_scores = {}
    metrics = {f'type{t}_count': 1e-10 for t in range(6)}
    em_overall = 0
    em_refined_overall = 0
    em_type = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0}
    em_refined_type = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0}
    assert len(preds) == len(gts)
    for pred, gt in zip(preds, gts):
        assert pred['question_id'] == gt['question_id']
        pred_answer = _ref_clean_answer(pred['text'])
        gt_answers = [_ref_clean_answer(gt['text'])]
        em_flag, em_refined_flag = _ref_answer_match(pred_answer, gt_answers)
        em_overall += em_flag
        em_refined_overall += em_refined_flag
        sqa_type = int(gt['type'])
        em_type[sqa_type] += em_flag
        em_refined_type[sqa_type] += em_refined_flag
        metrics[f'type{sqa_type}_count'] += 1
    val_scores["[sqa3d] EM1"] = em_overall / len(preds)
    val_scores["[sqa3d] EM1_refined"] = em_refined_overall / len(preds)
    for key in em_type.keys():
        val_scores[f'[sqa3d] EM_type{key}'] = em_type[key] / metrics[f'type{key}_count']
        val_scores[f'[sqa3d] EM_refined_type{key}'] = em_refined_type[key] / metrics[f'type{key}_count']
    return val_scores


def _load(name):
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in open(FIX / name, encoding="utf-8")]
    return json.loads((FIX / name).read_text(encoding="utf-8"))


# ------------------------------------------------------------------ normalisation, by hand
@pytest.mark.parametrize("raw, cleaned", [
    ("The 2 chairs.", "two chairs"),          # punctuation, digit -> word, article before a word
    ("Letf of the tv", "left of TV"),          # typo, tv -> TV (after lower-casing), article
    ("behine the rigth chai", "behind right chair"),
    ("none", "zero"),
    ("23", "twenty-three"),
    ("21", "21"),                              # only 0-20 and 23 are spelled
    ("mat2", "mat"),                           # digit glued to a word
    ("walking backwards", "walking backward"),
    ("  an   apple ", "apple"),
    ("5 o' clock", "five o'clock"),
    ("it's a TV-stand!", "it's TV-stand"),
])
def test_clean_answer_by_hand_and_as_upstream(raw, cleaned):
    assert m.clean_answer(raw) == cleaned
    assert _ref_clean_answer(raw) == cleaned


@pytest.mark.parametrize("pred, gts, expected", [
    ("chair", ["brown chair", "chair"], (1, 1)),   # exact match anywhere first (LEO's loop would give (0, 1))
    ("brown", ["dark brown"], (0, 1)),             # prediction inside a reference
    ("brown chair", ["chair"], (0, 1)),            # reference inside the prediction
    ("leftofTV", ["on left of TV"], (0, 1)),       # whitespace removed before containment
    ("red", ["blue"], (0, 0)),
    ("", ["blue"], (0, 1)),                        # upstream quirk: "" is inside every reference
])
def test_answer_match_by_hand_and_as_upstream(pred, gts, expected):
    assert m.answer_match(pred, gts) == expected
    assert _ref_answer_match(pred, gts) == expected


def test_answer_match_rejects_bad_input():
    with pytest.raises(TypeError, match="pred"):
        m.answer_match(None, ["a"])
    with pytest.raises(TypeError, match="gts"):
        m.answer_match("a", "a")


# ------------------------------------------------------------------ file formats, EM, hand-checked
def test_scanqa_em_on_the_fixture_files():
    preds = m.read_predictions(FIX / "scanqa_pred.jsonl")
    gts = m.read_answers(FIX / "llava3d_scanqa_val_answer.json")
    out = m.scanqa_score(preds, gts, caption_metrics=False)
    # chair: (1,1); "two" vs "2"->"two": (1,1); "left of TV" inside "on left of TV": (0,1); black/white: (0,0)
    assert out == {"[scanqa] EM1": 0.5, "[scanqa] EM1_refined": 0.75}


def test_sqa3d_on_the_fixture_files_by_hand_and_as_upstream():
    preds, gts = _load("sqa3d_pred.jsonl"), _load("llava3d_sqa3d_test_answer.json")
    out = m.sqa3d_score(preds, gts)
    assert out == _ref_calc_sqa3d_score(preds, gts)
    assert out["[sqa3d] EM1"] == 0.6 and out["[sqa3d] EM1_refined"] == 0.8
    by_hand = {0: (1, 1), 1: (0.5, 0.5), 2: (0, 1), 3: (0, 0), 4: (0, 0), 5: (1, 1)}
    for t, (em, refined) in by_hand.items():
        assert out[f"[sqa3d] EM_type{t}"] == pytest.approx(em, abs=1e-9)
        assert out[f"[sqa3d] EM_refined_type{t}"] == pytest.approx(refined, abs=1e-9)


def test_predictions_are_matched_by_id_not_order():
    preds, gts = _load("sqa3d_pred.jsonl"), _load("llava3d_sqa3d_test_answer.json")
    assert m.sqa3d_score(preds[::-1], gts) == m.sqa3d_score(preds, gts)
    with pytest.raises(ValueError, match="no prediction for question_id '220602000005'"):
        m.sqa3d_score(preds[:-1], gts)
    with pytest.raises(ValueError, match="have no answer"):
        m.sqa3d_score(preds + [{"question_id": "x", "text": "y"}], gts)
    with pytest.raises(ValueError, match="'type' in 0..5"):
        m.sqa3d_score(preds, [dict(g, type=9) for g in gts])


# ------------------------------------------------------------------ caption metrics (Java)
needs_java = pytest.mark.skipif(not java_available(), reason="pycocoevalcap's PTBTokenizer and METEOR need java")


@pytest.fixture(scope="module")
def scorers():
    """One METEOR JVM for the module (its start-up dominates these tests)."""
    pytest.importorskip("pycocoevalcap")
    from shared.metrics.chat_scene import CaptionScorers

    with CaptionScorers() as sc:
        yield sc


@needs_java
def test_scanqa_equals_upstream_calc_scanqa_score(scorers):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds, gts = _load("scanqa_pred.jsonl"), _load("llava3d_scanqa_val_answer.json")
    upstream_scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (scorers.meteor, "METEOR"),
                        (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]  # pycocoevalcap's Meteor (one JVM)
    ref = _ref_calc_scanqa_score(preds, gts, PTBTokenizer(), upstream_scorers)
    out = m.scanqa_score(preds, gts, scorers=scorers)
    assert set(out) == set(ref)
    for k in ref:
        assert out[k] == pytest.approx(float(ref[k]), rel=1e-12, abs=1e-12), k


@needs_java
def test_scan2cap_against_pycocoevalcap_on_hand_grouped_references(scorers):
    """Each prediction against every caption of its object (samples 0 and 1 share box_a)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    samples, preds = _load("llava-3d-scan2cap_val.json"), _load("scan2cap_pred.jsonl")
    chair = [samples[0]["conversations"][1]["value"], samples[1]["conversations"][1]["value"]]
    lamp = [samples[2]["conversations"][1]["value"]]
    tok = PTBTokenizer()
    gts = tok.tokenize({0: [{"caption": c} for c in chair], 1: [{"caption": c} for c in chair],
                        2: [{"caption": c} for c in lamp]})
    res = tok.tokenize({i: [{"caption": p["text"]}] for i, p in enumerate(preds)})
    out = m.scan2cap_score(preds, samples, scorers=scorers)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        assert out[f"[scan2cap] Bleu_{k + 1}"] == pytest.approx(bleu[k], rel=1e-12)
    assert out["[scan2cap] ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert out["[scan2cap] CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    assert out["[scan2cap] METEOR"] == pytest.approx(scorers.meteor.compute_score(gts, res)[0], rel=1e-12)
    assert out["[scan2cap] objects"] == 2.0
