"""The decoder runner: a drop-in ``forward`` for a LLaMA/Qwen2 decoder that applies a pruning plan.

Prefill (no cache yet): runs the host's own layers over a compact sequence that the plan shrinks,
re-expands or re-orders between layers; records each layer's active set so that decoding can build
per-layer masks over per-layer KV caches of different lengths. Decode (cache present): new tokens
attend to whatever each layer cached at prefill. The output hidden states are full length
(pruned slots are zero), so ``lm_head`` and host code that index the sequence work unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from .adapters import DecoderAdapter
from .plan import LayerView, Plan, PruningRequest
from .probe import attention_rows
from .state import ActiveSet, scatter_full, transition


@dataclass
class PrefillStats:
    """Token counts of the last prefill: (B, num_layers) long tensors."""

    tokens: torch.Tensor
    visual: torch.Tensor
    sequence_length: torch.Tensor  # (B,) valid tokens of the unpruned prefill
    visual_tokens: torch.Tensor  # (B,) visual tokens of the unpruned prefill


@dataclass
class Session:
    """State shared by the prefill and the decode steps of one generation."""

    prefill_length: int
    logical_length: int
    layer_valid: List[torch.Tensor] = field(default_factory=list)  # per layer (B, n_l) bool


def _as_request(
    batch: int,
    length: int,
    mask2d: torch.Tensor,
    visual_mask: Optional[torch.Tensor],
    visual_spans: Optional[Sequence[Sequence[int]]],
    query_index: Optional[Union[torch.Tensor, Sequence[int]]],
    guidance_index: Optional[Union[torch.Tensor, Sequence[int]]],
    visual_selection: Optional[Sequence[Any]] = None,
) -> PruningRequest:
    device = mask2d.device
    if (visual_mask is None) == (visual_spans is None):
        raise ValueError("visual_mask/visual_spans: give exactly one of them for the prefill")
    if visual_spans is not None:
        if len(visual_spans) != batch:
            raise ValueError(f"visual_spans: expected {batch} (start, end) pairs, one per sample, got {len(visual_spans)}")
        vm = torch.zeros(batch, length, dtype=torch.bool, device=device)
        for b, span in enumerate(visual_spans):
            if len(span) != 2:
                raise ValueError(f"visual_spans[{b}]: expected a (start, end) pair, got {span!r}")
            s, e = int(span[0]), int(span[1])
            if not 0 <= s < e <= length:
                raise ValueError(
                    f"visual_spans[{b}]: span ({s}, {e}) lies outside the sequence of length {length}; "
                    f"expected 0 <= start < end <= {length}"
                )
            vm[b, s:e] = True
    else:
        vm = torch.as_tensor(visual_mask, device=device)
        if vm.dtype != torch.bool or tuple(vm.shape) != (batch, length):
            raise ValueError(
                f"visual_mask: expected a bool tensor of shape ({batch}, {length}), got {vm.dtype} {tuple(vm.shape)}"
            )
    valid = mask2d.bool()
    if bool((vm & ~valid).any()):
        raise ValueError("visual_mask: some visual positions fall on padding (attention_mask == 0)")
    if query_index is None:
        last = torch.arange(length, device=device).expand(batch, length)
        qi = torch.where(valid, last, torch.full_like(last, -1)).max(dim=1).values
    else:
        qi = torch.as_tensor(query_index, device=device).long().reshape(-1)
        if qi.numel() != batch:
            raise ValueError(f"query_index: expected {batch} positions, one per sample, got {qi.numel()}")
        if bool(((qi < 0) | (qi >= length)).any()) or not bool(valid.gather(1, qi.clamp(0, length - 1)[:, None]).all()):
            raise ValueError(f"query_index: positions {qi.tolist()} must be valid tokens inside the sequence of length {length}")
    if bool(vm.gather(1, qi[:, None]).any()):
        raise ValueError("query_index: the scoring query must be a text token, not a visual one")
    gi = None
    if guidance_index is not None:
        gi = torch.as_tensor(guidance_index, device=device).long().reshape(-1)
        if gi.numel() != batch or bool(((gi < 0) | (gi >= length)).any()):
            raise ValueError(f"guidance_index: expected {batch} positions inside the sequence of length {length}")
    sel = None
    if visual_selection is not None:
        if len(visual_selection) != batch:
            raise ValueError(f"visual_selection: expected {batch} index tensors, one per sample, got {len(visual_selection)}")
        sel = []
        counts = vm.sum(dim=1)
        for b, idx in enumerate(visual_selection):
            idx = torch.as_tensor(idx, device=device).long().reshape(-1)
            n = int(counts[b])
            if idx.numel() == 0 or bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0 or int(idx[-1]) >= n:
                raise ValueError(
                    f"visual_selection[{b}]: expected sorted, distinct, non-empty indices in [0, {n}) "
                    f"(the sample's visual tokens), got {idx.tolist()[:8]}{'...' if idx.numel() > 8 else ''}"
                )
            sel.append(idx)
    return PruningRequest(visual_mask=vm, query_index=qi, guidance_index=gi, visual_selection=sel)


class DecoderRunner:
    """Replacement ``forward`` for one decoder; owns the per-generation ``Session``."""

    def __init__(self, decoder: nn.Module, method: Any) -> None:
        self.adapter = DecoderAdapter(decoder)
        self.method = method
        if method is not None and hasattr(method, "validate_for"):
            method.validate_for(self.adapter.num_layers)
        self.session: Optional[Session] = None
        self.last_stats: Optional[PrefillStats] = None
        self._pending: Optional[dict] = None
        self._shim = None

    # ------------------------------------------------------------------ public
    def prepare(
        self,
        visual_mask: Optional[torch.Tensor] = None,
        visual_spans: Optional[Sequence[Sequence[int]]] = None,
        query_index: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        guidance_index: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        visual_selection: Optional[Sequence[Any]] = None,
    ) -> None:
        """Describe the next prefill: where the visual tokens are, which token queries, and (for
        methods that start from a pre-LLM subset) which visual tokens a selector chose."""
        self._pending = dict(
            visual_mask=visual_mask,
            visual_spans=visual_spans,
            query_index=query_index,
            guidance_index=guidance_index,
            visual_selection=visual_selection,
        )

    # ----------------------------------------------------------------- forward
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
        ad = self.adapter
        cfg = ad.config
        if output_attentions:
            raise ValueError(
                "output_attentions: attention maps are not returned while pruning; the engine scores tokens "
                "from q/k itself (see shared.engine.probe)"
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids/inputs_embeds: give exactly one of them")
        if inputs_embeds is None:
            inputs_embeds = ad.decoder.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = bool(getattr(cfg, "use_cache", False))
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(cfg, "output_hidden_states", False))
        if return_dict is None:
            return_dict = bool(getattr(cfg, "return_dict", True))
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask: the pruning engine takes the 2-D padding mask (B, L), got shape {tuple(attention_mask.shape)}"
            )
        incoming_was_cache = ad.is_cache(past_key_values)
        cache = ad.from_incoming(past_key_values)
        empty = cache is None or ad.cache_length(cache, 0) == 0 and (
            not isinstance(cache, list) or all(e is None for e in cache)
        )
        with ad.rope_shim() as shim:
            self._shim = shim
            try:
                if empty:
                    if use_cache and cache is None:
                        cache = ad.new_cache()
                    hidden, all_hidden = self._prefill(
                        inputs_embeds, attention_mask, position_ids, cache if use_cache else None, output_hidden_states
                    )
                else:
                    hidden, all_hidden = self._decode(
                        inputs_embeds, attention_mask, position_ids, cache, output_hidden_states
                    )
            finally:
                self._shim = None
        out_cache = ad.outgoing(cache, incoming_was_cache) if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden, out_cache, all_hidden) if v is not None)
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=out_cache, hidden_states=all_hidden)

    # ------------------------------------------------------------------ prefill
    def _prefill(self, embeds, attention_mask, position_ids, cache, output_hidden_states):
        ad = self.adapter
        batch, length, _ = embeds.shape
        device = embeds.device
        mask2d = attention_mask if attention_mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
        if tuple(mask2d.shape) != (batch, length):
            raise ValueError(f"attention_mask: expected shape ({batch}, {length}) at prefill, got {tuple(mask2d.shape)}")
        if position_ids is None:
            full_pos = torch.arange(length, device=device).expand(batch, length)
        else:
            full_pos = position_ids.reshape(-1, length).expand(batch, length)

        pending, self._pending = self._pending, None
        plan: Optional[Plan] = None
        request: Optional[PruningRequest] = None
        if self.method is not None:
            if pending is None:
                raise ValueError(
                    "visual_mask: no visual-token positions were given for this prefill; call "
                    "`prepare(visual_mask=... | visual_spans=...)` on the pruning context before the forward"
                )
            request = _as_request(batch, length, mask2d, **pending)
            plan = self.method.make_plan(request, ad.num_layers)

        active = ActiveSet.full(mask2d)
        hidden = embeds
        pos = full_pos
        session = Session(prefill_length=length, logical_length=length)
        tokens: List[torch.Tensor] = []
        visual: List[torch.Tensor] = []
        all_hidden: List[torch.Tensor] = []
        mask = pos_emb = None
        stale = True  # mask/RoPE tables must be rebuilt for the current active set
        for j in range(ad.num_layers):
            if plan is not None:
                view = LayerView(
                    j, ad.num_layers, active, request, self._scorer(j, hidden, pos, active)
                )
                keep = plan.before_layer(view)
                if keep is not None and not active.same_as(keep):
                    if j == 0 and cache is not None and ad.generate_reads_layer0_length:
                        raise ValueError(
                            "use_cache: this plan prunes before layer 0, but this transformers version's generate() "
                            "reads the past length from layer 0's KV cache; run it with use_cache=False (as LISA's "
                            "evaluation does) or on transformers >= 5"
                        )
                    new_active = self._checked(keep, batch, length, mask2d, j)
                    hidden = transition(active, hidden, new_active, embeds)
                    active = new_active
                    pos = full_pos.gather(1, active.positions)
                    stale = True
                    view = LayerView(j, ad.num_layers, active, request, self._scorer(j, hidden, pos, active))
                plan.observe(view)
            if output_hidden_states:
                all_hidden.append(self._full(active, hidden, length))
            if stale:
                stale = False
                mask = ad.attention_mask(active.valid, active.length, hidden.dtype)
                pos_emb = ad.position_embeddings(hidden, pos)
                if self._shim is not None:
                    self._shim.min_len = int(pos.max()) + 1
            hidden = ad.call_layer(j, hidden, mask, pos, cache, cache is not None, pos_emb)
            session.layer_valid.append(active.valid)
            tokens.append(active.counts())
            if request is not None:
                visual.append((request.visual_mask.gather(1, active.positions) & active.valid).sum(1))
        hidden = ad.decoder.norm(hidden)
        hidden = self._full(active, hidden, length)
        if output_hidden_states:
            all_hidden.append(hidden)
        self.session = session if cache is not None else None
        self.last_stats = PrefillStats(
            tokens=torch.stack(tokens, dim=1).cpu(),
            visual=torch.stack(visual, dim=1).cpu() if visual else torch.zeros(batch, ad.num_layers, dtype=torch.long),
            sequence_length=mask2d.sum(1).cpu(),
            visual_tokens=request.visual_counts().cpu() if request is not None else torch.zeros(batch, dtype=torch.long),
        )
        return hidden, (tuple(all_hidden) if output_hidden_states else None)

    def _scorer(self, j, hidden, pos, active):
        ad = self.adapter

        def score(query_slots: torch.Tensor) -> torch.Tensor:
            return attention_rows(ad, j, hidden, pos, active.valid, query_slots)

        return score

    @staticmethod
    def _full(active: ActiveSet, hidden: torch.Tensor, length: int) -> torch.Tensor:
        if active.length == length and bool(
            (active.positions == torch.arange(length, device=hidden.device)).all()
        ):
            return hidden
        return scatter_full(active, hidden, length)

    @staticmethod
    def _checked(keep, batch: int, length: int, mask2d: torch.Tensor, layer: int) -> ActiveSet:
        if len(keep) != batch:
            raise ValueError(f"plan: layer {layer}: expected {batch} keep sets, got {len(keep)}")
        valid = mask2d.bool()
        lists = []
        for b, k in enumerate(keep):
            k = torch.as_tensor(k, device=mask2d.device).long().reshape(-1)
            if k.numel() == 0:
                raise ValueError(f"plan: layer {layer}: sample {b} would keep no token")
            if bool((k[1:] <= k[:-1]).any()):
                raise ValueError(f"plan: layer {layer}: sample {b} keep set must be sorted and unique")
            if int(k[0]) < 0 or int(k[-1]) >= length or not bool(valid[b, k].all()):
                raise ValueError(f"plan: layer {layer}: sample {b} keeps positions outside its valid tokens")
            lists.append(k)
        return ActiveSet.from_lists(lists, mask2d.device)

    # ------------------------------------------------------------------- decode
    def _decode(self, embeds, attention_mask, position_ids, cache, output_hidden_states):
        ad = self.adapter
        s = self.session
        if s is None:
            raise RuntimeError(
                "past_key_values: this cache was not produced by a prefill through the pruning engine; "
                "run the prefill inside the same pruning context"
            )
        batch, q, _ = embeds.shape
        device = embeds.device
        if s.layer_valid[0].shape[0] != batch:
            raise ValueError(
                f"past_key_values: batch size changed from {s.layer_valid[0].shape[0]} at prefill to {batch}"
            )
        total = s.logical_length + q
        if attention_mask is not None:
            if attention_mask.shape[1] != total:
                raise ValueError(
                    f"attention_mask: expected {total} columns (prefill {s.prefill_length} + generated), "
                    f"got {attention_mask.shape[1]}"
                )
            tail = attention_mask[:, s.prefill_length:].bool()
        else:
            tail = torch.ones(batch, total - s.prefill_length, dtype=torch.bool, device=device)
        if position_ids is None:
            pos = (torch.arange(q, device=device) + s.logical_length).expand(batch, q)
        else:
            pos = position_ids.reshape(-1, q).expand(batch, q)
        if self._shim is not None:
            self._shim.min_len = int(pos.max()) + 1
        pos_emb = ad.position_embeddings(embeds, pos)
        hidden = embeds
        all_hidden: List[torch.Tensor] = []
        prev_valid = key_valid = mask = None
        for j in range(ad.num_layers):
            if s.layer_valid[j] is not prev_valid:  # consecutive layers of one stage share a mask
                prev_valid = s.layer_valid[j]
                key_valid = torch.cat([prev_valid, tail], dim=1)
                mask = ad.attention_mask(key_valid, q, hidden.dtype)
            cached = ad.cache_length(cache, j)
            if cached + q != key_valid.shape[1]:
                raise RuntimeError(
                    f"past_key_values: layer {j} caches {cached} tokens, the engine expected {key_valid.shape[1] - q}"
                )
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden = ad.call_layer(j, hidden, mask, pos, cache, True, pos_emb)
        hidden = ad.decoder.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        s.logical_length = total
        return hidden, (tuple(all_hidden) if output_hidden_states else None)
