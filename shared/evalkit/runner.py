"""The evaluation loop every host shares: run settings, resume, sharding and merge, progress, errors,
and token/FLOP accounting from the session's records.

A host's driver supplies ``Benchmark`` objects (its data, prompt and metric: ``jobs``, ``run``,
``metrics``) and calls ``Run(...).evaluate()`` then ``Run.finish()``. One *job* is one model call that
answers one or more result keys (LISA: every expression of an image in one batch; 3D QA: one
question). Per key the runner stores what the benchmark returns plus the accounting of that row of the
call's prefill (``ForwardRecord.efficiency``: visual tokens per layer, text tokens, N_avg, pruning
ratio, TFLOPs in the paper's convention and exactly).

Output of a run directory: ``run.json`` (every setting that changes results; a resume with other
settings is refused), ``<benchmark>.jsonl`` (one record per key, written and fsync'ed as produced; a
rerun skips finished keys and cuts a line a crash truncated; ``.rankR-of-W`` shard files under
``torchrun``/``accelerate launch``), ``summary.json`` (metrics and efficiency per benchmark, skipped
keys with their reasons).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ..accounting import CONVENTIONS, DecoderDims, Efficiency
from ..runio import ResultWriter, dist_info, merge_shards, read_results, shard_path, shard_paths, shard_slice

KEY = "key"
ON_ERROR = ("raise", "skip")


@dataclass
class Job:
    """One model call: the result keys it answers, in the order of the rows it returns."""

    keys: List[str]
    payload: Any = None
    label: str = ""


@dataclass
class JobOutput:
    """What a benchmark's ``run`` returns: one record per key (in ``Job.keys`` order) and the session's
    record of the prefill (its rows ↔ the records), or None when nothing was recorded."""

    records: List[Dict[str, Any]]
    forward: Any = None
    seconds: Optional[float] = None


class Benchmark:
    """Base of a host's benchmark: ``name`` (a file-name-safe id), ``title`` (table heading), ``jobs()``
    (all jobs in dataset order; checks that the data exist before any model work), ``run(job)``
    (one model call under ``shared.prune``), ``metrics(records)``."""

    name: str = ""
    title: str = ""

    def jobs(self) -> List[Job]:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, job: Job) -> JobOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def metrics(self, records: List[Dict[str, Any]]) -> Dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Accounting:
    """How to count: the decoder's dims, the paper's convention (``CONVENTIONS`` name) and optional extra
    per-row figures (e.g. LVLM_CSP's TFLOPs at the paper's fixed text length)."""

    dims: DecoderDims
    convention: str = "fastv"
    extra: Optional[Callable[[Efficiency], Dict[str, Any]]] = None

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention: expected one of {', '.join(CONVENTIONS)}, got {self.convention!r}")

    def rows(self, forward: Any) -> List[Dict[str, Any]]:
        out = []
        exact = forward.efficiency(self.dims, CONVENTIONS["exact"])
        for e, x in zip(forward.efficiency(self.dims, CONVENTIONS[self.convention]), exact):
            row = {
                "visual_per_layer": [int(v) for v in e.visual_per_layer],
                "text_tokens": int(e.text_tokens),
                "visual_tokens": int(e.visual_tokens),
                "n_avg": e.n_avg,
                "pruning_ratio": e.pruning_ratio,
                "tflops": e.tflops,
                "tflops_exact": x.tflops,
            }
            if self.extra is not None:
                row.update(self.extra(e))
            out.append(row)
        return out


EFFICIENCY_FIELDS = ("n_avg", "pruning_ratio", "tflops", "tflops_exact", "text_tokens", "visual_tokens", "seconds")


def mean_of(records: Sequence[Mapping[str, Any]], name: str) -> Optional[float]:
    vals = [float(r[name]) for r in records if r.get(name) is not None]
    return math.fsum(vals) / len(vals) if vals else None


def _check_settings(out_dir: Path, settings: Dict[str, Any], write: bool) -> None:
    path = out_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        keys = sorted(set(old) | set(settings))
        diff = {k: (old.get(k), settings.get(k)) for k in keys if old.get(k) != settings.get(k)}
        if diff:
            raise ValueError(
                f"out: {out_dir} holds a run made with other settings {diff}; resume with the same settings or use "
                f"a new --out directory"
            )
    elif write:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _jsonable(settings: Mapping[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(settings, default=str))


class Run:
    """One run directory: ``evaluate`` this rank's share of every benchmark, then ``finish``."""

    def __init__(self, out: str, settings: Mapping[str, Any], benchmarks: Sequence[Benchmark],
                 accounting: Optional[Accounting], on_error: str = "raise", progress: bool = True,
                 env: Optional[Mapping[str, str]] = None) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error: expected one of {', '.join(ON_ERROR)}, got {on_error!r}")
        names = [b.name for b in benchmarks]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"benchmarks: expected distinct non-empty names, got {names}")
        self.out = Path(out)
        self.settings = _jsonable(settings)
        self.benchmarks = list(benchmarks)
        self.accounting = accounting
        self.on_error = on_error
        self.progress = progress
        self.info = dist_info(env)
        self._jobs: Dict[str, List[Job]] = {}

    def path(self, bench: Benchmark) -> Path:
        return self.out / f"{bench.name}.jsonl"

    def prepare(self, write_settings: bool = True) -> None:
        """Check the settings against run.json and list every benchmark's jobs (refusing empty ones)."""
        _check_settings(self.out, self.settings, write=write_settings and self.info.is_main)
        for b in self.benchmarks:
            jobs = b.jobs()
            keys = [k for j in jobs for k in j.keys]
            if not keys:
                raise ValueError(f"{b.name}: the split holds no items; check its data path (nothing was run)")
            if len(set(keys)) != len(keys):
                raise ValueError(f"{b.name}: duplicate result keys in the data")
            self._jobs[b.name] = jobs

    # ----------------------------------------------------------------- evaluate
    def evaluate(self) -> int:
        """Run this rank's jobs that are not done yet; returns the number of keys written."""
        from tqdm import tqdm

        if not self._jobs:
            self.prepare()
        self.out.mkdir(parents=True, exist_ok=True)
        written = 0
        rank, world = self.info.rank, self.info.world_size
        for b in self.benchmarks:
            mine = shard_slice(self._jobs[b.name], rank, world)
            with ResultWriter(shard_path(self.path(b), rank, world), key=KEY) as writer:
                todo = [j for j in mine if any(k not in writer.done for k in j.keys)]
                desc = b.name if world == 1 else f"{b.name} [{rank + 1}/{world}]"
                bar = tqdm(todo, desc=desc, disable=not self.progress, unit="job", initial=len(mine) - len(todo),
                           total=len(mine))
                for job in bar:
                    for rec in self._run_job(b, job):
                        if rec[KEY] not in writer.done:
                            writer.write(rec)
                            written += 1
        return written

    def _run_job(self, bench: Benchmark, job: Job) -> List[Dict[str, Any]]:
        t0 = time.perf_counter()
        try:
            out = bench.run(job)
        except Exception as exc:  # noqa: BLE001 - recorded per key with --on-error skip
            if self.on_error == "raise":
                raise
            reason = f"{type(exc).__name__}: {exc}"
            return [{KEY: k, "skipped": reason, "job": job.label} for k in job.keys]
        seconds = out.seconds if out.seconds is not None else time.perf_counter() - t0
        if len(out.records) != len(job.keys) or [r.get(KEY) for r in out.records] != job.keys:
            raise RuntimeError(f"{bench.name}: run() returned records for {[r.get(KEY) for r in out.records]}, "
                               f"expected {job.keys}")
        acc = None
        if self.accounting is not None:
            if out.forward is None:
                raise RuntimeError(
                    f"{bench.name}: no prefill was recorded for {job.label or job.keys[0]}; is the host patched and "
                    f"did the model run inside shared.prune?"
                )
            acc = self.accounting.rows(out.forward)
            if len(acc) != len(out.records):
                raise RuntimeError(f"{bench.name}: the prefill had {len(acc)} rows for {len(out.records)} keys")
        recs = []
        for i, r in enumerate(out.records):
            rec = dict(r)
            if acc is not None:
                rec.update(acc[i])
            rec["seconds"] = seconds
            recs.append(rec)
        return recs

    # ------------------------------------------------------------------- finish
    def _world_of(self, bench: Benchmark) -> int:
        base = self.path(bench)
        worlds = set()
        for p in self.out.glob(f"{base.stem}.rank*-of-*{base.suffix}"):
            try:
                worlds.add(int(p.name[len(base.stem):-len(base.suffix)].split("-of-")[1]))
            except (IndexError, ValueError):
                continue
        if len(worlds) > 1:
            raise ValueError(f"out: {self.out} holds {bench.name} shards of several world sizes {sorted(worlds)}")
        if worlds:
            return worlds.pop()
        if base.exists():
            return 1
        raise ValueError(f"out: no results for {bench.name} in {self.out}; run the evaluation first")

    def records(self, bench: Benchmark) -> List[Dict[str, Any]]:
        """All records of ``bench`` in dataset order: shards merged, every key present (done or skipped)."""
        order = [k for j in self._jobs[bench.name] for k in j.keys]
        world = self._world_of(bench)
        base = self.path(bench)
        if world > 1:
            return merge_shards(shard_paths(base, world), base, key=KEY, order=order)
        recs = read_results(base, KEY)
        have = {r[KEY]: r for r in recs}
        missing = [k for k in order if k not in have]
        if missing:
            raise ValueError(f"out: {base} lacks {len(missing)} results, e.g. {missing[:3]}; rerun to resume")
        return [have[k] for k in order]

    def finish(self, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Metrics and efficiency per benchmark over the complete results; writes summary.json."""
        if not self._jobs:
            self.prepare(write_settings=False)
        summary: Dict[str, Any] = {"settings": self.settings, "benchmarks": {}}
        summary.update(extra or {})
        for b in self.benchmarks:
            recs = self.records(b)
            done = [r for r in recs if "skipped" not in r]
            skipped = [r for r in recs if "skipped" in r]
            entry: Dict[str, Any] = {"title": b.title or b.name, "n": len(done), "skipped": len(skipped)}
            if skipped:
                entry["skipped_reasons"] = {r[KEY]: r["skipped"] for r in skipped[:50]}
            entry["metrics"] = b.metrics(done) if done else {}
            entry["efficiency"] = {f: mean_of(done, f) for f in EFFICIENCY_FIELDS}
            summary["benchmarks"][b.name] = entry
        all_done = [r for b in self.benchmarks for r in self.records(b) if "skipped" not in r]
        summary["efficiency"] = {f: mean_of(all_done, f) for f in EFFICIENCY_FIELDS}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        return summary

    def barrier(self) -> bool:
        """Wait for every rank when a launcher rendezvous exists; False when there is none."""
        if self.info.world_size == 1:
            return True
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return False
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
        return True


def load_summaries(run_dirs: Sequence[Any]) -> List[Dict[str, Any]]:
    """The ``summary.json`` of each run directory, in order (for a table combining several runs)."""
    out = []
    for d in run_dirs:
        f = Path(d) / "summary.json"
        if not f.exists():
            raise ValueError(f"runs: {d} has no summary.json (finish that run, or --merge-only it, first)")
        out.append(json.loads(f.read_text(encoding="utf-8")))
    return out


def write_table(header: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str], base: Path) -> str:
    """``base``.md and ``base``.csv; returns the markdown."""
    import csv

    base.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n" + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
    base.with_suffix(".md").write_text(text, encoding="utf-8")
    with open(base.with_suffix(".csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return text


def fmt(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


__all__ = ["Accounting", "Benchmark", "EFFICIENCY_FIELDS", "Job", "JobOutput", "KEY", "ON_ERROR", "Run", "fmt",
           "mean_of", "write_table"]
