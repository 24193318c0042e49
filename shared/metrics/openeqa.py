"""OpenEQA LLM-Match, as facebookresearch/open-eqa computes it, with pluggable judges and offline proxies.

Official protocol (open-eqa @ cfa3fce, ``evaluate-predictions.py`` + ``openeqa/evaluation/llm_match.py``):

1. a prediction is cut after its last period when text follows it (``cut_after_last_period``);
2. the judge prompt is ``prompts/mmbench.txt``, or ``prompts/mmbench-extra.txt`` when the question has
   an ``extra_answers`` list; the fields are filled with ``str.format`` (the extra answers appear as
   the Python list repr, ``['a', 'b']``);
3. the judge is GPT-4 (``gpt-4-1106-preview`` in open-eqa at cfa3fce; later upstream versions default
   to ``gpt-4o``) through the chat API with ``seed=1234, temperature=0.2, max_tokens=32``;
4. ``parse_score`` reads a bare integer reply or the integer after "Your mark:";
   a prediction that is ``None`` scores 0 without a query;
5. LLM-Match = mean over questions of ``100·(clip(s, 1, 5) − 1)/4``.

Only GPT-4 as the judge gives numbers comparable with published ones. ``OpenAIJudge`` talks to any
OpenAI-compatible endpoint (OpenAI, Azure-compatible proxies, vLLM/TGI serving a local model) and
``HFJudge`` runs a local transformers chat model; record the judge's ``name`` beside every figure.
``offline_scores`` gives deterministic EM/F1 proxies that are not LLM-Match.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

from .qa import exact_match, token_f1

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
PROMPT_NAMES = ("mmbench", "mmbench-extra")
#: The judge of the OpenEQA paper and of open-eqa's scorer at the pinned commit.
OFFICIAL_JUDGE_MODEL = "gpt-4-1106-preview"
OPENAI_BASE_URL = "https://api.openai.com/v1"
#: Label carried by every result of ``offline_scores``.
PROXY_LABEL = "offline proxy, not LLM-Match"


# --------------------------------------------------------------------------------------------------
# prompt, prediction, score


def load_prompt(name: str) -> str:
    """The judge prompt ``name`` ("mmbench" or "mmbench-extra"), stripped as open-eqa's ``load_prompt`` does."""
    if name not in PROMPT_NAMES:
        raise ValueError(f"name: expected one of {PROMPT_NAMES}, got {name!r}")
    return (PROMPT_DIR / f"{name}.txt").read_text(encoding="utf-8").strip()


def build_prompt(question: str, answer: str, prediction: str, extra_answers: Optional[Sequence[str]] = None) -> str:
    """Fill the LLM-Match prompt for one question.

    ``extra_answers=None`` selects "mmbench"; a list (even an empty one, as upstream) selects
    "mmbench-extra" and is rendered as its Python list repr. ``prediction`` is used as given: apply
    ``cut_after_last_period`` first to follow the official script.
    """
    for name, value in (("question", question), ("answer", answer), ("prediction", prediction)):
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    if extra_answers is None:
        return load_prompt("mmbench").format(question=question, answer=answer, prediction=prediction)
    if isinstance(extra_answers, str) or not all(isinstance(a, str) for a in extra_answers):
        raise TypeError(f"extra_answers: expected None or a list of str, got {extra_answers!r}")
    return load_prompt("mmbench-extra").format(
        question=question, answer=answer, prediction=prediction, extra_answers=list(extra_answers)
    )


def cut_after_last_period(prediction: Optional[str]) -> Optional[str]:
    """Drop everything after the last "." when something follows it (open-eqa's pre-processing).

    "A chair. It is red" → "A chair."; "3.5 m" → "3." (upstream behaviour); "no period" and
    "ends here." are unchanged; ``None`` and "" are returned as they are.
    """
    if prediction is not None and not isinstance(prediction, str):
        raise TypeError(f"prediction: expected a str or None, got {type(prediction).__name__}")
    if not prediction:
        return prediction
    end = prediction.rfind(".")
    if 0 <= end and end + 1 < len(prediction):
        return prediction[: end + 1]
    return prediction


def parse_score(output: str, tag: str = "Your mark:") -> int:
    """The judge's mark, exactly as open-eqa parses it.

    A reply made only of digits is the mark; otherwise the text between ``tag`` and the next newline
    (or the end), stripped, must be an integer. Anything else raises ValueError (as upstream: " 5",
    "5\\n" and "Mark: 5" are rejected). The value is not clipped here; see ``score_to_percent``.
    """
    if not isinstance(output, str):
        raise TypeError(f"output: expected the judge's reply as a str, got {type(output).__name__}")
    if output.isdigit():
        return int(output)
    start = output.find(tag)
    if start == -1:
        raise ValueError(f"output: no bare integer and no {tag!r} in the judge's reply {output!r}")
    end = output.find("\n", start)
    field = output[start:] if end == -1 else output[start:end]
    return int(field.replace(tag, "").strip())


_LENIENT = re.compile(r"(?<![0-9])([1-5])(?![0-9])")


def parse_score_lenient(output: str, tag: str = "Your mark:") -> Tuple[int, bool]:
    """``parse_score``, else the first standalone digit 1–5 in the reply → ``(score, used_fallback)``.

    For local judges that add whitespace or words around the mark. Raises ValueError when neither works.
    """
    try:
        return parse_score(output, tag), False
    except ValueError:
        match = _LENIENT.search(output)
        if match is None:
            raise ValueError(f"output: no mark 1-5 found in the judge's reply {output!r}") from None
        return int(match.group(1)), True


def score_to_percent(scores: Iterable[float]) -> float:
    """LLM-Match in percent: mean over questions of ``100·(clip(s, 1, 5) − 1)/4``."""
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("scores: expected at least one score, got none")
    return sum(100.0 * (min(max(v, 1.0), 5.0) - 1.0) / 4.0 for v in values) / len(values)


# --------------------------------------------------------------------------------------------------
# judges


class Judge(Protocol):
    """Anything callable as ``judge(prompt) -> reply``; an optional ``name`` str identifies it in caches."""

    def __call__(self, prompt: str) -> str:  # pragma: no cover - protocol
        ...


def judge_name(judge: Any) -> str:
    """The ``name`` attribute of a judge, else its qualified name."""
    name = getattr(judge, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(judge, "__qualname__", type(judge).__qualname__)


_RETRY_STATUS = frozenset([408, 409, 429, 500, 502, 503, 504])


class OpenAIJudge:
    """Chat-completions judge over plain HTTP (urllib; no ``openai`` package needed).

    base_url: endpoint root, e.g. ``OPENAI_BASE_URL`` or ``http://localhost:8000/v1`` (vLLM); ``None``
      means ``OPENAI_BASE_URL``. model: e.g. ``OFFICIAL_JUDGE_MODEL``. The API key is read from the
      environment variable ``api_key_env`` at call time; it is required for api.openai.com and sent
      when present elsewhere. Requests carry ``seed``, ``temperature`` and ``max_tokens`` like
      open-eqa; failures with HTTP 408/409/429/5xx or network errors are retried up to
      ``max_attempts`` times with random exponential waits within ``retry_wait`` seconds (upstream:
      6 attempts, 1–60 s); other HTTP errors raise at once with the server's message.
    """

    def __init__(
        self,
        base_url: Optional[str],
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        seed: Optional[int] = 1234,
        temperature: float = 0.2,
        max_tokens: int = 32,
        timeout: float = 120.0,
        max_attempts: int = 6,
        retry_wait: Tuple[float, float] = (1.0, 60.0),
    ) -> None:
        base = OPENAI_BASE_URL if base_url is None else base_url
        parsed = urllib.parse.urlparse(base)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url: expected an http(s) URL such as {OPENAI_BASE_URL!r}, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model: expected a model name such as {OFFICIAL_JUDGE_MODEL!r}, got {model!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected an int >= 1, got {max_tokens!r}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts: expected an int >= 1, got {max_attempts!r}")
        if len(retry_wait) != 2 or not 0 <= retry_wait[0] <= retry_wait[1]:
            raise ValueError(f"retry_wait: expected (min, max) seconds with 0 <= min <= max, got {retry_wait!r}")
        self.base_url = base.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.seed = seed
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.timeout = float(timeout)
        self.max_attempts = max_attempts
        self.retry_wait = (float(retry_wait[0]), float(retry_wait[1]))

    @property
    def name(self) -> str:
        return (f"openai-compatible:{self.model} @ {self.base_url} (seed={self.seed}, "
                f"temperature={self.temperature}, max_tokens={self.max_tokens})")

    def payload(self, prompt: str) -> Dict[str, Any]:
        """The JSON body sent for ``prompt`` (one user message, as open-eqa)."""
        body: Dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    def __call__(self, prompt: str) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif urllib.parse.urlparse(self.base_url).netloc.endswith("api.openai.com"):
            raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not set (needed for "
                             f"{self.base_url})")
        data = json.dumps(self.payload(prompt)).encode("utf-8")
        url = self.base_url + "/chat/completions"
        last_error: Optional[BaseException] = None
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(min(self.retry_wait[1], max(self.retry_wait[0], random.uniform(0, 2.0 ** attempt))))
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:500]
                if exc.code not in _RETRY_STATUS:
                    raise RuntimeError(f"judge: {url} answered HTTP {exc.code}: {detail}") from exc
                last_error = RuntimeError(f"HTTP {exc.code}: {detail}")
                continue
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, dropped connections
                last_error = exc
                continue
            choices = reply.get("choices") if isinstance(reply, dict) else None
            if not isinstance(choices, list) or len(choices) != 1:
                raise RuntimeError(f"judge: expected exactly one choice from {url}, got {reply!r:.500}")
            content = (choices[0].get("message") or {}).get("content")
            if not isinstance(content, str):
                raise RuntimeError(f"judge: the choice from {url} has no text content: {choices[0]!r:.500}")
            return content
        raise RuntimeError(f"judge: {url} failed {self.max_attempts} times; last error: {last_error}")


class HFJudge:
    """A local transformers chat model as judge: chat template, greedy decoding, reply stripped.

    model_path: a local folder with an Instruct/chat model (nothing is downloaded). device: where
    the model runs ("cuda", "cpu", ...). dtype: a torch dtype or its name ("bfloat16"); None keeps
    the checkpoint's. The reply is stripped of surrounding whitespace before parsing (GPT-4's replies
    carry none; local models often end with a newline).
    """

    def __init__(self, model_path: str, device: str = "cuda", dtype: Union[str, Any, None] = "auto",
                 max_new_tokens: int = 32) -> None:
        if not isinstance(model_path, (str, os.PathLike)) or not os.path.isdir(model_path):
            raise ValueError(f"model_path: expected a local model folder, got {model_path!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        try:
            import torch
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("HFJudge needs transformers: pip install transformers") from exc
        if isinstance(dtype, str) and dtype != "auto":
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"dtype: expected 'auto', None or a torch dtype name, got {dtype!r}")
            dtype = getattr(torch, dtype)
        self.model_path = os.fspath(model_path)
        self.max_new_tokens = max_new_tokens
        if _tf_version(transformers) < (4, 34):
            raise ImportError(f"HFJudge needs transformers >= 4.34 (chat templates), found {transformers.__version__}: "
                              "pip install -U transformers")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model_path: the tokenizer in {self.model_path} has no chat template; "
                             "use an Instruct/chat model")
        kwargs = {}
        if dtype is not None:  # transformers >= 4.56 calls it ``dtype``, older versions ``torch_dtype``
            kwargs["dtype" if _tf_version(transformers) >= (4, 56) else "torch_dtype"] = dtype
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, local_files_only=True, **kwargs)
        self.model.to(device).eval()
        self.device = device

    @property
    def name(self) -> str:
        return f"hf:{os.path.basename(os.path.normpath(self.model_path))} (greedy, max_new_tokens={self.max_new_tokens})"

    def __call__(self, prompt: str) -> str:
        import torch

        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"),
                                      do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=pad)
        new_tokens = out[0, enc["input_ids"].shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _tf_version(transformers: Any) -> Tuple[int, int]:
    parts = re.findall(r"\d+", transformers.__version__)[:2]
    return int(parts[0]), int(parts[1])


# --------------------------------------------------------------------------------------------------
# scoring


_REQUIRED = ("question_id", "question", "answer", "prediction")


def _check_records(records: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    if isinstance(records, Mapping) or isinstance(records, (str, bytes)):
        raise TypeError("records: expected a sequence of dicts with keys question_id, question, answer, "
                        "prediction[, extra_answers]")
    out = list(records)
    if not out:
        raise ValueError("records: expected at least one record, got none")
    seen = set()
    for rec in out:
        missing = [k for k in _REQUIRED if k not in rec]
        if missing:
            raise ValueError(f"records: record {rec.get('question_id', '?')!r} lacks {missing}")
        qid = str(rec["question_id"])
        if qid in seen:
            raise ValueError(f"records: duplicate question_id {qid!r}")
        seen.add(qid)
        extra = rec.get("extra_answers")
        if extra is not None and (isinstance(extra, str) or not all(isinstance(a, str) for a in extra)):
            raise TypeError(f"records: extra_answers of {qid!r} must be None or a list of str, got {extra!r}")
        if rec["prediction"] is not None and not isinstance(rec["prediction"], str):
            raise TypeError(f"records: prediction of {qid!r} must be a str or None, "
                            f"got {type(rec['prediction']).__name__}")
    return out


def join_openeqa(dataset: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
                 allow_missing: bool = False) -> List[Dict[str, Any]]:
    """Records for ``llm_match`` from open-eqa's dataset list and a results list ``[{question_id, answer}]``.

    As the official script, results must cover exactly the dataset's questions; ``allow_missing=True``
    (upstream ``--force``) keeps only the answered questions, which makes the score incomparable.
    Records follow the order of ``results``.
    """
    items = {str(d["question_id"]): d for d in dataset}
    if len(items) != len(dataset):
        raise ValueError("dataset: duplicate question_id")
    answered: Dict[str, Mapping[str, Any]] = {}
    for r in results:
        qid = str(r["question_id"])
        if qid in answered:
            raise ValueError(f"results: duplicate question_id {qid!r}")
        answered[qid] = r
    unknown = [q for q in answered if q not in items]
    if unknown:
        raise ValueError(f"results: {len(unknown)} question ids are not in the dataset, e.g. {unknown[:5]!r}")
    missing = [q for q in items if q not in answered]
    if missing and not allow_missing:
        raise ValueError(f"results: missing {len(missing)} of {len(items)} questions, e.g. {missing[:5]!r} "
                         "(allow_missing=True scores only the answered ones, not comparable)")
    records = []
    for qid, r in answered.items():
        item = items[qid]
        records.append({
            "question_id": item["question_id"],
            "question": item["question"],
            "answer": item["answer"],
            "extra_answers": item.get("extra_answers"),
            "prediction": r["answer"],
        })
    return records


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no progress bar then
        return iterable
    return tqdm(iterable, total=total, desc=desc)


def _load_cache(path: Optional[Path], name: str) -> Dict[str, Dict[str, Any]]:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"cache_path: {path} is not valid JSON ({exc}); move it away to start over") from exc
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
        raise ValueError(f"cache_path: {path} is not an LLM-Match cache written by this module")
    if data.get("judge") != name:
        raise ValueError(f"cache_path: {path} holds scores of judge {data.get('judge')!r}, this run uses "
                         f"{name!r}; use another cache file")
    return data["scores"]


def _save_cache(path: Optional[Path], name: str, scores: Dict[str, Dict[str, Any]]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"judge": name, "scores": scores}, fh, indent=1, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def llm_match(
    records: Sequence[Mapping[str, Any]],
    judge: Judge,
    cache_path: Optional[Union[str, os.PathLike]] = None,
    lenient: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """LLM-Match over ``records`` with ``judge``; scores are cached so a re-run does not re-query.

    records: dicts with ``question_id``, ``question``, ``answer``, ``prediction`` (str or None) and
      optionally ``extra_answers`` (None or list of str).
    judge: ``judge(prompt) -> reply``; its ``name`` (``judge_name``) is stored in the cache, and a cache
      written by another judge is refused.
    cache_path: JSON file of ``{"judge", "scores": {question_id: {score, reply, prompt_sha256, parse}}}``,
      rewritten atomically after every query. An entry is reused only if its prompt hash matches (a
      changed prediction is re-judged). Entries of other questions are kept but not scored.
    lenient: False parses replies exactly as open-eqa (a reply it cannot parse raises ValueError after
      the earlier scores are saved); True falls back to ``parse_score_lenient`` and counts its uses.

    Returns ``{"LLM-Match": percent, "n", "judge", "scores": {qid: int}, "queried", "cached",
    "lenient_parses"}``.
    """
    recs = _check_records(records)
    if not callable(judge):
        raise TypeError(f"judge: expected a callable prompt -> reply, got {type(judge).__name__}")
    name = judge_name(judge)
    path = None if cache_path is None else Path(cache_path)
    cache = _load_cache(path, name)
    scores: Dict[str, int] = {}
    queried = reused = lenient_parses = 0
    for rec in _progress(recs, len(recs), "LLM-Match", progress):
        qid = str(rec["question_id"])
        prediction = cut_after_last_period(rec["prediction"])
        if prediction is None:  # upstream: no prediction scores 0 without asking the judge
            prompt_hash = None
        else:
            prompt = build_prompt(rec["question"], rec["answer"], prediction, rec.get("extra_answers"))
            prompt_hash = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        entry = cache.get(qid)
        if entry is not None and entry.get("prompt_sha256") == prompt_hash:
            scores[qid] = int(entry["score"])
            reused += 1
            continue
        if prompt_hash is None:
            entry = {"score": 0, "reply": None, "prompt_sha256": None, "parse": "no prediction"}
        else:
            reply = judge(prompt)
            if not isinstance(reply, str):
                raise TypeError(f"judge: expected a str reply, got {type(reply).__name__} for {qid!r}")
            queried += 1
            try:
                if lenient:
                    score, fallback = parse_score_lenient(reply)
                else:
                    score, fallback = parse_score(reply), False
            except ValueError as exc:
                raise ValueError(f"judge: unparsable reply for question {qid!r}: {reply!r} ({exc}); "
                                 "lenient=True accepts the first standalone 1-5") from exc
            lenient_parses += int(fallback)
            entry = {"score": score, "reply": reply, "prompt_sha256": prompt_hash,
                     "parse": "lenient" if fallback else "official"}
        cache[qid] = entry
        scores[qid] = int(entry["score"])
        _save_cache(path, name, cache)
    return {
        "LLM-Match": score_to_percent(scores.values()),
        "n": len(scores),
        "judge": name,
        "scores": scores,
        "queried": queried,
        "cached": reused,
        "lenient_parses": lenient_parses,
    }


def offline_scores(records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Deterministic proxies (×100): SQuAD-normalised EM and token F1 of the prediction against
    ``answer`` ∪ ``extra_answers``, best over answers, after the same period cut as LLM-Match; a
    ``None`` prediction scores 0. Labelled ``PROXY_LABEL``: not comparable with LLM-Match."""
    recs = _check_records(records)
    em = f1 = 0.0
    for rec in recs:
        prediction = cut_after_last_period(rec["prediction"])
        if prediction is None:
            continue
        answers = [rec["answer"]] + list(rec.get("extra_answers") or [])
        em += exact_match(prediction, answers)
        f1 += token_f1(prediction, answers)
    n = len(recs)
    return {"proxy-EM": 100.0 * em / n, "proxy-F1": 100.0 * f1 / n, "n": n, "label": PROXY_LABEL}


__all__ = [
    "HFJudge",
    "Judge",
    "OFFICIAL_JUDGE_MODEL",
    "OPENAI_BASE_URL",
    "OpenAIJudge",
    "PROMPT_NAMES",
    "PROXY_LABEL",
    "build_prompt",
    "cut_after_last_period",
    "join_openeqa",
    "judge_name",
    "llm_match",
    "load_prompt",
    "offline_scores",
    "parse_score",
    "parse_score_lenient",
    "score_to_percent",
]
