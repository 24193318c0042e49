"""Validating what a host says about one prefill, and expanding it the way ``generate`` expands inputs.

A host describes a prefill per *sample* (``prepare(...)``); ``generate`` may run it on ``k`` copies of
each sample (beam search, ``num_return_sequences``), repeated with ``repeat_interleave``. When the
prefill batch is ``k`` times the number of samples described, every per-sample input is repeated the
same way, after checking that the ``k`` rows of each group really are copies (identical embeddings
and padding), so a description meant for other rows is never stretched over a batch silently.
"""
from __future__ import annotations

import hashlib
import numbers
from typing import Any, Optional, Sequence, Union

import torch

from .plan import PruningRequest

IndexLike = Union[torch.Tensor, Sequence[int]]


def is_int(x: Any) -> bool:
    """An integer that is not a bool (Python int, numpy/torch integer scalars)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral)


def _per_sample_count(value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() > 0 else 1
    return len(value)


def expansion_factor(batch: int, pending: dict) -> int:
    """k such that the prefill batch is k × the samples ``pending`` describes (1 when equal).

    Raises naming the first per-sample input whose count does not divide the batch."""
    counts = {}
    for name in ("visual_mask", "visual_spans", "query_index", "guidance_index", "visual_selection",
                 "input_keep", "sample_keys"):
        n = _per_sample_count(pending.get(name))
        if n is not None:
            counts[name] = n
    if not counts:
        return 1
    sizes = set(counts.values())
    if len(sizes) != 1:
        raise ValueError(f"prepare: per-sample inputs describe different numbers of samples: {counts}")
    n = sizes.pop()
    if n <= 0 or batch % n != 0:
        name = next(iter(counts))
        raise ValueError(
            f"{name}: expected {batch} entries (one per row of the prefill batch), or one per sample when "
            f"generate() repeats each sample k times (beam search: batch = samples x num_beams); got {n}"
        )
    return batch // n


def check_group_copies(embeds: torch.Tensor, mask2d: torch.Tensor, k: int, name: str) -> None:
    """Rows ``g·k … g·k + k − 1`` must be copies of row ``g·k`` (embeddings and padding)."""
    if k == 1:
        return
    b = embeds.shape[0]
    e = embeds.reshape(b // k, k, *embeds.shape[1:])
    m = mask2d.reshape(b // k, k, -1)
    if not (torch.equal(e, e[:, :1].expand_as(e)) and torch.equal(m, m[:, :1].expand_as(m))):
        raise ValueError(
            f"{name}: one entry per sample was given for a batch of {b} rows = {b // k} samples x {k}, but the "
            f"{k} rows of a sample are not copies of each other (as generate() makes them for beams); give one "
            f"entry per row"
        )


def _repeat(value: Any, k: int) -> Any:
    if value is None or k == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(k, dim=0)
    return [v for v in value for _ in range(k)]


def expand_pending(pending: dict, k: int) -> dict:
    return {name: _repeat(v, k) for name, v in pending.items()}


def _positions(name: str, value: IndexLike, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.to(device)
    else:
        items = list(value)
        if not all(is_int(v) for v in items):
            raise ValueError(f"{name}: expected integer positions, got {items!r}")
        t = torch.tensor([int(v) for v in items], device=device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer positions, got a {t.dtype} tensor")
    t = t.long().reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"{name}: expected {batch} positions, one per sample, got {t.numel()}")
    return t


def _check_text_query(name: str, qi: torch.Tensor, valid: torch.Tensor, vm: torch.Tensor, length: int) -> None:
    """A scoring query must be a valid, non-visual token that comes after all of its sample's visual tokens."""
    for b, q in enumerate(qi.tolist()):
        if not 0 <= q < length:
            raise ValueError(f"{name}: position {q} of sample {b} lies outside the sequence of length {length}")
        if not bool(valid[b, q]):
            raise ValueError(f"{name}: position {q} of sample {b} is a padding token (attention_mask == 0)")
        if bool(vm[b, q]):
            raise ValueError(f"{name}: position {q} of sample {b} is a visual token; the query must be a text token")
        vis = torch.nonzero(vm[b], as_tuple=False).flatten()
        if vis.numel() and q < int(vis[-1]):
            raise ValueError(
                f"{name}: position {q} of sample {b} precedes its visual tokens (last at {int(vis[-1])}); a causal "
                f"query placed there does not attend to them, so it cannot rank them"
            )


def digest_key(embeds: torch.Tensor) -> str:
    """Stable key of a sample's visual embeddings (their exact bytes): the default seed key of
    per-sample random draws. Equal embeddings give equal keys whatever the batch."""
    data = embeds.detach().to("cpu").contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.sha1(data.numpy().tobytes()).hexdigest()


def build_request(
    embeds: torch.Tensor,
    mask2d: torch.Tensor,
    *,
    visual_mask: Optional[torch.Tensor] = None,
    visual_spans: Optional[Sequence[Sequence[int]]] = None,
    query_index: Optional[IndexLike] = None,
    guidance_index: Optional[IndexLike] = None,
    visual_selection: Optional[Sequence[Any]] = None,
    input_keep: Optional[torch.Tensor] = None,
    sample_keys: Optional[Sequence[Any]] = None,
    needs_query: bool = True,
) -> PruningRequest:
    """Validate one prefill's description against its (B, L) batch; see ``DecoderRunner.prepare``.

    needs_query: whether the method ranks with ``query_index`` (then the default query, each sample's
    last token, is checked like a given one)."""
    batch, length = mask2d.shape
    device = mask2d.device
    valid = mask2d.bool()
    if (visual_mask is None) == (visual_spans is None):
        raise ValueError("visual_mask/visual_spans: give exactly one of them for the prefill")
    if visual_spans is not None:
        if len(visual_spans) != batch:
            raise ValueError(f"visual_spans: expected {batch} (start, end) pairs, one per sample, got {len(visual_spans)}")
        vm = torch.zeros(batch, length, dtype=torch.bool, device=device)
        for b, span in enumerate(visual_spans):
            if span is None:
                continue  # a text-only sample
            if len(span) != 2 or not all(is_int(x) for x in span):
                raise ValueError(f"visual_spans[{b}]: expected an integer (start, end) pair or None, got {span!r}")
            s, e = int(span[0]), int(span[1])
            if e <= s:
                raise ValueError(
                    f"visual_spans[{b}]: ({s}, {e}) is empty or reversed; expected start < end (None for a "
                    f"sample without visual tokens)"
                )
            if s < 0 or e > length:
                raise ValueError(
                    f"visual_spans[{b}]: ({s}, {e}) lies outside the sequence of length {length}; expected "
                    f"0 <= start < end <= {length}"
                )
            vm[b, s:e] = True
    else:
        vm = torch.as_tensor(visual_mask, device=device)
        if vm.dtype != torch.bool or tuple(vm.shape) != (batch, length):
            raise ValueError(
                f"visual_mask: expected a bool tensor of shape ({batch}, {length}), got {vm.dtype} {tuple(vm.shape)}"
            )
    if bool((vm & ~valid).any()):
        raise ValueError("visual_mask: some visual positions fall on padding (attention_mask == 0)")

    keep_in = None
    if input_keep is not None:
        keep_in = torch.as_tensor(input_keep, device=device)
        if keep_in.dtype != torch.bool or tuple(keep_in.shape) != (batch, length):
            raise ValueError(
                f"input_keep: expected a bool tensor of shape ({batch}, {length}), got {keep_in.dtype} {tuple(keep_in.shape)}"
            )
        if bool((~keep_in & valid & ~vm).any()):
            raise ValueError("input_keep: only visual tokens may be removed before the LLM; text tokens must stay")
        keep_in = keep_in & valid
        if bool((keep_in.sum(1) == 0).any()):
            raise ValueError("input_keep: a sample would enter the LLM with no token")
    llm_valid = valid if keep_in is None else keep_in
    llm_vm = vm & llm_valid

    if query_index is None:
        last = torch.arange(length, device=device).expand(batch, length)
        qi = torch.where(llm_valid, last, torch.full_like(last, -1)).max(dim=1).values
        if needs_query:
            _check_text_query("query_index (default: each sample's last token)", qi, llm_valid, llm_vm, length)
    else:
        qi = _positions("query_index", query_index, batch, device)
        _check_text_query("query_index", qi, llm_valid, llm_vm, length)
    gi = None
    if guidance_index is not None:
        gi = _positions("guidance_index", guidance_index, batch, device)
        _check_text_query("guidance_index", gi, llm_valid, llm_vm, length)

    sel = None
    if visual_selection is not None:
        if len(visual_selection) != batch:
            raise ValueError(f"visual_selection: expected {batch} index tensors, one per sample, got {len(visual_selection)}")
        sel = []
        counts = llm_vm.sum(dim=1)
        for b, idx in enumerate(visual_selection):
            t = torch.as_tensor(idx, device=device)
            if t.is_floating_point() or t.dtype == torch.bool:
                raise ValueError(f"visual_selection[{b}]: expected integer indices, got a {t.dtype} tensor")
            t = t.long().reshape(-1)
            n = int(counts[b])
            if n == 0 and t.numel() == 0:
                sel.append(t)
                continue
            if t.numel() == 0 or bool((t[1:] <= t[:-1]).any()) or int(t[0]) < 0 or int(t[-1]) >= n:
                raise ValueError(
                    f"visual_selection[{b}]: expected sorted, distinct, non-empty indices in [0, {n}) "
                    f"(the sample's visual tokens), got {t.tolist()[:8]}{'...' if t.numel() > 8 else ''}"
                )
            sel.append(t)

    keys = None
    if sample_keys is not None:
        keys = list(sample_keys)
        if len(keys) != batch:
            raise ValueError(f"sample_keys: expected {batch} keys, one per sample, got {len(keys)}")
    return PruningRequest(
        visual_mask=llm_vm, query_index=qi, guidance_index=gi, visual_selection=sel,
        input_keep=keep_in, source_visual_counts=vm.sum(dim=1), sample_keys=keys, embeds=embeds,
    )


__all__ = ["build_request", "check_group_copies", "digest_key", "expand_pending", "expansion_factor", "is_int"]
