"""AdaToken-3D calibration: span-block attention sums of an unpruned prefill, without attention maps.

For each decoder layer i (engine layer i − 1) the head-averaged softmax attention Ā⁽ⁱ⁾[query, key] of the
unpruned prefill is summed over three blocks (``shared/notes/hosts-and-methods/LLaVA-3D-AdaToken-3D.md`` §6.2–6.3,
rows = queries, columns = keys):

- SPA→SPA: q ∈ SPA, k ∈ SPA, k < q (strict lower triangle, self excluded)  → ``SpanBlockSums.spa_spa`` (Eq.1)
- PRM→SPA: q ∈ PRM, k ∈ SPA                                               → ``prm_spa`` (λ_s-p, Eq.3)
- SPA→SYS: q ∈ SPA, k ∈ SYS                                               → ``spa_sys`` (λ_s-s, Eq.3)

The layers run one at a time and the attention rows of the SPA and PRM queries are recomputed from each
layer's own q/k in chunks (``shared.engine.llm_attention.prefill_attention_chunks``), so memory stays at one
layer's activations plus (heads × chunk × n) and eager, SDPA and flash attention give the same sums. Run it on
K calibration prompts and add the results with ``accumulate``; ``adatoken.information_flow`` turns the total
into Eq.1–4.

On any host, through the session (the spans come from the visual mask the host publishes)::

    with shared.prune(model, AdaTokenCalibration()) as session:
        model(**forward_kwargs)              # outputs equal the stock model's
    session.engine.last                      # [SpanBlockSums] per sample of the last prefill
    session.engine.total                     # accumulated over every prefill of the block

Per sample, SYS = the valid tokens before the visual run, SPA = the visual run, PRM = the valid tokens after it.
The unpruned forward runs once (the engine's pass-through runner, which reproduces the stock decoder); each
layer's input is read by a pre-hook and the SPA/PRM attention rows are recomputed from it in chunks, so the
cost over a plain prefill is, per layer, one more K projection of the n tokens, Q projections of the N + |PRM|
query rows and their (heads × (N + |PRM|) × n) logits and softmax (measured on CPU: a calibrated prefill takes 1.5–2.3× a stock one at
n = 2057, d = 1024).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..engine.adapters import DecoderAdapter, rotate_half
from ..engine.llm_attention import prefill_attention_chunks
from ..engine.request import build_request, expansion_factor
from ..engine.runner import DecoderRunner, PrefillStats
from .adatoken import SpanBlockSums
from .base import as_int

Span = Union[Tuple[int, int], Sequence[Sequence[int]], torch.Tensor]


def _spans(name: str, value: Span, batch: int, length: int) -> torch.Tensor:
    """``value`` as (B, 2) long [start, end): one (start, end) pair for all samples or one per sample."""
    t = torch.as_tensor(value)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected a (start, end) pair of ints or ({batch}, 2) such pairs, got dtype {t.dtype}")
    if t.dim() == 1 and t.shape[0] == 2:
        t = t[None].expand(batch, 2)
    if tuple(t.shape) != (batch, 2):
        raise ValueError(f"{name}: expected a (start, end) pair or ({batch}, 2) pairs, got shape {tuple(t.shape)}")
    t = t.long()
    for b in range(batch):
        s, e = int(t[b, 0]), int(t[b, 1])
        if not 0 <= s < e <= length:
            raise ValueError(f"{name}: sample {b}: expected 0 <= start < end <= L = {length}, got [{s}, {e})")
    return t


class _BlockRows:
    """The SPA and PRM query rows of B samples and the block sums of their attention rows.

    sys_/spa/prm: (B, 2) long [start, end) slot ranges on ``device``; length: n. ``slots`` (B, R) lists each
    sample's SPA rows then its PRM rows (short samples repeat their last row with weight 0); ``add`` folds one
    chunk of ``attention_rows`` into ``sums`` (B, 3, L) float64 [spa_spa, prm_spa, spa_sys]."""

    def __init__(self, sys_: torch.Tensor, spa: torch.Tensor, prm: torch.Tensor, length: int, num_layers: int) -> None:
        device = spa.device
        batch = spa.shape[0]
        self.spans = [(int(a[0]), int(a[1]), int(b[0]), int(b[1])) for a, b in zip(sys_.tolist(), spa.tolist())]
        self.n_spa, self.n_prm = spa[:, 1] - spa[:, 0], prm[:, 1] - prm[:, 0]  # (B,)
        n_rows = self.n_spa + self.n_prm
        offs = torch.arange(int(n_rows.max()), device=device)[None, :]  # (1, R)
        offs = torch.minimum(offs.expand(batch, -1), n_rows[:, None] - 1)
        is_spa_row = offs < self.n_spa[:, None]  # (B, R)
        self.slots = torch.where(is_spa_row, spa[:, :1] + offs, prm[:, :1] + offs - self.n_spa[:, None])
        live = torch.arange(offs.shape[1], device=device)[None, :] < n_rows[:, None]
        self.w_spa, self.w_prm = (is_spa_row & live).float(), (~is_spa_row & live).float()
        self.key = torch.arange(length, device=device)
        self.spa_col = (self.key >= spa[:, :1]) & (self.key < spa[:, 1:])  # (B, n)
        self.sys_col = (self.key >= sys_[:, :1]) & (self.key < sys_[:, 1:])
        self.sums = torch.zeros(batch, 3, num_layers, dtype=torch.float64, device=device)

    @property
    def rows(self) -> int:
        return int(self.slots.shape[1])

    def add(self, layer: int, r0: int, probs: torch.Tensor) -> None:
        """probs: (B, c, n) head-averaged attention rows of ``slots[:, r0:r0 + c]`` at ``layer``'s input."""
        c = probs.shape[1]
        q = self.slots[:, r0:r0 + c]
        to_spa = (probs * self.spa_col[:, None, :]).sum(-1)  # (B, c)
        below = self.spa_col[:, None, :] & (self.key[None, None, :] < q[..., None])
        to_spa_below = (probs * below).sum(-1)
        to_sys = (probs * self.sys_col[:, None, :]).sum(-1)
        ws, wp = self.w_spa[:, r0:r0 + c], self.w_prm[:, r0:r0 + c]
        self.sums[:, 0, layer] += (to_spa_below * ws).sum(1).double()
        self.sums[:, 1, layer] += (to_spa * wp).sum(1).double()
        self.sums[:, 2, layer] += (to_sys * ws).sum(1).double()

    def add_heads(self, layer: int, r0: int, probs: torch.Tensor) -> None:
        """``add`` for (B, H, c, n) per-head probabilities, from contiguous key slices: Σ over SYS or SPA keys
        per head, then the head mean; SPA→SPA below the diagonal = the row's SPA mass − its diagonal entry
        (keys after the query have probability 0)."""
        c = probs.shape[2]
        q = self.slots[:, r0:r0 + c]  # (B, c)
        ws, wp = self.w_spa[:, r0:r0 + c], self.w_prm[:, r0:r0 + c]
        for b, (s0, s1, a0, a1) in enumerate(self.spans):
            p = probs[b]  # (H, c, n)
            to_sys = p[..., s0:s1].sum(-1).mean(0)  # (c,)
            to_spa = p[..., a0:a1].sum(-1).mean(0)
            diag = p.gather(-1, q[b].view(1, c, 1).expand(p.shape[0], c, 1)).squeeze(-1).mean(0)
            self.sums[b, 0, layer] += ((to_spa - diag) * ws[b]).sum().double()
            self.sums[b, 1, layer] += (to_spa * wp[b]).sum().double()
            self.sums[b, 2, layer] += (to_sys * ws[b]).sum().double()

    def per_sample(self) -> List[SpanBlockSums]:
        out = self.sums.cpu().numpy()
        return [SpanBlockSums(spa_spa=out[b, 0], prm_spa=out[b, 1], spa_sys=out[b, 2], spa_rows=int(self.n_spa[b]),
                              prm_rows=int(self.n_prm[b])) for b in range(out.shape[0])]


def _checked_spans(sys_span: Span, spa_span: Span, prm_span: Span, valid: torch.Tensor):
    batch, length = valid.shape
    sys_, spa, prm = (_spans(n, v, batch, length).to(valid.device)
                      for n, v in (("sys_span", sys_span), ("spa_span", spa_span), ("prm_span", prm_span)))
    for b in range(batch):
        if int(sys_[b, 1]) > int(spa[b, 0]) or int(spa[b, 1]) > int(prm[b, 0]):
            raise ValueError(
                f"spa_span: sample {b}: expected SYS {sys_[b].tolist()} ≤ SPA {spa[b].tolist()} ≤ PRM "
                f"{prm[b].tolist()} without overlap (a query only sees earlier keys)")
        for name, sp in (("sys_span", sys_), ("spa_span", spa), ("prm_span", prm)):
            if not bool(valid[b, int(sp[b, 0]):int(sp[b, 1])].all()):
                raise ValueError(f"attention_mask: sample {b}: padding inside {name} {sp[b].tolist()}")
    return sys_, spa, prm


@torch.no_grad()
def span_block_sums_per_sample(
    decoder: nn.Module,
    inputs_embeds: torch.Tensor,
    sys_span: Span,
    spa_span: Span,
    prm_span: Span,
    attention_mask: Optional[torch.Tensor] = None,
    chunk: int = 64,
) -> List[SpanBlockSums]:
    """``span_block_sums`` for each sample of the batch separately (B entries, same arguments)."""
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
        raise ValueError("inputs_embeds: expected a (B, n, d) tensor")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    ad = DecoderAdapter(decoder)
    batch, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if attention_mask is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask: expected shape ({batch}, {length}), got {tuple(attention_mask.shape)}")
        valid = attention_mask.to(device).bool()
    rows = _BlockRows(*_checked_spans(sys_span, spa_span, prm_span, valid), length, ad.num_layers)
    positions = torch.arange(length, device=device).expand(batch, length)
    for j, r0, probs in prefill_attention_chunks(ad, inputs_embeds, positions, valid, rows.slots, chunk):
        rows.add(j, r0, probs)  # probs (B, c, n)
    return rows.per_sample()


def span_block_sums(
    decoder: nn.Module,
    inputs_embeds: torch.Tensor,
    sys_span: Span,
    spa_span: Span,
    prm_span: Span,
    attention_mask: Optional[torch.Tensor] = None,
    chunk: int = 64,
) -> SpanBlockSums:
    """SPA→SPA (k < q), PRM→SPA and SPA→SYS sums of the head-averaged prefill attention, per layer.

    decoder: a LLaMA/Qwen2 decoder (``LlamaModel``; PEFT-wrapped projections allowed), transformers 4.31–5.x;
    inputs_embeds: (B, n, d) the unpruned prefill; sys_span / spa_span / prm_span: [start, end) slot ranges,
    a (start, end) pair for every sample or (B, 2) pairs, non-empty, in the order SYS ≤ SPA ≤ PRM without
    overlap (LLaVA-3D: (0, s), (s, s + N), (s + N, n)); attention_mask: (B, n) padding mask (1 = token), the
    spans must be tokens; positions are 0..n−1 (the stock forward). chunk: query rows scored at once per layer.

    Returns ``SpanBlockSums`` with (L,) float64 sums over the B samples and spa_rows = Σ_b N_b,
    prm_rows = Σ_b |PRM_b|.
    """
    per = span_block_sums_per_sample(decoder, inputs_embeds, sys_span, spa_span, prm_span, attention_mask, chunk)
    total = per[0]
    for s in per[1:]:
        total = accumulate(total, s)
    return total


def accumulate(a: SpanBlockSums, b: SpanBlockSums) -> SpanBlockSums:
    """The block sums and row counts of two calibration results added (same layer count)."""
    for name, v in (("a", a), ("b", b)):
        if not isinstance(v, SpanBlockSums):
            raise ValueError(f"{name}: expected a SpanBlockSums, got {type(v).__name__}")
    if a.num_layers != b.num_layers:
        raise ValueError(f"b: expected sums over {a.num_layers} layers like a, got {b.num_layers}")
    return SpanBlockSums(
        spa_spa=np.add(a.spa_spa, b.spa_spa),
        prm_spa=np.add(a.prm_spa, b.prm_spa),
        spa_sys=np.add(a.spa_sys, b.spa_sys),
        spa_rows=a.spa_rows + b.spa_rows,
        prm_rows=a.prm_rows + b.prm_rows,
    )


# ----------------------------------------------------------------------------- session runner
def layer_row_chunks(
    adapter: DecoderAdapter,
    layer_idx: int,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor,
    query_slots: torch.Tensor,
    chunk: int,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """``engine.llm_attention.attention_rows`` of ``query_slots[:, r0:r0 + chunk]`` for r0 = 0, chunk, …, with
    the layer's normed input, RoPE tables and rotated keys computed once per layer (not once per chunk).

    hidden: (B, n, d) the layer's input; positions: (B, n); key_valid: (B, n) bool; query_slots: (B, R).
    Yields (r0, (B, heads, c, w) float32 probabilities per head over the first w = max slot + 1 keys (the rest
    are causally masked for the whole chunk); their head mean is ``attention_rows`` truncated to w keys. Extra
    memory: K (B, heads, n, head_dim) in the model's dtype plus (B, heads, chunk, n) float32."""
    layer = adapter.layers[layer_idx]
    attn = layer.self_attn
    batch, n, _ = hidden.shape
    hd, h, hkv = adapter.head_dim, adapter.num_heads, adapter.num_kv_heads
    x = layer.input_layernorm(hidden)
    cos, sin = adapter.cos_sin(layer_idx, x, positions)  # (B, n, hd)
    k = attn.k_proj(x).view(batch, n, hkv, hd).transpose(1, 2)  # (B, Hkv, n, hd)
    k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
    k = k.contiguous()  # (B, H, n, hd): its transpose feeds every chunk's matmul without a copy
    for r0 in range(0, query_slots.shape[1], chunk):
        slots = query_slots[:, r0:r0 + chunk]
        c = slots.shape[1]
        width = int(slots.max()) + 1  # keys after the chunk's last query are masked for every row: left out
        xq = x.gather(1, slots.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        q = attn.q_proj(xq).view(batch, c, h, hd).transpose(1, 2)  # (B, H, c, hd)
        idx = slots.unsqueeze(-1).expand(-1, -1, hd)
        q = q * cos.gather(1, idx).unsqueeze(1) + rotate_half(q) * sin.gather(1, idx).unsqueeze(1)
        logits = torch.matmul(q, k[:, :, :width].transpose(2, 3)).mul_(adapter.scaling)  # (B, H, c, width)
        k_slot = torch.arange(width, device=hidden.device).view(1, 1, width)
        hidden_key = (k_slot > slots.unsqueeze(-1)) | ~key_valid[:, None, :width]  # (B, c, width)
        logits.masked_fill_(hidden_key.unsqueeze(1), torch.finfo(logits.dtype).min)
        yield r0, torch.softmax(logits, dim=-1, dtype=torch.float32)


def spans_from_mask(visual_mask: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(SYS, SPA, PRM) as three (B, 2) long [start, end) tensors from a (B, n) visual mask and padding mask.

    SPA is the sample's visual run, SYS the valid tokens before it, PRM the valid tokens after it. Refused: a
    sample without visual tokens, a visual run with gaps, padding between a sample's tokens, an empty SYS or PRM.
    """
    vm, valid = visual_mask.bool(), valid.bool()
    if vm.shape != valid.shape or vm.dim() != 2:
        raise ValueError(f"visual_mask: expected a (B, n) mask like the attention mask {tuple(valid.shape)}, got "
                         f"{tuple(vm.shape)}")
    out = torch.zeros(3, vm.shape[0], 2, dtype=torch.long)
    for b in range(vm.shape[0]):
        idx = torch.nonzero(vm[b], as_tuple=False).flatten()
        if idx.numel() == 0:
            raise ValueError(f"visual_mask: sample {b} has no visual tokens; AdaToken-3D calibration needs the layout "
                             f"SYS | SPA (visual run) | PRM")
        s, e = int(idx[0]), int(idx[-1]) + 1
        if e - s != idx.numel():
            runs = int((idx[1:] - idx[:-1] != 1).sum()) + 1
            raise ValueError(f"visual_mask: sample {b}: the visual tokens form {runs} separate runs in [{s}, {e}); "
                             f"AdaToken-3D's SPA span is one contiguous run (one scene per prompt)")
        tok = torch.nonzero(valid[b], as_tuple=False).flatten()
        first, last = int(tok[0]), int(tok[-1]) + 1
        if tok.numel() != last - first:
            raise ValueError(f"attention_mask: sample {b} has padding between its tokens [{first}, {last}); expected "
                             f"left or right padding only")
        if not (first <= s and e <= last):
            raise ValueError(f"visual_mask: sample {b}: visual tokens [{s}, {e}) lie in the padding")
        if s == first:
            raise ValueError(f"visual_mask: sample {b}: the visual run starts at the first token ({s}), so SYS is "
                             f"empty; AdaToken-3D needs system tokens before the scene")
        if e == last:
            raise ValueError(f"visual_mask: sample {b}: the visual run ends at the last token ({e}), so PRM is empty; "
                             f"AdaToken-3D needs prompt tokens after the scene")
        out[0, b] = torch.tensor([first, s])
        out[1, b] = torch.tensor([s, e])
        out[2, b] = torch.tensor([e, last])
    return out[0], out[1], out[2]


def _is_prefill(past: Any) -> bool:
    if past is None:
        return True
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length()) == 0
    return len(past) == 0 or all(p is None for p in past)


@dataclass
class AdaTokenCalibration:
    """Session config that measures AdaToken-3D's span-block sums during unpruned prefills (nothing is pruned).

    chunk: query rows scored at once per layer (memory: heads × chunk × n float32). Not a pruning method (not
    registered); it brings its own runner (``CalibrationRunner``), reachable as ``session.engine``.
    """

    chunk: int = 64

    name: ClassVar[str] = "adatoken_calibration"
    stage: ClassVar[str] = "llm"
    uses_query: ClassVar[bool] = False
    uses_selection: ClassVar[bool] = False
    positions: ClassVar[str] = "original"

    def __post_init__(self) -> None:
        self.chunk = as_int("chunk", self.chunk, low=1, meaning="a positive number of query rows")

    def needs(self) -> FrozenSet[str]:
        return frozenset({"decoder"})

    def validate_for(self, num_layers: int) -> None:
        """Any decoder depth works."""

    def schedule(self, visual_tokens: int, num_layers: int) -> List[int]:
        """Visual tokens each layer sees: all of them."""
        return [visual_tokens] * num_layers

    def make_runner(self, decoder: nn.Module) -> "CalibrationRunner":
        return CalibrationRunner(decoder, self)


class _Scope:
    done = False


class CalibrationRunner:
    """A decoder ``forward`` (DecoderRunner's interface) that runs the unpruned decoder and sums the blocks.

    last: per sample of the last calibrated prefill, its ``SpanBlockSums``; last_spans: (SYS, SPA, PRM) (B, 2)
    of that prefill; history: every calibrated sample in order; total: their ``accumulate``d sum (None before
    the first). Inside one ``generation()`` only the first prefill is measured (decode steps and cache-less
    replays are not prompts). Batches of several prompts are fine; beam copies of one prompt are refused.
    """

    def __init__(self, decoder: nn.Module, config: AdaTokenCalibration) -> None:
        if not isinstance(config, AdaTokenCalibration):
            raise TypeError(f"config: expected an AdaTokenCalibration, got {type(config).__name__}")
        self.inner = DecoderRunner(decoder, None)
        self.adapter = self.inner.adapter
        self.config = config
        self.last: List[SpanBlockSums] = []
        self.last_spans: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self.history: List[SpanBlockSums] = []
        self.total: Optional[SpanBlockSums] = None
        self._pending: Optional[dict] = None
        self._scope: Optional[_Scope] = None

    @property
    def last_stats(self) -> Optional[PrefillStats]:
        return self.inner.last_stats

    @property
    def last_request(self) -> Any:
        return self.inner.last_request

    def prepare(
        self,
        visual_mask: Optional[torch.Tensor] = None,
        visual_spans: Optional[Sequence[Optional[Sequence[int]]]] = None,
        query_index: Any = None,
        guidance_index: Any = None,
        visual_selection: Optional[Sequence[Any]] = None,
        input_keep: Optional[torch.Tensor] = None,
        sample_keys: Optional[Sequence[Any]] = None,
    ) -> None:
        """Describe the next prefill (``DecoderRunner.prepare``); only the visual tokens are used. A pre-LLM
        removal (``input_keep``) is refused: calibration measures the host's unpruned prefill."""
        if input_keep is not None and not bool(torch.as_tensor(input_keep).bool().all()):
            raise ValueError("input_keep: AdaToken-3D calibration measures the unpruned prefill; run it without a "
                             "pre-LLM method")
        self._pending = dict(visual_mask=visual_mask, visual_spans=visual_spans)
        self.inner.prepare(visual_mask=visual_mask, visual_spans=visual_spans, sample_keys=sample_keys)

    @contextmanager
    def generation(self) -> Iterator[None]:
        prev, self._scope = self._scope, _Scope()
        try:
            with self.inner.generation():
                yield
        finally:
            self._scope = prev

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Any = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_position: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        call = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                    use_cache=use_cache, output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states, return_dict=return_dict,
                    cache_position=cache_position, **kwargs)
        measure = _is_prefill(past_key_values) and not (self._scope is not None and self._scope.done)
        if not measure:
            self._pending = None
            return self.inner.forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **call)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids/inputs_embeds: give exactly one of them")
        if inputs_embeds is None:
            inputs_embeds = self.adapter.decoder.embed_tokens(input_ids)
        rows, valid = self._layout(inputs_embeds, attention_mask)
        seen: List[int] = []
        handles = [layer.register_forward_pre_hook(self._hook(j, rows, valid, seen), with_kwargs=True)
                   for j, layer in enumerate(self.adapter.layers)]
        try:
            out = self.inner.forward(inputs_embeds=inputs_embeds, **call)
        finally:
            for h in handles:
                h.remove()
        if seen != list(range(self.adapter.num_layers)):
            raise RuntimeError(f"decoder: calibration saw layers {seen} run, expected each of the "
                               f"{self.adapter.num_layers} layers once")
        self.last = rows.per_sample()
        self.history.extend(self.last)
        for s in self.last:
            self.total = s if self.total is None else accumulate(self.total, s)
        if self._scope is not None:
            self._scope.done = True
        return out

    def _layout(self, embeds: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Tuple[_BlockRows, torch.Tensor]:
        pending, self._pending = self._pending, None
        if pending is None:
            raise ValueError("visual_mask: no visual-token positions were given for this prefill; the host publishes "
                             "them through the session (or call `prepare(visual_mask=... | visual_spans=...)`)")
        batch, length, _ = embeds.shape
        if attention_mask is None:
            mask2d = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        elif attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask: expected the 2-D padding mask ({batch}, {length}) at prefill, got "
                             f"{tuple(attention_mask.shape)}")
        else:
            mask2d = attention_mask
        given = {k: v for k, v in pending.items() if v is not None}
        if expansion_factor(batch, given) > 1:
            raise ValueError(f"visual_mask: {batch} prefill rows for fewer prompts (beam copies); calibrate with one "
                             f"row per prompt (model(**inputs) or greedy generate)")
        request = build_request(embeds, mask2d, needs_query=False, **pending)
        valid = mask2d.bool()
        sys_, spa, prm = (t.to(embeds.device) for t in spans_from_mask(request.visual_mask, valid))
        self.last_spans = (sys_.cpu(), spa.cpu(), prm.cpu())
        return _BlockRows(sys_, spa, prm, length, self.adapter.num_layers), valid

    def _hook(self, j: int, rows: _BlockRows, valid: torch.Tensor, seen: List[int]):
        ad, chunk = self.adapter, self.config.chunk

        def pre_hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = kwargs.get("position_ids")
            if hidden.shape[:2] != valid.shape or positions is None:
                raise RuntimeError(f"decoder: layer {j} did not receive the full unpruned prefill with position_ids")
            positions = positions.reshape(-1, valid.shape[1]).expand(valid.shape[0], -1)
            with torch.no_grad():
                for r0, probs in layer_row_chunks(ad, j, hidden, positions, valid, rows.slots, chunk):
                    rows.add_heads(j, r0, probs)
            seen.append(j)
            return None

        return pre_hook


__all__ = [
    "AdaTokenCalibration",
    "CalibrationRunner",
    "accumulate",
    "layer_row_chunks",
    "span_block_sums",
    "span_block_sums_per_sample",
    "spans_from_mask",
]
