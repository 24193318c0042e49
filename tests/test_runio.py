"""Resumable JSONL results, crash recovery, sharding and shard merging."""
from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from shared.runio import (
    DistInfo,
    ResultWriter,
    dist_info,
    merge_shards,
    read_results,
    shard_path,
    shard_paths,
    shard_slice,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_items(path, items, stop_after=None):
    """A miniature eval loop: skip done items, write one record per item."""
    written = []
    with ResultWriter(path, key="id") as w:
        for item in items:
            if item in w.done:
                continue
            if stop_after is not None and len(written) == stop_after:
                break
            w.write({"id": item, "pred": f"answer {item}"})
            written.append(item)
    return written


def test_truncated_line_after_crash_is_dropped_and_resume_completes(tmp_path):
    path = tmp_path / "preds.jsonl"
    items = [f"q{i}" for i in range(10)]
    assert _run_items(path, items, stop_after=4) == ["q0", "q1", "q2", "q3"]
    with open(path, "ab") as fh:  # the crash: half of the next record reached the disk
        fh.write(b'{"id": "q4", "pred": "ans')
    with pytest.warns(RuntimeWarning, match=r"truncated record \(25 bytes"):
        w = ResultWriter(path)
    assert w.done == {"q0", "q1", "q2", "q3"} and w.recovered_bytes == 25
    w.close()
    assert path.read_bytes().endswith(b'"answer q3"}\n')  # cut back to the last complete record
    assert _run_items(path, items) == [f"q{i}" for i in range(4, 10)]
    recs = read_results(path)
    assert [r["id"] for r in recs] == items and recs[4] == {"id": "q4", "pred": "answer q4"}


def test_last_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": 0}\n{"id": 1}')
    w = ResultWriter(path)
    assert w.done == {0, 1} and w.recovered_bytes == 0
    w.write({"id": 2})
    w.close()
    assert path.read_text() == '{"id": 0}\n{"id": 1}\n{"id": 2}\n'


def test_damage_before_the_last_line_and_duplicates_raise(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 0}\n{"id": \n{"id": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        ResultWriter(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 0}\n{"id": 0}\n')
    with pytest.raises(ValueError, match="duplicate 'id'"):
        ResultWriter(dup)
    with ResultWriter(tmp_path / "ok.jsonl") as w:
        w.write({"id": "a"})
        with pytest.raises(ValueError, match="record: id='a' is already in"):
            w.write({"id": "a"})
        with pytest.raises(ValueError, match="record: expected a mapping with field 'id'"):
            w.write({"qid": "b"})
        with pytest.raises(TypeError, match="must be a str or int"):
            w.write({"id": ["b"]})
    truncated = tmp_path / "t.jsonl"
    truncated.write_text('{"id": 0}\n{"id"')
    with pytest.raises(ValueError, match="truncated line"):
        read_results(truncated)


def test_killed_writer_loses_no_acknowledged_record(tmp_path):
    """A real process killed while writing: every record it reported as written survives."""
    path = tmp_path / "preds.jsonl"
    child = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("runio", {str(ROOT / "shared" / "runio.py")!r})
        runio = sys.modules["runio"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(runio)
        w = runio.ResultWriter({str(path)!r})
        i = 0
        while True:
            w.write({{"id": i, "pad": "x" * 5000}})
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    acked = [int(proc.stdout.readline()) for _ in range(50)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with _maybe_warns():
        w = ResultWriter(path)
    assert set(acked) <= w.done
    assert sorted(w.done) == list(range(len(w.done)))  # a prefix, no gap, no duplicate
    w.close()


class _maybe_warns:
    """Context manager accepting zero or one truncation warning (the kill may land between records)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert all(issubclass(r.category, RuntimeWarning) and "truncated record" in str(r.message)
                   for r in self.records)
        return False


def test_shard_slice_contiguous_and_strided():
    for n in range(0, 13):
        items = list(range(n))
        for world in range(1, 6):
            parts = [shard_slice(items, r, world) for r in range(world)]
            assert sum(parts, []) == items
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            strided = [shard_slice(items, r, world, mode="strided") for r in range(world)]
            assert sorted(sum(strided, [])) == items
            assert all(p == items[r::world] for r, p in enumerate(strided))
    assert shard_slice(list("abcdefg"), 1, 3) == ["d", "e"]  # blocks of 3, 2, 2
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 2\], got 3"):
        shard_slice([1], 3, 3)
    with pytest.raises(ValueError, match="world: expected an int >= 1"):
        shard_slice([1], 0, 0)
    with pytest.raises(ValueError, match="mode"):
        shard_slice([1], 0, 1, mode="random")


def test_shard_path_names():
    assert shard_path("out/preds.jsonl", 1, 4) == pathlib.Path("out/preds.rank00001-of-00004.jsonl")
    assert shard_path("out/preds.jsonl", 0, 1) == pathlib.Path("out/preds.jsonl")
    assert [p.name for p in shard_paths("p.jsonl", 2)] == ["p.rank00000-of-00002.jsonl", "p.rank00001-of-00002.jsonl"]


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
def test_sharded_run_merges_to_the_unsharded_result(tmp_path, mode):
    items = [f"scene{i:04d}" for i in range(17)]
    single = tmp_path / "single.jsonl"
    _run_items(single, items)
    world = 3
    base = tmp_path / "sharded.jsonl"
    for rank in range(world):
        part = shard_slice(items, rank, world, mode=mode)
        _run_items(shard_path(base, rank, world), part, stop_after=2)  # every rank crashes early ...
        _run_items(shard_path(base, rank, world), part)  # ... and resumes
    order = None if mode == "contiguous" else items
    merged = merge_shards(shard_paths(base, world), base, key="id", order=order)
    assert merged == read_results(single)
    assert base.read_bytes() == single.read_bytes()
    as_json = merge_shards(shard_paths(base, world), tmp_path / "merged.json", order=items)
    assert json.loads((tmp_path / "merged.json").read_text()) == as_json == merged


def test_merge_detects_duplicates_missing_and_bad_inputs(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"id": 1}\n{"id": 2}\n')
    b.write_text('{"id": 2}\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"1 'id' values occur in more than one shard, e\.g\. \['2 "):
        merge_shards([a, b], tmp_path / "m.jsonl")
    b.write_text('{"id": 3}\n')
    with pytest.raises(ValueError, match=r"2 of 5 expected 'id' values are missing, e\.g\. \[4, 5\]"):
        merge_shards([a, b], tmp_path / "m.jsonl", order=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"1 'id' values are not in order, e\.g\. \[3\]"):
        merge_shards([a, b], tmp_path / "m.jsonl", order=[1, 2])
    assert [r["id"] for r in merge_shards([b, a], tmp_path / "m.jsonl", order=[3, 2, 1])] == [3, 2, 1]
    with pytest.raises(ValueError, match="out_path"):
        merge_shards([a, b], a)
    b.write_text('{"id": 3}\n{"id": 4')
    with pytest.raises(ValueError, match="truncated line"):
        merge_shards([a, b], tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="do not exist"):
        merge_shards([tmp_path / "nope.jsonl"], tmp_path / "m.jsonl")


def test_dist_info_from_launcher_environment():
    assert dist_info({}) == DistInfo(0, 1, 0)
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    info = dist_info(torchrun)
    assert info == DistInfo(5, 8, 1) and not info.is_main
    assert dist_info({"RANK": "0", "WORLD_SIZE": "1"}) == DistInfo(0, 1, 0)
    cases = [
        ({"RANK": "8", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}, "RANK: expected 0 <= RANK < WORLD_SIZE=8, got 8"),
        ({"WORLD_SIZE": "2"}, "RANK: not set while WORLD_SIZE is"),
        ({"RANK": "1"}, "WORLD_SIZE: not set while RANK is"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK: not set in a multi-process launch"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}, "LOCAL_RANK: expected 0 <= LOCAL_RANK <= RANK=1"),
        ({"LOCAL_RANK": "3"}, "LOCAL_RANK: is 3 but RANK and WORLD_SIZE are not set"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK: expected an integer"),
        ({**torchrun, "LOCAL_WORLD_SIZE": "1"}, "LOCAL_WORLD_SIZE: expected LOCAL_RANK=1 < LOCAL_WORLD_SIZE"),
    ]
    for env, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            dist_info(env)



def test_dist_info_reads_os_environ(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert dist_info() == DistInfo(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_info() == DistInfo(1, 2, 1)
