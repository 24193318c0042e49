"""Short-answer QA metrics: the official ScanQA scorer, LEO's refined exact match, SQuAD-style EM/F1.

``scanqa_scores`` reproduces ATR-DBI/ScanQA ``scripts/score.py``:

- **EM@1**: ``prediction in references``, raw strings, no normalisation (``evals_json``, "Top1 (EM)");
- **BLEU-1..4, METEOR, ROUGE-L, CIDEr** (``eval_pycoco``): pycocoevalcap's ``PTBTokenizer`` (Stanford
  CoreNLP 3.4.1, lower-cased, punctuation tokens removed) on the raw prediction and on every reference,
  then ``Bleu(4)`` (closest reference length), ``Meteor()`` (meteor-1.5, ``-l en -norm``),
  ``Rouge()`` (ROUGE-L, β = 1.2) and ``Cider()``, which is CIDEr-D (reported as "CIDEr", as ScanQA
  does): per question, for n = 1..4 the cosine of tf-idf n-gram vectors with the candidate's weights
  clipped at the reference's (Σ min(g_c, g_r)·g_r / (‖g_c‖‖g_r‖)), times the Gaussian length penalty
  exp(−δ²/(2σ²)), σ = 6 (δ counted in bigrams: the word-count difference unless a side is empty);
  mean over n and over references, ×10; no stemming. idf = log N − log max(1, df), N the number of
  questions scored, df the number of them whose references contain the n-gram: the value depends on
  the whole set, so score the merged shards, never average per-shard CIDEr. No SPICE, no "Top1 (F-value)" (NLTK
  WordNet lemmas). All ×100 (for CIDEr on top of its own ×10). One deliberate difference: line
  separators other than "\n" inside an answer ("\r", U+2028, ...) become spaces before PTBTokenizer;
  upstream they split the Java tokenizer's input lines and silently shift every later caption onto
  the wrong question.

plus the LLM-era convention of LEO (embodied-generalist/embodied-generalist @ 567f2d8,
``data/data_utils.py::clean_answer`` and ``evaluator/scanqa_eval.py::ScanQAEvaluator.answer_match``):

- **EM@1-cleaned**: LEO's ``em``: both sides through ``clean_answer``, then LEO's loop over the references
  in their given order, which stops at the *first* reference that is equal to, contains or is contained
  in the prediction (whitespace removed), and counts an exact match only if that first hit is equal.
  (So with references ``["brown chair", "chair"]`` the prediction "chair" scores 0 here: LEO's own
  behaviour, kept so the figures compare with LEO-convention papers.)
- **EM@1-refined**: LEO's ``em_refined``: 1 when some cleaned reference equals, contains or is contained
  in the cleaned prediction after removing all whitespace (order-independent).

PTBTokenizer and METEOR run Java. ``use_java=False`` replaces the tokenizer with
``ptb_like_tokenize`` (pure Python, mimics PTBTokenizer ``-lowerCase`` plus the scorer's punctuation
removal on short answers), omits METEOR and suffixes every tokenizer-dependent key with
``" (non-official)"``.
"""
from __future__ import annotations

import re
import shutil
import string
import subprocess
from collections import Counter
from typing import Dict, List, Mapping, Sequence, Tuple, Union

#: Marker appended to metric names computed with the pure-Python tokenizer.
NON_OFFICIAL = " (non-official)"

_OFFICIAL_TOKENIZER = "PTBTokenizer (official, Stanford CoreNLP 3.4.1 via Java)"
_FALLBACK_TOKENIZER = "python-fallback (non-official)"


# --------------------------------------------------------------------------------------------------
# normalisation


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation, drop articles a/an/the, squeeze spaces."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# LEO clean_answer, expressed as data.  Order matters: it is the order LEO applies its substitutions.
# (LEO also rewrites r"\.[ ]{2,}" -> ". ", "ç" -> "c" and "’" -> "'"; after its own earlier steps these
# can no longer match, so they are omitted here without changing any output.)
_LEO_TYPOS = (
    ("letf", "left"), ("let", "left"), ("tehre", "there"), ("rigth", "right"), ("rght", "right"),
    ("behine", "behind"), ("tv", "TV"), ("chai", "chair"), ("wasing", "washing"), ("waslked", "walked"),
    ("oclock", "o'clock"),
)
_LEO_NUMBERS = (
    ("0", "zero"), ("none", "zero"), ("1", "one"), ("2", "two"), ("3", "three"), ("4", "four"),
    ("5", "five"), ("6", "six"), ("7", "seven"), ("8", "eight"), ("9", "nine"), ("10", "ten"),
    ("11", "eleven"), ("12", "twelve"), ("13", "thirteen"), ("14", "fourteen"), ("15", "fifteen"),
    ("16", "sixteen"), ("17", "seventeen"), ("18", "eighteen"), ("19", "nineteen"), ("20", "twenty"),
    ("23", "twenty-three"),
)


def _leo_rules() -> List[Tuple["re.Pattern[str]", str]]:
    rules: List[Tuple[re.Pattern, str]] = [
        (re.compile(r"[ ]+$"), ""),
        (re.compile(r"^[ ]+"), ""),
        (re.compile(r" {2,}"), " "),
        (re.compile(r"[^a-zA-Z0-9,'\s\-:]+"), ""),
    ]
    rules += [(re.compile(rf"\b{wrong}\b"), right) for wrong, right in _LEO_TYPOS]
    rules.append((re.compile(r"\bo'[ ]+clock\b"), "o'clock"))
    rules += [(re.compile(rf"\b{word}\b"), spelled) for word, spelled in _LEO_NUMBERS]
    rules += [
        (re.compile(r"\b([a-zA-Z]+)([0-9])\b"), r"\g<1>"),  # "no1", "mat2" -> "no", "mat"
        (re.compile(r"\ba\b ([a-zA-Z]+)"), r"\g<1>"),
        (re.compile(r"\ban\b ([a-zA-Z]+)"), r"\g<1>"),
        (re.compile(r"\bthe\b ([a-zA-Z]+)"), r"\g<1>"),
        (re.compile(r"\bbackwards\b"), "backward"),
    ]
    return rules


_LEO_RULES = _leo_rules()


def clean_answer(text: str) -> str:
    """LEO's ``clean_answer``: lower-case, trim spaces, keep only ``[a-zA-Z0-9,'\\s\\-:]``, fix LEO's typo
    list, spell 0–20 and 23 as words ("none" → "zero"), drop a digit glued to a word, drop a/an/the
    before a word, "backwards" → "backward". Same output as LEO @ 567f2d8 ``data/data_utils.py``."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    out = text.lower()
    for pattern, repl in _LEO_RULES:
        out = pattern.sub(repl, out)
    return out


def leo_answer_match(prediction: str, references: Sequence[str]) -> Tuple[int, int]:
    """LEO's ``answer_match`` on already cleaned strings → ``(em, em_refined)``, each 0 or 1.

    References are visited in order; the first one that equals the prediction gives (1, 1), the first
    one that contains or is contained in it (all whitespace removed) gives (0, 1); none gives (0, 0).
    """
    squeezed = "".join(prediction.split())
    for ref in references:
        if prediction == ref:
            return 1, 1
        ref_squeezed = "".join(ref.split())
        if squeezed in ref_squeezed or ref_squeezed in squeezed:
            return 0, 1
    return 0, 0


def exact_match(prediction: str, references: Union[str, Sequence[str]]) -> float:
    """1.0 if ``normalize_answer(prediction)`` equals that of any reference, else 0.0."""
    refs = _as_references(references, "references")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in refs))


def token_f1(prediction: str, references: Union[str, Sequence[str]]) -> float:
    """SQuAD token F1 after ``normalize_answer``, maximum over references, in [0, 1].

    Token multiset overlap: P = |pred ∩ ref| / |pred|, R = |pred ∩ ref| / |ref|, F1 = 2PR/(P+R).
    If either side has no token, F1 is 1.0 when both are empty and 0.0 otherwise.
    """
    refs = _as_references(references, "references")
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for ref in refs:
        ref_tokens = normalize_answer(ref).split()
        if not pred_tokens or not ref_tokens:
            score = float(pred_tokens == ref_tokens)
        else:
            common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
            if common == 0:
                score = 0.0
            else:
                p, r = common / len(pred_tokens), common / len(ref_tokens)
                score = 2 * p * r / (p + r)
        best = max(best, score)
    return best


def _as_references(references: Union[str, Sequence[str]], name: str) -> List[str]:
    if isinstance(references, str):
        return [references]
    refs = list(references)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"{name}: expected a str or a non-empty sequence of str, got {references!r}")
    return refs


# --------------------------------------------------------------------------------------------------
# pure-Python stand-in for PTBTokenizer -lowerCase + pycocoevalcap's punctuation removal

#: Tokens pycocoevalcap's PTBTokenizer wrapper removes after tokenisation (compared case-sensitively,
#: so the lower-cased bracket tokens "-lrb-" etc. survive, exactly as in the official pipeline).
PTB_REMOVED = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                         "-", "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr etc vs ft mt inc ltd co corp ave blvd rd gen col lt sgt capt approx dept "
    "est fig jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                "wanna": ["wan", "na"]}
_TRAILING = ",;:?!%'`-"
_LEADING = "$#'`,;"
_KEEP_WHOLE = frozenset(["'s", "'m", "'re", "'ve", "'ll", "'d", "n't", "'n'"])
_INFIX = re.compile(r"(\.\.\.|[+=*])")


def ptb_like_tokenize(text: str) -> str:
    """Tokenise like pycocoevalcap's ``PTBTokenizer().tokenize`` on one caption (non-official).

    Mimics Stanford PTBTokenizer ``-preserveLines -lowerCase`` followed by pycocoevalcap's removal of
    the tokens in ``PTB_REMOVED``: lower-case; split on whitespace; brackets become ``-lrb-``/``-rrb-``/
    ``-lcb-``/``-rcb-``/``-lsb-``/``-rsb-`` (kept, as upstream keeps them); double quotes and quote
    marks are removed; leading ``$``/``#`` and trailing ``, ; : ? ! % -`` and ellipses split off (a run
    of one character is one token, e.g. "!!"); a final period splits off unless the word is a known
    abbreviation, a single letter or has an inner letter period ("u.s.a.", "a.m."); clitics
    ``n't 's 'm 're 've 'll 'd`` split off ("don't" → "do n't"); ``cannot`` → "can not";
    ``+ = *`` split inside words. Numbers such as "3.5", "1,000", "2:30" and hyphenated words stay
    whole. It agrees with the Java tokenizer on typical short answers, not on arbitrary text.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    tokens: List[str] = []
    for chunk in text.replace("\n", " ").lower().replace('"', " ").split():
        for piece in re.split(r"([(){}\[\]])", chunk):
            if not piece:
                continue
            if piece in _BRACKETS:
                tokens.append(_BRACKETS[piece])
                continue
            for sub in _INFIX.split(piece):
                if sub:
                    tokens.extend(_split_word(sub))
    return " ".join(t for t in tokens if t not in PTB_REMOVED)


def _split_word(word: str) -> List[str]:
    if word in _KEEP_WHOLE:
        return [word]
    lead: List[str] = []
    while word and word[0] in _LEADING:
        run = _run(word, 0)
        lead.append(word[:run])
        word = word[run:]
    trail: List[str] = []
    while len(word) > 1:
        if word.endswith("...") and len(word) > 3:
            trail.insert(0, "...")
            word = word[:-3]
        elif word[-1] in _TRAILING:
            run = _run_back(word)
            if run == len(word):
                break
            trail.insert(0, word[-run:])
            word = word[:-run]
        elif word[-1] == "." and not _is_abbreviation(word):
            trail.insert(0, ".")
            word = word[:-1]
        else:
            break
    if word in _SPLIT_WORDS:
        core = list(_SPLIT_WORDS[word])
    elif word in _KEEP_WHOLE:
        core = [word]
    else:
        m = _CLITIC.match(word)
        core = [m.group(1), m.group(2)] if m else ([word] if word else [])
    return lead + core + trail


def _run(word: str, start: int) -> int:
    end = start + 1
    while end < len(word) and word[end] == word[start]:
        end += 1
    return end - start


def _run_back(word: str) -> int:
    n = 1
    while n < len(word) and word[-1 - n] == word[-1]:
        n += 1
    return n


def _is_abbreviation(word: str) -> bool:
    stem = word[:-1]
    if stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()):
        return True
    return bool(re.fullmatch(r"(?:[a-z]\.)+[a-z]", stem))


# --------------------------------------------------------------------------------------------------
# the ScanQA scorer


def java_available() -> bool:
    """True when ``java -version`` runs (what PTBTokenizer and METEOR need)."""
    exe = shutil.which("java")
    if exe is None:
        return False
    try:
        proc = subprocess.run([exe, "-version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _require_java() -> None:
    if not java_available():
        raise RuntimeError(
            "use_java: `java -version` failed (no Java runtime on PATH). The official ScanQA captioning "
            "metrics run pycocoevalcap's PTBTokenizer and METEOR in Java. Install a JRE (e.g. "
            "`apt-get install default-jre-headless` or `conda install -c conda-forge openjdk`) and put "
            "`java` on PATH, or pass use_java=False for the pure-Python tokenizer (non-official "
            "BLEU/ROUGE-L/CIDEr, no METEOR)."
        )


def _import_pycoco():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("scanqa_scores needs pycocoevalcap: pip install pycocoevalcap") from exc
    return Bleu, Rouge, Cider


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> List[str]:
    if not isinstance(predictions, Mapping):
        raise TypeError(f"predictions: expected a mapping id -> str, got {type(predictions).__name__}")
    if not isinstance(references, Mapping):
        raise TypeError(f"references: expected a mapping id -> list of str, got {type(references).__name__}")
    if not references:
        raise ValueError("references: expected at least one question, got an empty mapping")
    ids = list(references.keys())
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise ValueError(
            f"predictions: missing for {len(missing)} of {len(ids)} questions, e.g. {missing[:5]!r}"
        )
    extra = [i for i in predictions if i not in references]
    if extra:
        raise ValueError(
            f"predictions: {len(extra)} ids have no references, e.g. {extra[:5]!r} (wrong split or ids?)"
        )
    for i in ids:
        if not isinstance(predictions[i], str):
            raise TypeError(f"predictions: expected str values, got {type(predictions[i]).__name__} for {i!r}")
        refs = references[i]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references: expected a non-empty list of str for {i!r}, got {refs!r}")
    return ids


# Characters the Java tokenizer takes as line ends. pycocoevalcap only replaces "\n", so one of these in
# a caption shifts every later caption onto the wrong question; they are turned into spaces first.
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _tokenize(texts: Dict[str, List[str]], use_java: bool) -> Dict[str, List[str]]:
    if not use_java:
        return {k: [ptb_like_tokenize(t) for t in v] for k, v in texts.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({k: [{"caption": _LINE_BREAKS.sub(" ", t)} for t in v] for k, v in texts.items()})
    bad = [k for k, v in texts.items() if len(out.get(k, ())) != len(v)]
    if bad:
        raise RuntimeError(f"PTBTokenizer returned a different number of captions for {len(bad)} questions, "
                           f"e.g. {bad[:5]!r}; check `java` and the pycocoevalcap installation")
    return out


def _meteor(gts: Dict[str, List[str]], res: Dict[str, List[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:  # stop the JVM now rather than at garbage collection
        proc = scorer.meteor_p
        if proc.poll() is None:
            proc.stdin.close()
            proc.kill()
            proc.wait()
    return float(score)


def scanqa_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    use_java: bool = True,
) -> Dict[str, object]:
    """ScanQA metrics (×100) of one prediction per question against its reference answers.

    predictions: question id -> generated answer (raw text, as the model produced it).
    references: question id -> the question's ``answers`` list. Every id needs a prediction and vice versa.
    use_java: True runs the official pipeline (needs ``java``; checked first). False uses
      ``ptb_like_tokenize``, skips METEOR and marks the caption metrics ``" (non-official)"``.

    Returns ``{"EM@1", "EM@1-cleaned", "EM@1-refined", "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
    "n", "tokenizer", "official"}`` (fallback: caption keys suffixed, no METEOR, ``official=False``).
    """
    if not isinstance(use_java, bool):
        raise TypeError(f"use_java: expected a bool, got {type(use_java).__name__}")
    ids = _check_inputs(predictions, references)
    if use_java:
        _require_java()
    Bleu, Rouge, Cider = _import_pycoco()

    em = em_clean = em_refined = 0
    for i in ids:
        refs = list(references[i])
        pred = predictions[i]
        em += int(pred in refs)
        c_em, c_refined = leo_answer_match(clean_answer(pred), [clean_answer(r) for r in refs])
        em_clean += c_em
        em_refined += c_refined
    n = len(ids)
    out: Dict[str, object] = {
        "EM@1": 100.0 * em / n,
        "EM@1-cleaned": 100.0 * em_clean / n,
        "EM@1-refined": 100.0 * em_refined / n,
    }

    gts = _tokenize({i: list(references[i]) for i in ids}, use_java)
    res = _tokenize({i: [predictions[i]] for i in ids}, use_java)
    suffix = "" if use_java else NON_OFFICIAL
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k, value in enumerate(bleu, start=1):
        out[f"BLEU-{k}{suffix}"] = 100.0 * float(value)
    if use_java:
        out["METEOR"] = 100.0 * _meteor(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    out[f"ROUGE-L{suffix}"] = 100.0 * float(rouge)
    cider, _ = Cider().compute_score(gts, res)
    out[f"CIDEr{suffix}"] = 100.0 * float(cider)
    out["n"] = n
    out["tokenizer"] = _OFFICIAL_TOKENIZER if use_java else _FALLBACK_TOKENIZER
    out["official"] = use_java
    return out


__all__ = [
    "NON_OFFICIAL",
    "PTB_REMOVED",
    "clean_answer",
    "exact_match",
    "java_available",
    "leo_answer_match",
    "normalize_answer",
    "ptb_like_tokenize",
    "scanqa_scores",
    "token_f1",
]
