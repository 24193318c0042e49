"""PruMerge and PruMerge+ (Shang et al., 2024): adaptive pre-LLM token pruning and merging.

Re-implementation of ``token_prune_merge_advanced`` (PruMerge) and
``token_prune_merge_advanced_plus`` (PruMerge+) in ``42Shawn/LLaVA-PruMerge``
``llava/model/multimodal_encoder/clip_encoder.py`` (HEAD 097c041). Per image, with P patches:

1. Scores: the [CLS] row of one full-width attention product of the *last* tower layer
   (``layers[23]`` of CLIP-L's 24; its input is ``hidden_states[-2]``, the features LLaVA/LISA use):
   ``a = softmax(q_cls · Kᵀ · C^-0.5)`` over all 1 + P keys, [CLS] column dropped
   (``shared.scoring.cls_attention``). q, k are the ``q_proj``/``k_proj`` outputs (bias included),
   C the hidden size.
2. Count (``adaptive=True``): IQR outliers of ``a``: ``ratio = #{a > Q3 + 1.5·(Q3 − Q1)} / P`` with
   ``numpy.percentile`` (linear interpolation) on the float32 values; ``k = int(P · ratio)``.
   ``adaptive=False`` (the repo's training path): ``k = int(P · reduction_ratio)``.
3. Keep ``idx = topk(a, k)`` (descending attention). PruMerge+ appends spatial samples (below).
4. ``compl``: the other patches, ascending (the repo's ``complement_idx``).
5. Merge: each kept token i becomes ``x_i + Σ_j a_j x_j`` over its ``neighbours`` (32) most
   key-cosine-similar tokens among all other kept and non-kept tokens (keys of step 1, full width,
   L2-normalised); the weights are the raw [CLS] attentions (no normalisation).
6. One extra token ``Σ_{j ∈ compl} a_j x_j`` is appended. Output: k (+ samples) + 1 tokens.

PruMerge+ samples (repo, adaptive path): ``step = int(1 / ratio)``, the patches
``arange(0, P − 1, int(step / 3))`` that are not already kept are appended in ascending order.
Non-adaptive path: ``arange(int(step / 2), P − 1, step)`` with ``step = int(1 / reduction_ratio)``
is appended *without* filtering (duplicates possible; it must hold exactly k patches, as the repo's
``new_idx`` assignment requires).

Reproduced quirks and deviations (documented, deliberate):

- The repo hard-codes ``arange(…, 575, …)`` for 576 patches; it is generalised to ``P − 1`` (so the
  last patch is never a spatial sample, as in the repo).
- ``complement_idx`` semantics are kept literally: ``sort(arange(P) with idx zeroed)[len(idx):]``.
  With duplicate indices (non-adaptive PruMerge+) this drops the smallest true complement patches
  from both sets, as the repo does.
- Batches: the repo's ``outlier_dectection`` flattens the [CLS] attention of the *whole batch*,
  so every image gets the batch-pooled count, and its PruMerge+ filter tests membership in the
  kept indices of all images and then fails for B > 1. Here ``outlier_scope="image"`` (default)
  counts per image (B images ≡ B runs of one image); ``outlier_scope="batch"`` reproduces the
  pooled count (the spatial filter stays per image). Images may thus emit different numbers of
  tokens: ``ReducedTokens.counts``.
- Precision: scores, keys and the merge are computed in float32 and the tokens are cast back to
  the feature dtype; the repo works in the tower dtype (fp16 in LLaVA's eval), so near-ties of
  the IQR bound or of the similarity ranking can resolve differently from a literal fp16 run.
- ``neighbours=1`` is computed as the rule states; the repo's ``.squeeze()`` would collapse it.
- PruMerge+ with no IQR outlier (``ratio = 0``) raises: the repo divides by zero there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from ..scoring import cls_attention
from .base import register
from .prellm import MERGED_INDEX, PreLLMMethod, ReducedTokens, VisionInputs

OUTLIER_SCOPES = ("image", "batch")


def iqr_outlier_ratio(scores: torch.Tensor) -> float:
    """Fraction of ``scores`` (any shape, flattened) above Q3 + 1.5·IQR, as the repo computes it.

    Quartiles are ``numpy.percentile`` (linear interpolation) of the float32 values.
    """
    arr = scores.detach().to(torch.float32).cpu().numpy().reshape(-1)
    q1 = np.percentile(arr, 25)
    q3 = np.percentile(arr, 75)
    upper = q3 + 1.5 * (q3 - q1)
    return int(np.count_nonzero(arr > upper)) / arr.size


def complement_indices(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The repo's ``complement_idx`` for one image: ``sort(arange(n) with idx set to 0)[len(idx):]``.

    For distinct ``idx`` these are the other indices in ascending order.
    """
    masked = torch.arange(n, device=idx.device)
    masked[idx] = 0
    return masked.sort().values[idx.numel():]


@register("prumerge")
@dataclass
class PruMerge(PreLLMMethod):
    """PruMerge: IQR-adaptive [CLS]-attention selection, key-similarity merging, one extra token.

    adaptive: count by the IQR outlier rule (the repo's inference setting); else
        ``int(P · reduction_ratio)`` tokens (its training path).
    reduction_ratio: fraction kept when ``adaptive=False`` (repo default 1/8).
    neighbours: tokens merged into each kept token (repo: 32); at most P − 1.
    outlier_scope: "image" (per-image count) or "batch" (the repo's count pooled over the batch).
    layer: encoder layer whose q/k score the tokens (-1: the last, ``layers[23]`` of CLIP-L).
    select_layer: ``hidden_states`` index of the merged features (LLaVA/LISA: -2), [CLS] dropped.
    """

    adaptive: bool = True
    reduction_ratio: float = 1 / 8
    neighbours: int = 32
    outlier_scope: str = "image"
    layer: int = -1
    select_layer: int = -2

    def __post_init__(self) -> None:
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"adaptive: expected a bool, got {self.adaptive!r}")
        if isinstance(self.reduction_ratio, bool) or not isinstance(self.reduction_ratio, (int, float)) or not (
            0.0 < float(self.reduction_ratio) <= 1.0
        ):
            raise ValueError(f"reduction_ratio: expected a fraction in (0, 1], got {self.reduction_ratio!r}")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise ValueError(f"neighbours: expected an int >= 1 (tokens merged per kept token), got {self.neighbours!r}")
        if self.outlier_scope not in OUTLIER_SCOPES:
            raise ValueError(f"outlier_scope: expected one of {OUTLIER_SCOPES}, got {self.outlier_scope!r}")
        for param in ("layer", "select_layer"):
            v = getattr(self, param)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{param}: expected an int layer index (negative counts from the end), got {v!r}")

    # -- selection ----------------------------------------------------------------------------
    def _ratios(self, attn: torch.Tensor) -> List[float]:
        b = attn.shape[0]
        if not self.adaptive:
            return [float(self.reduction_ratio)] * b
        if self.outlier_scope == "batch":
            return [iqr_outlier_ratio(attn)] * b
        return [iqr_outlier_ratio(attn[i]) for i in range(b)]

    def _select(self, attn: torch.Tensor, ratio: float, image: int) -> torch.Tensor:
        """Kept patch indices of one image (P,) scores, in output order."""
        p = attn.shape[0]
        k = int(p * ratio)
        if not self.adaptive and k == 0:
            raise ValueError(f"reduction_ratio: {self.reduction_ratio} of {p} patches keeps no token")
        return torch.topk(attn, k, largest=True).indices

    # -- reduction ----------------------------------------------------------------------------
    @torch.no_grad()
    def reduce(self, inputs: VisionInputs) -> ReducedTokens:
        """Reduce B images: ``inputs`` from ``capture`` (attention layer ``layer``, features (B, P, C)).

        Returns (B, K, C) tokens: the kept tokens (merged) in selection order, then the extra token;
        ``indices`` give the kept patches and ``MERGED_INDEX`` for the extra token.
        """
        if not isinstance(inputs, VisionInputs):
            raise TypeError(f"inputs: expected VisionInputs, got {type(inputs).__name__}")
        p = inputs.num_patches
        if self.neighbours > p - 1:
            raise ValueError(
                f"neighbours: expected at most P - 1 = {p - 1} (other tokens of an image with {p} patches), "
                f"got {self.neighbours}"
            )
        attn = cls_attention(inputs.attn, inputs.attn_hidden)  # (B, P) float32
        keys = inputs.attn.k_proj(inputs.attn_hidden[:, 1:]).float()  # (B, P, C), bias included
        keys = F.normalize(keys, p=2, dim=-1)
        feats = inputs.patch_features()
        rows, index_rows = [], []
        for b, ratio in enumerate(self._ratios(attn)):
            idx = self._select(attn[b], ratio, b)
            compl = complement_indices(idx, p)
            tokens = _merge(feats[b].float(), attn[b], keys[b], idx, compl, self.neighbours)
            rows.append(tokens.to(feats.dtype))
            index_rows.append(torch.cat([idx, idx.new_full((1,), MERGED_INDEX)]))
        return ReducedTokens.stack(rows, index_rows)

    def output_tokens(self, num_patches: int) -> int:
        """Tokens per image for ``adaptive=False`` (k + 1); adaptive counts depend on the image."""
        if self.adaptive:
            raise ValueError("adaptive: the adaptive token count depends on each image's [CLS] attention")
        return int(num_patches * float(self.reduction_ratio)) + 1


@register("prumerge_plus")
@dataclass
class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge plus spatially uniform samples appended to the kept set (see module doc)."""

    def _select(self, attn: torch.Tensor, ratio: float, image: int) -> torch.Tensor:
        idx = super()._select(attn, ratio, image)
        p = attn.shape[0]
        if self.adaptive:
            if ratio == 0:
                raise ValueError(
                    f"inputs: image {image} has no IQR outlier in its [CLS] attention; PruMerge+ derives its "
                    f"sampling stride from 1 / ratio and is undefined here (the reference divides by zero)"
                )
            stride = int(int(1 / ratio) / 3)
            if stride < 1:
                raise ValueError(f"inputs: image {image}: outlier ratio {ratio} gives a sampling stride of 0")
            seq = torch.arange(0, p - 1, stride, device=idx.device)
            return torch.cat([idx, seq[~torch.isin(seq, idx)]])
        step = int(1 / float(self.reduction_ratio))
        seq = torch.arange(int(step / 2), p - 1, step, device=idx.device)
        if seq.numel() != idx.numel():
            raise ValueError(
                f"reduction_ratio: {self.reduction_ratio} gives {idx.numel()} top tokens but {seq.numel()} spatial "
                f"samples for {p} patches; the reference's non-adaptive PruMerge+ needs them equal"
            )
        return torch.cat([idx, seq])

    def output_tokens(self, num_patches: int) -> int:
        """Tokens per image for ``adaptive=False`` (2k + 1)."""
        return 2 * (super().output_tokens(num_patches) - 1) + 1


def _merge(
    x: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, compl: torch.Tensor, neighbours: int
) -> torch.Tensor:
    """One image: x (P, C) float32 features, attn (P,), keys (P, C) L2-normalised; idx (k,), compl (m,).

    Returns (k + 1, C): ``x_i + Σ a_j x_j`` over each kept token's ``neighbours`` most similar other
    tokens (kept slots other than i, then compl), and the extra token ``Σ_{compl} a_j x_j``.
    """
    extra = (x[compl] * attn[compl].unsqueeze(-1)).sum(dim=0, keepdim=True)
    k = idx.numel()
    if k == 0:
        return extra
    cand = torch.cat([idx, compl])  # candidate slots; slot i (< k) is kept token i itself
    sim = keys[idx] @ keys[cand].T  # (k, k + m) cosine similarities
    sim[torch.arange(k), torch.arange(k)] = float("-inf")
    near = cand[sim.topk(neighbours, dim=1).indices]  # (k, neighbours) patch indices
    merged = (x[near] * attn[near].unsqueeze(-1)).sum(dim=1)
    return torch.cat([x[idx] + merged, extra])


__all__ = ["PruMerge", "PruMergePlus", "complement_indices", "iqr_outlier_ratio"]
