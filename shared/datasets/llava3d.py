"""LLaVA-3D's evaluation data (ZCMax/LLaVA-3D @ 91d979d): question/answer files, scene subsets, prompts, inputs.

Files (upstream ``scripts/eval/*.sh``; HF dataset ``ChaimZhu/LLaVA-3D-Data``, under ``playground/data``):

- ScanQA val: ``annotations/llava-3d-scanqa_val_question.json`` = ``[{question_id, video: "scannet/sceneXXXX_XX",
  text}]``, answers ``annotations/llava3d_scanqa_val_answer.json`` = ``[{question_id, text: [answers]}]``;
- SQA3D test: ``annotations/llava-3d-sqa3d_test_question.json`` (same layout; ``text`` is what the model is
  asked: situation and question), answers ``annotations/llava3d_sqa3d_test_answer.json`` =
  ``[{question_id, text: answer, type: 0..5}]``. The original SQA3D files (``{"questions": [{situation,
  question, question_id, scene_id}]}`` and ``{"annotations": [{question_id, answers: [{answer}]}]}``, what the
  unofficial AdaToken-3D code reads) are read too; their ``text`` is ``situation + " " + question`` (the layout
  of the public converters to LLaVA-3D's format) and ``type`` comes from the first word (``sqa3d_type``);
- Scan2Cap val: ``annotations/llava-3d-scan2cap_val.json`` = ``[{id, video, conversations: [{value: "<video>\\n...
  <boxes>..."}, {value: caption}], target: {boxes: [[x, y, z, dx, dy, dz], ...]}}]``;
- scenes: ``LLaVA-3D-Pretrain/<video>`` (``--video-folder``) with camera data from
  ``annotations/embodiedscan_infos_full.json``, which ``RGBDVideoProcessor`` opens *relative to the working
  directory* as ``./playground/data/annotations/embodiedscan_infos_full.json`` (``load_llava3d(data_root=...)``
  changes into the right folder while the model is built).

Records are plain dicts: ``task``, ``question_id``, ``video``, ``scene_id``, ``text`` (the question exactly as
upstream feeds it), ``question``/``situation`` (when the source holds them apart, else None), ``answers``
(list or None), ``type`` (SQA3D) and, for Scan2Cap, ``answer`` (the GT caption) and ``boxes``; readers given a
``video_folder`` add ``video_path``.

Prompts are built as ``llava/eval/model_{scanqa,sqa3d,scan2cap}.py`` build them: ``"<image>\\n" + text`` (QA) or
``conversations[0].value`` with ``<video>`` -> ``<image>`` and ``<boxes>`` repeated once per target box
(Scan2Cap), in the ``llava_v1`` template of the checkout's ``llava.conversation`` (a transcription of it when
the checkout is not importable). ``compat="adatoken"`` feeds SQA3D's question without the situation, as
``junkerman2004/Adatoken-3D`` ``llava/eval/model_sqa3d.py`` does (``qs = line["question"]``).

``load_llava3d`` / ``build_inputs`` import LLaVA-3D from its checkout (``PYTHONPATH=LLaVA-3D``) when called.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Dict, Iterator, List, Optional, Sequence, Tuple, Union

TASKS = ("scanqa", "sqa3d", "scan2cap")
COMPAT = ("adatoken",)

#: Upstream's file names (``scripts/eval/*.sh``, ``llava/eval/*_evaluator.py``), relative to ``playground/data``.
QUESTION_FILES = {
    "scanqa": "annotations/llava-3d-scanqa_val_question.json",
    "sqa3d": "annotations/llava-3d-sqa3d_test_question.json",
    "scan2cap": "annotations/llava-3d-scan2cap_val.json",
}
ANSWER_FILES = {
    "scanqa": "annotations/llava3d_scanqa_val_answer.json",
    "sqa3d": "annotations/llava3d_sqa3d_test_answer.json",
}
VIDEO_FOLDER = "LLaVA-3D-Pretrain"
EMBODIEDSCAN_INFOS = "annotations/embodiedscan_infos_full.json"

#: Scene lists of the unofficial AdaToken-3D code (junkerman2004/Adatoken-3D @ 8407182):
#: ``dataloader/choose_questions.py`` (``test_scene``: the ScanQA val subset, 19 scenes) and
#: ``dataloader/xieru.py`` (``test_scene``: the scenes merged into embodiedscan_infos_full.json, 22 scenes).
#: The paper says "32 scenarios", undisclosed.
SCENE_SUBSETS: Dict[str, Tuple[str, ...]] = {
    "adatoken_public19": (
        "scene0011_00", "scene0015_00", "scene0019_00", "scene0025_00", "scene0030_00", "scene0046_00",
        "scene0050_00", "scene0064_00", "scene0084_00", "scene0153_00", "scene0169_00", "scene0300_00",
        "scene0406_00", "scene0435_00", "scene0593_00", "scene0616_00", "scene0645_00", "scene0678_00",
        "scene0702_00",
    ),
    "adatoken_public22": (
        "scene0011_00", "scene0015_00", "scene0019_00", "scene0025_00", "scene0030_00", "scene0046_00",
        "scene0050_00", "scene0063_00", "scene0064_00", "scene0077_00", "scene0084_00", "scene0153_00",
        "scene0169_00", "scene0196_00", "scene0300_00", "scene0406_00", "scene0435_00", "scene0593_00",
        "scene0616_00", "scene0645_00", "scene0678_00", "scene0702_00",
    ),
}

#: ``llava.conversation.conv_llava_v1`` (SeparatorStyle.TWO, sep " ", sep2 "</s>"), used only when the
#: checkout's module cannot be imported; tests compare it with the checkout's.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_V1_ROLES = ("USER", "ASSISTANT")

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
BOX_TOKEN = "<boxes>"
IM_START, IM_END = "<im_start>", "<im_end>"

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------------------------------- paths


def resolve_data_root(data_root: PathLike) -> Path:
    """The folder holding ``annotations/`` (upstream's ``playground/data``): ``data_root`` itself, or its
    ``playground/data`` or ``data`` child."""
    root = Path(os.path.expanduser(str(data_root)))
    for cand in (root, root / "playground" / "data", root / "data"):
        if (cand / "annotations").is_dir():
            return cand
    raise FileNotFoundError(f"data_root: no annotations/ folder in {root}, {root / 'playground' / 'data'} or "
                            f"{root / 'data'} (expected LLaVA-3D's playground/data layout)")


def scene_of(video: str) -> str:
    """``"scannet/scene0011_00"`` -> ``"scene0011_00"``."""
    return str(video).rstrip("/").split("/")[-1]


def _load_json(path: PathLike, what: str) -> Any:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such file {p}")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _with_video_path(records: List[Dict[str, Any]], video_folder: Optional[PathLike]) -> List[Dict[str, Any]]:
    if video_folder is not None:
        for r in records:
            r["video_path"] = os.path.join(os.path.expanduser(str(video_folder)), r["video"])
    return records


# ------------------------------------------------------------------------------------------- readers


def _qa_record(task: str, item: Dict[str, Any], where: str) -> Dict[str, Any]:
    """One question of any supported layout -> a record (answers filled in later)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "question_id" not in item:
        raise ValueError(f"{where}: no 'question_id'")
    if "video" in item and "text" in item:  # LLaVA-3D's layout
        video, text = str(item["video"]), item["text"]
        question, situation = item.get("question"), item.get("situation")
    elif "scene_id" in item and "question" in item:  # ScanQA / SQA3D original layout
        video = f"scannet/{item['scene_id']}"
        question, situation = item["question"], item.get("situation")
        text = question if situation is None else f"{situation} {question}"
    else:
        raise ValueError(f"{where}: expected {{question_id, video, text}} (LLaVA-3D) or {{question_id, scene_id, "
                         f"question[, situation]}} (ScanQA/SQA3D), got keys {sorted(item)}")
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected the question text to be a str, got {text!r}")
    answers = item.get("answers")
    if answers is not None:
        answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
    rec = {"task": task, "question_id": item["question_id"], "video": video, "scene_id": scene_of(video),
           "text": text, "question": question, "situation": situation, "answers": answers, "type": item.get("type")}
    if task == "sqa3d" and rec["type"] is None and question is not None:
        from ..metrics.llava3d import sqa3d_type

        rec["type"] = sqa3d_type(question)
    return rec


def _question_items(data: Any, path: PathLike) -> List[Any]:
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        return data["questions"]  # SQA3D original
    if isinstance(data, list):
        return data
    raise ValueError(f"question_file: expected {path} to hold a JSON list of questions or {{'questions': [...]}}")


def load_answers(answer_file: PathLike) -> Dict[str, Dict[str, Any]]:
    """``str(question_id)`` -> ``{"answers": [...], "type": t or None}`` from LLaVA-3D's answer JSON
    (``[{question_id, text, type?}]``) or SQA3D's annotations (``{"annotations": [{question_id, answers}]}``)."""
    data = _load_json(answer_file, "answer_file")
    items = data["annotations"] if isinstance(data, dict) and "annotations" in data else data
    if not isinstance(items, list):
        raise ValueError(f"answer_file: expected {answer_file} to hold a JSON list or {{'annotations': [...]}}")
    out: Dict[str, Dict[str, Any]] = {}
    for i, a in enumerate(items):
        if not isinstance(a, dict) or "question_id" not in a or not ("text" in a or "answers" in a):
            raise ValueError(f"answer_file: entry {i} of {answer_file}: expected {{question_id, text}} or "
                             f"{{question_id, answers}}")
        if "text" in a:
            answers = [a["text"]] if isinstance(a["text"], str) else list(a["text"])
        else:
            answers = [x["answer"] if isinstance(x, dict) else x for x in a["answers"]]
        out[str(a["question_id"])] = {"answers": answers, "type": a.get("type")}
    return out


def load_qa(task: str, question_file: PathLike, answer_file: Optional[PathLike] = None,
            video_folder: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """ScanQA or SQA3D records in file order; answers (and SQA3D ``type``) from ``answer_file`` when given."""
    if task not in ("scanqa", "sqa3d"):
        raise ValueError(f"task: expected 'scanqa' or 'sqa3d', got {task!r}")
    items = _question_items(_load_json(question_file, "question_file"), question_file)
    recs = [_qa_record(task, it, f"question_file {question_file} entry {i}") for i, it in enumerate(items)]
    if answer_file is not None:
        answers = load_answers(answer_file)
        missing = [r["question_id"] for r in recs if str(r["question_id"]) not in answers]
        if missing:
            raise ValueError(f"answer_file: {answer_file} has no answer for {len(missing)} questions, e.g. {missing[:5]}")
        for r in recs:
            a = answers[str(r["question_id"])]
            r["answers"] = a["answers"]
            if a["type"] is not None:
                r["type"] = int(a["type"])
    if task == "sqa3d" and answer_file is not None:
        bad = [r["question_id"] for r in recs if r["type"] not in (0, 1, 2, 3, 4, 5)]
        if bad:
            raise ValueError(f"answer_file: SQA3D needs a type 0..5 per question; none for {bad[:5]}")
    return _with_video_path(recs, video_folder)


def load_scan2cap(question_file: PathLike, video_folder: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """Scan2Cap records: ``question_id`` = ``id``, ``text`` = ``conversations[0].value``, ``answer`` =
    ``conversations[1].value``, ``boxes`` = ``target.boxes`` (None without a target)."""
    data = _load_json(question_file, "question_file")
    if not isinstance(data, list):
        raise ValueError(f"question_file: expected {question_file} to hold a JSON list")
    recs = []
    for i, it in enumerate(data):
        try:
            qid, video = it["id"], str(it["video"])
            text, answer = it["conversations"][0]["value"], it["conversations"][1]["value"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"question_file {question_file} entry {i}: expected {{id, video, conversations: "
                             f"[{{value}}, {{value}}], target?}}") from None
        boxes = None
        if "target" in it:
            boxes = it["target"]["boxes"]
            if not boxes or not all(len(b) >= 3 for b in boxes):
                raise ValueError(f"question_file {question_file} entry {i}: target.boxes must be non-empty "
                                 f"[[x, y, z, ...], ...], got {boxes!r}")
        recs.append({"task": "scan2cap", "question_id": qid, "video": video, "scene_id": scene_of(video),
                     "text": text, "answer": answer, "boxes": boxes, "question": None, "situation": None,
                     "answers": [answer], "type": None})
    return _with_video_path(recs, video_folder)


def load_task(task: str, data_root: PathLike, question_file: Optional[PathLike] = None,
              answer_file: Optional[PathLike] = None, video_folder: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """The records of ``task`` with upstream's file names under ``data_root`` (``resolve_data_root``);
    explicit files and folders override them."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    root = resolve_data_root(data_root)
    q = question_file if question_file is not None else root / QUESTION_FILES[task]
    v = video_folder if video_folder is not None else root / VIDEO_FOLDER
    if task == "scan2cap":
        return load_scan2cap(q, v)
    a = answer_file if answer_file is not None else root / ANSWER_FILES[task]
    return load_qa(task, q, a, v)


def filter_scenes(records: Sequence[Dict[str, Any]], subset: str) -> List[Dict[str, Any]]:
    """``subset``: ``"full"`` (all) or a ``SCENE_SUBSETS`` name; keeps the records of those scenes, in order."""
    if subset == "full":
        return list(records)
    if subset not in SCENE_SUBSETS:
        raise ValueError(f"subset: expected 'full' or one of {sorted(SCENE_SUBSETS)}, got {subset!r}")
    keep = set(SCENE_SUBSETS[subset])
    return [r for r in records if r["scene_id"] in keep]


# ------------------------------------------------------------------------------------------- calibration


def _task_of_file(path: PathLike, data: Any) -> str:
    items = _question_items(data, path)
    if isinstance(data, dict) or any(isinstance(it, dict) and "situation" in it for it in items[:1]):
        return "sqa3d"
    return "sqa3d" if "sqa" in Path(str(path)).name.lower() else "scanqa"


def calibration_records(question_files: Sequence[str], k: int = 64, seed: int = 0,
                        exclude_scenes: Collection[str] = ()) -> List[dict]:
    """A deterministic sample of ``k`` question records for AdaToken-3D's offline calibration.

    question_files: train-split question files, e.g. ScanQA's ``ScanQA_v1.0_train.json`` (list of
      ``{question_id, scene_id, question, answers}``), SQA3D's ``v1_balanced_questions_train_scannetv2.json``
      (``{"questions": [...]}``) or files in LLaVA-3D's layout (``{question_id, video, text}``; SQA3D when the
      file name contains "sqa"). The task of each record is ``"sqa3d"`` for SQA3D sources, else ``"scanqa"``.
    exclude_scenes: scenes to keep out (e.g. the evaluation split's), as ``scene0011_00`` or
      ``scannet/scene0011_00``.
    Returns ``k`` records (``build_inputs``-ready, see the module doc) drawn without replacement by
    ``random.Random(seed)`` from all questions of the files (in the order given) whose scene is not excluded,
    in file order. Raises ``ValueError`` when fewer than ``k`` remain.
    """
    if isinstance(question_files, (str, bytes)) or not question_files:
        raise TypeError("question_files: expected a non-empty list of paths")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    excluded = {scene_of(s) for s in exclude_scenes}
    pool: List[Dict[str, Any]] = []
    for path in question_files:
        data = _load_json(path, "question_files")
        task = _task_of_file(path, data)
        for i, it in enumerate(_question_items(data, path)):
            rec = _qa_record(task, it, f"question_files {path} entry {i}")
            if rec["scene_id"] not in excluded:
                rec["source"] = str(path)
                pool.append(rec)
    if len(pool) < k:
        raise ValueError(f"k: {k} records requested, only {len(pool)} questions outside exclude_scenes in "
                         f"{list(question_files)}")
    picked = sorted(random.Random(seed).sample(range(len(pool)), k))
    return [pool[i] for i in picked]


# ------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptParts:
    """What an upstream eval script derives from a record before tokenising.

    prompt: the full ``llava_v1`` prompt. cur_prompt: the text upstream passes as ``text=`` to
    ``process_videos`` and (Scan2Cap: from its 8th character) records as ``"prompt"``. clicks: the Scan2Cap
    click per target box (box centre rounded to 3 dp), else empty. special: True when upstream tokenises with
    ``tokenizer_special_token`` (``<image>`` and ``<boxes>``), False for ``tokenizer_image_token``.
    """

    prompt: str
    cur_prompt: str
    clicks: List[List[float]]
    special: bool

    @property
    def recorded_prompt(self) -> str:
        return self.cur_prompt[8:] if self.special else self.cur_prompt


def _conv_templates() -> Optional[Dict[str, Any]]:
    try:
        from llava.conversation import conv_templates  # the checkout's (imports the llava package)
    except Exception:  # noqa: BLE001 - no checkout, or its model imports fail here: use the transcription
        return None
    return conv_templates


def apply_template(message: str, conv_mode: str = "llava_v1") -> str:
    """``conv_templates[conv_mode]`` with one user ``message`` and an empty assistant turn, ``get_prompt()``.

    Uses the checkout's ``llava.conversation`` when importable; otherwise only ``llava_v1`` is available
    (transcribed: ``system + " " + "USER: " + message + " " + "ASSISTANT:"``)."""
    templates = _conv_templates()
    if templates is not None:
        if conv_mode not in templates:
            raise ValueError(f"conv_mode: {conv_mode!r} is not in llava.conversation.conv_templates")
        conv = templates[conv_mode].copy()
        conv.append_message(conv.roles[0], message)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()
    if conv_mode != "llava_v1":
        raise ValueError(f"conv_mode: {conv_mode!r} needs the LLaVA-3D checkout (llava.conversation); only "
                         "'llava_v1' is available without it")
    return f"{LLAVA_V1_SYSTEM} {LLAVA_V1_ROLES[0]}: {message} {LLAVA_V1_ROLES[1]}:"


def question_text(record: Dict[str, Any], task: str, compat: Optional[str] = None) -> str:
    """The question as the eval script reads it: ``record["text"]``; SQA3D under ``compat="adatoken"``: the
    question without the situation (needs a source that holds them apart: the original SQA3D files, or a
    LLaVA-3D-layout file with ``question``)."""
    if compat is not None and compat not in COMPAT:
        raise ValueError(f"compat: expected None or one of {COMPAT}, got {compat!r}")
    if compat == "adatoken" and task == "sqa3d":
        if record.get("question") is None:
            raise ValueError(
                f"compat: 'adatoken' feeds SQA3D's question without its situation, but record "
                f"{record.get('question_id')!r} has only the joined text; read the original SQA3D question file "
                "(v1_balanced_questions_test_scannetv2.json, as the AdaToken-3D code does) instead")
        return str(record["question"])
    return str(record["text"])


def build_prompt(record: Dict[str, Any], task: str, compat: Optional[str] = None, conv_mode: str = "llava_v1",
                 mm_use_im_start_end: bool = False) -> PromptParts:
    """The prompt of ``llava/eval/model_{task}.py`` for ``record`` (see ``PromptParts``)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if task == "scan2cap":
        cur = str(record["text"])
        qs = cur.replace(VIDEO_TOKEN, IMAGE_TOKEN)
        clicks: List[List[float]] = []
        boxes = record.get("boxes")
        if boxes is not None:
            clicks = [[round(float(c), 3) for c in box[:3]] for box in boxes]
            objs = ("<boxes>, " * len(boxes)).rstrip(", ")
            qs = qs.replace(BOX_TOKEN, objs)
        return PromptParts(apply_template(qs, conv_mode), cur, clicks, True)
    cur = question_text(record, task, compat)
    head = IM_START + IMAGE_TOKEN + IM_END if mm_use_im_start_end else IMAGE_TOKEN
    return PromptParts(apply_template(head + "\n" + cur, conv_mode), cur, [], False)


# ------------------------------------------------------------------------------------------- model side


@contextlib.contextmanager
def _infos_cwd(data_root: Optional[PathLike]) -> Iterator[None]:
    """Work in the folder whose ``./playground/data/annotations/embodiedscan_infos_full.json`` is
    ``data_root``'s while LLaVA-3D builds its video processor (it opens that CWD-relative path)."""
    if data_root is None:
        yield
        return
    data = resolve_data_root(data_root)
    infos = data / EMBODIEDSCAN_INFOS
    if not infos.is_file():
        raise FileNotFoundError(f"data_root: {infos} is missing (LLaVA-3D's video processor reads it)")
    if data.name != "data" or data.parent.name != "playground":
        raise ValueError(f"data_root: LLaVA-3D opens ./playground/data/{EMBODIEDSCAN_INFOS} relative to the working "
                         f"directory; {data} is not a playground/data folder")
    old = os.getcwd()
    os.chdir(data.parent.parent)
    try:
        yield
    finally:
        os.chdir(old)


def load_llava3d(model_path: str, model_base: Optional[str] = None, device: str = "cuda", dtype: Any = None,
                 data_root: Optional[PathLike] = None) -> Tuple[Any, Any, Dict[str, Any]]:
    """``llava.model.builder.load_pretrained_model`` as the eval scripts call it -> ``(tokenizer, model,
    processor)`` (``processor["video"]``: the ``RGBDVideoProcessor``).

    dtype: torch dtype (default bfloat16, upstream's). device: ``"cuda"`` (upstream: ``device_map="auto"``) or a
    device string (``{"": device}``). data_root: where ``playground/data`` is (see ``_infos_cwd``); None = the
    working directory, as upstream. The model folder name must contain "llava" (upstream picks its LLaVA
    branch by name)."""
    import torch
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    model_path = os.path.expanduser(model_path)
    name = get_model_name_from_path(model_path)
    if "llava" not in name.lower():
        raise ValueError(f"model_path: LLaVA-3D's loader needs 'llava' in the folder name, got {name!r}")
    with _infos_cwd(data_root):
        tokenizer, model, processor, _ = load_pretrained_model(
            model_path, model_base, name, torch_dtype=torch.bfloat16 if dtype is None else dtype, device=device)
    model.eval()
    return tokenizer, model, processor


def build_inputs(record: Dict[str, Any], task: str, tokenizer: Any, model: Any, processor: Any,
                 compat: Optional[str] = None, video_folder: Optional[PathLike] = None) -> Dict[str, Any]:
    """The model inputs of one record, built as ``llava/eval/model_{task}.py`` builds them.

    Returns ``{input_ids (1, L), images (1, V, 3, H, W), depths (1, V, H, W), poses (1, V, 4, 4),
    intrinsics (1, 4, 4) or (1, V, 4, 4), clicks, image_sizes: None}`` on the model's device, the scene tensors
    and clicks in the model's dtype (upstream: bfloat16, the loader's default). ``clicks`` is None for QA (as
    upstream passes none) and the (n, 3) click tensor for Scan2Cap. ``model(**kw)`` runs the prefill;
    ``model.generate`` takes the ids as its first argument ``inputs`` (``generate_inputs(kw)``).
    The scene is ``record["video_path"]``, else ``video_folder/record["video"]``.
    """
    import torch
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_videos, tokenizer_image_token, tokenizer_special_token

    if "video_path" in record:
        video_path = record["video_path"]
    elif video_folder is not None:
        video_path = os.path.join(os.path.expanduser(str(video_folder)), record["video"])
    else:
        raise ValueError(f"record: {record.get('question_id')!r} has no 'video_path'; pass video_folder")
    parts = build_prompt(record, task, compat, mm_use_im_start_end=bool(getattr(model.config, "mm_use_im_start_end",
                                                                                False)))
    device, dtype = model.device, model.dtype
    if parts.special:
        ids = tokenizer_special_token(parts.prompt, tokenizer, return_tensors="pt")
    else:
        ids = tokenizer_image_token(parts.prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    videos = process_videos(video_path, processor["video"], mode="random", device=device, text=parts.cur_prompt)
    kw: Dict[str, Any] = {
        "input_ids": ids.unsqueeze(0).to(device),
        "images": videos["images"].to(device, dtype=dtype),
        "depths": videos["depths"].to(device, dtype=dtype),
        "poses": videos["poses"].to(device, dtype=dtype),
        "intrinsics": videos["intrinsics"].to(device, dtype=dtype),
        "clicks": None,
        "image_sizes": None,
    }
    if task == "scan2cap":
        clicks = torch.tensor(parts.clicks) if parts.clicks else torch.zeros((0, 3))
        kw["clicks"] = clicks.to(device, dtype=dtype)
    return kw


def generate_inputs(kw: Dict[str, Any]) -> Dict[str, Any]:
    """``build_inputs``' kwargs for ``LlavaLlamaForCausalLM.generate``, whose ids argument is ``inputs``."""
    out = dict(kw)
    out["inputs"] = out.pop("input_ids")
    return out


def decoding_kwargs(temperature: float = 0.0, top_p: Optional[float] = None, num_beams: int = 1,
                    max_new_tokens: int = 512) -> Dict[str, Any]:
    """The eval scripts' ``generate`` settings: ``do_sample = temperature > 0`` (upstream default 0.2, i.e.
    sampling; 0 = greedy), ``top_p``, ``num_beams`` 1, ``max_new_tokens`` 512, ``use_cache=True``."""
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    return {"do_sample": temperature > 0, "temperature": temperature, "top_p": top_p, "num_beams": num_beams,
            "max_new_tokens": max_new_tokens, "use_cache": True}


__all__ = [
    "ANSWER_FILES",
    "COMPAT",
    "EMBODIEDSCAN_INFOS",
    "LLAVA_V1_ROLES",
    "LLAVA_V1_SYSTEM",
    "PromptParts",
    "QUESTION_FILES",
    "SCENE_SUBSETS",
    "TASKS",
    "VIDEO_FOLDER",
    "apply_template",
    "build_inputs",
    "build_prompt",
    "calibration_records",
    "decoding_kwargs",
    "filter_scenes",
    "generate_inputs",
    "load_answers",
    "load_llava3d",
    "load_qa",
    "load_scan2cap",
    "load_task",
    "question_text",
    "resolve_data_root",
    "scene_of",
]
