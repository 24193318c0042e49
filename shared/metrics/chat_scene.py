"""Chat-Scene's evaluation metrics (``utils/eval.py`` @ 475e106), one function per benchmark.

Every function takes the per-sample prediction dicts that ``tasks/train.py::evaluate`` writes to
``preds_epoch{e}_step{s}_{name}.json`` — ``{scene_id, gt_id, pred_id, qid, prompt, pred, ref_captions,
type_info}`` (``gt_id`` = annotation ``obj_id``, ``pred_id`` = annotation ``pred_id``, ``type_info`` =
``sqa_type`` / ``eval_type``) — and returns the keys upstream returns, as fractions in [0, 1]:

- ``score_scanrefer``: ``[scanrefer] Acc@0.25/0.50`` and the ``Unique``/``Multiple`` splits. The first
  ``<OBJxxx>`` of ``pred`` whose id is below the scene's number of Mask3D instances picks a box from
  ``scannet_mask3d_val_attributes.pt`` (id 0 when there is none); it is a hit when its IoU with the GT
  box (``scannet_val_attributes.pt``) is >= the threshold;
- ``score_multi3dref``: ``[multi3dref] {all, <eval_type>} F1@0.25/0.50``: every valid ``<OBJxxx>`` (repeats
  kept); ``zt_*`` types score 1 iff none is predicted; otherwise Hungarian matching on the IoU matrix
  (float32, zero-padded square, ``scipy.optimize.linear_sum_assignment``), F1 = 2 TP / (#pred + #gt);
  per-sample F1 averaged per type and over all;
- ``score_scan2cap``: ``[scan2cap] {Bleu_1..4, METEOR, ROUGE_L, CIDEr}@0.25/0.50``: the caption
  ``"sos {pred} eos"`` counts at a threshold only when the IoU between the *annotation's* ``pred_id``
  Mask3D box and the GT box reaches it (else ``"sos eos"``); references from ``scan2cap_val_corpus.json``
  (``"scene|gt_id"`` -> captions); corpus keys never predicted are scored as ``"sos eos"``;
- ``score_scanqa``: ``[scanqa] EM1``, ``EM1_refined`` and the caption metrics; ``score_sqa3d``: the same
  plus ``EM_type{0..5}`` / ``EM_refined_type{0..5}`` (``type_info`` = ``sqa_type``).

Answers: ``clean_prediction`` (drop one trailing ".", lower-case the first character, then LEO's
``clean_answer`` from ``shared.metrics.qa``, identical to Chat-Scene's ``utils/helper.py`` copy) and
Chat-Scene's ``answer_match`` (EM iff the cleaned prediction is one of the references; refined EM also
when one contains the other with whitespace removed; an empty prediction scores (0, 0)).

Upstream's ScanQA scorer cleans the references and then overwrites them with the raw ones, so EM and the
caption metrics compare a cleaned prediction with raw references. ``score_scanqa`` cleans them (the
evident intent, what SQA3D does) unless ``compat_ref_overwrite=True``, which reproduces upstream exactly.

Caption metrics: pycocoevalcap's ``PTBTokenizer`` and ``Bleu(4)``, ``Meteor()``, ``Rouge()``, ``Cider()``
(Java), as ``tasks/train.py`` sets them up (``CaptionScorers``; pass one to several calls to start the
METEOR JVM once). Deliberate differences, none of which changes a figure on well-formed input: bad input
raises ``ValueError``/``TypeError`` naming the parameter (upstream raises ``KeyError``/``IndexError``/
``ZeroDivisionError`` or wraps negative indices); an empty Unique/Multiple split of ScanRefer omits its
two keys with a warning (upstream divides by zero); line separators other than "\\n" in a caption become
spaces before PTBTokenizer (upstream they shift every later caption onto the wrong sample); Scan2Cap's
never-predicted corpus keys are scored in corpus order (upstream: ``set`` order, which only moves the
last bits of the ROUGE-L/CIDEr means and of METEOR). Kept on purpose: the 1e-8 IoU epsilon (an exact
IoU of 0.5 fails ScanRefer's ``>= 0.5`` but passes Multi3dRefer's, whose float32 matrix rounds it up),
and SQA3D's per-type counts starting at 1e-10 (a type without samples scores 0.0).
"""
from __future__ import annotations

import csv
import json
import operator
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .boxes3d import as_boxes, box_iou, box_iou_matrix
from .qa import _require_java, _tokenize, clean_answer

PathLike = Union[str, "os.PathLike[str]"]
Predictions = Sequence[Mapping[str, Any]]

#: The files upstream reads (relative to the Chat-Scene root; ``config.val_file_dict[name][2]`` is the
#: instance file for the Mask3D runs).
INSTANCE_ATTRIBUTES = "annotations/scannet_mask3d_val_attributes.pt"
SCANNET_ATTRIBUTES = "annotations/scannet_val_attributes.pt"
UNIQUE_MULTIPLE_LOOKUP = "annotations/scanrefer_unique_multiple_lookup.json"
SCAN2CAP_CORPUS = "annotations/scan2cap_val_corpus.json"

#: ``<OBJxxx>`` as upstream matches it (Python ``\d``: any Unicode decimal digit, parsed by ``int``).
OBJECT_ID = re.compile(r"<OBJ\d{3}>")
MULTI3DREF_TYPES = ("zt_w_d", "zt_wo_d", "st_w_d", "st_wo_d", "mt")
ZERO_TARGET_TYPES = ("zt_w_d", "zt_wo_d")
SQA3D_TYPES = (0, 1, 2, 3, 4, 5)  # what, is, how, can, which, other
CAPTION_METHODS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


# --------------------------------------------------------------------------------------------------
# answers and object ids


def clean_prediction(pred: str) -> str:
    """Upstream's answer preprocessing: if ``len(pred) > 1``, drop one trailing "." and lower-case the
    first character; then ``clean_answer``."""
    if not isinstance(pred, str):
        raise TypeError(f"pred: expected a str, got {type(pred).__name__}")
    if len(pred) > 1:
        if pred[-1] == ".":
            pred = pred[:-1]
        pred = pred[0].lower() + pred[1:]
    return clean_answer(pred)


def answer_match(pred: str, gts: Sequence[str]) -> Tuple[int, int]:
    """Chat-Scene's ``(EM, refined EM)`` of a cleaned prediction against cleaned references, each 0/1.

    Empty ``pred`` -> (0, 0); ``pred in gts`` -> (1, 1); else (0, 1) when, with all whitespace removed,
    ``pred`` is a substring of some reference or one is a substring of it; else (0, 0). Unlike LEO's loop
    (``qa.leo_answer_match``) the exact match is looked for in every reference first.
    """
    if len(pred) == 0:
        return 0, 0
    return exact_or_contained(pred, gts)


def exact_or_contained(pred: str, gts: Sequence[str]) -> Tuple[int, int]:
    """(1, 1) when ``pred`` is one of ``gts``; else (0, 1) when, with all whitespace removed, ``pred`` and some
    reference contain one another; else (0, 0). (The shared core of Chat-Scene's and LLaVA-3D's matchers.)"""
    if pred in gts:
        return 1, 1
    squeezed = "".join(pred.split())
    for gt in gts:
        gt_squeezed = "".join(gt.split())
        if squeezed in gt_squeezed or gt_squeezed in squeezed:
            return 0, 1
    return 0, 0


def object_ids(text: str, num_objects: int) -> List[int]:
    """Ids of every ``<OBJxxx>`` in ``text`` that is below ``num_objects``, in order, repeats kept."""
    ids = (int(m.group(0)[4:7]) for m in OBJECT_ID.finditer(text))
    return [i for i in ids if i < num_objects]


def first_object_id(text: str, num_objects: int) -> int:
    """The first valid ``<OBJxxx>`` id of ``text`` (see ``object_ids``), else 0 (upstream's default)."""
    ids = object_ids(text, num_objects)
    return ids[0] if ids else 0


def sort_predictions(preds: Predictions) -> List[Mapping[str, Any]]:
    """``preds`` in the order ``evaluate`` scores them: by ``f"{scene_id}_{gt_id:03}_{qid}"``.

    Order matters only for the last bits of averaged caption metrics and, in Scan2Cap, for which of two
    predictions with the same ``scene|gt_id`` counts (the last)."""
    return sorted(preds, key=lambda x: f"{x['scene_id']}_{x['gt_id']:03}_{x['qid']}")


# --------------------------------------------------------------------------------------------------
# inputs


def load_attributes(source: Union[PathLike, Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    """A ``scannet_*_attributes.pt`` mapping ``scene -> {'objects', 'locs' (n, 6)}``: ``source`` itself if
    it is a mapping, else ``torch.load(source, map_location="cpu", weights_only=True)``."""
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path to a .pt file or a mapping scene -> {{'locs': ...}}, "
                        f"got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file {path}")
    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends; message names the file
        raise ValueError(
            f"{name}: {path} did not load with torch.load(weights_only=True) ({exc}); if you trust it, load it "
            f"with weights_only=False and pass the mapping"
        ) from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}: expected {path} to hold a dict scene -> {{'locs': ...}}, got {type(data).__name__}")
    return data


def load_json(source: Union[PathLike, Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    """``source`` itself if it is a mapping, else the JSON object in the file ``source``."""
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path to a .json file or a mapping, got {type(source).__name__}")
    with open(source, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected {source} to hold a JSON object, got {type(data).__name__}")
    return data


class _SceneBoxes:
    """Per-scene ``locs`` of one attributes mapping as float64 (n, 6), converted once."""

    def __init__(self, attributes: Mapping[str, Any], name: str):
        self.attributes, self.name, self._cache = attributes, name, {}

    def __call__(self, scene_id: str) -> np.ndarray:
        if scene_id not in self._cache:
            entry = self.attributes.get(scene_id)
            if not isinstance(entry, Mapping) or "locs" not in entry:
                raise ValueError(f"{self.name}: no entry {{'locs': (n, 6)}} for scene {scene_id!r}")
            self._cache[scene_id] = as_boxes(entry["locs"], f"{self.name}[{scene_id!r}]['locs']")
        return self._cache[scene_id]

    def box(self, scene_id: str, index: int, what: str) -> np.ndarray:
        locs = self(scene_id)
        if not 0 <= index < len(locs):
            raise ValueError(f"{what}: {index} is not an object of scene {scene_id!r} in {self.name} "
                             f"(expected 0 <= id < {len(locs)})")
        return locs[index]


def _check_predictions(preds: Predictions, keys: Iterable[str]) -> List[Mapping[str, Any]]:
    if isinstance(preds, (str, bytes, Mapping)) or not isinstance(preds, Sequence):
        raise TypeError(f"preds: expected a list of prediction dicts, got {type(preds).__name__}")
    if len(preds) == 0:
        raise ValueError("preds: expected at least one prediction, got an empty list")
    keys = tuple(keys)
    for i, p in enumerate(preds):
        if not isinstance(p, Mapping):
            raise TypeError(f"preds[{i}]: expected a dict, got {type(p).__name__}")
        missing = [k for k in keys if k not in p]
        if missing:
            raise ValueError(f"preds[{i}]: missing {missing} (expected the keys of tasks/train.py::evaluate: "
                             f"scene_id, gt_id, pred_id, qid, prompt, pred, ref_captions, type_info)")
        if "pred" in keys and not isinstance(p["pred"], str):
            raise TypeError(f"preds[{i}]['pred']: expected a str, got {type(p['pred']).__name__}")
        if "scene_id" in keys and not isinstance(p["scene_id"], str):
            raise TypeError(f"preds[{i}]['scene_id']: expected a str, got {type(p['scene_id']).__name__}")
    return list(preds)


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected an int, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what}: expected an int, got {type(value).__name__} {value!r}") from None


def _captions(value: Any, what: str, allow_empty: bool) -> List[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(c, str) for c in value):
        raise TypeError(f"{what}: expected a list of str, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{what}: expected at least one reference caption, got an empty list")
    return list(value)


# --------------------------------------------------------------------------------------------------
# caption metrics


class CaptionScorers:
    """``tasks/train.py``'s ``tokenizer``/``scorers``: pycocoevalcap ``PTBTokenizer``, ``Bleu(4)``,
    ``Meteor()``, ``Rouge()``, ``Cider()``. Needs ``java``. The METEOR JVM starts on first use and stays
    until ``close()`` (or the end of a ``with`` block), so one instance can serve several benchmarks."""

    def __init__(self) -> None:
        _require_java()
        try:
            from pycocoevalcap.bleu.bleu import Bleu
            from pycocoevalcap.cider.cider import Cider
            from pycocoevalcap.rouge.rouge import Rouge
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap==1.2") from exc
        self._bleu, self._rouge, self._cider = Bleu(4), Rouge(), Cider()
        self._meteor = None

    def tokenize(self, captions: Mapping[str, Sequence[str]]) -> Dict[str, List[str]]:
        """id -> captions, PTB-tokenised (lower-cased, punctuation tokens removed), order kept."""
        return _tokenize({k: list(v) for k, v in captions.items()}, True)

    def score(self, gts: Mapping[str, List[str]], res: Mapping[str, List[str]]) -> Dict[str, float]:
        """Corpus scores ``{Bleu_1..4, METEOR, ROUGE_L, CIDEr}`` of tokenised ``res`` (one caption per id)
        against tokenised ``gts`` (same ids, same order)."""
        if list(gts) != list(res):
            raise ValueError("res: expected the ids of gts in the same order")
        out: Dict[str, float] = {}
        bleu, _ = self._bleu.compute_score(gts, res, verbose=0)
        for k, value in enumerate(bleu, start=1):
            out[f"Bleu_{k}"] = float(value)
        out["METEOR"] = float(self.meteor.compute_score(gts, res)[0])
        out["ROUGE_L"] = float(self._rouge.compute_score(gts, res)[0])
        out["CIDEr"] = float(self._cider.compute_score(gts, res)[0])
        return out

    @property
    def meteor(self):
        """The pycocoevalcap ``Meteor`` scorer (its JVM starts on first access, ~5-10 s)."""
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return self._meteor

    def close(self) -> None:
        """Stop the METEOR JVM (if started)."""
        meteor, self._meteor = self._meteor, None
        if meteor is not None and meteor.meteor_p.poll() is None:
            with meteor.lock:
                meteor.meteor_p.stdin.close()
                meteor.meteor_p.kill()
                meteor.meteor_p.wait()

    def __enter__(self) -> "CaptionScorers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _caption_scores(gts: Dict[str, List[str]], res_sets: Sequence[Dict[str, List[str]]],
                    scorers: Optional[CaptionScorers]) -> List[Dict[str, float]]:
    own = scorers is None
    scorers = CaptionScorers() if own else scorers
    try:
        res_tok = [scorers.tokenize(res) for res in res_sets]
        gts_tok = scorers.tokenize(gts)
        return [scorers.score(gts_tok, res) for res in res_tok]
    finally:
        if own:
            scorers.close()


# --------------------------------------------------------------------------------------------------
# grounding


def score_scanrefer(
    preds: Predictions,
    instance_attributes: Union[PathLike, Mapping[str, Any]],
    scannet_attributes: Union[PathLike, Mapping[str, Any]],
    unique_multiple_lookup: Union[PathLike, Mapping[str, Mapping[str, int]]],
) -> Dict[str, float]:
    """``calc_scanrefer_score``: Acc@0.25/0.50 overall, Unique and Multiple.

    instance_attributes: Mask3D boxes (``INSTANCE_ATTRIBUTES``; path or loaded mapping).
    scannet_attributes: GT boxes (``SCANNET_ATTRIBUTES``).
    unique_multiple_lookup: ``scene -> {str(object_id): 0 unique | 1 multiple}`` (``UNIQUE_MULTIPLE_LOOKUP``
      or ``build_unique_multiple_lookup``).
    """
    preds = _check_predictions(preds, ("scene_id", "gt_id", "pred"))
    inst = _SceneBoxes(load_attributes(instance_attributes, "instance_attributes"), "instance_attributes")
    gt = _SceneBoxes(load_attributes(scannet_attributes, "scannet_attributes"), "scannet_attributes")
    lookup = load_json(unique_multiple_lookup, "unique_multiple_lookup")
    hits = {"all": [0, 0, 0], "Unique": [0, 0, 0], "Multiple": [0, 0, 0]}  # n, @0.25, @0.50
    for i, p in enumerate(preds):
        scene, gt_id = p["scene_id"], _index(p["gt_id"], f"preds[{i}]['gt_id']")
        try:
            split = lookup[scene][str(gt_id)]
        except (KeyError, TypeError):
            raise ValueError(f"unique_multiple_lookup: no entry [{scene!r}][{str(gt_id)!r}] for preds[{i}]") from None
        split = "Unique" if _index(split, f"unique_multiple_lookup[{scene!r}][{str(gt_id)!r}]") == 0 else "Multiple"
        pred_id = first_object_id(p["pred"], len(inst(scene)))
        pred_box = inst.box(scene, pred_id, f"preds[{i}] predicted id")
        iou = box_iou(pred_box, gt.box(scene, gt_id, f"preds[{i}]['gt_id']"))
        for name in ("all", split):
            hits[name][0] += 1
            hits[name][1] += iou >= 0.25
            hits[name][2] += iou >= 0.5
    n = hits["all"][0]
    out = {"[scanrefer] Acc@0.25": float(hits["all"][1]) / n, "[scanrefer] Acc@0.50": float(hits["all"][2]) / n}
    for name in ("Unique", "Multiple"):
        count, at25, at50 = hits[name]
        if count == 0:
            warnings.warn(f"score_scanrefer: no {name} samples in preds; its Acc keys are omitted", stacklevel=2)
            continue
        out[f"[scanrefer] {name} Acc@0.25"] = float(at25) / count
        out[f"[scanrefer] {name} Acc@0.50"] = float(at50) / count
    return out


def score_multi3dref(
    preds: Predictions,
    instance_attributes: Union[PathLike, Mapping[str, Any]],
    scannet_attributes: Union[PathLike, Mapping[str, Any]],
) -> Dict[str, float]:
    """``calc_multi3dref_score``: ``[multi3dref] all F1@0.25/0.50`` and per ``eval_type`` present.

    ``ref_captions`` holds the GT object ids, ``type_info`` the ``eval_type``. The keys follow upstream's
    order: "all", then the types in order of first appearance."""
    from scipy.optimize import linear_sum_assignment

    preds = _check_predictions(preds, ("scene_id", "pred", "ref_captions", "type_info"))
    inst = _SceneBoxes(load_attributes(instance_attributes, "instance_attributes"), "instance_attributes")
    gt = _SceneBoxes(load_attributes(scannet_attributes, "scannet_attributes"), "scannet_attributes")
    f1: Dict[str, Tuple[list, list]] = defaultdict(lambda: ([], []))
    for i, p in enumerate(preds):
        scene, eval_type = p["scene_id"], p["type_info"]
        if eval_type not in MULTI3DREF_TYPES:
            raise ValueError(f"preds[{i}]['type_info']: expected one of {MULTI3DREF_TYPES}, got {eval_type!r}")
        inst_locs = inst(scene)
        gt(scene)
        pred_ids = object_ids(p["pred"], len(inst_locs))
        refs = p["ref_captions"]
        if isinstance(refs, (str, bytes)) or not isinstance(refs, Sequence):
            raise TypeError(f"preds[{i}]['ref_captions']: expected a list of GT object ids, got {refs!r}")
        gt_ids = [_index(g, f"preds[{i}]['ref_captions']") for g in refs]
        if eval_type in ZERO_TARGET_TYPES:
            f25 = f50 = 1 if len(pred_ids) == 0 else 0
        else:
            if not gt_ids:
                raise ValueError(f"preds[{i}]['ref_captions']: expected >= 1 GT id for eval_type {eval_type!r}")
            gt_boxes = np.stack([gt.box(scene, g, f"preds[{i}]['ref_captions']") for g in gt_ids])
            size = max(len(pred_ids), len(gt_ids))
            iou = np.zeros((size, size), dtype=np.float32)  # upstream's float32 matrix (rounds before >=)
            if pred_ids:
                iou[: len(pred_ids), : len(gt_ids)] = box_iou_matrix(inst_locs[pred_ids], gt_boxes)
            rows, cols = linear_sum_assignment(iou * -1)
            matched = iou[rows[: len(pred_ids)], cols[: len(pred_ids)]]
            f25 = 2 * int((matched >= 0.25).sum()) / (len(pred_ids) + len(gt_ids))
            f50 = 2 * int((matched >= 0.5).sum()) / (len(pred_ids) + len(gt_ids))
        for key in ("all", eval_type):
            f1[key][0].append(f25)
            f1[key][1].append(f50)
    out: Dict[str, float] = {}
    for key, (s25, s50) in f1.items():
        out[f"[multi3dref] {key} F1@0.25"] = float(np.mean(s25))
        out[f"[multi3dref] {key} F1@0.50"] = float(np.mean(s50))
    return out


# --------------------------------------------------------------------------------------------------
# captioning and QA


def score_scan2cap(
    preds: Predictions,
    instance_attributes: Union[PathLike, Mapping[str, Any]],
    scannet_attributes: Union[PathLike, Mapping[str, Any]],
    corpus: Union[PathLike, Mapping[str, Sequence[str]]],
    scorers: Optional[CaptionScorers] = None,
) -> Dict[str, float]:
    """``calc_scan2cap_score``: ``[scan2cap] {Bleu_1..4, METEOR, ROUGE_L, CIDEr}@0.25`` then ``@0.50``.

    preds: ``pred_id`` is the annotation's matched Mask3D id (not parsed from ``pred``); a later prediction
      for the same ``scene|gt_id`` replaces an earlier one. corpus: ``SCAN2CAP_CORPUS`` (``"scene|gt_id"`` ->
      ``["sos ... eos", ...]``); every key is scored. scorers: reused if given, else one for this call.
    """
    preds = _check_predictions(preds, ("scene_id", "gt_id", "pred_id", "pred"))
    inst = _SceneBoxes(load_attributes(instance_attributes, "instance_attributes"), "instance_attributes")
    gt = _SceneBoxes(load_attributes(scannet_attributes, "scannet_attributes"), "scannet_attributes")
    corpus = load_json(corpus, "corpus")
    res25: Dict[str, List[str]] = {}
    res50: Dict[str, List[str]] = {}
    for i, p in enumerate(preds):
        scene = p["scene_id"]
        gt_id = _index(p["gt_id"], f"preds[{i}]['gt_id']")
        pred_id = _index(p["pred_id"], f"preds[{i}]['pred_id']")
        key = f"{scene}|{gt_id}"
        if key not in corpus:
            raise ValueError(f"corpus: no captions for {key!r} (preds[{i}]); wrong corpus file or split?")
        iou = box_iou(inst.box(scene, pred_id, f"preds[{i}]['pred_id']"), gt.box(scene, gt_id, f"preds[{i}]['gt_id']"))
        caption = f"sos {p['pred']} eos".replace("\n", " ")
        res25[key] = [caption if iou >= 0.25 else "sos eos"]
        res50[key] = [caption if iou >= 0.5 else "sos eos"]
    for key in corpus:
        if key not in res25:
            res25[key] = res50[key] = ["sos eos"]
    gts = {key: _captions(corpus[key], f"corpus[{key!r}]", allow_empty=False) for key in res25}
    at25, at50 = _caption_scores(gts, [res25, res50], scorers)
    out = {f"[scan2cap] {m}@0.25": v for m, v in at25.items()}
    out.update({f"[scan2cap] {m}@0.50": v for m, v in at50.items()})
    return out


def _qa_items(preds: List[Mapping[str, Any]], clean_refs: bool, need_refs: bool):
    for i, p in enumerate(preds):
        item_id = f"{p['scene_id']}_{p['gt_id']}_{p['qid']}_{i}"
        refs = _captions(p["ref_captions"], f"preds[{i}]['ref_captions']", allow_empty=not need_refs)
        if clean_refs:
            refs = [clean_answer(r) for r in refs]
        yield i, item_id, clean_prediction(p["pred"]), refs


def _qa_caption_metrics(prefix: str, res: Dict[str, List[str]], gts: Dict[str, List[str]],
                        scorers: Optional[CaptionScorers]) -> Dict[str, float]:
    (scores,) = _caption_scores(gts, [res], scorers)
    return {f"[{prefix}] {m}": v for m, v in scores.items()}


def score_scanqa(
    preds: Predictions,
    scorers: Optional[CaptionScorers] = None,
    compat_ref_overwrite: bool = False,
    caption_metrics: bool = True,
) -> Dict[str, float]:
    """``calc_scanqa_score``: ``[scanqa] EM1``, ``EM1_refined``, then ``Bleu_1..4, METEOR, ROUGE_L, CIDEr``.

    compat_ref_overwrite: False cleans the references (``clean_answer``) for EM and the caption metrics;
      True uses them raw, as upstream does through its overwrite bug. caption_metrics: False returns only
      the two EM keys (no Java needed). scorers: reused if given, else one for this call.
    """
    if not isinstance(compat_ref_overwrite, bool) or not isinstance(caption_metrics, bool):
        raise TypeError("compat_ref_overwrite, caption_metrics: expected bools")
    preds = _check_predictions(preds, ("scene_id", "gt_id", "qid", "pred", "ref_captions"))
    em = refined = 0
    res: Dict[str, List[str]] = {}
    gts: Dict[str, List[str]] = {}
    for _, item_id, pred, refs in _qa_items(preds, not compat_ref_overwrite, caption_metrics):
        a, b = answer_match(pred, refs)
        em, refined = em + a, refined + b
        res[item_id] = [pred]
        gts[item_id] = [r.replace("\n", " ").strip() for r in refs]
    out = {"[scanqa] EM1": em / len(preds), "[scanqa] EM1_refined": refined / len(preds)}
    if caption_metrics:
        out.update(_qa_caption_metrics("scanqa", res, gts, scorers))
    return out


def score_sqa3d(
    preds: Predictions,
    scorers: Optional[CaptionScorers] = None,
    caption_metrics: bool = True,
) -> Dict[str, float]:
    """``calc_sqa3d_score``: ``[sqa3d] EM1``, ``EM1_refined``, ``EM_type{t}``/``EM_refined_type{t}`` for
    t = 0..5 (what, is, how, can, which, other; ``type_info`` = ``sqa_type``), then the caption metrics.

    References are cleaned (upstream does so here). Per-type rates divide by ``count + 1e-10`` accumulated as
    upstream does (a type without samples gives 0.0). caption_metrics: False -> EM keys only (no Java).
    """
    if not isinstance(caption_metrics, bool):
        raise TypeError(f"caption_metrics: expected a bool, got {type(caption_metrics).__name__}")
    preds = _check_predictions(preds, ("scene_id", "gt_id", "qid", "pred", "ref_captions", "type_info"))
    em = refined = 0
    em_type = {t: 0 for t in SQA3D_TYPES}
    refined_type = {t: 0 for t in SQA3D_TYPES}
    count = {t: 1e-10 for t in SQA3D_TYPES}
    res: Dict[str, List[str]] = {}
    gts: Dict[str, List[str]] = {}
    for i, item_id, pred, refs in _qa_items(preds, True, caption_metrics):
        try:
            sqa_type = int(preds[i]["type_info"])
        except (TypeError, ValueError):
            sqa_type = None
        if sqa_type not in SQA3D_TYPES or isinstance(preds[i]["type_info"], (bool, float)):
            raise ValueError(f"preds[{i}]['type_info']: expected an sqa_type 0..5, got {preds[i]['type_info']!r}")
        a, b = answer_match(pred, refs)
        em, refined = em + a, refined + b
        em_type[sqa_type] += a
        refined_type[sqa_type] += b
        count[sqa_type] += 1
        res[item_id] = [pred]
        gts[item_id] = [r.replace("\n", " ").strip() for r in refs]
    out = {"[sqa3d] EM1": em / len(preds), "[sqa3d] EM1_refined": refined / len(preds)}
    for t in SQA3D_TYPES:
        out[f"[sqa3d] EM_type{t}"] = em_type[t] / count[t]
        out[f"[sqa3d] EM_refined_type{t}"] = refined_type[t] / count[t]
    if caption_metrics:
        out.update(_qa_caption_metrics("sqa3d", res, gts, scorers))
    return out


# --------------------------------------------------------------------------------------------------
# ScanRefer unique/multiple lookup

#: ScanRefer's 18 classes (``type2class``); NYU40 names outside them map to "others" (17).
SCANREFER_CLASSES = ("cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
                     "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
                     "bathtub", "others")


def build_unique_multiple_lookup(
    scanrefer: Union[PathLike, Sequence[Mapping[str, Any]]], labels_tsv: PathLike
) -> Dict[str, Dict[str, int]]:
    """``scanrefer_get_unique_multiple_lookup`` when the lookup file is missing: ``scene -> {object_id: 0|1}``.

    scanrefer: ``ScanRefer_filtered.json`` (path or its list of ``{scene_id, object_id, object_name}``).
    labels_tsv: ``scannetv2-labels.combined.tsv`` (raw_category in column 1, nyu40class in column 7).
    An object is unique (0) when it is the only object of its class among the scene's *annotated* objects
    (ScanRefer's definition), else multiple (1); names missing from the TSV count as "others".
    """
    if isinstance(scanrefer, (str, os.PathLike)):
        with open(scanrefer, encoding="utf-8") as f:
            scanrefer = json.load(f)
    if isinstance(scanrefer, (str, bytes, Mapping)) or not isinstance(scanrefer, Sequence):
        raise TypeError(f"scanrefer: expected a path or a list of annotation dicts, got {type(scanrefer).__name__}")
    others = SCANREFER_CLASSES.index("others")
    raw2label: Dict[str, int] = {}
    with open(labels_tsv, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        next(rows, None)
        for n, row in enumerate(rows, start=2):
            if len(row) < 8:
                raise ValueError(f"labels_tsv: line {n} has {len(row)} columns, expected >= 8 (nyu40class is column 7)")
            name = row[7]
            raw2label[row[1]] = SCANREFER_CLASSES.index(name) if name in SCANREFER_CLASSES else others

    def label(anno: Mapping[str, Any]) -> int:
        return raw2label.get(" ".join(anno["object_name"].split("_")), others)

    scene_labels: Dict[str, Dict[Any, int]] = defaultdict(dict)  # first annotation of an object decides
    for anno in scanrefer:
        scene_labels[anno["scene_id"]].setdefault(anno["object_id"], label(anno))
    counts = {scene: np.array(list(objs.values())) for scene, objs in scene_labels.items()}
    lookup: Dict[str, Dict[str, int]] = defaultdict(dict)
    for anno in scanrefer:
        scene = anno["scene_id"]
        lookup[scene][anno["object_id"]] = 0 if int((counts[scene] == label(anno)).sum()) == 1 else 1
    return dict(lookup)


__all__ = [
    "CAPTION_METHODS",
    "CaptionScorers",
    "INSTANCE_ATTRIBUTES",
    "MULTI3DREF_TYPES",
    "OBJECT_ID",
    "SCAN2CAP_CORPUS",
    "SCANNET_ATTRIBUTES",
    "SCANREFER_CLASSES",
    "SQA3D_TYPES",
    "UNIQUE_MULTIPLE_LOOKUP",
    "ZERO_TARGET_TYPES",
    "answer_match",
    "exact_or_contained",
    "build_unique_multiple_lookup",
    "clean_prediction",
    "first_object_id",
    "load_attributes",
    "load_json",
    "object_ids",
    "score_multi3dref",
    "score_scan2cap",
    "score_scanqa",
    "score_sqa3d",
    "score_scanrefer",
    "sort_predictions",
]
