"""The decoder runner: a drop-in ``forward`` for a LLaMA/Qwen2 decoder that applies a pruning plan.

Prefill (no cache yet): runs the host's own layers over a compact sequence that the plan shrinks,
re-expands or re-orders between layers; records each layer's active set so that decoding can build
per-layer masks over per-layer KV caches of different lengths. Decode (cache present): new tokens
attend to whatever each layer cached at prefill. The output hidden states are full length
(pruned slots are zero), so ``lm_head`` and host code that index the sequence work unchanged.

Pruning is a prefill decision. Inside ``generation()`` (one ``generate`` call), forwards without a
cache that extend the first prefill's prompt (``use_cache=False`` decoding) replay that decision on
prompt + generated tokens instead of ranking again, so both modes generate the same tokens.

Positions: ``"original"`` (default) keeps every token at its position in the LLM input;
``"compact"`` renumbers the active tokens ``0 … n−1`` after each drop (PyramidDrop's released rule),
and a decoded token then takes position ``n_l + t`` at layer l. Tokens a pre-LLM selector removed
(``input_keep``) are gone from the LLM input in both modes, as if the host had collapsed them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapters import DecoderAdapter
from .cache import attach_state, attached_state, pad_to_positions
from .plan import LayerView, Plan, PruningRequest
from .llm_attention import attention_rows
from .request import build_request, check_group_copies, expand_pending, expansion_factor
from .state import ActiveSet, scatter_full, transition

POSITION_MODES = ("original", "compact")


@dataclass
class PrefillStats:
    """Token counts of the last prefill.

    tokens / visual: (B, num_layers) long, tokens and visual tokens each layer saw.
    sequence_length: (B,) valid tokens of the prefill as the host spliced it.
    visual_tokens: (B,) visual tokens of the prefill as spliced, before any pre-LLM removal.
    stages: [(layer, [(k_b,) visual positions per sample])] at the input and at every layer whose
    visual set changed (kept indices per stage, as original positions of the spliced sequence).
    """

    tokens: torch.Tensor
    visual: torch.Tensor
    sequence_length: torch.Tensor
    visual_tokens: torch.Tensor
    stages: List[Tuple[int, List[torch.Tensor]]] = field(default_factory=list)


@dataclass
class GenerationState:
    """What decoding needs from the prefill that filled a cache.

    layer_valid: per layer (B, n_l) bool, which cached slots hold a token (layer 0 at full length).
    next_position: per layer (B,) long, the position the first decoded token takes at that layer.
    """

    owner: int
    prefill_length: int
    logical_length: int
    compact: bool
    removed_input: bool
    layer_valid: List[torch.Tensor] = field(default_factory=list)
    next_position: List[torch.Tensor] = field(default_factory=list)


@dataclass
class _Decision:
    """The first prefill of a ``generation()`` scope, replayed by later cache-less forwards."""

    length: int
    embeds: torch.Tensor
    mask2d: torch.Tensor
    request: Optional[PruningRequest]
    layer_sets: List[ActiveSet]


class _Scope:
    def __init__(self) -> None:
        self.decision: Optional[_Decision] = None


class _ReplayPlan(Plan):
    """The recorded per-layer active sets, extended by the tokens appended since the prefill."""

    def __init__(self, decision: _Decision, mask2d: torch.Tensor) -> None:
        self.sets = decision.layer_sets
        new = torch.arange(decision.length, mask2d.shape[1], device=mask2d.device)
        self.new = [new[mask2d[b, decision.length:].bool()] for b in range(mask2d.shape[0])]

    def before_layer(self, view: LayerView):
        j = view.layer
        if j > 0 and self.sets[j] is self.sets[j - 1]:
            return None
        return [torch.cat([p, n]) for p, n in zip(self.sets[j].per_sample(), self.new)]


def _identity(active: ActiveSet, length: int) -> bool:
    return active.length == length and bool((active.positions == torch.arange(length, device=active.positions.device)).all())


def _full_valid(active: ActiveSet, length: int) -> torch.Tensor:
    """(B, length) bool: which positions are active (valid slots scattered to their positions)."""
    out = torch.zeros(active.batch_size, length + 1, dtype=torch.bool, device=active.positions.device)
    tgt = torch.where(active.valid, active.positions, torch.full_like(active.positions, length))
    out.scatter_(1, tgt, True)
    return out[:, :length]


class DecoderRunner:
    """Replacement ``forward`` for one decoder (see the module docstring)."""

    def __init__(self, decoder: nn.Module, method: Any) -> None:
        self.adapter = DecoderAdapter(decoder)
        self.method = method
        if method is not None and hasattr(method, "validate_for"):
            method.validate_for(self.adapter.num_layers)
        positions = getattr(method, "positions", "original")
        if positions not in POSITION_MODES:
            raise ValueError(f"positions: expected one of {', '.join(POSITION_MODES)}, got {positions!r}")
        self.compact = positions == "compact"
        self.state: Optional[GenerationState] = None
        self.last_stats: Optional[PrefillStats] = None
        self.last_request: Optional[PruningRequest] = None
        self._pending: Optional[dict] = None
        self._scope: Optional[_Scope] = None
        self._shim = None

    # ------------------------------------------------------------------ public
    def prepare(
        self,
        visual_mask: Optional[torch.Tensor] = None,
        visual_spans: Optional[Sequence[Optional[Sequence[int]]]] = None,
        query_index: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        guidance_index: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        visual_selection: Optional[Sequence[Any]] = None,
        input_keep: Optional[torch.Tensor] = None,
        sample_keys: Optional[Sequence[Any]] = None,
    ) -> None:
        """Describe the next prefill, one entry per sample (``generate``'s beam copies are expanded).

        visual_mask (B, L) bool | visual_spans [(start, end) or None per sample]: the visual tokens.
        query_index / guidance_index: (B,) scoring queries (text tokens after the visual ones).
        visual_selection: per sample, indices into its visual tokens chosen before the LLM, for
        methods that start from such a subset (LVLM_CSP's clustering stage).
        input_keep: (B, L) bool, tokens that enter the LLM at all (pre-LLM removal; see the module doc).
        sample_keys: per sample, a key (image id) seeding per-sample random draws.
        """
        self._pending = dict(
            visual_mask=visual_mask, visual_spans=visual_spans, query_index=query_index,
            guidance_index=guidance_index, visual_selection=visual_selection, input_keep=input_keep,
            sample_keys=sample_keys,
        )

    @contextmanager
    def generation(self) -> Iterator[None]:
        """One ``generate`` call: its first prefill decides; cache-less forwards after it replay that decision."""
        prev, self._scope = self._scope, _Scope()
        try:
            yield
        finally:
            self._scope = prev

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
                "from q/k itself (see shared.engine.llm_attention)"
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
                        inputs_embeds, attention_mask, position_ids, cache, output_hidden_states, cache_position
                    )
            finally:
                self._shim = None
        out_cache = ad.outgoing(cache, incoming_was_cache) if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden, out_cache, all_hidden) if v is not None)
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=out_cache, hidden_states=all_hidden)

    # ------------------------------------------------------------------ prefill
    def _request(self, embeds, mask2d) -> Optional[PruningRequest]:
        pending, self._pending = self._pending, None
        if pending is None:
            if self.method is not None:
                raise ValueError(
                    "visual_mask: no visual-token positions were given for this prefill; call "
                    "`prepare(visual_mask=... | visual_spans=...)` on the pruning context before the forward"
                )
            return None
        given = {k: v for k, v in pending.items() if v is not None}
        k = expansion_factor(embeds.shape[0], given)
        if k > 1:
            check_group_copies(embeds, mask2d, k, next(iter(given)))
            pending = expand_pending(pending, k)
        uses = getattr(self.method, "uses_selection", False)
        if pending.get("visual_selection") is not None and not uses:
            name = type(self.method).__name__ if self.method is not None else "no in-LLM method"
            raise ValueError(
                f"visual_selection: {name} does not start from a pre-LLM selection of visual tokens; remove it "
                f"(or use input_keep to take tokens out of the LLM input)"
            )
        needs_query = self.method is not None and getattr(self.method, "uses_query", True)
        return build_request(embeds, mask2d, needs_query=needs_query, **pending)

    def _check_window(self, total: int) -> None:
        window = self.adapter.sliding_window
        if window is not None and total > window:
            raise ValueError(
                f"sliding_window: this decoder uses sliding-window attention (window {window}) and the sequence "
                f"has {total} tokens; the pruning engine builds full causal masks only. Set "
                f"config.use_sliding_window=False or keep sequences within the window"
            )

    def _prefill(self, embeds, attention_mask, position_ids, cache, output_hidden_states):
        ad = self.adapter
        batch, length, _ = embeds.shape
        device = embeds.device
        self._check_window(length)
        mask2d = attention_mask if attention_mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
        if tuple(mask2d.shape) != (batch, length):
            raise ValueError(f"attention_mask: expected shape ({batch}, {length}) at prefill, got {tuple(mask2d.shape)}")

        scope = self._scope
        replay = scope is not None and scope.decision is not None
        if replay:
            request = self._replay_request(embeds, mask2d)
            plan: Optional[Plan] = _ReplayPlan(scope.decision, mask2d)
        else:
            request = self._request(embeds, mask2d)
            plan = self.method.make_plan(request, ad.num_layers) if self.method is not None else None

        valid = mask2d.bool()
        removed = request is not None and request.input_keep is not None and not torch.equal(request.input_keep, valid)
        if removed:
            keep_in = request.input_keep
            base_pos = (keep_in.long().cumsum(1) - 1).clamp(min=0)
        elif position_ids is not None:
            keep_in = valid
            base_pos = position_ids.reshape(-1, length).expand(batch, length)
        else:
            keep_in = valid
            base_pos = torch.arange(length, device=device).expand(batch, length)
        first = torch.where(keep_in, torch.arange(length, device=device).expand(batch, length), length).min(1).values
        first_base = base_pos.gather(1, first.clamp(max=length - 1)[:, None])[:, 0]

        active = ActiveSet.full(mask2d)
        hidden = embeds
        if removed:
            active = ActiveSet.from_lists([torch.nonzero(keep_in[b], as_tuple=False).flatten() for b in range(batch)], device)
            hidden = transition(ActiveSet.full(mask2d), embeds, active, embeds)
        dropped = removed

        def positions(a: ActiveSet) -> torch.Tensor:
            if not (self.compact and dropped):
                return base_pos.gather(1, a.positions)
            return first_base[:, None] + (a.valid.long().cumsum(1) - 1).clamp(min=0)

        pos = positions(active)
        state = GenerationState(owner=id(self), prefill_length=length, logical_length=length, compact=self.compact,
                                removed_input=removed)
        tokens: List[torch.Tensor] = []
        visual: List[torch.Tensor] = []
        stages: List[Tuple[int, List[torch.Tensor]]] = []
        layer_sets: List[ActiveSet] = []
        all_hidden: List[torch.Tensor] = []
        vis_mask = request.visual_mask if request is not None else None
        if vis_mask is not None:
            stages.append((0, [p[vis_mask[b, p]] for b, p in enumerate(active.per_sample())]))
        mask = pos_emb = None
        stale = True  # mask/RoPE tables must be rebuilt for the current active set
        for j in range(ad.num_layers):
            if plan is not None:
                view = LayerView(j, ad.num_layers, active, request, self._scorer(j, hidden, pos, active))
                keep = plan.before_layer(view)
                if keep is not None and not active.same_as(keep):
                    new_active = self._checked(keep, batch, length, keep_in, j)
                    hidden = transition(active, hidden, new_active, embeds)
                    active = new_active
                    dropped = True
                    pos = positions(active)
                    stale = True
                    view = LayerView(j, ad.num_layers, active, request, self._scorer(j, hidden, pos, active))
                    if vis_mask is not None:
                        sets = [p[vis_mask[b, p]] for b, p in enumerate(active.per_sample())]
                        if stages and stages[-1][0] == j:
                            stages[-1] = (j, sets)
                        else:
                            stages.append((j, sets))
                plan.observe(view)
            if output_hidden_states:
                all_hidden.append(self._full(active, hidden, length))
            if stale:
                stale = False
                mask = ad.attention_mask(active.valid, active.length, hidden.dtype)
                pos_emb = ad.position_embeddings(hidden, pos)
                if self._shim is not None:
                    self._shim.min_len = int(pos.max()) + 1
                if cache is not None:
                    nxt = self._next_position(active, first_base, keep_in.sum(1) if removed else None)
            hidden = ad.call_layer(j, hidden, mask, pos, cache, cache is not None, pos_emb)
            layer_sets.append(active)
            if cache is not None:
                if j == 0 and not _identity(active, length):
                    pad_to_positions(cache, 0, active.positions, active.valid, length)
                    state.layer_valid.append(_full_valid(active, length))
                else:
                    state.layer_valid.append(active.valid)
                state.next_position.append(nxt)
            tokens.append(active.counts())
            if vis_mask is not None:
                visual.append((vis_mask.gather(1, active.positions) & active.valid).sum(1))
        hidden = ad.decoder.norm(hidden)
        hidden = self._full(active, hidden, length)
        if output_hidden_states:
            all_hidden.append(hidden)
        if cache is not None:
            self.state = state
            attach_state(cache, state)
        if scope is not None and not replay:
            scope.decision = _Decision(length, embeds.detach(), valid, request, layer_sets)
        if not replay:
            self.last_request = request
            self.last_stats = PrefillStats(
                tokens=torch.stack(tokens, dim=1).cpu(),
                visual=torch.stack(visual, dim=1).cpu() if visual else torch.zeros(batch, ad.num_layers, dtype=torch.long),
                sequence_length=valid.sum(1).cpu(),
                visual_tokens=(request.source_visual_counts.cpu() if request is not None
                               else torch.zeros(batch, dtype=torch.long)),
                stages=[(j, [s.cpu() for s in sets]) for j, sets in stages],
            )
        return hidden, (tuple(all_hidden) if output_hidden_states else None)

    def _next_position(self, active: ActiveSet, first_base: torch.Tensor, n_input: Optional[torch.Tensor]
                       ) -> Optional[torch.Tensor]:
        """(B,) position of the first decoded token at a layer running on ``active``; None: the caller's
        position_ids (or the logical length when it gives none, as the stock decoder does).

        n_input: tokens per sample in the LLM input when a pre-LLM removal renumbered it, else None."""
        if self.compact:
            return first_base + active.counts()
        if n_input is None:
            return None
        return first_base + n_input

    def _replay_request(self, embeds, mask2d) -> Optional[PruningRequest]:
        d = self._scope.decision
        self._pending = None  # the hosts' per-step description is the prompt's; the decision stands
        length = d.length
        if (embeds.shape[0] != d.embeds.shape[0] or embeds.shape[1] < length
                or not torch.equal(mask2d[:, :length].bool(), d.mask2d)
                or not torch.allclose(embeds[:, :length].float(), d.embeds.float(), rtol=1e-3, atol=1e-3)):
            raise ValueError(
                "use_cache: inside one generation, a forward without a cache must extend the prompt of the first "
                "prefill (same batch, same prompt tokens); use a new generate() call for a new prompt"
            )
        r = d.request
        if r is None:
            return None
        extra = mask2d.shape[1] - length
        pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)  # noqa: E731
        keep = None if r.input_keep is None else torch.cat([r.input_keep, mask2d[:, length:].bool()], dim=1)
        return PruningRequest(visual_mask=pad(r.visual_mask), query_index=r.query_index, guidance_index=r.guidance_index,
                              visual_selection=r.visual_selection, input_keep=keep,
                              source_visual_counts=r.source_visual_counts, sample_keys=r.sample_keys)

    def _scorer(self, j, hidden, pos, active):
        ad = self.adapter

        def score(query_slots: torch.Tensor) -> torch.Tensor:
            return attention_rows(ad, j, hidden, pos, active.valid, query_slots)

        return score

    @staticmethod
    def _full(active: ActiveSet, hidden: torch.Tensor, length: int) -> torch.Tensor:
        if _identity(active, length):
            return hidden
        return scatter_full(active, hidden, length)

    @staticmethod
    def _checked(keep, batch: int, length: int, valid2d: torch.Tensor, layer: int) -> ActiveSet:
        if len(keep) != batch:
            raise ValueError(f"plan: layer {layer}: expected {batch} keep sets, got {len(keep)}")
        valid = valid2d.bool()
        lists = []
        for b, k in enumerate(keep):
            k = torch.as_tensor(k, device=valid2d.device).long().reshape(-1)
            if k.numel() == 0:
                raise ValueError(f"plan: layer {layer}: sample {b} would keep no token")
            if bool((k[1:] <= k[:-1]).any()):
                raise ValueError(f"plan: layer {layer}: sample {b} keep set must be sorted and unique")
            if int(k[0]) < 0 or int(k[-1]) >= length or not bool(valid[b, k].all()):
                raise ValueError(f"plan: layer {layer}: sample {b} keeps positions outside the tokens that entered the LLM")
            lists.append(k)
        return ActiveSet.from_lists(lists, valid2d.device)

    # ------------------------------------------------------------------- decode
    def _decode(self, embeds, attention_mask, position_ids, cache, output_hidden_states, cache_position=None):
        ad = self.adapter
        s = attached_state(cache) or self.state
        if s is None or s.owner != id(self):
            raise RuntimeError(
                "past_key_values: this cache was not produced by a prefill through this pruning engine; "
                "run the prefill inside the same pruning context"
            )
        batch, q, _ = embeds.shape
        device = embeds.device
        if s.layer_valid[0].shape[0] != batch:
            raise ValueError(
                f"past_key_values: batch size changed from {s.layer_valid[0].shape[0]} at prefill to {batch}"
            )
        if cache_position is not None and int(cache_position.reshape(-1)[0]) != s.logical_length:
            raise ValueError(
                f"cache_position: decoding resumes at position {int(cache_position.reshape(-1)[0])}, but this pruned "
                f"cache holds a sequence of {s.logical_length} tokens; rewinding or cropping a pruned cache is not "
                f"supported (its layers keep different tokens)"
            )
        total = s.logical_length + q
        self._check_window(total)
        if attention_mask is not None:
            if attention_mask.shape[1] != total:
                raise ValueError(
                    f"attention_mask: expected {total} columns (prefill {s.prefill_length} + generated), "
                    f"got {attention_mask.shape[1]}"
                )
            tail = attention_mask[:, s.prefill_length:].bool()
        else:
            tail = torch.ones(batch, total - s.prefill_length, dtype=torch.bool, device=device)
        step = torch.arange(q, device=device) + (s.logical_length - s.prefill_length)
        if position_ids is None:
            caller = (torch.arange(q, device=device) + s.logical_length).expand(batch, q)
        else:
            caller = position_ids.reshape(-1, q).expand(batch, q)
        hidden = embeds
        all_hidden: List[torch.Tensor] = []
        prev_valid = key_valid = mask = None
        prev_next: Any = ()
        pos = pos_emb = None
        for j in range(ad.num_layers):
            if s.layer_valid[j] is not prev_valid:  # consecutive layers of one stage share a mask
                prev_valid = s.layer_valid[j]
                key_valid = torch.cat([prev_valid, tail], dim=1)
                mask = ad.attention_mask(key_valid, q, hidden.dtype)
            nxt = s.next_position[j]
            if nxt is not prev_next:
                prev_next = nxt
                pos = caller if nxt is None else nxt[:, None] + step[None, :]
                pos_emb = ad.position_embeddings(embeds, pos)
                if self._shim is not None:
                    self._shim.min_len = int(pos.max()) + 1
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
