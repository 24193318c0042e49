"""Resumable, shardable evaluation output: JSONL result files, shard slicing and merging.

One evaluation run writes one record per item (question, expression, ...) to a JSONL file with
``ResultWriter``; each line is flushed and fsync'ed, so after a crash the file holds every finished
item plus at most one truncated line, which the next ``ResultWriter`` on the same path detects,
reports and cuts off. ``writer.done`` then tells the loop what to skip.

Sharded runs (``torchrun``/``accelerate launch``/``deepspeed``: one process per GPU) take their part
of the item list with ``shard_slice(items, rank, world)``, write to ``shard_path(base, rank, world)``,
and ``merge_shards`` joins the shard files into one in a deterministic order, refusing duplicates and,
given the expected order, missing items.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar, Union

PathLike = Union[str, "os.PathLike[str]"]
Key = Union[str, int]
T = TypeVar("T")


def _check_key(value: Any, key: str, where: str) -> Key:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"record: field {key!r} must be a str or int, got {type(value).__name__} ({where})")
    return value


def _read_jsonl(path: Path, key: str, repair: bool) -> Tuple[List[Dict[str, Any]], int, bytes]:
    """Records of a JSONL file, the byte length of its valid part and the bytes of a truncated tail.

    Only the last line may be bad, and only if it has no trailing newline (a crash mid-write); a bad
    line elsewhere raises. With ``repair=False`` a truncated tail raises too.
    """
    data = path.read_bytes()
    records: List[Dict[str, Any]] = []
    pos = 0
    lineno = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        complete = end != -1
        line = data[pos:end] if complete else data[pos:]
        lineno += 1
        try:
            rec = json.loads(line.decode("utf-8")) if line.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if complete:
                raise ValueError(f"path: {path} line {lineno} is not valid JSON ({exc}); the file is damaged "
                                 "beyond a truncated last line, repair it by hand") from exc
            if not repair:
                raise ValueError(f"path: {path} ends with a truncated line ({len(line)} bytes; the run that "
                                 "wrote it crashed): resume that run or open it with ResultWriter to "
                                 "drop the line") from exc
            return records, pos, data[pos:]
        if rec is None:
            if complete:
                raise ValueError(f"path: {path} line {lineno} is empty")
            return records, pos, data[pos:]  # trailing whitespace only
        if not isinstance(rec, dict) or key not in rec:
            raise ValueError(f"path: {path} line {lineno} is not a JSON object with field {key!r}")
        _check_key(rec[key], key, f"{path} line {lineno}")
        records.append(rec)
        if not complete:  # a whole object missing only its newline: keep it, the writer adds "\n"
            return records, len(data), b""
        pos = end + 1
    return records, pos, b""


def read_results(path: PathLike, key: str = "id") -> List[Dict[str, Any]]:
    """All records of a result file; raises on a truncated last line or a duplicate ``key``."""
    p = Path(path)
    records, _, _ = _read_jsonl(p, key, repair=False)
    _duplicates(records, key, str(p))
    return records


def _duplicates(records: Iterable[Mapping[str, Any]], key: str, where: str) -> Set[Key]:
    seen: Set[Key] = set()
    dup: List[Key] = []
    for r in records:
        k = r[key]
        if k in seen:
            dup.append(k)
        seen.add(k)
    if dup:
        raise ValueError(f"path: {where} holds {len(dup)} duplicate {key!r} values, e.g. {dup[:5]!r}")
    return seen


class ResultWriter:
    """Append-only JSONL results keyed by ``record[key]``, crash-safe and resumable.

    On open, existing records are read (``records``, ``done``); a truncated last line left by a crash is
    reported with a warning and cut off (the file is truncated to its last complete record), a last
    record lacking only its newline is kept. ``write`` appends one record as one line, then flushes
    and fsyncs; a key already present raises ValueError. Keys are str or int (JSON keeps both).
    Use as a context manager or call ``close``.
    """

    def __init__(self, path: PathLike, key: str = "id") -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"key: expected a non-empty field name, got {key!r}")
        self.path = Path(path)
        self.key = key
        self.recovered_bytes = 0
        records: List[Dict[str, Any]] = []
        if self.path.exists():
            records, valid_len, tail = _read_jsonl(self.path, key, repair=True)
            size = self.path.stat().st_size
            if tail:
                self.recovered_bytes = len(tail)
                warnings.warn(
                    f"path: {self.path} ended with a truncated record ({len(tail)} bytes: "
                    f"{tail[:80]!r}...), left by an interrupted run; it was removed and that item will be "
                    f"redone ({len(records)} complete records kept)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            needs_newline = valid_len == size and size > 0 and not tail and self._last_byte() != b"\n"
            if valid_len < size:
                with open(self.path, "r+b") as fh:
                    fh.truncate(valid_len)
                    fh.flush()
                    os.fsync(fh.fileno())
        else:
            needs_newline = False
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: Set[Key] = _duplicates(records, key, str(self.path))
        self.records: List[Dict[str, Any]] = records
        self._fh = open(self.path, "ab")
        if needs_newline:
            self._fh.write(b"\n")
            self._sync()

    def _last_byte(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1)

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def __contains__(self, item: Key) -> bool:
        return item in self.done

    def __len__(self) -> int:
        return len(self.done)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (a JSON-serialisable mapping holding ``key``) durably."""
        if self._fh.closed:
            raise ValueError(f"path: {self.path} is closed")
        if not isinstance(record, Mapping) or self.key not in record:
            raise ValueError(f"record: expected a mapping with field {self.key!r}, got {record!r:.200}")
        k = _check_key(record[self.key], self.key, str(self.path))
        if k in self.done:
            raise ValueError(f"record: {self.key}={k!r} is already in {self.path} (done items must be skipped)")
        line = json.dumps(dict(record), ensure_ascii=False)
        if "\n" in line:  # json.dumps escapes newlines inside strings; this would be a bug
            raise ValueError(f"record: serialises to more than one line: {line[:200]!r}")
        self._fh.write(line.encode("utf-8") + b"\n")
        self._sync()
        self.done.add(k)
        self.records.append(dict(record))

    def close(self) -> None:
        if not self._fh.closed:
            self._sync()
            self._fh.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# sharding


def shard_slice(items: Sequence[T], rank: int, world: int, mode: str = "contiguous") -> List[T]:
    """The items of shard ``rank`` out of ``world``.

    ``mode="contiguous"`` (default): ``world`` consecutive blocks whose sizes differ by at most one, the
    first ``len(items) % world`` blocks one longer (as ``numpy.array_split``); concatenating the
    shards in rank order gives the original order back. ``mode="strided"``: ``items[rank::world]``
    (balances runs whose item cost drifts along the list; merge with an explicit ``order``).
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world: expected an int >= 1, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank: expected an int in [0, {world - 1}], got {rank!r}")
    seq = list(items)
    if mode == "strided":
        return seq[rank::world]
    if mode != "contiguous":
        raise ValueError(f"mode: expected 'contiguous' or 'strided', got {mode!r}")
    base, extra = divmod(len(seq), world)
    start = rank * base + min(rank, extra)
    return seq[start:start + base + (1 if rank < extra else 0)]


def shard_path(base: PathLike, rank: int, world: int) -> Path:
    """``out/preds.jsonl`` → ``out/preds.rank00001-of-00004.jsonl``; ``world == 1`` returns ``base``."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world: expected an int >= 1, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank: expected an int in [0, {world - 1}], got {rank!r}")
    p = Path(base)
    if world == 1:
        return p
    return p.with_name(f"{p.stem}.rank{rank:05d}-of-{world:05d}{p.suffix}")


def shard_paths(base: PathLike, world: int) -> List[Path]:
    """``shard_path(base, r, world)`` for every rank, in rank order."""
    return [shard_path(base, r, world) for r in range(world)]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a launch: global rank, world size, rank on this node."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment, got {raw!r}") from None


def dist_info(env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Rank, world size and local rank from the launcher's environment (``os.environ`` by default).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` as set by torchrun,
    ``accelerate launch`` and the deepspeed launcher. None set → a single process (0, 1, 0). Raises
    ValueError when only some are set, or when 0 <= RANK < WORLD_SIZE, 0 <= LOCAL_RANK <= RANK or
    LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE fails.
    """
    e = os.environ if env is None else env
    rank, world, local = _env_int(e, "RANK"), _env_int(e, "WORLD_SIZE"), _env_int(e, "LOCAL_RANK")
    local_world = _env_int(e, "LOCAL_WORLD_SIZE")
    if rank is None and world is None:
        if local not in (None, 0):
            raise ValueError(f"LOCAL_RANK: is {local} but RANK and WORLD_SIZE are not set; launch with torchrun "
                             "or accelerate launch, or unset LOCAL_RANK")
        return DistInfo(0, 1, 0)
    if rank is None or world is None:
        missing = "RANK" if rank is None else "WORLD_SIZE"
        raise ValueError(f"{missing}: not set while {'WORLD_SIZE' if rank is None else 'RANK'} is; the launcher "
                         "sets both (torchrun, accelerate launch, deepspeed)")
    if world < 1:
        raise ValueError(f"WORLD_SIZE: expected >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK: expected 0 <= RANK < WORLD_SIZE={world}, got {rank}")
    if local is None:
        if world > 1:
            raise ValueError("LOCAL_RANK: not set in a multi-process launch (WORLD_SIZE="
                             f"{world}); it selects the GPU")
        local = 0
    if not 0 <= local <= rank:
        raise ValueError(f"LOCAL_RANK: expected 0 <= LOCAL_RANK <= RANK={rank}, got {local}")
    if local_world is not None and not local < local_world <= world:
        raise ValueError(f"LOCAL_WORLD_SIZE: expected LOCAL_RANK={local} < LOCAL_WORLD_SIZE <= WORLD_SIZE={world}, "
                         f"got {local_world}")
    return DistInfo(rank, world, local)


def merge_shards(
    paths: Sequence[PathLike],
    out_path: PathLike,
    key: str = "id",
    order: Optional[Sequence[Key]] = None,
) -> List[Dict[str, Any]]:
    """Join shard result files into ``out_path`` and return the merged records.

    paths: the shard files (a truncated last line raises: resume that shard first).
    order: the expected keys in their final order (e.g. the dataset's ids). Every key must appear
      exactly once across the shards: missing or unexpected keys raise ValueError listing a few.
      ``None`` keeps the shards' order concatenated in ``paths`` order (the unsharded order for
      contiguous sharding) and checks duplicates only.
    out_path: written atomically (temporary file + rename); ``.json`` gives a JSON list, anything else
      JSONL. It must not be one of ``paths``.
    """
    shard_files = [Path(p) for p in paths]
    if not shard_files:
        raise ValueError("paths: expected at least one shard file, got none")
    out = Path(out_path)
    if any(out.resolve() == p.resolve() for p in shard_files):
        raise ValueError(f"out_path: {out} is one of the shard files")
    missing_files = [str(p) for p in shard_files if not p.exists()]
    if missing_files:
        raise ValueError(f"paths: {len(missing_files)} shard files do not exist, e.g. {missing_files[:3]}")
    merged: List[Dict[str, Any]] = []
    origin: Dict[Key, str] = {}
    dup: List[str] = []
    for p in shard_files:
        for rec in read_results(p, key):
            k = rec[key]
            if k in origin:
                dup.append(f"{k!r} ({origin[k]} and {p})")
                continue
            origin[k] = str(p)
            merged.append(rec)
    if dup:
        raise ValueError(f"paths: {len(dup)} {key!r} values occur in more than one shard, e.g. {dup[:3]}")
    if order is not None:
        wanted = list(order)
        position: Dict[Key, int] = {}
        for i, k in enumerate(wanted):
            if k in position:
                raise ValueError(f"order: {k!r} is listed twice")
            position[k] = i
        missing = [k for k in wanted if k not in origin]
        if missing:
            raise ValueError(f"paths: {len(missing)} of {len(wanted)} expected {key!r} values are missing, "
                             f"e.g. {missing[:5]!r}")
        unexpected = [k for k in origin if k not in position]
        if unexpected:
            raise ValueError(f"paths: {len(unexpected)} {key!r} values are not in order, e.g. {unexpected[:5]!r}")
        merged.sort(key=lambda r: position[r[key]])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        if out.suffix == ".json":
            json.dump(merged, fh, ensure_ascii=False, indent=1)
            fh.write("\n")
        else:
            for rec in merged:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return merged


__all__ = [
    "DistInfo",
    "ResultWriter",
    "dist_info",
    "merge_shards",
    "read_results",
    "shard_path",
    "shard_paths",
    "shard_slice",
]
