"""Evaluation metrics of the hosts' benchmarks.

- ``qa``: ScanQA's official scorer (EM@1, BLEU-1..4, METEOR, ROUGE-L, CIDEr via pycocoevalcap), LEO's
  cleaned/refined EM, SQuAD-style EM and token F1;
- ``openeqa``: OpenEQA LLM-Match (official prompts and parsing, OpenAI-compatible or local judges,
  cached), plus offline EM/F1 proxies;
- ``segmentation``: LISA's gIoU/cIoU with a resumable, mergeable meter;
- ``chat_scene``: Chat-Scene's ``utils/eval.py`` benchmarks (ScanRefer Acc, Multi3dRefer F1, Scan2Cap,
  ScanQA, SQA3D), on ``boxes3d``'s axis-aligned 3D IoU.

Optional dependencies are imported when used: pycocoevalcap (+ a Java runtime for the official ScanQA
tokenizer and METEOR) and transformers (``HFJudge``).
"""
from __future__ import annotations

from . import boxes3d, chat_scene
from .boxes3d import box_iou, box_iou_matrix
from .chat_scene import (
    CaptionScorers,
    score_multi3dref,
    score_scan2cap,
    score_scanqa,
    score_scanrefer,
    score_sqa3d,
)
from .openeqa import (
    HFJudge,
    Judge,
    OpenAIJudge,
    build_prompt,
    cut_after_last_period,
    join_openeqa,
    llm_match,
    load_prompt,
    offline_scores,
    parse_score,
    score_to_percent,
)
from .qa import (
    clean_answer,
    exact_match,
    java_available,
    leo_answer_match,
    normalize_answer,
    ptb_like_tokenize,
    scanqa_scores,
    token_f1,
)
from .segmentation import SegmentationMeter, intersection_union

__all__ = [
    "CaptionScorers",
    "HFJudge",
    "Judge",
    "OpenAIJudge",
    "SegmentationMeter",
    "box_iou",
    "box_iou_matrix",
    "boxes3d",
    "build_prompt",
    "chat_scene",
    "clean_answer",
    "cut_after_last_period",
    "exact_match",
    "intersection_union",
    "java_available",
    "join_openeqa",
    "leo_answer_match",
    "llm_match",
    "load_prompt",
    "normalize_answer",
    "offline_scores",
    "parse_score",
    "ptb_like_tokenize",
    "scanqa_scores",
    "score_multi3dref",
    "score_scan2cap",
    "score_scanqa",
    "score_scanrefer",
    "score_sqa3d",
    "score_to_percent",
    "token_f1",
]
