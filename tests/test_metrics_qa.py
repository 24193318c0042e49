"""ScanQA scorer, LEO's cleaned/refined EM, SQuAD EM/F1, the PTB-like fallback tokenizer."""
from __future__ import annotations

import json
import math
import pathlib
from collections import Counter

import pytest

from shared.metrics.qa import (
    NON_OFFICIAL,
    clean_answer,
    exact_match,
    java_available,
    leo_answer_match,
    normalize_answer,
    ptb_like_tokenize,
    scanqa_scores,
    token_f1,
)

FIX = pathlib.Path(__file__).resolve().parent / "fixtures" / "metrics"
DATA = json.loads((FIX / "scanqa_3q.json").read_text())
PREDS, REFS = DATA["predictions"], DATA["references"]

# The fixture after PTBTokenizer -lowerCase and punctuation removal, written out by hand.
TOK_RES = {"q1": ["chair"], "q2": ["two"], "q3": ["the table 's left side"]}
TOK_GTS = {"q1": ["chair", "brown chair"], "q2": ["2", "two chairs"], "q3": ["on the left side of the table", "left"]}

needs_pycoco = pytest.mark.skipif(
    __import__("importlib").util.find_spec("pycocoevalcap") is None,
    reason="pycocoevalcap not installed (pip install pycocoevalcap)",
)
needs_java = pytest.mark.skipif(
    not java_available(), reason="no `java` on PATH: the official PTBTokenizer/METEOR path needs a JRE"
)

# Hand computation of the captioning metrics on the tokenised fixture:
#  BLEU: test lengths 1 + 1 + 5 = 7; closest reference lengths 1 + 1 + 7 = 9; BP = exp(1 - 9/7).
#  clipped n-gram matches / candidates: 1-grams (1 + 1 + 4)/7, 2-grams (0 + 0 + 2)/(0 + 0 + 4),
#  3-grams 0/3, 4-grams 0/2 ("the table" and "left side" are the only shared bigrams of q3).
BP = math.exp(1 - 9 / 7)
BLEU1 = 100 * 6 / 7 * BP
BLEU2 = 100 * math.sqrt(6 / 7 * 2 / 4) * BP
#  ROUGE-L (beta = 1.2), max precision and max recall over references taken separately:
#  q1 P = R = 1 -> 1; q2 "two" vs "two chairs": P = 1, R = 1/2; q3 LCS with ref 1 = 3 ("the left side"):
#  P = 3/5, R = 3/7; with "left": P = 1/5, R = 1 -> P = 3/5, R = 1.
B2 = 1.2 ** 2


def _rouge(p, r):
    return (1 + B2) * p * r / (r + B2 * p)


ROUGE_L = 100 * (1.0 + _rouge(1, 0.5) + _rouge(0.6, 1.0)) / 3

#  CIDEr-D (pycocoevalcap's Cider: n = 1..4, per n the cosine of tf-idf vectors with the candidate's
#  weights clipped at the reference's, Σ min(c, r)·r / (|c||r|), times exp(-δ²/(2σ²)), σ = 6, δ the
#  length difference; mean over n, mean over references, ×10; idf = log N − log max(1, df)).
#  Here N = 3 and every n-gram of the references occurs in one question only (df = 1), while the
#  candidates' other n-grams have df = 0 → max(1, 0) = 1: every weight is log 3, so the cosines are
#  those of plain n-gram counts. g = exp(-1/72) is the penalty for |δ| = 1.
#  q1 "chair": vs "chair" 1-gram cos 1, δ 0; vs "brown chair" cos 1/√2, δ -1 (n = 2..4: empty, 0).
#  q2 "two": vs "2" 0; vs "two chairs" cos 1/√2, δ -1.
#  q3 "the table 's left side": vs "on the left side of the table" (the ×2): 1-grams clipped dot
#  min(1,2)·2 + 1 + 1 + 1 = 5, norms √5 and 3 → √5/3; bigrams "the table", "left side" shared of
#  4 and 6 → 2/(2√6); no shared 3-/4-gram; δ = 5 - 7 = -2. vs "left": 1/√5, δ = 4.
_G = math.exp(-1 / 72)
_CIDER_Q = (
    10 / 4 * (1 + _G / math.sqrt(2)) / 2,
    10 / 4 * (_G / math.sqrt(2)) / 2,
    10 / 4 * (math.exp(-4 / 72) * (math.sqrt(5) / 3 + 1 / math.sqrt(6)) + math.exp(-16 / 72) / math.sqrt(5)) / 2,
)
CIDER_D = 100 * sum(_CIDER_Q) / 3

#  METEOR golden numbers: the official meteor-1.5.jar shipped with pycocoevalcap 1.2, run directly in
#  file mode on the tokenised fixture (test.txt: one TOK_RES caption per line; ref.txt: the two
#  TOK_GTS references of each question, consecutive):
#    java -Xmx2G -jar pycocoevalcap/meteor/meteor-1.5.jar test.txt ref.txt -l en -norm -r 2
#  (OpenJDK 17.0.15): "Segment 1..3 score" and "Final score" below; pycocoevalcap's -stdio wrapper
#  returns the same numbers. Two of them by hand (α 0.85, β 0.2, γ 0.6, δ 0.75; "two" is in the jar's
#  function/english.words, "chairs" is not, function words weigh 1 - δ, content words δ):
#  q1 equals a reference: 1. q2 vs "two chairs": P = 1, R = 0.25/(0.75 + 0.25), Fmean =
#  P·R/(α·P + (1-α)·R) = 20/71, one chunk of one match: penalty γ·1^β = 0.6 → 8/71.
METEOR_SEGMENTS = (1.0, 0.11267605633802819, 0.3717273634414985)
METEOR_CORPUS = 0.3447100653769359


def _independent_bleu(res, gts, n_max=4):
    """Corpus BLEU with the closest reference length, pycocoevalcap's smoothing constants."""
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n_max, [0] * n_max
    testlen = reflen = 0
    for k in res:
        hyp = res[k][0].split()
        refs = [r.split() for r in gts[k]]
        testlen += len(hyp)
        reflen += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, n_max + 1):
            grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            best = Counter()
            for r in refs:
                for g, c in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                    best[g] = max(best[g], c)
            correct[n - 1] += sum(min(c, best[g]) for g, c in grams.items())
            guess[n - 1] += max(0, len(hyp) - n + 1)
    out, prod = [], 1.0
    for n in range(n_max):
        prod *= (correct[n] + tiny) / (guess[n] + small)
        out.append(prod ** (1 / (n + 1)) * min(1.0, math.exp(1 - reflen / testlen)))
    return [100 * v for v in out]


def _check_common(scores, suffix):
    assert scores["EM@1"] == 0.0  # "Chair." / "two" / "The table's left side": no raw match
    assert scores["EM@1-cleaned"] == pytest.approx(200 / 3)  # q1 and q2 ("2" -> "two") after cleaning
    assert scores["EM@1-refined"] == 100.0  # q3: "left" is contained in the cleaned prediction
    assert scores["BLEU-1" + suffix] == pytest.approx(BLEU1, rel=1e-9)
    assert scores["BLEU-2" + suffix] == pytest.approx(BLEU2, rel=1e-9)
    ind = _independent_bleu(TOK_RES, TOK_GTS)
    for k in range(4):
        assert scores[f"BLEU-{k + 1}{suffix}"] == pytest.approx(ind[k], rel=1e-9)
    assert scores["ROUGE-L" + suffix] == pytest.approx(ROUGE_L, rel=1e-12)
    assert scores["CIDEr" + suffix] == pytest.approx(CIDER_D, rel=1e-12)
    assert scores["n"] == 3


#  A METEOR property: a candidate equal to its reference scores 1, one sharing no word (nor stem,
#  synonym or paraphrase) scores 0, a partial one in between: "wooden chair" vs "brown wooden chair"
#  (content words only): P = 1, R = 2/3, Fmean = R/(α + (1-α)·R), one chunk of 2 matches → penalty
#  γ·(1/2)^β.
METEOR_PROPERTY_GTS = {"same": ["brown wooden chair"], "partial": ["brown wooden chair"],
                       "disjoint": ["brown wooden chair"]}
METEOR_PROPERTY_RES = {"same": ["brown wooden chair"], "partial": ["wooden chair"], "disjoint": ["green metal lamp"]}
METEOR_PARTIAL = (2 / 3) / (0.85 + 0.15 * 2 / 3) * (1 - 0.6 * 0.5 ** 0.2)


@pytest.fixture(scope="module")
def official():
    """One official run (one METEOR JVM: ~10 s); the METEOR scorer's inputs and output are recorded.
    The same JVM then scores the METEOR property set (recorded in ``calls`` as a second entry)."""
    from pycocoevalcap.meteor import meteor as meteor_module

    calls = []

    class RecordingMeteor(meteor_module.Meteor):
        def compute_score(self, gts, res):
            out = super().compute_score(gts, res)
            calls.append((gts, res, out))
            calls.append((METEOR_PROPERTY_GTS, METEOR_PROPERTY_RES,
                          super().compute_score(METEOR_PROPERTY_GTS, METEOR_PROPERTY_RES)))
            return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module, "Meteor", RecordingMeteor)
        scores = scanqa_scores(PREDS, REFS, use_java=True)
    return scores, calls


@needs_pycoco
@needs_java
def test_official_path_matches_hand_computation(official):
    scores, _ = official
    _check_common(scores, "")
    assert scores["official"] is True and "PTBTokenizer" in scores["tokenizer"]
    assert not any(k.endswith(NON_OFFICIAL) for k in scores)


@needs_pycoco
@needs_java
def test_official_meteor_scores_the_hand_tokenised_fixture(official):
    scores, calls = official
    assert len(calls) == 2
    gts, res, (meteor, per_question) = calls[0]
    assert gts == TOK_GTS and res == TOK_RES  # PTBTokenizer output reaches METEOR unchanged
    assert list(per_question) == pytest.approx(METEOR_SEGMENTS, rel=1e-12)
    assert per_question[1] == pytest.approx(8 / 71, rel=1e-12)
    assert meteor == pytest.approx(METEOR_CORPUS, rel=1e-12)
    assert scores["METEOR"] == pytest.approx(100 * METEOR_CORPUS, rel=1e-12)


@needs_pycoco
@needs_java
def test_official_meteor_identical_beats_partial_beats_disjoint(official):
    _, calls = official
    gts, res, (_, per_question) = calls[1]
    same, partial, disjoint = per_question
    assert same == 1.0 and disjoint == 0.0
    assert partial == pytest.approx(METEOR_PARTIAL, rel=1e-12)
    assert same > partial > disjoint


# A tiny corpus where idf, clipping, the length penalty and the mean over references all matter.
# N = 2 questions. df: "chair" 2 (both questions' references) → idf log 2 − log 2 = 0; every other
# n-gram L = log 2 (df 1, or df 0 → max(1, 0) = 1), so L cancels in each cosine.
#  q1 "red red chair" vs "red chair":
#    1-grams  c = {red: 2L, chair: 0}, r = {red: L, chair: 0}; clipped dot min(2L, L)·L = L²,
#             |c| = 2L, |r| = L → 1/2 (unclipped it would be 2L²/(2L²) = 1);
#    2-grams  c = {red red: L, red chair: L}, r = {red chair: L} → L²/(√2 L · L) = 1/√2;
#    3-grams  c = {red red chair: L}, r = {} → 0; 4-grams none → 0;
#    δ = 1 → exp(-1/72). q1 = 10 · exp(-1/72) · (1/2 + 1/√2) / 4.
#  q2 "wooden table" vs "chair" (1-gram r = {chair: 0}: zero vector → 0, nothing else) and vs
#    "wooden chair": 1-grams c = {wooden: L, table: L}, r = {wooden: L, chair: 0} → L²/(√2 L · L) =
#    1/√2; 2-grams "wooden table" vs "wooden chair" → 0; δ = 0. q2 = 10 · (0 + 1/√2 / 4) / 2.
TINY_PREDS = {"q1": "red red chair", "q2": "wooden table"}
TINY_REFS = {"q1": ["red chair"], "q2": ["chair", "wooden chair"]}
_TINY_Q1 = 10 * math.exp(-1 / 72) * (1 / 2 + 1 / math.sqrt(2)) / 4
_TINY_Q2 = 10 * (1 / math.sqrt(2) / 4) / 2
TINY_CIDER_D = 100 * (_TINY_Q1 + _TINY_Q2) / 2
#  The same without clipping and length penalty ("plain" CIDEr with idf): q1 = 10 · (1 + 1/√2) / 4.
TINY_NO_CLIP_NO_PENALTY = 100 * (10 * (1 + 1 / math.sqrt(2)) / 4 + _TINY_Q2) / 2


@needs_pycoco
def test_cider_is_cider_d_by_hand():
    scores = scanqa_scores(TINY_PREDS, TINY_REFS, use_java=False)
    assert scores["CIDEr" + NON_OFFICIAL] == pytest.approx(TINY_CIDER_D, rel=1e-12)
    assert abs(TINY_NO_CLIP_NO_PENALTY - TINY_CIDER_D) > 10  # the clipping and penalty are visible
    from pycocoevalcap.cider.cider import Cider  # the official library agrees with the hand value

    tok = {k: [v] for k, v in TINY_PREDS.items()}
    cider, per_question = Cider().compute_score(TINY_REFS, tok)
    assert list(per_question) == pytest.approx([_TINY_Q1, _TINY_Q2], rel=1e-12)
    assert 100 * cider == pytest.approx(TINY_CIDER_D, rel=1e-12)


@needs_pycoco
def test_fallback_path_values_and_labels():
    scores = scanqa_scores(PREDS, REFS, use_java=False)
    _check_common(scores, NON_OFFICIAL)
    assert scores["official"] is False
    assert scores["tokenizer"] == "python-fallback (non-official)"
    assert not any(k.startswith("METEOR") for k in scores)
    for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert k not in scores and k + NON_OFFICIAL in scores


@needs_pycoco
@needs_java
def test_fallback_equals_official_where_tokenisation_agrees(official):
    official, _ = official
    fallback = scanqa_scores(PREDS, REFS, use_java=False)
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert fallback[k + NON_OFFICIAL] == official[k]


@needs_pycoco
@needs_java
def test_python_tokenizer_agrees_with_ptbtokenizer_on_typical_answers():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cases = (FIX / "ptb_cases.txt").read_text().split("\n")
    java = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(cases)})
    mismatches = [(c, java[str(i)][0], ptb_like_tokenize(c)) for i, c in enumerate(cases)
                  if java[str(i)][0] != ptb_like_tokenize(c)]
    assert mismatches == []


def test_python_tokenizer_hand_cases():
    assert ptb_like_tokenize("Don't know.") == "do n't know"
    assert ptb_like_tokenize("On the wall (above the bed).") == "on the wall -lrb- above the bed -rrb-"
    assert ptb_like_tokenize("It's 3.5 m, U.S.A.!") == "it 's 3.5 m u.s.a."
    assert ptb_like_tokenize("$5 and 50%...") == "$ 5 and 50 %"
    assert ptb_like_tokenize("") == ""


def test_java_missing_error_names_use_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java executable
    assert not java_available()
    with pytest.raises(RuntimeError) as info:
        scanqa_scores(PREDS, REFS)
    msg = str(info.value)
    assert msg.startswith("use_java:") and "use_java=False" in msg and "JRE" in msg


def test_missing_and_extra_predictions_are_errors():
    refs = {f"scene0000_00-{i}": ["chair"] for i in range(10)}
    preds = {k: "chair" for k in list(refs)[:3]}
    with pytest.raises(ValueError, match=r"predictions: missing for 7 of 10 questions, e\.g\. \['scene0000_00-3'"):
        scanqa_scores(preds, refs, use_java=False)
    with pytest.raises(ValueError, match="predictions: 1 ids have no references"):
        scanqa_scores({**{k: "x" for k in refs}, "other": "x"}, refs, use_java=False)
    with pytest.raises(ValueError, match="references: expected a non-empty list"):
        scanqa_scores({"a": "x"}, {"a": []}, use_java=False)
    with pytest.raises(TypeError, match="use_java"):
        scanqa_scores(preds, refs, use_java="no")


def test_clean_answer_follows_leo():
    assert clean_answer("  The Brown  Chair. ") == "brown chair"
    assert clean_answer("2") == "two" and clean_answer("23") == "twenty-three" and clean_answer("none") == "zero"
    assert clean_answer("21") == "21"  # LEO spells 0-20 and 23 only
    assert clean_answer("a tv on the letf") == "TV on left"
    assert clean_answer("mat2 near no1") == "mat near no"
    assert clean_answer("it's 3 o' clock!") == "it's three o'clock"
    assert clean_answer("left, right: up-down") == "left, right: up-down"  # , : - ' survive
    assert clean_answer("café") == "caf"  # non-ASCII letters are dropped, as in LEO
    assert clean_answer("moving backwards") == "moving backward"


def test_raw_vs_refined_em_differ_on_case_punctuation_digits():
    preds = {"case": "Chair", "punct": "chair.", "digit": "2", "word": "two", "sub": "white", "raw": "table",
             "miss": "sofa"}
    refs = {"case": ["chair"], "punct": ["chair"], "digit": ["two"], "word": ["2"], "sub": ["white and brown"],
            "raw": ["table"], "miss": ["bed"]}
    raw = {k: float(preds[k] in refs[k]) for k in preds}
    leo = {k: leo_answer_match(clean_answer(preds[k]), [clean_answer(r) for r in refs[k]]) for k in preds}
    assert raw == {"case": 0, "punct": 0, "digit": 0, "word": 0, "sub": 0, "raw": 1, "miss": 0}
    assert leo == {"case": (1, 1), "punct": (1, 1), "digit": (1, 1), "word": (1, 1), "sub": (0, 1), "raw": (1, 1),
                   "miss": (0, 0)}
    if _has_pycoco():  # the same through the scorer (EM does not depend on the tokenizer)
        scores = scanqa_scores(preds, refs, use_java=False)
        assert scores["EM@1"] == pytest.approx(100 / 7)
        assert scores["EM@1-cleaned"] == pytest.approx(500 / 7)
        assert scores["EM@1-refined"] == pytest.approx(600 / 7)


def test_leo_answer_match_stops_at_first_related_reference():
    # LEO's loop returns at the first reference related by containment, so the exact "chair" is not seen.
    assert leo_answer_match("chair", ["brown chair", "chair"]) == (0, 1)
    assert leo_answer_match("chair", ["chair", "brown chair"]) == (1, 1)
    assert leo_answer_match("brownchair", ["brown chair"]) == (0, 1)  # whitespace ignored for containment
    assert leo_answer_match("sofa", ["bed", "table"]) == (0, 0)


def test_squad_exact_match_and_token_f1():
    assert normalize_answer("The  Brown, chair!") == "brown chair"
    assert exact_match("A chair.", ["the chair"]) == 1.0
    assert exact_match("chairs", "chair") == 0.0
    # pred tokens [brown, wooden, chair], ref [brown, chair]: overlap 2, P 2/3, R 1 -> F1 0.8
    assert token_f1("a brown wooden chair", "the brown chair") == pytest.approx(0.8)
    # best over references; repeated tokens clipped: [chair, chair] vs [chair] -> P 1/2, R 1 -> 2/3
    assert token_f1("chair chair", ["table", "chair"]) == pytest.approx(2 / 3)
    assert token_f1("the", "a") == 1.0 and token_f1("the", "chair") == 0.0  # both empty / one empty
    with pytest.raises(ValueError, match="references"):
        token_f1("x", [])


def _has_pycoco():
    import importlib.util

    return importlib.util.find_spec("pycocoevalcap") is not None


# ---------------------------------------------------------------------------------------------------
# OpenEQA LLM-Match

import hashlib  # noqa: E402
import http.server  # noqa: E402
import threading  # noqa: E402

from shared.metrics.openeqa import (  # noqa: E402
    PROXY_LABEL,
    OpenAIJudge,
    build_prompt,
    cut_after_last_period,
    join_openeqa,
    llm_match,
    load_prompt,
    offline_scores,
    parse_score,
    parse_score_lenient,
    score_to_percent,
)


def test_prompt_files_are_the_upstream_ones_and_fill():
    root = pathlib.Path(__file__).resolve().parents[1] / "shared" / "metrics" / "prompts"
    sha1 = {n: hashlib.sha1((root / f"{n}.txt").read_bytes()).hexdigest() for n in ("mmbench", "mmbench-extra")}
    assert sha1 == {"mmbench": "5d5f6dd840213dd65d3b90f49d7d21fbfbe11f45",
                    "mmbench-extra": "fc88b4b7dffc1901f0f225f228dec92829b8bd8c"}
    plain = build_prompt("What color is the rug?", "tan", "brown")
    assert plain.startswith("You are an AI assistant who will help me to evaluate the response")
    assert plain.endswith("Your Turn:\nQuestion: What color is the rug?\nAnswer: tan\nResponse: brown")
    assert plain == load_prompt("mmbench").replace("{question}", "What color is the rug?").replace(
        "{answer}", "tan").replace("{prediction}", "brown")
    extra = build_prompt("Is it on?", "yes", "no", ("it is on", "yeah"))
    assert extra.endswith("Answer: yes\nExtra Answers: ['it is on', 'yeah']\nResponse: no")
    assert "extra answers that are also correct" in extra
    assert "Extra Answers: []" in build_prompt("q", "a", "p", [])  # an empty list still selects mmbench-extra
    with pytest.raises(TypeError, match="extra_answers"):
        build_prompt("q", "a", "p", "yes")


def test_prediction_cut_after_last_period():
    assert cut_after_last_period("A chair. It is red") == "A chair."
    assert cut_after_last_period("It is 3.5 m away") == "It is 3."  # upstream behaviour, kept
    assert cut_after_last_period("ends here.") == "ends here."
    assert cut_after_last_period("no period") == "no period"
    assert cut_after_last_period("") == "" and cut_after_last_period(None) is None


def test_parse_score_exactly_as_upstream():
    assert parse_score("4") == 4
    assert parse_score("12") == 12  # not clipped here
    assert parse_score("Your mark: 3") == 3
    assert parse_score("The response is close.\nYour mark: 2\nBecause ...") == 2
    for bad in (" 5", "5\n", "Mark: 5", "Your mark: five", "Your mark: 4/5"):
        with pytest.raises(ValueError):
            parse_score(bad)
    assert parse_score_lenient(" 5\n") == (5, True)
    assert parse_score_lenient("Your mark: 1") == (1, False)
    with pytest.raises(ValueError):
        parse_score_lenient("I cannot judge 10 of these")


def test_score_to_percent():
    assert score_to_percent([1, 5, 3]) == pytest.approx(50.0)
    assert score_to_percent([0, 7]) == pytest.approx(50.0)  # clipped to 1 and 5 first
    assert score_to_percent([2]) == 25.0
    with pytest.raises(ValueError, match="scores"):
        score_to_percent([])


RECORDS = [
    {"question_id": "a", "question": "What color is the rug?", "answer": "tan", "prediction": "Tan. It is big"},
    {"question_id": "b", "question": "Is the door open?", "answer": "yes", "prediction": "No",
     "extra_answers": ["it is open", "open"]},
    {"question_id": "c", "question": "How many chairs?", "answer": "two", "prediction": None},
]


class FakeJudge:
    """Marks 5 when the answer's first word appears in the response, else 1; counts calls."""

    name = "fake-judge-v1"

    def __init__(self, reply_format="{}"):
        self.prompts = []
        self.reply_format = reply_format

    def __call__(self, prompt):
        self.prompts.append(prompt)
        turn = prompt.split("Your Turn:")[1]
        answer = turn.split("Answer: ")[1].split("\n")[0]
        response = turn.split("Response: ")[1]
        return self.reply_format.format(5 if answer.lower() in response.lower() else 1)


def test_llm_match_scores_and_caches(tmp_path):
    cache = tmp_path / "metrics.json"
    judge = FakeJudge()
    first = llm_match(RECORDS, judge, cache, progress=False)
    assert len(judge.prompts) == 2  # "c" has no prediction: 0 without a query
    assert judge.prompts[0].endswith("Response: Tan.")  # cut after the last period
    assert "Extra Answers: ['it is open', 'open']" in judge.prompts[1]
    assert first["scores"] == {"a": 5, "b": 1, "c": 0}
    assert first["LLM-Match"] == pytest.approx((100 + 0 + 0) / 3)
    assert (first["queried"], first["cached"]) == (2, 0)

    again = FakeJudge()
    second = llm_match(RECORDS, again, cache, progress=False)
    assert again.prompts == [] and second["scores"] == first["scores"] and second["cached"] == 3

    changed = [dict(r) for r in RECORDS]
    changed[1]["prediction"] = "Yes, it is open."
    third_judge = FakeJudge()
    third = llm_match(changed, third_judge, cache, progress=False)
    assert len(third_judge.prompts) == 1 and third["scores"]["b"] == 5  # only the changed one re-judged
    stored = json.loads(cache.read_text())
    assert stored["judge"] == "fake-judge-v1" and stored["scores"]["b"]["reply"] == "5"

    other = FakeJudge()
    other.name = "another-judge"
    with pytest.raises(ValueError, match="cache_path: .*'another-judge'"):
        llm_match(RECORDS, other, cache, progress=False)


def test_llm_match_unparsable_reply(tmp_path):
    with pytest.raises(ValueError, match="judge: unparsable reply for question 'a'"):
        llm_match(RECORDS, FakeJudge("Score {}!"), tmp_path / "c.json", progress=False)
    lenient = llm_match(RECORDS, FakeJudge("Score {}!"), tmp_path / "d.json", lenient=True, progress=False)
    assert lenient["scores"] == {"a": 5, "b": 1, "c": 0} and lenient["lenient_parses"] == 2
    with pytest.raises(ValueError, match="records: duplicate question_id 'a'"):
        llm_match(RECORDS + RECORDS[:1], FakeJudge(), None, progress=False)


def test_offline_proxies_use_extra_answers():
    records = [
        {"question_id": 1, "question": "q", "answer": "tan", "prediction": "Tan. It is big"},
        {"question_id": 2, "question": "q", "answer": "yes", "prediction": "It is open.",
         "extra_answers": ["it is open", "open"]},
        {"question_id": 3, "question": "q", "answer": "two chairs", "prediction": "two wooden chairs"},
        {"question_id": 4, "question": "q", "answer": "two", "prediction": None},
    ]
    out = offline_scores(records)
    assert out["label"] == PROXY_LABEL and out["n"] == 4
    assert out["proxy-EM"] == pytest.approx(100 * 2 / 4)  # "tan." and "it is open." match after normalisation
    # F1: 1, 1, [two wooden chairs] vs [two chairs] = 2*(2/3*1)/(2/3+1) = 0.8, 0
    assert out["proxy-F1"] == pytest.approx(100 * (1 + 1 + 0.8 + 0) / 4)


def test_join_openeqa_checks_coverage():
    dataset = [{"question_id": "x", "question": "q1", "answer": "a1"},
               {"question_id": "y", "question": "q2", "answer": "a2", "extra_answers": ["b2"]}]
    records = join_openeqa(dataset, [{"question_id": "y", "answer": "p2"}, {"question_id": "x", "answer": "p1"}])
    assert [r["question_id"] for r in records] == ["y", "x"]
    assert records[0]["extra_answers"] == ["b2"] and records[1]["extra_answers"] is None
    with pytest.raises(ValueError, match=r"results: missing 1 of 2 questions, e\.g\. \['y'\]"):
        join_openeqa(dataset, [{"question_id": "x", "answer": "p1"}])
    assert len(join_openeqa(dataset, [{"question_id": "x", "answer": "p1"}], allow_missing=True)) == 1
    with pytest.raises(ValueError, match="not in the dataset"):
        join_openeqa(dataset, [{"question_id": "z", "answer": "p"}], allow_missing=True)


class _ChatServer(http.server.BaseHTTPRequestHandler):
    replies = []  # (status, body) served in order
    requests = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        status, payload = type(self).replies.pop(0)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_judge_over_http(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ok = {"choices": [{"message": {"role": "assistant", "content": "Your mark: 4"}}]}
        _ChatServer.replies[:] = [(503, {"error": "busy"}), (200, ok), (200, {"choices": []})]
        _ChatServer.requests[:] = []
        monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
        judge = OpenAIJudge(f"http://127.0.0.1:{server.server_port}/v1/", "judge-model", api_key_env="MY_JUDGE_KEY",
                            retry_wait=(0.0, 0.0))
        assert judge("PROMPT") == "Your mark: 4"  # after one retried 503
        path, headers, body = _ChatServer.requests[-1]
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
        assert body == {"model": "judge-model", "messages": [{"role": "user", "content": "PROMPT"}],
                        "max_tokens": 32, "temperature": 0.2, "seed": 1234}
        with pytest.raises(RuntimeError, match="expected exactly one choice"):
            judge("PROMPT")
        assert "judge-model" in judge.name and "seed=1234" in judge.name
    finally:
        server.shutdown()
        server.server_close()
    closed = OpenAIJudge(f"http://127.0.0.1:{server.server_port}/v1", "m", max_attempts=2, retry_wait=(0.0, 0.0))
    with pytest.raises(RuntimeError, match="failed 2 times"):  # nothing listens there any more
        closed("x")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key_env: environment variable OPENAI_API_KEY is not set"):
        OpenAIJudge(None, "gpt-4-1106-preview")("x")
    with pytest.raises(ValueError, match="base_url"):
        OpenAIJudge("localhost:8000", "m")


def _tiny_chat_model(folder, with_template=True):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    import torch

    words = ["[UNK]", "[PAD]", "</s>", "<|user|>", "<|assistant|>", "1", "2", "3", "4", "5", "Your", "mark:",
             "Question:", "Answer:", "Response:", "yes", "no"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins tokens with spaces
    template = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="</s>")
    if with_template:
        fast.chat_template = template
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(words), max_position_embeddings=256,
                                   pad_token_id=1, eos_token_id=2, bos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return fast, model


def test_hf_judge_greedy_with_chat_template(tmp_path):
    import torch

    from shared.metrics.openeqa import HFJudge

    transformers = pytest.importorskip("transformers")
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 34):
        with pytest.raises(ImportError, match="transformers >= 4.34"):
            HFJudge(str(tmp_path), device="cpu")
        return
    tokenizer, model = _tiny_chat_model(tmp_path / "judge")
    judge = HFJudge(str(tmp_path / "judge"), device="cpu", dtype="float32", max_new_tokens=4)
    prompt = "Question: yes Answer: no Response: yes"
    reply = judge(prompt)
    # independent greedy decoding of the templated prompt
    ids = tokenizer("<|user|> " + prompt + " <|assistant|>", add_special_tokens=False, return_tensors="pt").input_ids
    model.eval()
    new = []
    with torch.no_grad():
        for _ in range(4):
            nxt = int(model(ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert reply == tokenizer.decode(new, skip_special_tokens=True).strip()
    assert judge(prompt) == reply and judge.name.startswith("hf:judge")
    _tiny_chat_model(tmp_path / "plain", with_template=False)
    with pytest.raises(ValueError, match="model_path: .* no chat template"):
        HFJudge(str(tmp_path / "plain"), device="cpu")


@needs_pycoco
@needs_java
def test_line_separators_inside_answers_do_not_shift_questions():
    from shared.metrics.qa import _tokenize

    texts = {"a": ["one\rtwo"], "b": ["three\u2028four"], "c": ["five\x0cx"], "d": ["six"]}
    assert _tokenize(texts, use_java=True) == {"a": ["one two"], "b": ["three four"], "c": ["five x"], "d": ["six"]}
    assert _tokenize(texts, use_java=False) == {"a": ["one two"], "b": ["three four"], "c": ["five x"], "d": ["six"]}
