"""The contract between a pruning method and the engine.

At prefill the engine builds one ``Plan`` per forward (``method.make_plan(request, num_layers)``)
and, before running each decoder layer ``l``, calls ``plan.before_layer(view)`` and then, on the
state the layer will run on, ``plan.observe(view)``. The plan returns
``None`` (keep the current tokens) or, per sample, the sorted original positions that must be
active for layer ``l`` onward. Positions not active before are re-activated and enter with their
layer-0 embedding. Decisions are made at prefill only; decoding reuses them through the KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from .state import ActiveSet

KeepSets = Sequence[torch.Tensor]


@dataclass
class PruningRequest:
    """What one prefill is about (built by ``engine.request.build_request`` from the host's description).

    visual_mask: (B, L) bool, True at the visual tokens that enter the LLM.
    query_index: (B,) long, the scoring query of each sample (default: its last valid token, i.e.
    the last instruction token at prefill).
    guidance_index: optional (B,) long, a second query a method may use (e.g. LISA's [SEG]).
    visual_selection: optional, per sample a sorted (k_b,) long tensor of indices into that
    sample's visual tokens (0 .. N_b-1, in sequence order) chosen before the LLM by a selector the
    host ran (e.g. LVLM_CSP's CLS or Seg-First clustering).
    input_keep: optional (B, L) bool, the tokens that enter the LLM at all (a pre-LLM selector's
    removal on a host that splices every token: the LLM sees the kept subsequence, renumbered, as if
    the host had collapsed it). None: every valid token.
    source_visual_counts: (B,) visual tokens of the prefill before any pre-LLM removal.
    sample_keys: optional per-sample keys (e.g. image ids) that seed per-sample random draws.
    embeds: the prefill's input embeddings (B, L, d), for default sample keys.
    """

    visual_mask: torch.Tensor
    query_index: torch.Tensor
    guidance_index: Optional[torch.Tensor] = None
    visual_selection: Optional[List[torch.Tensor]] = None
    input_keep: Optional[torch.Tensor] = None
    source_visual_counts: Optional[torch.Tensor] = None
    sample_keys: Optional[List[Any]] = None
    embeds: Optional[torch.Tensor] = field(default=None, repr=False)

    def visual_positions(self, b: int) -> torch.Tensor:
        """(N_b,) original positions of sample ``b``'s visual tokens, ascending."""
        return torch.nonzero(self.visual_mask[b], as_tuple=False).flatten()

    @property
    def batch_size(self) -> int:
        return self.visual_mask.shape[0]

    def visual_counts(self) -> torch.Tensor:
        """(B,) number of visual tokens per sample entering the LLM."""
        return self.visual_mask.sum(dim=1)

    def sample_key(self, b: int) -> str:
        """Seed key of sample ``b``: the host's key, else a digest of its visual embeddings."""
        if self.sample_keys is not None:
            return str(self.sample_keys[b])
        if self.embeds is None:
            raise ValueError("sample_keys: no per-sample key and no embeddings to derive one from")
        from .request import digest_key

        return "embeds:" + digest_key(self.embeds[b, self.visual_positions(b)])


class LayerView:
    """Read access to the engine state just before decoder layer ``layer`` runs (prefill only)."""

    def __init__(
        self,
        layer: int,
        num_layers: int,
        active: ActiveSet,
        request: PruningRequest,
        scorer: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.layer = layer
        self.num_layers = num_layers
        self.active = active
        self.request = request
        self._scorer = scorer
        self._cache: dict = {}

    @property
    def visual(self) -> torch.Tensor:
        """(B, n) bool: which active slots hold visual tokens."""
        return self.request.visual_mask.gather(1, self.active.positions) & self.active.valid

    def slots_of(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, q) original positions → slot indices in the current active set; raises if inactive."""
        eq = (self.active.positions.unsqueeze(1) == positions.unsqueeze(-1)) & self.active.valid.unsqueeze(1)
        found = eq.any(dim=-1)
        if not bool(found.all()):
            raise ValueError(
                f"query_index: query position(s) {positions[~found].tolist()} are not active at layer "
                f"{self.layer}; a scoring query must never be pruned"
            )
        return eq.float().argmax(dim=-1)

    def attention(self, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Head-averaged attention of query rows over the active slots at this layer's input.

        positions: (B,) or (B, q) original positions of the query rows (default: the request's
        ``query_index``). Returns (B, n) for (B,) input, else (B, q, n); float32.
        """
        if positions is None:
            positions = self.request.query_index
        single = positions.dim() == 1
        pos = positions.unsqueeze(1) if single else positions
        key = tuple(pos.flatten().tolist())
        if key not in self._cache:
            self._cache[key] = self._scorer(self.slots_of(pos))
        out = self._cache[key]
        return out[:, 0] if single else out

    def keep_top_visual(self, scores: torch.Tensor, keep: Union[int, Sequence[int], torch.Tensor]) -> List[torch.Tensor]:
        """Per sample: every active non-visual token plus the ``keep`` active visual tokens with the
        highest ``scores`` (B, n); ties go to the earlier position. Returns sorted original positions.
        Integer keeps must be ints (not bools). A sample without active visual tokens keeps all its tokens."""
        visual = self.visual
        batch = visual.shape[0]
        if isinstance(keep, int):
            keep_list = [keep] * batch
        else:
            keep_list = [int(k) for k in keep]
        out: List[torch.Tensor] = []
        for b in range(batch):
            pos = self.active.positions[b]
            valid = self.active.valid[b]
            vis = visual[b]
            n_vis = int(vis.sum())
            k = keep_list[b]
            if n_vis == 0:
                out.append(pos[valid])
                continue
            if k < 0 or k > n_vis:
                raise ValueError(f"keep: {k} visual tokens requested but sample {b} has {n_vis} active at layer {self.layer}")
            vis_slots = torch.nonzero(vis, as_tuple=False).flatten()
            order = torch.sort(scores[b, vis_slots].float(), descending=True, stable=True).indices[:k]
            chosen = pos[vis_slots[order]]
            text = pos[valid & ~vis]
            out.append(torch.sort(torch.cat([text, chosen])).values)
        return out


class Plan:
    """Per-prefill pruning schedule. Subclasses override ``before_layer`` and, to score the tokens
    a layer actually runs on, ``observe``."""

    def before_layer(self, view: LayerView) -> Optional[KeepSets]:  # pragma: no cover - interface
        raise NotImplementedError

    def observe(self, view: LayerView) -> None:
        """Called with layer ``view.layer``'s final input, after the transition ``before_layer``
        asked for (if any). Scores taken here are those of the layer's own attention over the
        tokens it sees, even when that set was changed just before it."""


class FixedSelectionPlan(Plan):
    """From layer ``layer`` on, each sample keeps all its text tokens and the visual tokens ``picks[b]``
    (indices into its visual tokens, chosen before the prefill: Fast3D's objects, a seeded random draw).
    A sample without visual tokens keeps everything."""

    def __init__(self, layer: int, picks: Sequence[torch.Tensor], request: PruningRequest) -> None:
        self.layer, self.picks, self.request = layer, list(picks), request

    def before_layer(self, view: LayerView) -> Optional[KeepSets]:
        if view.layer != self.layer:
            return None
        out = []
        for b in range(view.active.positions.shape[0]):
            pos = view.active.positions[b][view.active.valid[b]]
            vis = self.request.visual_positions(b)
            if vis.numel() == 0:
                out.append(pos)
                continue
            text = pos[~self.request.visual_mask[b, pos]]
            out.append(torch.sort(torch.cat([text, vis[self.picks[b].to(vis.device)]])).values)
        return out

