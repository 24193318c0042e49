"""The resumable calibration state file: one JSON line of settings, then one JSON line per calibrated prompt.

    {"format": "adatoken-calibration-state/1", "settings": {...}, "created": "<UTC ISO time>"}
    {"index": 0, "key": "...", "spa_spa": [L], "prm_spa": [L], "spa_sys": [L], "spa_rows": N, "prm_rows": P,
     "sys_tokens": S, "length": n, "seconds": t, "time": "<UTC ISO time>"}
    ...

Each prompt's line is flushed and fsynced once its prefill is done, so an interrupted run loses at most the
prompt in flight; a torn last line (a kill mid-write) is cut off when the file is reopened. ``settings`` fix what
was calibrated (source, model, prompts and their keys digest, ...); reopening with other settings is refused.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np

from ..methods.adatoken import SpanBlockSums
from ..methods.adatoken_calibration import accumulate

FORMAT = "adatoken-calibration-state/1"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _diff(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{k}: {json.dumps(a.get(k))[:80]} in the file, {json.dumps(b.get(k))[:80]} now")
    return out


class CalibrationState:
    """A state file opened for reading (``load``) or for appending (``open``)."""

    def __init__(self, path: str, settings: Dict[str, Any], created: str, rows: List[Dict[str, Any]]) -> None:
        self.path = path
        self.settings = settings
        self.created = created
        self.rows = rows

    # ---------------------------------------------------------------- reading
    @classmethod
    def load(cls, path: str) -> "CalibrationState":
        """Read ``path`` (a torn last line is ignored here and cut off by ``open``)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--state: no calibration state file at {path}")
        with open(path, "r", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            raise ValueError(f"--state: {path} is not a calibration state file (its first line is not JSON)") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise ValueError(f"--state: {path} is not a calibration state file (expected format {FORMAT!r})")
        rows = []
        body = lines[1:]
        for i, line in enumerate(body):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(body) - 1:
                    break  # torn last line of an interrupted write
                raise ValueError(f"--state: {path} line {i + 2} is not JSON (the file is damaged)") from None
        keys = [r["key"] for r in rows]
        if len(set(keys)) != len(keys):
            raise ValueError(f"--state: {path} holds some prompt keys twice (the file is damaged)")
        return cls(path, head["settings"], head.get("created", ""), rows)

    @classmethod
    def open(cls, path: str, settings: Dict[str, Any]) -> "CalibrationState":
        """Open ``path`` for appending: create it with ``settings``, or resume it if its settings are the same."""
        settings = json.loads(json.dumps(settings))  # the form it takes in the file
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            created = utc_now()
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"format": FORMAT, "settings": settings, "created": created}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            return cls(path, settings, created, [])
        state = cls.load(path)
        diff = _diff(state.settings, settings)
        if diff:
            raise ValueError(f"--state: {path} was written with other settings ({'; '.join(diff)}); pass the same "
                             f"flags to resume it, or a new --state (or --out) to start over")
        state._cut_torn_tail()
        return state

    def _cut_torn_tail(self) -> None:
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if data.endswith(b"\n"):
                return
            fh.truncate(data.rfind(b"\n") + 1)

    # ---------------------------------------------------------------- writing
    @property
    def done(self) -> set:
        return {r["key"] for r in self.rows}

    def append(self, index: int, key: str, sums: SpanBlockSums, **extra: Any) -> None:
        row = {"index": int(index), "key": key, "spa_spa": sums.spa_spa.tolist(), "prm_spa": sums.prm_spa.tolist(),
               "spa_sys": sums.spa_sys.tolist(), "spa_rows": int(sums.spa_rows), "prm_rows": int(sums.prm_rows),
               **extra, "time": utc_now()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)

    # --------------------------------------------------------------- results
    def sums(self, row: Dict[str, Any]) -> SpanBlockSums:
        return SpanBlockSums(spa_spa=row["spa_spa"], prm_spa=row["prm_spa"], spa_sys=row["spa_sys"],
                             spa_rows=row["spa_rows"], prm_rows=row["prm_rows"])

    def total(self) -> SpanBlockSums:
        """The block sums of every calibrated prompt, added in prompt order."""
        if not self.rows:
            raise ValueError(f"--state: {self.path} holds no calibrated prompt yet")
        rows = sorted(self.rows, key=lambda r: r["index"])
        out: Optional[SpanBlockSums] = None
        for r in rows:
            s = self.sums(r)
            out = s if out is None else accumulate(out, s)
        return out  # type: ignore[return-value]

    def stat(self, field: str) -> Dict[str, float]:
        vals = np.array([r[field] for r in self.rows], dtype=np.float64)
        return {"mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max())}


__all__ = ["CalibrationState", "FORMAT", "utc_now"]
