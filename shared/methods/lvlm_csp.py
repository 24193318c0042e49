"""LVLM_CSP (2025): Clustering → Scattering → Pruning of image tokens inside the LLM.

Stages over L decoder layers, N image tokens per sample (reconstructed from the paper; the
interpretation of every ambiguous point follows the project's LISA note):

- clustering, layers 0 … Lc−1: only Nc image tokens S are active (plus all text). S comes from a
  clustering sampler: ``random`` (seeded), ``uniform`` (Eq. 2, literal 1-D stride or a 2-D grid),
  ``cls`` (last CLIP layer's [CLS] attention, Eq. 3) or ``seg_first`` (instance masks, Eq. 4–5).
  ``random``/``uniform`` are computed here; ``cls``/``seg_first`` need vision-side inputs, so the
  host computes them with :meth:`LVLMCSP.cluster` and passes ``visual_selection`` to the engine.
- scattering, layers Lc … Lc+Ls−1: all N image tokens are active; the N−Nc absent ones enter at
  layer Lc with their layer-0 (projected) embeddings (no recomputation, as Eq. 9 counts).
- pruning, layers Lc+Ls … L−1: the top-Np image tokens by the guidance token's attention at the
  last scattering layer (0-based Lc+Ls−1), head mean, computed from q/k; per sample.

Every token keeps its original position id. The guidance token is the host's ``guidance_index``
([SEG] in LISA); ``seg_query="pre_seg"`` uses the token just before it (the one whose hidden state
LISA sends to SAM). Without a guidance index the request's ``query_index`` is used.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Dict, FrozenSet, List, Optional

import torch

from ..engine.plan import LayerView, Plan, PruningRequest
from .base import LayerMethod, as_int, register

CLUSTERING_MODES = ("random", "uniform", "cls", "seg_first")
#: the pruning stage's query row: the guidance token, the token before it, or the host's scoring query
#: (by default each sample's last prompt token) on hosts without a guidance token
SEG_QUERIES = ("seg", "pre_seg", "query")


@register("lvlm_csp")
@dataclass
class LVLMCSP(LayerMethod):
    """(Lc, Nc, Ls, Np) = (cluster_layers, cluster_tokens, scatter_layers, prune_tokens).

    clustering: one of ``random``, ``uniform``, ``cls``, ``seg_first``.
    uniform_layout: ``literal`` (Eq. 2 as printed: S[i] = i·⌊N/Nc⌋) or ``grid`` (2-D lattice).
    seed: seeds ``random`` (and Seg-First's sampling); every image draws from its own generator,
    seeded from (``seed``, the image's key: the host's image id, else a digest of its visual
    embeddings), so a selection depends on neither the batch nor the other images in it.
    seg_query: ``seg`` (the guidance token's own row, paper-literal), ``pre_seg`` (the row before) or
    ``query`` (the host's scoring query, by default each sample's last prompt token: for hosts without a
    guidance token).
    """

    cluster_layers: int = 8
    cluster_tokens: int = 64
    scatter_layers: int = 6
    prune_tokens: int = 16
    clustering: str = "uniform"
    uniform_layout: str = "literal"
    seed: int = 0
    seg_query: str = "seg"

    def __post_init__(self) -> None:
        for name in ("cluster_layers", "scatter_layers"):
            setattr(self, name, as_int(name, getattr(self, name), low=0, meaning="a non-negative int number of layers"))
        for name in ("cluster_tokens", "prune_tokens"):
            setattr(self, name, as_int(name, getattr(self, name), low=1, meaning="a positive int number of image tokens"))
        if self.clustering not in CLUSTERING_MODES:
            raise ValueError(f"clustering: expected one of {', '.join(CLUSTERING_MODES)}, got {self.clustering!r}")
        if self.uniform_layout not in ("literal", "grid"):
            raise ValueError(f"uniform_layout: expected 'literal' or 'grid', got {self.uniform_layout!r}")
        if self.seg_query not in SEG_QUERIES:
            raise ValueError(f"seg_query: expected one of {', '.join(SEG_QUERIES)}, got {self.seg_query!r}")
        self.seed = as_int("seed", self.seed)

    # ------------------------------------------------------------------ config
    @property
    def paper_tuple(self) -> tuple:
        """(Lc, Nc, Ls, Np) as the paper writes a configuration."""
        return (self.cluster_layers, self.cluster_tokens, self.scatter_layers, self.prune_tokens)

    def validate_for(self, num_layers: int) -> None:
        lc, ls = self.cluster_layers, self.scatter_layers
        if lc + ls > num_layers:
            raise ValueError(
                f"cluster_layers/scatter_layers: Lc + Ls = {lc} + {ls} exceeds the decoder's {num_layers} layers"
            )
        if lc + ls < num_layers and ls < 1:
            raise ValueError(
                "scatter_layers: the pruning stage ranks tokens at the last scattering layer, so Ls >= 1 is "
                f"needed when Lc + Ls < {num_layers} layers"
            )

    def _check_tokens(self, visual_tokens: int) -> None:
        if self.cluster_layers > 0 and self.cluster_tokens > visual_tokens:
            raise ValueError(f"cluster_tokens: Nc={self.cluster_tokens} exceeds the sample's N={visual_tokens} image tokens")
        if self.prune_tokens > visual_tokens:
            raise ValueError(f"prune_tokens: Np={self.prune_tokens} exceeds the sample's N={visual_tokens} image tokens")

    def schedule(self, visual_tokens: int, num_layers: int, clustered: Optional[int] = None) -> List[int]:
        """Image tokens each layer sees: Nc (or the measured |S|) for Lc layers, N for Ls, Np for the rest."""
        self.validate_for(num_layers)
        self._check_tokens(visual_tokens)
        nc = self.cluster_tokens if clustered is None else clustered
        lc, ls = self.cluster_layers, self.scatter_layers
        return [nc] * lc + [visual_tokens] * ls + [self.prune_tokens] * (num_layers - lc - ls)

    uses_selection = True

    @property
    def uses_query(self) -> bool:  # type: ignore[override]
        return self.seg_query == "query"

    def needs(self) -> FrozenSet[str]:
        """The decoder; the guidance token unless ``seg_query="query"``; [CLS] attention or instance masks
        for the ``cls`` / ``seg_first`` clustering stage."""
        out = {"decoder"}
        if self.seg_query != "query":
            out.add("guidance_token")
        if self.cluster_layers > 0 and self.clustering == "cls":
            out.add("cls_attention")
        if self.cluster_layers > 0 and self.clustering == "seg_first":
            out.add("instance_masks")
        return frozenset(out)

    # -------------------------------------------------------------- clustering
    def generator(self, key: object) -> torch.Generator:
        """The random generator of one image: seeded from (``seed``, ``key``), stable across runs."""
        if key is None:
            raise ValueError(
                f"key: clustering='{self.clustering}' draws at random per image; pass the image's key (an image "
                f"id or path) so each image gets its own draw"
            )
        digest = hashlib.sha256(f"{self.seed}\x00{key}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    def cluster(
        self,
        visual_tokens: int,
        cls_scores: Optional[torch.Tensor] = None,
        grid_masks=None,
        budget: str = "paper",
        key: object = None,
    ):
        """Clustering selection S for one sample: sorted (|S|,) indices into its N image tokens.

        cls_scores: (N,) [CLS] attention over the patches (``clustering="cls"``; see
        ``shared.scoring.cls_attention``). grid_masks: a ``shared.segfirst.GridMasks`` for the
        sample's image (``clustering="seg_first"``). key: the image's key, seeding ``random`` and
        Seg-First's draws (see ``generator``). Returns (indices, info dict).
        """
        from . import lvlm_csp_clustering as cl

        n, nc = int(visual_tokens), self.cluster_tokens
        if nc > n:
            raise ValueError(f"cluster_tokens: Nc={nc} exceeds the sample's N={n} image tokens")
        mode = self.clustering
        if mode == "random":
            return cl.random_tokens(n, nc, self.generator(key)), {}
        if mode == "uniform":
            return cl.uniform_tokens(n, nc, layout=self.uniform_layout), {}
        if mode == "cls":
            if cls_scores is None:
                raise ValueError("cls_scores: clustering='cls' needs the [CLS] attention over the N patches")
            scores = torch.as_tensor(cls_scores).reshape(-1)
            if scores.numel() != n:
                raise ValueError(f"cls_scores: expected {n} scores (one per image token), got {scores.numel()}")
            return cl.cls_tokens(scores, nc), {}
        if grid_masks is None:
            raise ValueError("grid_masks: clustering='seg_first' needs the instance masks on the CLIP grid")
        if grid_masks.num_tokens != n:
            raise ValueError(
                f"grid_masks: masks were mapped onto a {grid_masks.grid}x{grid_masks.grid} grid "
                f"({grid_masks.num_tokens} tokens) but the sample has {n} image tokens"
            )
        sel = cl.seg_first_tokens(
            grid_masks.token_sets, grid_masks.areas, nc, self.generator(key), budget=budget, n=n,
            fallback_layout=self.uniform_layout,
        )
        return sel.indices, {"fallback_used": sel.fallback_used, "quotas": sel.quotas, "count": sel.count}

    def host_selection(self, visual_tokens: int, cls_scores=None, grid_masks=None, key: object = None):
        """The clustering stage's selection from the host's per-image inputs, for the modes that need
        them (``cls``, ``seg_first``); None for ``random``/``uniform`` (drawn in ``make_plan``) or Lc = 0.
        Returns (indices, info) like ``cluster``."""
        if self.cluster_layers == 0 or self.clustering not in ("cls", "seg_first"):
            return None
        if visual_tokens == 0:
            return torch.zeros(0, dtype=torch.long), {}
        return self.cluster(visual_tokens, cls_scores=cls_scores, grid_masks=grid_masks, key=key)

    # -------------------------------------------------------------------- plan
    def make_plan(self, request: PruningRequest, num_layers: int) -> Plan:
        self.validate_for(num_layers)
        counts = [int(n) for n in request.visual_counts()]
        for n in counts:
            if n > 0:  # a sample without image tokens is left unpruned
                self._check_tokens(n)
        selection: Optional[List[torch.Tensor]] = None
        if self.cluster_layers > 0:
            if request.visual_selection is not None:
                selection = list(request.visual_selection)
            elif self.clustering in ("random", "uniform"):
                selection = [
                    self.cluster(n, key=request.sample_key(b) if self.clustering == "random" else None)[0]
                    if n > 0 else torch.zeros(0, dtype=torch.long)
                    for b, n in enumerate(counts)
                ]
            else:
                raise ValueError(
                    f"visual_selection: clustering='{self.clustering}' needs vision-side inputs; the host must "
                    f"compute the selection with LVLMCSP.cluster(...) and pass it to prepare(visual_selection=...)"
                )
        if self.seg_query == "query":
            guidance = request.query_index
        elif request.guidance_index is None:
            raise ValueError(
                f"guidance_index: seg_query='{self.seg_query}' ranks with the guidance token ([SEG]); give its "
                f"position per sample, or use seg_query='query'"
            )
        else:
            guidance = request.guidance_index
        if self.seg_query == "pre_seg":
            guidance = guidance - 1
            if bool((guidance < 0).any()) or bool(request.visual_mask.gather(1, guidance.clamp(min=0)[:, None]).any()):
                raise ValueError(
                    "seg_query: 'pre_seg' needs a text token right before the guidance token (got the sequence "
                    "start or an image token)"
                )
        return _CSPPlan(self, request, selection, guidance, num_layers)


class _CSPPlan(Plan):
    def __init__(
        self,
        cfg: LVLMCSP,
        request: PruningRequest,
        selection: Optional[List[torch.Tensor]],
        guidance: torch.Tensor,
        num_layers: int,
    ) -> None:
        self.lc = cfg.cluster_layers
        self.score_layer = cfg.cluster_layers + cfg.scatter_layers - 1
        self.prune_layer = cfg.cluster_layers + cfg.scatter_layers
        self.num_layers = num_layers
        self.np = cfg.prune_tokens
        self.request = request
        self.selection = selection
        self.guidance = guidance
        self.kept: Optional[List[torch.Tensor]] = None
        self.full: List[torch.Tensor] = []
        #: per sample, the clustering-stage image-token count |S| actually used
        self.clustered: Optional[List[int]] = None

    @staticmethod
    def _valid_positions(view: LayerView) -> List[torch.Tensor]:
        a = view.active
        return [a.positions[b][a.valid[b]] for b in range(a.positions.shape[0])]

    def before_layer(self, view: LayerView):
        j = view.layer
        if j == 0:
            self.full = self._valid_positions(view)  # every valid prefill token (nothing pruned yet)
            if self.lc > 0 and self.selection is not None:
                out = []
                self.clustered = []
                for b, cur in enumerate(self.full):
                    vis_pos = self.request.visual_positions(b)
                    if vis_pos.numel() == 0:
                        out.append(cur)
                        self.clustered.append(0)
                        continue
                    chosen = vis_pos[self.selection[b].to(vis_pos.device)]
                    text = cur[~self.request.visual_mask[b, cur]]
                    out.append(torch.sort(torch.cat([text, chosen])).values)
                    self.clustered.append(int(chosen.numel()))
                return out
        if j == self.lc and self.lc > 0:
            return self.full  # scattering: the absent image tokens re-enter with their layer-0 embeddings
        if j == self.prune_layer and self.prune_layer < self.num_layers:
            return self.kept
        return None

    def observe(self, view: LayerView) -> None:
        # the last scattering layer's own attention (over all N image tokens), guidance row, head mean
        if view.layer == self.score_layer and self.prune_layer < self.num_layers:
            self.kept = view.keep_top_visual(view.attention(self.guidance), self.np)


PRESETS: Dict[str, LVLMCSP] = {}


def _preset(model: str, lc: int, nc: int, ls: int, np_: int) -> None:
    PRESETS[f"{model}/{lc}-{nc}-{ls}-{np_}"] = LVLMCSP(lc, nc, ls, np_)


# Table 6 (7B-224, 7B-336, 13B-224) and Table 1's main 7B-224 setting; clustering mode defaults to
# uniform (the paper does not state it per row: pass another with dataclasses.replace).
for _m, _cfgs in {
    "7b-224": [(6, 96, 8, 8), (7, 80, 7, 8), (8, 64, 6, 4), (10, 48, 4, 8), (11, 32, 3, 8), (12, 32, 2, 2), (8, 64, 6, 16)],
    "7b-336": [(6, 128, 9, 32), (7, 64, 7, 16), (11, 32, 3, 2)],
    "13b-224": [(5, 64, 11, 16), (12, 32, 2, 8)],
}.items():
    for _c in _cfgs:
        _preset(_m, *_c)


def preset(name: str, **overrides) -> LVLMCSP:
    """A paper configuration by name, e.g. ``preset("7b-224/8-64-6-16", clustering="cls")``."""
    if name not in PRESETS:
        raise ValueError(f"name: unknown LVLM_CSP preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides)


__all__ = ["CLUSTERING_MODES", "LVLMCSP", "PRESETS", "SEG_QUERIES", "preset"]
