"""GAP training targets ("global attention maps") from a teacher-forced prefill, without attention maps.

For each sample the target is the attention the LLM pays, from the text after the object list
(question + answer rows), to each object's group of visual tokens: per layer the head-mean attention
probabilities, averaged over layers, summed over each object's ``group`` tokens, then

- ``a_map``: mean over all query rows (question + "ASSISTANT:" + answer),
- ``a_map_ori``: mean over the first ``question_rows`` rows (the question only),

which is what the authors' ``extract_attn_maps`` computes from ``output_attentions`` (there: 32
layers, 32 heads, 100 objects × 3 tokens). Here the decoder layers run one at a time and the
attention rows are recomputed from each layer's own q/k (``shared.engine.llm_attention``) in chunks
of query rows, so memory stays at one layer's activations plus (heads × chunk × sequence); it works
under eager, SDPA and flash attention alike.

Chat-Scene layout (the authors' ``get_attn_maps``): inputs_embeds = cat(p_0, object list, p_1,
embed(" {prompt} ASSISTANT: {caption}")); visual_start = len(p_0) (45), n_obj = 100, group = 3,
query_start = len(p_0) + 300 + len(p_1), query_end = L, question_rows = the token count of
" {prompt} " (no special tokens), object IDs in the prompt rewritten to slot IDs first.

Files: ``write_targets`` writes the authors' list ``[{index, a_map, a_map_ori}, ...]`` (plus a stable
``key`` per record, see ``annotation_keys``), resumably.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ..engine.adapters import DecoderAdapter
from ..engine.llm_attention import prefill_attention_chunks

IntOrTensor = Union[int, Sequence[int], torch.Tensor]


def _per_sample(name: str, value: IntOrTensor, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected an int or (B,) ints, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name}: expected an int or ({batch},) ints, got shape {tuple(t.shape)}")
    return t.long()


@torch.no_grad()
def object_attention_targets(
    decoder: nn.Module,
    inputs_embeds: torch.Tensor,
    visual_start: IntOrTensor,
    n_obj: int,
    group: int,
    query_start: IntOrTensor,
    query_end: IntOrTensor,
    question_rows: IntOrTensor,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    chunk: int = 64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer- and head-averaged attention from the query rows to each object's visual tokens.

    decoder: a LLaMA/Qwen2 decoder (``LlamaModel``, PEFT-wrapped projections allowed), transformers
    4.31–5.x; inputs_embeds: (B, L, d) the teacher-forced prefill (prompt + answer tokens);
    visual_start: s, the visual span is [s, s + n_obj·group), object o owning tokens
    [s + o·group, s + (o+1)·group) (Chat-Scene: s = 45, n_obj = 100, group = 3);
    query_start / query_end: the query rows [query_start, query_end) (question + answer);
    question_rows: how many of them are the question (rows of ``a_map_ori``), >= 1;
    all of these an int or (B,) per sample. attention_mask: (B, L) padding mask (1 = token), the
    query rows must be tokens; position_ids: (B, L) or (1, L), default 0..L-1 (the stock forward).
    chunk: query rows scored at once per layer.

    Returns (a_map, a_map_ori): (B, n_obj) float32 each — summed attention probability per object,
    averaged over heads, layers and the respective rows.
    """
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
        raise ValueError("inputs_embeds: expected a (B, L, d) tensor")
    for name, v in (("n_obj", n_obj), ("group", group), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    ad = DecoderAdapter(decoder)
    batch, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    vs = _per_sample("visual_start", visual_start, batch, device)
    q0 = _per_sample("query_start", query_start, batch, device)
    q1 = _per_sample("query_end", query_end, batch, device)
    nq = _per_sample("question_rows", question_rows, batch, device)
    span = n_obj * group
    if attention_mask is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask: expected shape ({batch}, {length}), got {tuple(attention_mask.shape)}")
        valid = attention_mask.to(device).bool()
    rows = q1 - q0
    for b in range(batch):
        s, a, e, q = int(vs[b]), int(q0[b]), int(q1[b]), int(nq[b])
        if s < 0 or s + span > a:
            raise ValueError(
                f"visual_start: sample {b}: the visual span [{s}, {s + span}) (n_obj·group = {span}) must end at or "
                f"before query_start {a}"
            )
        if not a < e <= length:
            raise ValueError(f"query_end: sample {b}: expected query_start {a} < query_end <= L = {length}, got {e}")
        if not 1 <= q <= e - a:
            raise ValueError(f"question_rows: sample {b}: expected 1 ≤ question_rows ≤ {e - a} query rows, got {q}")
        if not bool(valid[b, s:s + span].all()) or not bool(valid[b, a:e].all()):
            raise ValueError(f"attention_mask: sample {b}: padding inside the visual span or the query rows")
    if position_ids is None:
        pos = torch.arange(length, device=device).expand(batch, length)
    else:
        pos = position_ids.to(device).reshape(-1, length).expand(batch, length)

    cols = (vs[:, None] + torch.arange(span, device=device)[None, :])  # (B, V)
    sum_all = torch.zeros(batch, n_obj, dtype=torch.float32, device=device)
    sum_q = torch.zeros_like(sum_all)
    max_rows = int(rows.max())
    slots = q0[:, None] + torch.minimum(torch.arange(max_rows, device=device)[None, :], rows[:, None] - 1)  # (B, R)
    for _, r0, probs in prefill_attention_chunks(ad, inputs_embeds, pos, valid, slots, chunk):  # probs (B, c, L)
        c = probs.shape[1]
        offs = torch.arange(r0, r0 + c, device=device)[None, :]  # (1, c)
        vis = probs.gather(2, cols[:, None, :].expand(-1, c, -1))
        per_obj = vis.view(batch, c, n_obj, group).sum(-1)  # (B, c, n_obj)
        w_all = (offs < rows[:, None]).float()
        w_q = (offs < nq[:, None]).float()
        sum_all += (per_obj * w_all[..., None]).sum(1)
        sum_q += (per_obj * w_q[..., None]).sum(1)
    layers = float(ad.num_layers)
    return sum_all / (rows[:, None].float() * layers), sum_q / (nq[:, None].float() * layers)


# ---------------------------------------------------------------------------------------- keys
def annotation_keys(set_name: str, annotations: Sequence[Mapping[str, Any]]) -> List[str]:
    """A stable id per annotation: ``"{set}/{scene_id}/{sha1 of the annotation's JSON}"``.

    It does not depend on the file's order (unlike the authors' list position ``index``) and changes
    when the annotation's content changes; the k-th repeat of an identical annotation gets ``#k``.
    The ``index`` field the authors' loader adds is ignored."""
    if not isinstance(set_name, str) or not set_name or "/" in set_name:
        raise ValueError(f"set_name: expected a non-empty name without '/', got {set_name!r}")
    keys, seen = [], {}  # type: List[str], Dict[str, int]
    for i, anno in enumerate(annotations):
        if not isinstance(anno, Mapping) or "scene_id" not in anno:
            raise ValueError(f"annotations: entry {i} is not a dict with a 'scene_id'")
        body = {k: v for k, v in anno.items() if k != "index"}
        digest = hashlib.sha1(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
        key = f"{set_name}/{anno['scene_id']}/{digest}"
        n = seen.get(key, 0)
        seen[key] = n + 1
        keys.append(key if n == 0 else f"{key}#{n}")
    return keys


# ---------------------------------------------------------------------------------------- files
def _partial_path(out_path: str) -> str:
    return out_path + ".partial"


def _check_record(rec: Any) -> Dict[str, Any]:
    if not isinstance(rec, Mapping):
        raise ValueError(f"records: expected dicts with key, index, a_map, a_map_ori; got {type(rec).__name__}")
    missing = [k for k in ("key", "index", "a_map", "a_map_ori") if k not in rec]
    if missing:
        raise ValueError(f"records: a record lacks {', '.join(missing)}")
    out = dict(rec)
    for k in ("a_map", "a_map_ori"):
        t = out[k]
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"records: {k} of {out['key']!r} must be a (n_obj,) tensor")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"records: {k} of {out['key']!r} has non-finite values")
        out[k] = t.detach().float().cpu()
    return out


def _atomic_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def completed_keys(out_path: Union[str, os.PathLike]) -> Set[str]:
    """Keys already written to ``out_path`` (finished file or its ``.partial``): skip these on resume."""
    out_path = os.fspath(out_path)
    for p in (out_path, _partial_path(out_path)):
        if os.path.exists(p):
            return {r["key"] for r in torch.load(p, map_location="cpu", weights_only=True) if "key" in r}
    return set()


def write_targets(records: Iterable[Mapping[str, Any]], out_path: Union[str, os.PathLike], flush_every: int = 64,
                  total: Optional[int] = None) -> str:
    """Write target records to ``out_path`` in the authors' format, resumably.

    records: dicts ``{key, index, a_map (n_obj,), a_map_ori (n_obj,)}`` (key from ``annotation_keys``,
    index = position in the annotation file). Every ``flush_every`` records the list so far is saved
    to ``out_path + ".partial"``; a rerun continues from it (build ``records`` lazily and skip
    ``completed_keys(out_path)``). At the end the list, sorted by index, goes to ``out_path`` and the
    partial file is removed. A key written twice is an error. Returns the path written.
    """
    from tqdm.auto import tqdm

    out_path = os.fspath(out_path)
    partial = _partial_path(out_path)
    if os.path.exists(out_path):
        done = torch.load(out_path, map_location="cpu", weights_only=True)
    elif os.path.exists(partial):
        done = torch.load(partial, map_location="cpu", weights_only=True)
    else:
        done = []
    seen = {r["key"] for r in done}
    since = 0
    for rec in tqdm(records, total=total, desc=os.path.basename(out_path), initial=len(done)):
        rec = _check_record(rec)
        if rec["key"] in seen:
            raise ValueError(f"records: key {rec['key']!r} written twice (resume: skip completed_keys(out_path))")
        seen.add(rec["key"])
        done.append(rec)
        since += 1
        if since >= flush_every:
            _atomic_save(done, partial)
            since = 0
    done.sort(key=lambda r: (r["index"], r["key"]))
    _atomic_save(done, out_path)
    if os.path.exists(partial):
        os.remove(partial)
    return out_path


def load_targets(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[Dict[str, Any]]:
    """Records of one or more target files (e.g. rank shards), authors' or this project's format.
    A key (or, for files without keys, an index) present twice with different values is an error."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: Dict[Any, Dict[str, Any]] = {}
    for p in paths:
        data = torch.load(os.fspath(p), map_location="cpu", weights_only=True)
        if isinstance(data, Mapping):  # {index: {...}}: the authors' prediction layout
            data = [dict(v, index=k) if "index" not in v else dict(v) for k, v in data.items()]
        for r in data:
            ident = r.get("key", ("index", r["index"]))
            if ident in out and not torch.equal(out[ident]["a_map"], r["a_map"]):
                raise ValueError(f"paths: {ident!r} appears twice with different a_map ({os.fspath(p)})")
            out[ident] = dict(r)
    return list(out.values())


def iter_pending(items: Iterable[Tuple[str, Any]], out_path: Union[str, os.PathLike]) -> Iterator[Tuple[str, Any]]:
    """The (key, item) pairs of ``items`` whose key is not yet in ``out_path`` (resume helper)."""
    done = completed_keys(out_path)
    for key, item in items:
        if key not in done:
            yield key, item
