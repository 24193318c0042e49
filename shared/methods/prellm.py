"""Pre-LLM reducers: what they receive from one vision-tower forward and what they return.

A pre-LLM method (PruMerge, PruMerge+, VisionZip) shortens the visual sequence *before* the
projector, from the tower's own hidden states and one layer's q/k. The host runs its CLIP tower
once with forward pre-hooks on that layer's ``self_attn`` and on the feature layer
(``shared.scoring.capture_input``; neither ``output_attentions``, so SDPA/flash towers work, nor
``output_hidden_states``), packs the result in ``VisionInputs`` (``capture_vision_inputs``), and
feeds ``ReducedTokens.features`` to its projector instead of the full feature map.

| method | attention layer (``layer``) | features (``select_layer``, select) | CLIP-L/14 (24 layers) |
|---|---|---|---|
| PruMerge / PruMerge+ | -1 (last) | -2, patch (B, P, C) | q/k of ``layers[23]``, input ``hidden_states[23]`` |
| VisionZip | -2 | -2, cls_patch (B, 1 + P, C) | attention/keys of ``layers[22]``, its output ``hidden_states[23]`` |

Layer conventions (HF CLIP, L encoder layers; ``hidden_states`` has L + 1 entries, entry 0 being
the embeddings after ``pre_layrnorm`` and entry i + 1 the output of layer i):

- the *attention layer* ``layer`` is an encoder-layer index (negative counts from the end);
  ``VisionInputs.attn_hidden`` is ``layer_norm1(hidden_states[layer])``, the input of its ``self_attn``;
- the *features* are ``hidden_states[select_layer]`` (LLaVA's ``mm_vision_select_layer``, -2),
  with [CLS] dropped (``select_feature="patch"``, LLaVA/LISA) or kept (``"cls_patch"``).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar, FrozenSet, Iterator, List, Optional

import torch
from torch import nn

from ..scoring import CapturedInput, capture_input, tower_layers

#: ``ReducedTokens.indices`` value of the [CLS] token.
CLS_INDEX = -1
#: ``ReducedTokens.indices`` value of a token that is not anchored at one patch (PruMerge's extra token).
MERGED_INDEX = -2
#: ``ReducedTokens.indices`` value of padding slots (images that emit fewer than K tokens).
PAD_INDEX = -3

SELECT_FEATURES = ("patch", "cls_patch")


@dataclass
class VisionInputs:
    """What a pre-LLM reducer needs from one tower forward over B images.

    attn_hidden: (B, 1 + P, C) input of the attention layer's ``self_attn`` (already layer-normed),
        [CLS] first; q/k are recomputed from it (``shared.scoring``).
    attn: that layer's attention module (``q_proj``, ``k_proj``, ``num_heads``/``head_dim``).
    features: the tensor the host feeds to its projector: (B, P, C) patch tokens, or (B, 1 + P, C)
        with [CLS] first when ``has_cls``.
    has_cls: whether ``features[:, 0]`` is the [CLS] token.
    layer: 0-based encoder index of the attention layer (informational).
    num_layers: encoder depth of the tower (informational).
    """

    attn_hidden: torch.Tensor
    attn: nn.Module
    features: torch.Tensor
    has_cls: bool = False
    layer: Optional[int] = None
    num_layers: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.attn_hidden, torch.Tensor) or self.attn_hidden.dim() != 3:
            raise ValueError(f"attn_hidden: expected a (B, 1 + P, C) tensor, got {_shape(self.attn_hidden)}")
        if not isinstance(self.features, torch.Tensor) or self.features.dim() != 3:
            raise ValueError(f"features: expected a (B, P, C) or (B, 1 + P, C) tensor, got {_shape(self.features)}")
        if not isinstance(self.attn, nn.Module) or not hasattr(self.attn, "q_proj") or not hasattr(self.attn, "k_proj"):
            raise TypeError(f"attn: expected an attention module with q_proj and k_proj, got {type(self.attn).__name__}")
        b, n, _ = self.attn_hidden.shape
        if n < 2:
            raise ValueError(f"attn_hidden: expected [CLS] plus at least one patch token, got {n} tokens")
        if self.features.shape[0] != b:
            raise ValueError(f"features: batch {self.features.shape[0]} differs from attn_hidden's batch {b}")
        want = n if self.has_cls else n - 1
        if self.features.shape[1] != want:
            raise ValueError(
                f"features: expected {want} tokens ({'with' if self.has_cls else 'without'} [CLS], "
                f"attn_hidden has 1 + {n - 1}), got {self.features.shape[1]}"
            )

    @property
    def batch(self) -> int:
        return int(self.attn_hidden.shape[0])

    @property
    def num_patches(self) -> int:
        """P, the patch tokens per image ([CLS] excluded)."""
        return int(self.attn_hidden.shape[1]) - 1

    def patch_features(self) -> torch.Tensor:
        """(B, P, C): the features without [CLS]."""
        return self.features[:, 1:] if self.has_cls else self.features


@dataclass
class ReducedTokens:
    """Output of a pre-LLM reducer for B images.

    features: (B, K, C) tokens in the order the method emits them, in the dtype of
        ``VisionInputs.features``; an image with fewer tokens (adaptive PruMerge) is zero-padded at
        the end, see ``counts``.
    indices: (B, K) int64: the patch (0 … P-1, [CLS] excluded, row-major on the grid) each token is
        anchored at — a kept patch, possibly merged with others (see the method); ``CLS_INDEX`` (-1)
        for [CLS], ``MERGED_INDEX`` (-2) for a token that stands for no single patch,
        ``PAD_INDEX`` (-3) for padding.
    counts: (B,) int64 tokens each image emits (all equal to K for fixed-budget methods).
    """

    features: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor

    @property
    def K(self) -> int:  # noqa: N802 - the name the papers use
        """Tokens per image (the largest count when images differ)."""
        return int(self.features.shape[1])

    @property
    def ragged(self) -> bool:
        return bool((self.counts != self.K).any())

    def per_image(self) -> List[torch.Tensor]:
        """The features without padding: B tensors of shape (counts[b], C)."""
        return [self.features[b, : int(c)] for b, c in enumerate(self.counts.tolist())]

    @staticmethod
    def stack(rows: List[torch.Tensor], index_rows: List[torch.Tensor]) -> "ReducedTokens":
        """Build from per-image (K_b, C) features and (K_b,) indices, zero-padding to max K_b."""
        k = max(int(r.shape[0]) for r in rows)
        c = rows[0].shape[1]
        feats = rows[0].new_zeros(len(rows), k, c)
        idx = torch.full((len(rows), k), PAD_INDEX, dtype=torch.long, device=rows[0].device)
        for b, (r, ir) in enumerate(zip(rows, index_rows)):
            feats[b, : r.shape[0]] = r
            idx[b, : r.shape[0]] = ir
        counts = torch.tensor([int(r.shape[0]) for r in rows], dtype=torch.long, device=rows[0].device)
        return ReducedTokens(feats, idx, counts)


class PreLLMMethod:
    """Base of pre-LLM reducers: a config naming the tower layers it needs, and ``reduce``.

    Subclasses set ``layer`` (attention layer), ``select_layer`` and the class attribute
    ``select_feature``, and implement ``reduce``.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "pre_llm"
    select_feature: ClassVar[str] = "patch"
    layer: int
    select_layer: int

    def needs(self) -> FrozenSet[str]:
        """Tower features and a [CLS]-scored layer; the host must take K merged tokens per image."""
        return frozenset({"vision_features", "cls_token", "token_merge"})

    def capture_during(self, tower: nn.Module):
        """Context manager recording this method's inputs at every forward of ``tower`` in the block
        (``tower_capture``): hosts use it on their own tower forward instead of running it again."""
        return tower_capture(tower, self.layer, self.select_layer, self.select_feature)

    def capture(self, tower: nn.Module, pixel_values: torch.Tensor) -> VisionInputs:
        """Run ``tower`` once on ``pixel_values`` (B, 3, H, W) and collect this method's inputs."""
        return capture_vision_inputs(tower, pixel_values, self.layer, self.select_layer, self.select_feature)

    def reduce(self, inputs: VisionInputs) -> ReducedTokens:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, tower: nn.Module, pixel_values: torch.Tensor) -> ReducedTokens:
        """``reduce(capture(tower, pixel_values))``."""
        return self.reduce(self.capture(tower, pixel_values))


def resolve_layer(param: str, layer: int, num_layers: int) -> int:
    """0-based index of encoder layer ``layer`` (negative counts from the end); raises naming ``param``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
        raise ValueError(
            f"{param}: expected an encoder-layer index in [{-num_layers}, {num_layers - 1}] "
            f"(the tower has {num_layers} layers), got {layer!r}"
        )
    return layer % num_layers


class TowerCapture:
    """The inputs a pre-LLM reducer needs, recorded from the most recent forward of a tower."""

    def __init__(self, attn: nn.Module, layer: int, num_layers: int, select_feature: str) -> None:
        self.attn = attn
        self.layer = layer
        self.num_layers = num_layers
        self.select_feature = select_feature
        self.attn_box = CapturedInput()
        self.feat_box = CapturedInput()

    @property
    def ready(self) -> bool:
        return self.attn_box.hidden is not None and self.feat_box.hidden is not None

    def inputs(self) -> VisionInputs:
        feats = self.feat_box.get()
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        return VisionInputs(
            attn_hidden=self.attn_box.get(), attn=self.attn, features=feats,
            has_cls=self.select_feature == "cls_patch", layer=self.layer, num_layers=self.num_layers,
        )


@contextmanager
def tower_capture(tower: nn.Module, layer: int, select_layer: int = -2, select_feature: str = "patch") -> Iterator[TowerCapture]:
    """Record, at every forward of ``tower`` inside the block, the input of encoder layer ``layer``'s
    ``self_attn`` and the hidden states ``hidden_states[select_layer]`` (see ``capture_vision_inputs``).
    Works whoever calls the tower (the host's own forward), with any attention implementation, without
    ``output_attentions``/``output_hidden_states``. Hooks are removed on exit."""
    if select_feature not in SELECT_FEATURES:
        raise ValueError(f"select_feature: expected one of {SELECT_FEATURES}, got {select_feature!r}")
    layers = tower_layers(tower)
    n = len(layers)
    li = resolve_layer("layer", layer, n)
    if isinstance(select_layer, bool) or not isinstance(select_layer, int) or not -(n + 1) <= select_layer <= n:
        raise ValueError(
            f"select_layer: expected an index into the {n + 1} hidden states, in [{-(n + 1)}, {n}], got {select_layer!r}"
        )
    si = select_layer % (n + 1)
    cap = TowerCapture(layers[li].self_attn, li, n, select_feature)
    with ExitStack() as stack:
        cap.attn_box = stack.enter_context(capture_input(cap.attn))
        # hidden_states[s] is the input of layer s (s < L) or the output of the last layer (s = L)
        cap.feat_box = stack.enter_context(capture_input(layers[si]) if si < n else _capture_output(layers[-1]))
        yield cap


def capture_vision_inputs(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    layer: int,
    select_layer: int = -2,
    select_feature: str = "patch",
) -> VisionInputs:
    """One forward of a HF CLIP tower, collecting a pre-LLM reducer's inputs.

    tower: ``CLIPVisionModel`` / ``CLIPVisionTransformer`` (transformers 4.31 → 5.x, any attention
        implementation). pixel_values: (B, 3, H, W), moved to the tower's device and dtype as LLaVA does.
    layer: encoder layer whose ``self_attn`` input is captured (negative: from the end).
    select_layer: index into ``hidden_states`` (L + 1 entries) of the features; -2 in LLaVA/LISA.
    select_feature: "patch" drops [CLS] from the features, "cls_patch" keeps it.
    Runs under ``torch.no_grad`` with two hooks (the attention's input, and the input of layer
    ``select_layer`` or the last layer's output), removed on return, also on error. The tower is
    called without ``output_hidden_states``: transformers 5.x collects hidden states through hooks
    of its own, which a parent model (LISA's LLM, called with ``output_hidden_states=True``)
    installs a second time on an already hooked tower, duplicating every entry.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        raise ValueError(f"pixel_values: expected a (B, 3, H, W) tensor, got {_shape(pixel_values)}")
    param = next(tower.parameters())
    with torch.no_grad(), tower_capture(tower, layer, select_layer, select_feature) as cap:
        tower(pixel_values.to(device=param.device, dtype=param.dtype))
    return cap.inputs()


@contextmanager
def _capture_output(module: nn.Module) -> Iterator[CapturedInput]:
    """Record the hidden states (B, N, C) a layer returns (tensor or first tuple element); hook removed on exit."""
    box = CapturedInput()

    def hook(_m, _args, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            raise TypeError(f"module: expected (B, N, C) hidden states as output, got {type(h).__name__}")
        box.hidden = h.detach()

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


__all__ = [
    "CLS_INDEX",
    "MERGED_INDEX",
    "PAD_INDEX",
    "PreLLMMethod",
    "ReducedTokens",
    "VisionInputs",
    "TowerCapture",
    "capture_vision_inputs",
    "resolve_layer",
    "tower_capture",
    "tower_layers",
]
