"""Fast3D's compat mode: the released code's pruning semantics, reproduced on the host's own decoder.

Fast3D (``wencan25/Fast3D``) prunes inside a forked transformers 4.31 ``LlamaModel.forward`` (FastV's fork
plus an "oracle" branch). What that code does, and what this mode reproduces:

- **Key masking, no saving.** Every token runs through every layer (hidden states, MLP, K/V cache);
  from layer K on, the pruned visual tokens are only removed as attention *keys* for all queries.
  ``last_stats`` therefore shows every token at every layer: compat saves no compute.
- **FastV rule** (``rule="fastv"``, K >= 1): before layer K, the eager attention weights returned by
  layer K-1 are averaged over heads; batch row 0 (beam 0), the *last* query row, the visual columns,
  ``topk(R)``. The key mask is applied to every row (every beam) for all layers >= K.
- **Re-selected at every forward**: the prefill ranks with the last prompt token, and every cached
  decode step ranks again with its new token (beam 0's row), over the cached keys. The K/V of pruned
  tokens stay in the cache, so a token pruned at one step can come back at the next. (transformers
  4.31/4.39 force ``use_cache=True`` for ``generate(inputs_embeds=...)``, so this is what ran even though
  Fast3D passes ``use_cache=False``.)
- **Oracle / GAP rule** (``rule="oracle"``, K >= 0): a static ranking given per sample: the 100 object
  scores (GAP logits or extracted maps) repeated x3 in slot order, ``topk(R)`` (``host_selection``), the
  same mask at every step. ``alpha`` gives SAP's per-sample budget R = 3 k* (GAP+SAP, K = 0).
- **Random rule** (``rule="random"``): Fast3D's FastV with K = 0 silently shuffles a list of R ones and
  N-R zeros with Python's global ``random`` at every forward. That draw cannot be matched bit for bit;
  this rule draws a uniform R-subset with a ``torch.Generator`` seeded from (``seed``, sample key), a
  new draw at every forward, which is the same distribution and structure.
- **Eager attention** only (the rule reads the layer's attention weights, and Fast3D ran eager).
- **One sample x beams per forward**, no padding: the selection is read from batch row 0 and applied
  to all rows, and Fast3D's masks ignore the padding mask, so batches of several samples or padded
  rows have no defined result and are refused.
- **RoPE**: Fast3D's attention asks the rotary table for ``seq_len=1000``; positions below 1000 get
  exactly the stock rows, positions >= 1000 index past the table. Compat refuses them.
- **Identity object ids**: Fast3D's evaluation forces ``assigned_ids = arange``; ``host_selection``
  refuses a permuted ``slot_to_object`` (use the host's identity-ids option, or canonical Fast3D).

The visual span is the host's (``prepare(visual_spans=...)``), which for Chat-Scene's prompt is Fast3D's
hard-coded [45, 345). Canonical FastV / Fast3D (prefill-only, per-beam selection, physical dropping)
are separate configs on the token engine; ``compat(method)`` turns one into this mode.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..engine.adapters import DecoderAdapter
from ..engine.cache import attach_state, attached_state
from ..engine.request import build_request, check_group_copies, expand_pending, expansion_factor
from ..engine.runner import PrefillStats
from .base import as_fraction, as_int
from .random_drop import keyed_generator

RULES = ("fastv", "oracle", "random")
#: Fast3D's ``LlamaAttention.forward`` calls ``rotary_emb(value_states, seq_len=1000)``
ROPE_POSITIONS = 1000


def sap_budget_objects(probs: torch.Tensor, alpha: float) -> int:
    """SAP's k*: the smallest k whose k largest ``probs`` (N,) sum to >= ``alpha``; N if none does
    (Fast3D ``find_min_rank_sum_larger_than_alpha``, same ops)."""
    sorted_p = torch.sort(probs, descending=True).values
    reached = torch.cumsum(sorted_p, dim=0) >= alpha
    if bool(reached.any()):
        return int(reached.nonzero(as_tuple=True)[0][0].item()) + 1
    return int(probs.size(0))


@dataclass
class Fast3DCompat:
    """Fast3D's released pruning semantics (see the module docstring).

    rule: "fastv" (attention of layer K-1, re-ranked every forward), "oracle" (static per-sample object
    scores: GAP / extracted maps) or "random" (a seeded uniform draw every forward).
    layer: K, 0-based index of the first layer whose keys are masked (fastv: K >= 1).
    keep: R, visual tokens left visible (Fast3D: 15 / 60 / 90 of 300); None only with ``alpha``.
    group: tokens per object slot (Chat-Scene: 3, interleaved id/3D/2D), oracle rule only.
    alpha: SAP threshold (oracle rule): R = group * k* per sample, overriding ``keep``.
    seed: seed of the random rule's per-sample generators (sha256(seed, sample key), as ``RandomDrop``).
    scorer: oracle rule, a callable returning (n,) GAP logits from the host's ``gap_inputs`` when the host
    gives no ``object_scores`` (as ``Fast3D.scorer``).
    """

    rule: str = "fastv"
    layer: int = 2
    keep: Optional[int] = None
    group: int = 3
    seed: int = 0
    alpha: Optional[float] = None
    scorer: Optional[Callable[..., torch.Tensor]] = field(default=None, repr=False, compare=False)

    name: ClassVar[str] = "fast3d_compat"
    stage: ClassVar[str] = "llm"
    uses_query: ClassVar[bool] = False
    positions: ClassVar[str] = "original"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {self.rule!r}")
        self.layer = as_int("layer", self.layer, low=0, meaning="an int K (0-based first masked layer)")
        if self.rule == "fastv" and self.layer == 0:
            raise ValueError(
                "layer: the fastv rule ranks with layer K-1's attention, so K >= 1; Fast3D's FastV with K = 0 "
                "silently pruned at random, which is rule='random'"
            )
        if self.alpha is not None:
            if self.rule != "oracle":
                raise ValueError(
                    f"alpha: SAP budgets come from object scores; only rule='oracle' takes alpha, got rule={self.rule!r}"
                )
            self.alpha = as_fraction("alpha", self.alpha, meaning="SAP's probability-mass threshold")
        if self.keep is None:
            if self.alpha is None:
                raise ValueError("keep: expected R, the number of visual tokens left visible (or alpha for SAP)")
        else:
            self.keep = as_int("keep", self.keep, low=1, meaning="a positive number of visual tokens R")
        self.group = as_int("group", self.group, low=1, meaning="tokens per object slot")
        self.seed = as_int("seed", self.seed, meaning="an int seed")
        if self.scorer is not None and (self.rule != "oracle" or not callable(self.scorer)):
            raise ValueError("scorer: a callable returning per-object logits, for rule='oracle' only")

    # ------------------------------------------------------------- session API
    @property
    def uses_selection(self) -> bool:
        """The oracle rule's ranking arrives from the host (``host_selection``) as ``visual_selection``."""
        return self.rule == "oracle"

    def needs(self) -> FrozenSet[str]:
        return frozenset({"decoder", "object_groups"} if self.rule == "oracle" else {"decoder"})

    def validate_for(self, num_layers: int) -> None:
        if not 0 <= self.layer < num_layers:
            raise ValueError(f"layer: K={self.layer} is outside the decoder; expected 0 <= layer < {num_layers}")

    def make_runner(self, decoder: nn.Module) -> "KeyMaskRunner":
        return KeyMaskRunner(decoder, self)

    def schedule(self, visual_tokens: int, num_layers: int) -> List[int]:
        """Visual tokens each layer computes: all of them (masking saves nothing)."""
        self.validate_for(num_layers)
        return [visual_tokens] * num_layers

    def key_schedule(self, visual_tokens: int, num_layers: int, keep: Optional[int] = None) -> List[int]:
        """Visual tokens visible as keys per layer (what Fast3D's README ratios count); ``keep``: a
        per-sample R (SAP) instead of the config's."""
        self.validate_for(num_layers)
        r = self.keep if keep is None else keep
        if r is None:
            raise ValueError("keep: SAP's R is per sample; pass keep=R of the sample")
        return [visual_tokens] * self.layer + [min(r, visual_tokens)] * (num_layers - self.layer)

    def host_selection(
        self,
        visual_tokens: int,
        object_scores: Any = None,
        slot_to_object: Any = None,
        group: Optional[int] = None,
        gap_inputs: Optional[Dict[str, Any]] = None,
        **_: Any,
    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The oracle rule's static selection, as Fast3D's evaluate + oracle branch compute it.

        object_scores: (n_obj,) one score per object slot (GAP logits or an extracted map); None: run
        ``scorer(**gap_inputs)``. slot_to_object: (n_obj,) object id of each slot; must be the identity
        (Fast3D's eval ids). group: tokens per slot as the host lays them out (default: the config's).
        Returns ((R,) sorted indices into the sample's visual tokens, info). The ranking is
        ``scores.unsqueeze(-1).repeat(1, g).reshape(-1).topk(R)`` on the scores' own device and dtype,
        so ties (the g tokens of a slot always tie) resolve as ``torch.topk`` does there; R need not be
        a multiple of g (Fast3D does not require it).
        """
        if self.rule != "oracle":
            raise ValueError(f"rule: only rule='oracle' takes a host selection, this config has rule={self.rule!r}")
        from .fast3d import given_or_online_scores

        if object_scores is None and self.scorer is None:
            raise ValueError(
                "object_scores: the oracle rule needs one score per object slot (GAP logits or a map): the host "
                "option object_scores=, or Fast3DCompat(scorer=...) to run GAP online"
            )
        object_scores, info = given_or_online_scores(object_scores, self.scorer, gap_inputs, "Fast3DCompat")
        scores = torch.as_tensor(object_scores).detach()
        if scores.dim() != 1 or not scores.is_floating_point() or scores.numel() == 0:
            raise ValueError(f"object_scores: expected a non-empty 1-D float tensor, got {scores.dtype} {tuple(scores.shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("object_scores: scores must be finite, got NaN or inf")
        g = self.group if group is None else as_int("group", group, low=1, meaning="tokens per object slot")
        if g != self.group:
            raise ValueError(f"group: the host lays out {g} tokens per object, the config says group={self.group}")
        if slot_to_object is not None:
            ids = torch.as_tensor(slot_to_object).reshape(-1).long().cpu()
            if ids.numel() != scores.numel() or not torch.equal(ids, torch.arange(ids.numel())):
                raise ValueError(
                    "slot_to_object: Fast3D compat reproduces its evaluation with identity object ids "
                    "(assigned_ids = arange); the host permuted them. Turn on the host's identity-ids option, "
                    "or use canonical Fast3D"
                )
        if scores.numel() * g != visual_tokens:
            raise ValueError(
                f"object_scores: {scores.numel()} slots x group {g} = {scores.numel() * g} tokens, but the sample "
                f"has {visual_tokens} visual tokens"
            )
        if self.alpha is not None:
            from .fast3d import _looks_like_attention

            if _looks_like_attention(scores):
                raise ValueError(
                    "object_scores: SAP needs GAP logits, but these scores are non-negative and sum to <= 1 (an "
                    "attention map, e.g. extracted a_map targets); Fast3D's softmax over them is nearly uniform and "
                    "keeps almost every object. Pass GAP logits, or use a fixed keep"
                )
            k_star = sap_budget_objects(scores.softmax(-1), self.alpha)
            r = k_star * g
            info.update(alpha=self.alpha, objects=k_star)
        else:
            r = int(self.keep)  # type: ignore[arg-type]
        if r > visual_tokens:
            raise ValueError(f"keep: R={r} exceeds the sample's {visual_tokens} visual tokens")
        a_map = scores.unsqueeze(-1).repeat(1, g).reshape(-1)
        top = a_map.topk(r).indices
        info["keep"] = r
        return torch.sort(top).values.cpu(), info


def compat(method: Any) -> Fast3DCompat:
    """The compat-mode config of a canonical one: ``FastV(layer=K, keep=R)`` -> ``rule="fastv"``;
    ``Fast3D(layer=K, keep=R | alpha=a, scorer=...)`` (GAP, GAP+SAP) -> ``rule="oracle"``;
    ``RandomDrop(layer=K, keep=R, seed=s)`` -> ``rule="random"``. A ``Fast3DCompat`` is returned unchanged.
    Relative budgets (``keep_ratio``) are refused: Fast3D keeps an absolute R."""
    from .fast3d import Fast3D
    from .fastv import FastV
    from .random_drop import RandomDrop

    if isinstance(method, Fast3DCompat):
        return method
    if isinstance(method, (FastV, RandomDrop)) and method.keep is None:
        raise ValueError(
            f"keep_ratio: Fast3D keeps an absolute R of the visual tokens; give {type(method).__name__}(keep=R) "
            f"(got keep_ratio={method.keep_ratio})"
        )
    if isinstance(method, FastV):
        return Fast3DCompat(rule="fastv", layer=method.layer, keep=method.keep)
    if isinstance(method, RandomDrop):
        if method.group != 1:
            raise ValueError(
                f"group: Fast3D's random pruning (FastV with K = 0) draws single tokens, not groups of {method.group}"
            )
        return Fast3DCompat(rule="random", layer=method.layer, keep=method.keep, seed=method.seed)
    if isinstance(method, Fast3D):
        return Fast3DCompat(rule="oracle", layer=method.layer, keep=method.keep, alpha=method.alpha,
                            scorer=method.scorer)
    raise TypeError(
        f"method: no Fast3D compat mode for {type(method).__name__}; expected FastV, Fast3D, RandomDrop or Fast3DCompat"
    )


@dataclass
class KeySelection:
    """One forward's key mask (the same for every row and every layer >= K).

    step: 0 for the prefill, t for the t-th decode step; keys: key positions of the forward;
    kept: (R,) sorted visual positions left visible; key_valid: (keys,) bool, the mask itself."""

    step: int
    keys: int
    kept: torch.Tensor
    key_valid: torch.Tensor


@dataclass
class _State:
    owner: int
    visual: torch.Tensor  # (N,) long, visual positions (ascending)
    keep: int
    static: Optional[torch.Tensor]  # oracle: (R,) kept positions
    generator: Optional[torch.Generator]  # random rule
    length: int  # tokens in the cache
    step: int = 0


class KeyMaskRunner:
    """A decoder ``forward`` with DecoderRunner's interface that reproduces Fast3D's key masking.

    ``prepare(...)`` describes the next prefill (as ``DecoderRunner.prepare``); ``forward`` has the
    decoder's signature; ``generation()`` scopes one ``generate`` call; ``last_stats`` are the prefill's
    token counts (every token at every layer); ``history`` holds one ``KeySelection`` per forward since
    the last prefill.
    """

    def __init__(self, decoder: nn.Module, method: Fast3DCompat) -> None:
        if not isinstance(method, Fast3DCompat):
            raise TypeError(f"method: expected a Fast3DCompat config, got {type(method).__name__}")
        self.adapter = DecoderAdapter(decoder)
        if self.adapter.attn_impl != "eager":
            raise ValueError(
                f"attn_implementation: Fast3D compat reads each layer's eager attention weights, as Fast3D ran; "
                f"this decoder uses '{self.adapter.attn_impl}'. Load the LLM with attn_implementation='eager'"
            )
        method.validate_for(self.adapter.num_layers)
        self.method = method
        self.state: Optional[_State] = None
        self.last_stats: Optional[PrefillStats] = None
        self.last_request: Any = None
        self.history: List[KeySelection] = []
        self._pending: Optional[dict] = None
        self._in_generation = False

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
        """Describe the next prefill (see ``DecoderRunner.prepare``). visual_selection: the oracle rule's
        per-sample indices into the visual tokens (``Fast3DCompat.host_selection``). query_index, when
        given, must be the last token (Fast3D ranks with the last row); guidance_index and input_keep
        have no Fast3D counterpart and are refused."""
        if guidance_index is not None:
            raise ValueError("guidance_index: Fast3D ranks with the last token's row; it takes no guidance token")
        if input_keep is not None:
            raise ValueError("input_keep: Fast3D compat keeps every token in the LLM input (it only masks keys)")
        self._pending = dict(visual_mask=visual_mask, visual_spans=visual_spans, query_index=query_index,
                             visual_selection=visual_selection, sample_keys=sample_keys)

    @contextmanager
    def generation(self) -> Iterator[None]:
        """One ``generate`` call (it must use the KV cache: see ``forward``)."""
        prev, self._in_generation = self._in_generation, True
        try:
            yield
        finally:
            self._in_generation = prev

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
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids/inputs_embeds: give exactly one of them")
        if inputs_embeds is None:
            inputs_embeds = ad.decoder.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = bool(getattr(cfg, "use_cache", False))
        if output_attentions is None:
            output_attentions = bool(getattr(cfg, "output_attentions", False))
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(cfg, "output_hidden_states", False))
        if return_dict is None:
            return_dict = bool(getattr(cfg, "return_dict", True))
        incoming_was_cache = ad.is_cache(past_key_values)
        cache = ad.from_incoming(past_key_values)
        past = ad.cache_length(cache, 0) if cache is not None else 0
        batch, q, _ = inputs_embeds.shape
        total = past + q
        device = inputs_embeds.device
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, total):
                raise ValueError(
                    f"attention_mask: expected the 2-D padding mask ({batch}, {total}), got {tuple(attention_mask.shape)}"
                )
            if not bool(attention_mask.bool().all()):
                raise ValueError(
                    "attention_mask: Fast3D's FastV/oracle masks ignore the padding mask, so padded rows have no "
                    "defined result; run one sample (and its beam copies) without padding"
                )
        if position_ids is None:
            pos = (torch.arange(q, device=device) + past).expand(batch, q)
        else:
            pos = position_ids.reshape(-1, q).expand(batch, q).to(device)
        if int(pos.max()) >= ROPE_POSITIONS:
            raise ValueError(
                f"position_ids: position {int(pos.max())} is >= {ROPE_POSITIONS}; Fast3D's attention builds its "
                f"rotary table with seq_len={ROPE_POSITIONS}, so it cannot run such sequences (compat refuses them)"
            )
        if past == 0:
            if self._in_generation and not use_cache:
                raise ValueError(
                    "use_cache: Fast3D's generate ran with the KV cache (transformers forces it for inputs_embeds) "
                    "and re-ranks every step over cached keys; a cache-less generate recomputes every token under "
                    "the newest mask, which is not what ran. Call generate with use_cache=True"
                )
            if use_cache and cache is None:
                cache = ad.new_cache()
            state = self._start(inputs_embeds, total)
        else:
            state = attached_state(cache) or self.state
            if state is None or state.owner != id(self):
                raise RuntimeError(
                    "past_key_values: this cache was not filled by a prefill through this Fast3D compat runner"
                )
            if past != state.length:
                raise ValueError(
                    f"past_key_values: the cache holds {past} tokens, the runner's last forward left {state.length}; "
                    f"rewinding or cropping is not supported"
                )
            state.step += 1

        hidden = inputs_embeds
        dtype = hidden.dtype
        layers = ad.num_layers
        k_layer = self.method.layer
        all_keys = torch.ones(batch, total, dtype=torch.bool, device=device)
        base_mask = ad.attention_mask(all_keys, q, dtype)
        masked = None
        prev_weights: Optional[torch.Tensor] = None
        all_hidden: List[torch.Tensor] = []
        all_attn: List[torch.Tensor] = []
        pos_emb = ad.position_embeddings(hidden, pos)
        with ad.rope_shim() as shim:
            if shim is not None:  # 4.31/4.37 slice their table to the KV length; Fast3D's asks for 1000 rows
                shim.min_len = int(pos.max()) + 1
            for j in range(layers):
                if j == k_layer:
                    kept = self._select(state, prev_weights)
                    key_valid = torch.ones(total, dtype=torch.bool, device=device)
                    key_valid[state.visual] = False
                    key_valid[kept] = True
                    masked = ad.attention_mask(key_valid.expand(batch, total), q, dtype)
                    self.history.append(KeySelection(state.step, total, torch.sort(kept).values.cpu(), key_valid.cpu()))
                if output_hidden_states:
                    all_hidden.append(hidden)
                want = output_attentions or (self.method.rule == "fastv" and j == k_layer - 1)
                hidden, weights = self._layer(j, hidden, base_mask if j < k_layer else masked, pos, cache, use_cache,
                                              pos_emb, want)
                prev_weights = weights
                if output_attentions:
                    all_attn.append(weights)
        hidden = ad.decoder.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        state.length = total
        if past == 0:
            self.state = state
            if use_cache:
                attach_state(cache, state)
        out_cache = ad.outgoing(cache, incoming_was_cache) if use_cache else None
        hs = tuple(all_hidden) if output_hidden_states else None
        attn = tuple(all_attn) if output_attentions else None
        if not return_dict:
            return tuple(v for v in (hidden, out_cache, hs, attn) if v is not None)
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=out_cache, hidden_states=hs,
                                       attentions=attn)

    # ------------------------------------------------------------------ helpers
    def _layer(self, j, hidden, mask, pos, cache, use_cache, pos_emb, want_weights):
        """Run layer j; return (hidden, its attention weights (B, H, q, keys) or None)."""
        ad = self.adapter
        if not want_weights:
            return ad.call_layer(j, hidden, mask, pos, cache, use_cache and cache is not None, pos_emb), None
        captured: dict = {}

        def hook(_m, _inp, out):
            captured["w"] = out[1]

        handle = ad.layers[j].self_attn.register_forward_hook(hook)
        try:
            hidden = ad.call_layer(j, hidden, mask, pos, cache, use_cache and cache is not None, pos_emb,
                                   output_attentions=True)
        finally:
            handle.remove()
        w = captured.get("w")
        if w is None:
            raise RuntimeError(f"attn_implementation: layer {j} returned no attention weights; compat needs eager attention")
        return hidden, w

    def _select(self, state: _State, prev_weights: Optional[torch.Tensor]) -> torch.Tensor:
        """The kept visual positions of this forward (device of the visual positions)."""
        rule = self.method.rule
        vis = state.visual
        if rule == "oracle":
            return state.static  # type: ignore[return-value]
        if rule == "random":
            pick = torch.randperm(vis.numel(), generator=state.generator)[: state.keep]
            return vis[pick.to(vis.device)]
        # Fast3D: torch.mean(w, dim=1)[0][-1][SYS:SYS+IMG].topk(R).indices + SYS
        avg = torch.mean(prev_weights, dim=1)[0]  # type: ignore[arg-type]
        row = avg[-1]
        return vis[row[vis].topk(state.keep).indices]

    def _start(self, embeds: torch.Tensor, length: int) -> _State:
        """Validate the prefill's description and start a new forward history."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise ValueError(
                "visual_mask: no visual-token positions were given for this prefill; call "
                "`prepare(visual_mask=... | visual_spans=...)` before the forward"
            )
        batch = embeds.shape[0]
        if batch > 1 and not torch.equal(embeds, embeds[:1].expand_as(embeds)):
            raise ValueError(
                f"inputs_embeds: Fast3D compat runs one sample (and its beam copies) per forward, as Fast3D's "
                f"evaluate does: its selection is read from batch row 0 and applied to every row; got {batch} rows "
                f"that are not copies of one sample"
            )
        mask2d = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        given = {k: v for k, v in pending.items() if v is not None}
        k = expansion_factor(batch, given)
        if k > 1:
            check_group_copies(embeds, mask2d, k, next(iter(given)))
            pending = expand_pending(pending, k)
        if pending.get("visual_selection") is not None and self.method.rule != "oracle":
            raise ValueError(
                f"visual_selection: rule='{self.method.rule}' ranks inside the LLM; only rule='oracle' takes a "
                f"host selection"
            )
        request = build_request(embeds, mask2d, needs_query=False, **pending)
        if pending.get("query_index") is not None and bool((request.query_index != length - 1).any()):
            raise ValueError(
                f"query_index: Fast3D ranks with the last token's attention row (position {length - 1}); got "
                f"{request.query_index.tolist()}"
            )
        vis = request.visual_positions(0)
        n = int(vis.numel())
        if n == 0:
            raise ValueError("visual_spans: Fast3D compat needs the sample's visual tokens; this prefill has none")
        method = self.method
        static = None
        generator = None
        if method.rule == "oracle":
            if request.visual_selection is None:
                raise ValueError(
                    "visual_selection: rule='oracle' needs the per-sample ranking; the host passes "
                    "selection_inputs=[{'object_scores': ...}] to session.prefill (Fast3DCompat.host_selection), "
                    "or prepare(visual_selection=...)"
                )
            static = vis[request.visual_selection[0].to(vis.device)]
            keep = int(static.numel())
        else:
            keep = int(method.keep)  # type: ignore[arg-type]
            if keep > n:
                raise ValueError(f"keep: R={keep} exceeds the sample's {n} visual tokens")
            if method.rule == "random":
                generator = keyed_generator(method.seed, request.sample_key(0))
        self.last_request = request
        self.history = []
        layers = self.adapter.num_layers
        self.last_stats = PrefillStats(
            tokens=torch.full((batch, layers), length, dtype=torch.long),
            visual=torch.full((batch, layers), n, dtype=torch.long),
            sequence_length=torch.full((batch,), length, dtype=torch.long),
            visual_tokens=torch.full((batch,), n, dtype=torch.long),
            stages=[(0, [vis.cpu() for _ in range(batch)])],
        )
        return _State(owner=id(self), visual=vis, keep=keep, static=static, generator=generator, length=0)


__all__ = ["Fast3DCompat", "KeyMaskRunner", "KeySelection", "RULES", "ROPE_POSITIONS", "compat", "sap_budget_objects"]
