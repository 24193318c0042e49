"""Fast3D GAP targets (``shared.methods.fast3d_targets``) against the stock eager attention maps.

The reference is the authors' computation (notes §6.4) on ``output_attentions=True`` of the stock
decoder: per layer the head mean, the mean over layers, rows = query rows, columns = the visual span,
each object's ``group`` tokens summed, then the mean over all rows (``a_map``) and over the question
rows (``a_map_ori``). Runs on every transformers pin of the suite (tests/engine is not needed).
"""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shared.methods.fast3d_targets import (  # noqa: E402
    annotation_keys,
    completed_keys,
    iter_pending,
    load_targets,
    object_attention_targets,
    write_targets,
)
from tests.engine import tiny  # noqa: E402

N_OBJ, GROUP = 5, 3


def reference(model, embeds, mask, vs, q0, q1, nq):
    """The authors' aggregation on the stock eager attention maps, one sample at a time."""
    out = model.model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
    att = out.attentions
    a_maps, a_oris = [], []
    for b in range(embeds.shape[0]):
        avg = torch.stack([a[b].float().mean(0) for a in att]).mean(0)  # (L, L)
        rows = avg[q0[b]:q1[b], vs[b]:vs[b] + N_OBJ * GROUP].reshape(-1, N_OBJ, GROUP).sum(-1)
        a_maps.append(rows.mean(0))
        a_oris.append(rows[:nq[b]].mean(0))
    return torch.stack(a_maps), torch.stack(a_oris)


def sample_batch(seed=0):
    torch.manual_seed(seed)
    length = 32
    embeds = torch.randn(2, length, 64)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 27:] = 0  # right padding
    vs, q0, q1, nq = [3, 5], [20, 22], [32, 27], [4, 2]
    return embeds, mask, vs, q0, q1, nq


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_matches_eager_attention_maps(chunk):
    model = tiny.build("llama", "eager", layers=3)
    embeds, mask, vs, q0, q1, nq = sample_batch()
    ref_map, ref_ori = reference(model, embeds, mask, vs, q0, q1, nq)
    a_map, a_ori = object_attention_targets(model.model, embeds, torch.tensor(vs), N_OBJ, GROUP, torch.tensor(q0),
                                            torch.tensor(q1), torch.tensor(nq), attention_mask=mask, chunk=chunk)
    assert a_map.shape == (2, N_OBJ) and a_map.dtype == torch.float32
    torch.testing.assert_close(a_map, ref_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(a_ori, ref_ori, atol=1e-5, rtol=0)
    assert not torch.allclose(a_map, a_ori, atol=1e-4)  # question rows differ from all rows


def test_batch_equals_single_samples_and_sdpa():
    embeds, mask, vs, q0, q1, nq = sample_batch(1)
    model = tiny.build("llama", "eager", layers=2)
    both = object_attention_targets(model.model, embeds, torch.tensor(vs), N_OBJ, GROUP, torch.tensor(q0),
                                    torch.tensor(q1), torch.tensor(nq), attention_mask=mask, chunk=2)
    for b in range(2):
        valid = int(mask[b].sum())
        one = object_attention_targets(model.model, embeds[b:b + 1, :valid], vs[b], N_OBJ, GROUP, q0[b], q1[b], nq[b])
        torch.testing.assert_close(one[0][0], both[0][b], atol=1e-6, rtol=0)
        torch.testing.assert_close(one[1][0], both[1][b], atol=1e-6, rtol=0)
    if ("llama", "sdpa") in tiny.available():  # same weights, SDPA layers: nothing depends on attention maps
        sdpa = tiny.build("llama", "sdpa", layers=2)
        got = object_attention_targets(sdpa.model, embeds, torch.tensor(vs), N_OBJ, GROUP, torch.tensor(q0),
                                       torch.tensor(q1), torch.tensor(nq), attention_mask=mask, chunk=5)
        torch.testing.assert_close(got[0], both[0], atol=1e-5, rtol=0)


def test_refuses_bad_spans():
    model = tiny.build("llama", "eager", layers=1)
    x = torch.randn(1, 24, 64)
    with pytest.raises(ValueError, match="visual_start"):
        object_attention_targets(model.model, x, 2, N_OBJ, GROUP, 10, 24, 3)  # span [2, 17) overlaps the rows
    with pytest.raises(ValueError, match="question_rows"):
        object_attention_targets(model.model, x, 2, N_OBJ, GROUP, 18, 24, 0)
    with pytest.raises(ValueError, match="query_end"):
        object_attention_targets(model.model, x, 2, N_OBJ, GROUP, 18, 30, 1)
    with pytest.raises(ValueError, match="chunk"):
        object_attention_targets(model.model, x, 2, N_OBJ, GROUP, 18, 24, 1, chunk=0)


ANNOS = [
    {"scene_id": "scene0000_00", "obj_id": 1, "prompt": "a"},
    {"scene_id": "scene0000_00", "obj_id": 2, "prompt": "b"},
    {"scene_id": "scene0001_00", "obj_id": 1, "prompt": "a"},
    {"scene_id": "scene0000_00", "obj_id": 1, "prompt": "a"},  # identical to the first
]


def test_annotation_keys_are_content_keys():
    keys = annotation_keys("scanqa", ANNOS)
    assert len(set(keys)) == 4 and keys[3] == keys[0] + "#1"
    assert keys[0].startswith("scanqa/scene0000_00/")
    # independent of file order and of the `index` field the authors' loader adds
    shuffled = [dict(ANNOS[2], index=0), dict(ANNOS[1], index=1)]
    assert annotation_keys("scanqa", shuffled) == [keys[2], keys[1]]
    assert annotation_keys("scanrefer", ANNOS)[0] != keys[0]


def _records(n=7):
    g = torch.Generator().manual_seed(0)
    return [{"key": f"s/scene/{i}", "index": n - 1 - i, "a_map": torch.rand(4, generator=g),
             "a_map_ori": torch.rand(4, generator=g)} for i in range(n)]


def test_write_targets_authors_format_and_resume(tmp_path):
    recs = _records()
    full = write_targets(iter(recs), tmp_path / "full.pt", flush_every=2)
    data = torch.load(full, weights_only=True)
    assert [r["index"] for r in data] == list(range(7))  # sorted by annotation index, as the authors' list
    assert all(set(r) == {"key", "index", "a_map", "a_map_ori"} for r in data)
    by_index = {r["index"]: r for r in data}  # what the authors' preprocess_attn_maps does
    torch.testing.assert_close(by_index[6]["a_map"], recs[0]["a_map"])

    out = tmp_path / "resumed.pt"

    def interrupted():
        for i, r in enumerate(recs):
            if i == 5:
                raise KeyboardInterrupt
            yield r

    with pytest.raises(KeyboardInterrupt):
        write_targets(interrupted(), out, flush_every=2)
    assert not out.exists() and os.path.exists(str(out) + ".partial")
    assert completed_keys(out) == {r["key"] for r in recs[:4]}  # flushed every 2 records
    pending = [r for _, r in iter_pending(((r["key"], r) for r in recs), out)]
    assert [r["key"] for r in pending] == [r["key"] for r in recs[4:]]
    write_targets(iter(pending), out, flush_every=2)
    assert not os.path.exists(str(out) + ".partial")
    again = torch.load(out, weights_only=True)
    assert [r["key"] for r in again] == [r["key"] for r in data]
    for a, b in zip(again, data):
        assert torch.equal(a["a_map"], b["a_map"]) and torch.equal(a["a_map_ori"], b["a_map_ori"])
    with pytest.raises(ValueError, match="twice"):
        write_targets(iter(recs[:1]), out)
    assert len(load_targets([out, full])) == 7  # shards with the same records merge by key


def test_write_targets_refuses_bad_records(tmp_path):
    bad = dict(_records(1)[0], a_map=torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="non-finite"):
        write_targets(iter([bad]), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="lacks"):
        write_targets(iter([{"key": "k", "index": 0}]), tmp_path / "y.pt")
