"""LLaVA-3D's evaluators (ZCMax/LLaVA-3D @ 91d979d ``llava/eval/{scanqa,sqa3d}_evaluator.py``) as functions.

Upstream scores the prediction JSONL its ``model_scanqa.py``/``model_sqa3d.py`` write
(``{question_id, prompt, text, answer_id, model_id, metadata}``) against its answer JSON
(``llava3d_scanqa_val_answer.json``: ``[{question_id, text: [answers]}]``; ``llava3d_sqa3d_test_answer.json``:
``[{question_id, text: answer, type: 0..5}]``):

- ``clean_answer``: LEO's normalisation (the evaluators' copy, "refer to LEO"), the same function as
  ``shared.metrics.qa.clean_answer`` (re-exported here, not duplicated): lower-case, trim, keep only
  ``[a-zA-Z0-9,'\\s\\-:]``, LEO's typo list, 0-20 and 23 (and "none") as words, a digit glued to a word
  dropped, a/an/the before a word dropped, "backwards" -> "backward";
- ``answer_match(pred, gts)``: ``(EM, refined EM)``: (1, 1) when ``pred in gts``; else (0, 1) when, with all
  whitespace removed, ``pred`` is inside some ``gt`` or that ``gt`` inside ``pred``; else (0, 0). As upstream,
  an empty prediction is inside every reference, so it scores (0, 1) (LEO's copy in Chat-Scene guards it;
  LLaVA-3D does not);
- ``scanqa_score``: ``[scanqa] EM1``, ``EM1_refined`` (both sides cleaned), then pycocoevalcap's
  ``PTBTokenizer`` on the *cleaned* prediction and cleaned references and ``Bleu(4)``, ``Meteor()``,
  ``Rouge()``, ``Cider()`` (``Bleu_1..4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``), and ``Spice()`` only with
  ``spice=True`` (SPICE downloads Stanford CoreNLP models on first use; the papers' tables do not report it);
- ``sqa3d_score``: ``[sqa3d] EM1``, ``EM1_refined`` and ``EM_type{t}``/``EM_refined_type{t}`` for t = 0..5
  (What, Is, How, Can, Which, Other), each type divided by ``count + 1e-10`` as upstream (a type without
  samples scores 0.0). No caption metrics (upstream computes none for SQA3D);
- ``scan2cap_score``: LLaVA-3D has **no Scan2Cap scorer** (``llava/eval/capeval`` holds unused copies of the
  Scan2Cap caption scorers; nothing calls them) and **no IoU protocol**: its model is given the GT box centre
  as a click, predicts no box, so Scan2Cap's m@kIoU / C@0.5 cannot be computed from its output. This function
  scores the captions only (BLEU-1..4, METEOR, ROUGE-L, CIDEr; PTBTokenizer on the raw texts, no LEO cleaning,
  no "sos/eos"), each prediction against every GT caption of its object (same scene, same target box) in the
  question file. Figures are therefore "captioning given the GT location", not comparable to C@0.5.

All scores are fractions as upstream prints them (CIDEr as pycocoevalcap returns it, e.g. 0.917 = 91.7).
Predictions and references are matched by ``question_id`` (upstream zips two lists in order and asserts the
ids agree; any order here, but both sides must hold the same ids). CIDEr's idf depends on the whole set:
score the merged shards, never average per-shard scores. Caption metrics need Java (PTBTokenizer, METEOR);
``caption_metrics=False`` returns the EM keys only.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .chat_scene import CaptionScorers, exact_or_contained
from .qa import clean_answer

SQA3D_TYPES = (0, 1, 2, 3, 4, 5)  # What, Is, How, Can, Which, Other
SQA3D_TYPE_NAMES = ("What", "Is", "How", "Can", "Which", "Other")
CAPTION_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

PathLike = Union[str, "os.PathLike[str]"]


def answer_match(pred: str, gts: Sequence[str]) -> Tuple[int, int]:
    """LLaVA-3D's ``answer_match`` on cleaned strings -> ``(em, em_refined)``, each 0 or 1 (see module doc)."""
    if not isinstance(pred, str):
        raise TypeError(f"pred: expected a str, got {type(pred).__name__}")
    if isinstance(gts, str) or not all(isinstance(g, str) for g in gts):
        raise TypeError(f"gts: expected a list of str, got {gts!r}")
    return exact_or_contained(pred, gts)  # no empty-prediction guard: upstream gives "" refined credit


# --------------------------------------------------------------------------------------------------- files


def read_predictions(path: PathLike) -> List[Dict[str, Any]]:
    """A prediction JSONL as upstream writes it (one JSON object per line; blank lines ignored)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"predictions: {path} line {n} is not JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"predictions: {path} line {n}: expected a JSON object, got {type(rec).__name__}")
            out.append(rec)
    return out


def read_answers(path: PathLike) -> List[Dict[str, Any]]:
    """An answer JSON as upstream loads it (``mmengine.load``): a list of ``{question_id, text, ...}``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"answers: expected {path} to hold a JSON list of objects {{question_id, text}}")
    return data


def _pair(preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]],
          need: Sequence[str]) -> List[Tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(prediction, answer) pairs in answer order, matched by question_id; every id on both sides."""
    for name, items in (("preds", preds), ("gts", gts)):
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
            raise TypeError(f"{name}: expected a list of dicts, got {type(items).__name__}")
        if len(items) == 0:
            raise ValueError(f"{name}: expected at least one entry, got an empty list")
    by_id: Dict[Any, Mapping[str, Any]] = {}
    for i, p in enumerate(preds):
        if not isinstance(p, Mapping) or "question_id" not in p or "text" not in p:
            raise ValueError(f"preds[{i}]: expected a dict with 'question_id' and 'text', got {p!r}")
        if not isinstance(p["text"], str):
            raise TypeError(f"preds[{i}]['text']: expected a str, got {type(p['text']).__name__}")
        qid = str(p["question_id"])
        if qid in by_id:
            raise ValueError(f"preds: question_id {qid!r} appears twice")
        by_id[qid] = p
    pairs = []
    seen = set()
    for i, g in enumerate(gts):
        if not isinstance(g, Mapping) or any(k not in g for k in need):
            raise ValueError(f"gts[{i}]: expected a dict with {list(need)}, got {g!r}")
        qid = str(g["question_id"])
        if qid in seen:
            raise ValueError(f"gts: question_id {qid!r} appears twice")
        seen.add(qid)
        if qid not in by_id:
            raise ValueError(f"preds: no prediction for question_id {qid!r} (gts[{i}]); "
                             f"{len(gts)} answers, {len(preds)} predictions")
        pairs.append((by_id[qid], g))
    extra = [q for q in by_id if q not in seen]
    if extra:
        raise ValueError(f"preds: {len(extra)} question_ids have no answer, e.g. {extra[:5]!r} (wrong split?)")
    return pairs


def _caption_scores(gts: Dict[str, List[str]], res: Dict[str, List[str]], spice: bool,
                    scorers: Optional[CaptionScorers]) -> Dict[str, float]:
    own = scorers is None
    sc = CaptionScorers() if own else scorers
    try:
        gts_t, res_t = sc.tokenize(gts), sc.tokenize(res)
        out = sc.score(gts_t, res_t)
        if spice:
            try:
                from pycocoevalcap.spice.spice import Spice
            except ImportError as exc:  # pragma: no cover - depends on the installation
                raise ImportError("spice=True: pycocoevalcap.spice is missing (pip install pycocoevalcap==1.2)") from exc
            out["SPICE"] = float(Spice().compute_score(gts_t, res_t)[0])
    finally:
        if own:
            sc.close()
    return out


# --------------------------------------------------------------------------------------------------- ScanQA


def scanqa_score(preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]], spice: bool = False,
                 caption_metrics: bool = True, scorers: Optional[CaptionScorers] = None) -> Dict[str, float]:
    """``calc_scanqa_score``: ``{"[scanqa] EM1", "EM1_refined", "Bleu_1".."Bleu_4", "METEOR", "ROUGE_L",
    "CIDEr"(, "SPICE")}`` (fractions; keys prefixed ``"[scanqa] "`` as upstream).

    preds: prediction records ``{question_id, text}``. gts: ``llava3d_scanqa_val_answer.json`` entries
    ``{question_id, text: [answers]}``. spice: add SPICE (needs the CoreNLP models). caption_metrics: False
    -> EM keys only (no Java). scorers: a ``CaptionScorers`` to reuse (else one for this call).
    """
    pairs = _pair(preds, gts, ("question_id", "text"))
    em = refined = 0
    res: Dict[str, List[str]] = {}
    refs: Dict[str, List[str]] = {}
    for n, (p, g) in enumerate(pairs):
        answers = g["text"]
        if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers \
                or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"gts: question_id {g['question_id']!r}: expected 'text' to be a non-empty list of "
                             f"answers, got {answers!r}")
        pred = clean_answer(p["text"])
        cleaned = [clean_answer(a) for a in answers]
        a, b = answer_match(pred, cleaned)
        em, refined = em + a, refined + b
        res[str(n)] = [pred]
        refs[str(n)] = [c.replace("\n", " ").strip() for c in cleaned]
    out = {"[scanqa] EM1": em / len(pairs), "[scanqa] EM1_refined": refined / len(pairs)}
    if caption_metrics:
        out.update({f"[scanqa] {k}": v for k, v in _caption_scores(refs, res, spice, scorers).items()})
    return out


# --------------------------------------------------------------------------------------------------- SQA3D


def sqa3d_type(question: str) -> int:
    """SQA3D's question type from the first word (LEO's ``get_sqa_question_type``): what 0, is 1, how 2,
    can 3, which 4, anything else 5. Only for sources without a ``type`` field (the original SQA3D files)."""
    q = question.lstrip().lower()
    for t, prefix in enumerate(("what", "is", "how", "can", "which")):
        if q.startswith(prefix):
            return t
    return 5


def sqa3d_score(preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
    """``calc_sqa3d_score``: ``[sqa3d] EM1``, ``EM1_refined`` and ``EM_type{t}``/``EM_refined_type{t}``, t = 0..5.

    gts: ``llava3d_sqa3d_test_answer.json`` entries ``{question_id, text: answer, type: 0..5}`` (``text`` a
    single answer as upstream; a list is taken as several references).
    """
    pairs = _pair(preds, gts, ("question_id", "text", "type"))
    em = refined = 0
    em_type = {t: 0 for t in SQA3D_TYPES}
    refined_type = {t: 0 for t in SQA3D_TYPES}
    count = {t: 1e-10 for t in SQA3D_TYPES}
    for p, g in pairs:
        t = g["type"]
        if isinstance(t, str) and t.strip().isdigit():
            t = int(t)  # upstream: int(gt['type'])
        if isinstance(t, bool) or not isinstance(t, int) or t not in SQA3D_TYPES:
            raise ValueError(f"gts: question_id {g['question_id']!r}: expected 'type' in 0..5, got {t!r}")
        answers = [g["text"]] if isinstance(g["text"], str) else list(g["text"])
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"gts: question_id {g['question_id']!r}: expected 'text' to be an answer, got {g['text']!r}")
        a, b = answer_match(clean_answer(p["text"]), [clean_answer(x) for x in answers])
        em, refined = em + a, refined + b
        em_type[t] += a
        refined_type[t] += b
        count[t] += 1
    out = {"[sqa3d] EM1": em / len(pairs), "[sqa3d] EM1_refined": refined / len(pairs)}
    for t in SQA3D_TYPES:
        out[f"[sqa3d] EM_type{t}"] = em_type[t] / count[t]
        out[f"[sqa3d] EM_refined_type{t}"] = refined_type[t] / count[t]
    return out


# --------------------------------------------------------------------------------------------------- Scan2Cap


def object_key(video: str, box: Sequence[float]) -> str:
    """The object a Scan2Cap sample is about: its scene and the target box (6 numbers, as in the file)."""
    return f"{video}|" + ",".join(repr(float(x)) for x in box)


def scan2cap_score(preds: Sequence[Mapping[str, Any]], samples: Sequence[Mapping[str, Any]], spice: bool = False,
                   scorers: Optional[CaptionScorers] = None) -> Dict[str, float]:
    """Caption metrics of Scan2Cap predictions (see the module doc: no IoU, no C@0.5).

    preds: records ``{question_id, text}`` (``model_scan2cap.py`` writes ``question_id`` = the sample ``id``).
    samples: the ``llava-3d-scan2cap_val.json`` entries ``{id, video, conversations, target: {boxes}}``; the
      references of a prediction are the GT captions (``conversations[1].value``) of every sample of the file
      with the same ``video`` and the same first target box. Returns ``[scan2cap] Bleu_1..4, METEOR, ROUGE_L,
      CIDEr`` (+ SPICE) and ``[scan2cap] objects`` (distinct objects).
    """
    if isinstance(samples, (str, bytes, Mapping)) or not isinstance(samples, Sequence) or not samples:
        raise TypeError("samples: expected the non-empty list of llava-3d-scan2cap_val.json entries")
    captions: Dict[str, List[str]] = {}
    gts = []
    for i, s in enumerate(samples):
        try:
            key = object_key(s["video"], s["target"]["boxes"][0])
            caption = s["conversations"][1]["value"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"samples[{i}]: expected {{id, video, conversations: [question, answer], "
                             f"target: {{boxes: [[x, y, z, dx, dy, dz], ...]}}}}") from None
        if not isinstance(caption, str):
            raise TypeError(f"samples[{i}]['conversations'][1]['value']: expected a str")
        captions.setdefault(key, []).append(caption)
        gts.append({"question_id": s["id"], "text": key})
    pairs = _pair(preds, gts, ("question_id", "text"))
    res = {str(n): [p["text"].replace("\n", " ").strip()] for n, (p, _) in enumerate(pairs)}
    refs = {str(n): [c.replace("\n", " ").strip() for c in captions[g["text"]]] for n, (_, g) in enumerate(pairs)}
    out = {f"[scan2cap] {k}": v for k, v in _caption_scores(refs, res, spice, scorers).items()}
    out["[scan2cap] objects"] = float(len({g["text"] for _, g in pairs}))
    return out


__all__ = [
    "CAPTION_KEYS",
    "SQA3D_TYPES",
    "SQA3D_TYPE_NAMES",
    "answer_match",
    "clean_answer",
    "object_key",
    "read_answers",
    "read_predictions",
    "scan2cap_score",
    "scanqa_score",
    "sqa3d_score",
    "sqa3d_type",
]
