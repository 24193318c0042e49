"""VisionZip (Yang et al., CVPR 2025): dominant + contextual visual tokens before the LLM.

Re-implementation of ``CLIPVisionTower_VisionZip.forward`` in ``dvlab-research/VisionZip``
``visionzip/clip_encoder.py`` with the layer patches of ``visionzip/utils.py`` (HEAD 3151f6d).
With L tower layers (24 for CLIP-L) and N = 1 + P tokens per image:

- Layer: ``attentions[-2]`` and the head-averaged keys ("metric", stored only by the layer with
  ``r = 1``, index 22 = L − 2) of encoder layer L − 2; the features are ``hidden_states[-2]``, the
  output of that same layer, *with* [CLS] (B, N, C).
- Dominant: the [CLS] row of that layer's per-head softmax attention (scale head_dim^-0.5),
  summed over heads, over the P patches; [CLS] plus the top ``dominant − 1`` patches, emitted in
  *position order* ([CLS] first), as the repo's ``masked_select`` does.
- Contextual: the R = N − dominant remaining tokens, in position order, with keys
  ``mean_heads(k_proj(x))`` (B, N, head_dim), divided by their L2 norm. Targets are the
  remaining-list positions ``arange(0, R, max(1, R // contextual))[:contextual]``; every other
  remaining token goes to the target of highest key cosine similarity (``argmax``: first on ties);
  each contextual token is ``target + mean(assigned tokens)`` (``target + 0`` when none is
  assigned): the repo adds the target to the *mean of its assignees*, it does not average them.
- Output: ``dominant + contextual`` tokens per image, [CLS] included (the host's projector gets
  it; LISA's ``patch`` selection would have dropped it).

``dominant`` counts [CLS], as the repo's ``visionzip(model, dominant=54, contextual=10)`` does
(it passes ``dominant − 1`` to the patch top-k). Presets (``VisionZip(tokens=…)``): 64 = 54 + 10
(the authors' README); 128 = 108 + 20 and 192 = 162 + 30 keep the same ratio, the split used for
the paper's 128/192-token LLaVA-1.5 rows by common re-implementations (the repo itself only
spells out 54 + 10; its ``visionzip()`` default is 191 + 30).

Deviations: scores, keys and the merge are computed in float32 (the repo uses the tower dtype,
fp16 in LLaVA's eval) and the tokens are cast back to the feature dtype. The repo is batch-correct;
so is this (B images ≡ B runs of one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch

from ..scoring import attention_probs
from .base import register
from .prellm import PreLLMMethod, ReducedTokens, VisionInputs

#: tokens per image → (dominant incl. [CLS], contextual)
PRESETS: Dict[int, Tuple[int, int]] = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


@register("visionzip")
@dataclass
class VisionZip(PreLLMMethod):
    """VisionZip: ``dominant`` tokens ([CLS] + top patches) and ``contextual`` merged tokens.

    dominant: tokens kept by [CLS] attention, [CLS] included (>= 1); default 54.
    contextual: merged tokens (>= 1); default 10.
    tokens: alternatively a preset total, 64, 128 or 192 (see ``PRESETS``).
    layer: encoder layer of the attention and keys (repo: -2, i.e. 22 of 24).
    select_layer: ``hidden_states`` index of the features (repo: -2, that layer's output), [CLS] kept.
    """

    dominant: Optional[int] = None
    contextual: Optional[int] = None
    tokens: Optional[int] = None
    layer: int = -2
    select_layer: int = -2

    select_feature: ClassVar[str] = "cls_patch"

    def __post_init__(self) -> None:
        if self.tokens is not None:
            if self.tokens not in PRESETS:
                raise ValueError(f"tokens: expected a preset in {sorted(PRESETS)}, got {self.tokens!r}")
            d, c = PRESETS[self.tokens]
            for param, given, preset in (("dominant", self.dominant, d), ("contextual", self.contextual, c)):
                if given is not None and given != preset:
                    raise ValueError(f"{param}: {given} contradicts tokens={self.tokens} (preset {d} + {c})")
            self.dominant, self.contextual = d, c
        if self.dominant is None and self.contextual is None:
            self.dominant, self.contextual = PRESETS[64]
        for param in ("dominant", "contextual"):
            v = getattr(self, param)
            if v is None:
                raise ValueError(f"{param}: give both dominant and contextual (or tokens=64/128/192)")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{param}: expected an int >= 1, got {v!r}")
        for param in ("layer", "select_layer"):
            v = getattr(self, param)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{param}: expected an int layer index (negative counts from the end), got {v!r}")

    def output_tokens(self, num_patches: int) -> int:
        """Tokens per image: dominant + contextual."""
        self._check(num_patches)
        return int(self.dominant) + int(self.contextual)

    def _check(self, p: int) -> None:
        if int(self.dominant) - 1 + int(self.contextual) > p:
            raise ValueError(
                f"dominant/contextual: {self.dominant} - 1 dominant patches + {self.contextual} contextual "
                f"targets exceed the {p} patches of the image"
            )

    @torch.no_grad()
    def reduce(self, inputs: VisionInputs) -> ReducedTokens:
        """Reduce B images: ``inputs`` from ``capture`` (attention layer ``layer``, features (B, 1 + P, C)).

        Returns (B, dominant + contextual, C): dominant tokens in position order ([CLS] first,
        ``indices`` -1), then the contextual tokens in target order (``indices``: their target patch).
        """
        if not isinstance(inputs, VisionInputs):
            raise TypeError(f"inputs: expected VisionInputs, got {type(inputs).__name__}")
        if not inputs.has_cls:
            raise ValueError("inputs: VisionZip needs the features with [CLS] (select_feature='cls_patch')")
        p = inputs.num_patches
        self._check(p)
        d, c = int(self.dominant), int(self.contextual)
        hidden, attn = inputs.attn_hidden, inputs.attn
        b, n, _ = hidden.shape
        dev = hidden.device

        probs = attention_probs(attn, hidden, query_rows=torch.zeros(1, dtype=torch.long, device=dev))
        score = probs[:, :, 0, 1:].sum(dim=1)  # (B, P): [CLS] row summed over heads
        top = score.topk(d - 1, dim=1).indices + 1
        keep = torch.zeros(b, n, dtype=torch.bool, device=dev)
        keep[:, 0] = True
        keep.scatter_(1, top, True)

        x = inputs.features.float()
        cdim = x.shape[-1]
        pos = torch.arange(n, device=dev).expand(b, n)
        r = n - d
        dominant = x[keep].view(b, d, cdim)  # position order
        rest_x = x[~keep].view(b, r, cdim)
        rest_pos = pos[~keep].view(b, r)

        heads, head_dim = _head_shape(attn)
        metric = attn.k_proj(hidden).float().view(b, n, heads, head_dim).mean(dim=2)
        metric = metric[~keep].view(b, r, head_dim)
        metric = metric / metric.norm(dim=-1, keepdim=True)

        targets = torch.arange(0, r, max(1, r // c), device=dev)[:c]
        is_target = torch.zeros(r, dtype=torch.bool, device=dev)
        is_target[targets] = True
        sim = metric[:, ~is_target] @ metric[:, targets].transpose(1, 2)  # (B, R - c, c)
        one_hot = torch.zeros_like(sim).scatter_(2, sim.argmax(dim=2, keepdim=True), 1.0)
        counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (B, c, 1)
        merged = (one_hot.transpose(1, 2) @ rest_x[:, ~is_target]) / counts
        contextual = rest_x[:, targets] + merged

        feats = torch.cat([dominant, contextual], dim=1).to(inputs.features.dtype)
        # patch index = position - 1, so [CLS] (position 0) gets -1 = CLS_INDEX
        indices = torch.cat([pos[keep].view(b, d), rest_pos[:, targets]], dim=1) - 1
        counts_out = torch.full((b,), d + c, dtype=torch.long, device=dev)
        return ReducedTokens(feats, indices, counts_out)


def _head_shape(attn: torch.nn.Module) -> Tuple[int, int]:
    """(num_heads, head_dim) of a HF CLIP attention (4.x keeps num_heads on the module, 5.x on the config)."""
    heads = getattr(attn, "num_heads", None)
    if heads is None:
        heads = attn.config.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or attn.k_proj.out_features // int(heads)
    return int(heads), int(head_dim)


__all__ = ["PRESETS", "VisionZip"]
