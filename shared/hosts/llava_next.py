"""Glue for the patched LLaVA-NeXT fork (``patches/LLaVA-NeXT``; LLaVA-OneVision-Qwen2).

The patch series only adds annotated calls into this module:

- **P1** ``select_image_tokens`` in ``prepare_inputs_labels_for_multimodal``, right after the
  features are merged per image (single crop: 729 grid tokens + 1 ``image_newline``): when a
  ``scene_context`` is active, the selector picks grid tokens per view from the last SigLIP layer's
  received attention and the pre-projector features (both captured by hooks that ``attach``
  installs), and each view keeps its kept tokens in row-major order plus its newline.
  The fork's projector has already run on all tokens at this point; it is applied token by token
  (``mlp2x_gelu``), so pruning after projection gives exactly the rows that projecting only the
  kept tokens would (the native host, ``shared.hosts.hf_onevision``, projects only the kept ones).
- **P2** ``segment_mask`` / ``publish_visual_mask``: the visual-token mask of the spliced sequence,
  after truncation and left/right padding, for in-LLM methods and the token accounting.
- **P3** ``qwen2_forward``: ``LlavaQwenModel.forward`` routes to the engine's decoder runner while
  an in-LLM method is attached, and to the stock ``Qwen2Model.forward`` otherwise.

Usage (eval driver)::

    with llava_next.attach(model):                      # hooks; once per model
        with scene_context(SeGPruner(...), views=prep):   # per call: selector + geometry
            out = model.generate(input_ids, images=images, image_sizes=sizes, ...)
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from ..scoring import received_attention, tower_layers
from .selection import (
    SelectionContext,
    active_context,
    check_single_crop,
    check_view_tokens,
    compact_view,
    grid_side,
    scene_context,
)

#: LLaVA's placeholder id for an image in ``input_ids`` (llava.constants.IMAGE_TOKEN_INDEX).
IMAGE_TOKEN_INDEX = -200


# ------------------------------------------------------------------------------ module lookup
def last_vision_attention(model: nn.Module) -> nn.Module:
    """The last attention block of the fork's (truncated, 26-layer) SigLIP tower."""
    tower = model.get_vision_tower()
    inner = getattr(tower, "vision_tower", None)
    if inner is None:
        raise TypeError(f"model: expected a SigLIP tower wrapper with .vision_tower, got {type(tower).__name__}")
    return tower_layers(inner)[-1].self_attn


def projector(model: nn.Module) -> nn.Module:
    proj = getattr(model.get_model(), "mm_projector", None)
    if proj is None:
        raise TypeError(f"model: {type(model).__name__} has no mm_projector")
    return proj


# ------------------------------------------------------------------------------------ session
@dataclass
class HostSession:
    """State of one attached model: hook captures, the attached in-LLM runner, the last masks."""

    model: nn.Module
    attention_inputs: List[torch.Tensor] = field(default_factory=list)  # (n, P, C_vis) per tower call
    projector_inputs: List[torch.Tensor] = field(default_factory=list)  # (n, P, C_vis) per projector call
    runner: Any = None  # shared.engine.DecoderRunner while an in-LLM method is attached
    query_index: Optional[torch.Tensor] = None
    visual_mask: Optional[torch.Tensor] = None  # (B, L) bool of the last spliced sequence
    attention_mask: Optional[torch.Tensor] = None  # (B, L) bool of the last spliced sequence

    def clear_captures(self) -> None:
        self.attention_inputs.clear()
        self.projector_inputs.clear()

    @property
    def visual_tokens(self) -> Optional[List[int]]:
        """Visual tokens per sample of the last spliced sequence (after selection)."""
        return None if self.visual_mask is None else [int(v) for v in self.visual_mask.sum(1).tolist()]

    @property
    def sequence_lengths(self) -> Optional[List[int]]:
        """Valid tokens per sample of the last spliced sequence (text + visual)."""
        return None if self.attention_mask is None else [int(v) for v in self.attention_mask.sum(1).tolist()]


_SESSIONS: Dict[int, HostSession] = {}


def _session_of(model: nn.Module) -> Optional[HostSession]:
    inner = model.get_model() if hasattr(model, "get_model") else model
    return _SESSIONS.get(id(inner))


@contextmanager
def attach(model: nn.Module, llm_method: Any = None, query_index: Optional[torch.Tensor] = None) -> Iterator[HostSession]:
    """Attach the glue to a (patched) ``LlavaQwenForCausalLM`` for the block.

    Installs two forward pre-hooks that record, only while a ``scene_context`` is active, the input
    of the last SigLIP attention (for the saliency) and of ``mm_projector`` (the pre-projector
    features). llm_method: optional in-decoder method (``shared.FastV``, ``PyramidDrop``, ...) run
    by the engine through P3, with the visual mask from P2; query_index: its (B,) scoring query
    (default: each sample's last token). All hooks and registrations are removed on exit.
    """
    inner = model.get_model()
    key = id(inner)
    if key in _SESSIONS:
        raise RuntimeError("model: the LLaVA-NeXT glue is already attached to this model")
    session = HostSession(model=model, query_index=query_index)
    attn = last_vision_attention(model)
    proj = projector(model)

    def on_attention(_m, args, kwargs):
        if active_context() is not None:
            h = kwargs.get("hidden_states", args[0] if args else None)
            session.attention_inputs.append(h.detach())

    def on_projector(_m, args, kwargs):
        if active_context() is not None:
            x = args[0] if args else next(iter(kwargs.values()))
            session.projector_inputs.append(x.detach())

    handles = [
        attn.register_forward_pre_hook(on_attention, with_kwargs=True),
        proj.register_forward_pre_hook(on_projector, with_kwargs=True),
    ]
    with ExitStack() as stack:
        if llm_method is not None:
            from ..engine import DecoderRunner

            session.runner = DecoderRunner(inner, llm_method)
        _SESSIONS[key] = session
        stack.callback(_SESSIONS.pop, key, None)
        for h in handles:
            stack.callback(h.remove)
        yield session


@contextmanager
def pruning(
    model: nn.Module,
    pruner: Any = None,
    views: Any = None,
    *,
    llm_method: Any = None,
    query_index: Optional[torch.Tensor] = None,
    grid: Optional[int] = None,
    patch: int = 14,
) -> Iterator[HostSession]:
    """``attach`` plus, when ``pruner`` is given, a ``scene_context`` for one call (see both)."""
    with attach(model, llm_method=llm_method, query_index=query_index) as session:
        if pruner is None:
            yield session
        else:
            with scene_context(pruner, views, grid=grid, patch=patch):
                yield session


# --------------------------------------------------------------------------------------- P1
def _images_per_sample(input_ids: Optional[torch.Tensor], num_images: int, image_token_index: int) -> List[int]:
    """Images each sample consumes in the splice loop (a sample without placeholder consumes one)."""
    if input_ids is None:
        return [num_images]
    counts = [max(int(n), 1) for n in (input_ids == image_token_index).sum(dim=1).tolist()]
    if sum(counts) != num_images:
        raise ValueError(
            f"input_ids: the prompts hold {sum(counts)} image placeholders in all ({counts} per sample), "
            f"but {num_images} images were given; pruning needs one placeholder per image"
        )
    return counts


def _newline_after_merge(model: nn.Module, from_list: bool) -> bool:
    merge = getattr(model.config, "mm_patch_merge_type", "flat")
    return bool(from_list and merge.startswith("spatial") and "unpad" in merge)


def select_image_tokens(
    model: nn.Module,
    image_features: Union[torch.Tensor, Sequence[torch.Tensor]],
    split_sizes: Optional[Sequence[int]] = None,
    image_sizes: Any = None,
    modalities: Optional[Sequence[str]] = None,
    video_idx: Sequence[int] = (),
    input_ids: Optional[torch.Tensor] = None,
    image_token_index: int = IMAGE_TOKEN_INDEX,
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """[P1] Prune the merged image features when a ``scene_context`` is active; else return them as is.

    image_features: the list of merged per-image features (list branch: single crop = (P + 1, D)
    with ``spatial*unpad`` merge, (P, D) with ``flat``/``spatial``), or the (N, P, D) tensor of the
    4-D ``images`` branch (one image per sample, no newline). split_sizes: crops per image.
    Returns a list of (T_i + newline, D) tensors, one per image, in the input order.
    """
    ctx: Optional[SelectionContext] = active_context()
    session = _session_of(model)
    if ctx is None:
        if session is not None:
            session.clear_captures()
        return image_features
    if session is None:
        raise RuntimeError(
            "model: a scene_context is active but the LLaVA-NeXT glue is not attached; wrap the call in "
            "`with shared.hosts.llava_next.attach(model):` so the SigLIP saliency and pre-projector features are captured"
        )
    from_list = not isinstance(image_features, torch.Tensor)
    feats = list(image_features) if from_list else list(image_features.unbind(0))
    n_img = len(feats)
    crops = list(split_sizes) if split_sizes is not None else [1] * n_img
    check_single_crop(crops, list(video_idx))
    newline = _newline_after_merge(model, from_list)

    attn_in, proj_in = list(session.attention_inputs), list(session.projector_inputs)
    session.clear_captures()
    if not attn_in or not proj_in:
        raise RuntimeError("model: no SigLIP/projector input was captured for this forward (were the hooks removed?)")
    hidden = torch.cat(attn_in, dim=0)
    pre = torch.cat(proj_in, dim=0)
    if hidden.shape[0] != n_img or pre.shape[0] != n_img:
        raise RuntimeError(
            f"model: captured {hidden.shape[0]} tower / {pre.shape[0]} projector inputs for {n_img} single-crop images"
        )
    grid = grid_side(pre.shape[1])
    check_view_tokens(feats, grid, newline)
    attn = last_vision_attention(model)

    out: List[torch.Tensor] = []
    start = 0
    for b, n in enumerate(_images_per_sample(input_ids, n_img, image_token_index)):
        sl = slice(start, start + n)
        saliency = received_attention(attn, hidden[sl])
        keep = ctx.select(saliency, pre[sl], sample=b, newline=newline)
        out.extend(compact_view(f, k, newline) for f, k in zip(feats[sl], keep))
        start += n
    return out


# --------------------------------------------------------------------------------------- P2
def segment_mask(segments: Sequence[torch.Tensor]) -> torch.Tensor:
    """Visual-token mask of one sample's spliced sequence.

    segments: the splice loop's ``cur_new_input_embeds`` list, alternating text and image features
    [text_0, image_0, text_1, image_1, ..., text_n]. Returns (sum of lengths,) bool, True on images.
    """
    parts = [torch.full((int(s.shape[0]),), i % 2 == 1, dtype=torch.bool) for i, s in enumerate(segments)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def padded_visual_mask(masks: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """Place per-sample visual masks (untruncated, (n_b,) bool) on the padded batch.

    attention_mask: (B, L) of the padded spliced batch, True on each sample's kept tokens (a
    contiguous run, left- or right-aligned). Truncation keeps the first tokens of a sample, so its
    valid run holds the first ``attention_mask[b].sum()`` entries of ``masks[b]``.
    Returns (B, L) bool.
    """
    valid = attention_mask.bool()
    if len(masks) != valid.shape[0]:
        raise ValueError(
            f"masks: expected {valid.shape[0]} per-sample masks, got {len(masks)}; LLaVA-NeXT zips the batch with "
            "`modalities` when truncating, so a batch of B prompts needs modalities=['image'] * B"
        )
    out = torch.zeros_like(valid)
    for b, m in enumerate(masks):
        n = int(valid[b].sum())
        if n > m.shape[0]:
            raise ValueError(f"attention_mask: sample {b} has {n} valid tokens but its spliced sequence only {m.shape[0]}")
        out[b, valid[b]] = m[:n].to(out.device)
    return out


def publish_visual_mask(model: nn.Module, masks: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> None:
    """[P2] Record the (B, L) visual mask of the spliced batch; prepare the attached in-LLM runner."""
    session = _session_of(model)
    if session is None:
        return
    mask = padded_visual_mask(masks, attention_mask)
    session.visual_mask = mask
    session.attention_mask = attention_mask.bool().clone()
    if session.runner is not None:
        session.runner.prepare(visual_mask=mask, query_index=session.query_index)


# --------------------------------------------------------------------------------------- P3
def qwen2_forward(decoder: nn.Module, stock_forward: Callable, *args: Any, **kwargs: Any):
    """[P3] ``LlavaQwenModel.forward``: the engine's runner while an in-LLM method is attached,
    else ``stock_forward`` (``super().forward``) with the arguments unchanged."""
    session = _SESSIONS.get(id(decoder))
    if session is None or session.runner is None:
        return stock_forward(*args, **kwargs)
    return session.runner.forward(*args, **kwargs)


__all__ = [
    "HostSession",
    "IMAGE_TOKEN_INDEX",
    "attach",
    "last_vision_attention",
    "padded_visual_mask",
    "projector",
    "pruning",
    "publish_visual_mask",
    "qwen2_forward",
    "segment_mask",
    "select_image_tokens",
]
