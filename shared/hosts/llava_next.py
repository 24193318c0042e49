"""Host adapter: the patched LLaVA-NeXT fork (``patches/LLaVA-NeXT``; LLaVA-OneVision-Qwen2).

The patch series only adds annotated calls into this module, each a no-op unless a session
(``shared.prune(model, method, host="llava_next", views=...)``) is active on the model:

- **P1** ``select_image_tokens`` in ``prepare_inputs_labels_for_multimodal``, right after the
  features are merged per image (single crop: 729 grid tokens + 1 ``image_newline``): with a pre-LLM
  selector, each sample's views are ranked from the last SigLIP layer's received attention and the
  pre-projector features (both captured by hooks the session installs), and each view keeps its
  kept tokens in row-major order plus its newline. The fork's projector has already run on all tokens
  at this point; it is applied token by token (``mlp2x_gelu``), so pruning after projection gives
  exactly the rows that projecting only the kept tokens would.
- **P2** ``segment_mask`` / ``publish_visual_mask``: the visual-token mask of the spliced sequence,
  after truncation and left/right padding, handed to the session (in-LLM methods, accounting).
- **P3** ``qwen2_forward``: ``LlavaQwenModel.forward`` routes to the session's engine while an in-LLM
  method is active, and to the stock ``Qwen2Model.forward`` otherwise.

Usage (eval driver)::

    with shared.prune(model, SeGPruner(...), host="llava_next", views=[prep]) as session:
        out = model.generate(input_ids, images=images, image_sizes=sizes, ...)
    session.last.pre_llm[0]["keep"]     # (V, 729) kept grid tokens of sample 0

Options: ``views`` (per sample a ``PreparedViews``/``SceneGeometry``/None), ``patch`` (14),
``on_invalid_pose``, ``compat_released`` (see ``geometry_from_views``), ``query_index`` (B,),
``sample_keys``.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..scoring import received_attention, tower_layers
from . import splice
from .base import HostAdapter, register_host, session_of
from .selection import (
    DEFAULT_PATCH,
    check_single_crop,
    check_view_tokens,
    compact_view,
    geometry_per_sample,
    grid_side,
    run_selector,
    selection_record,
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


# ------------------------------------------------------------------------------------ the host
@register_host
class LlavaNextHost(HostAdapter):
    name = "llava_next"
    always = frozenset({"decoder", "vision_features", "token_subset"})
    optional = {"geometry": "views"}
    options = {"views": None, "patch": DEFAULT_PATCH, "on_invalid_pose": "raise", "compat_released": False,
               "query_index": None, "sample_keys": None}
    decoder_patched = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaQwenForCausalLM"

    def check_options(self) -> None:
        if self.opts["on_invalid_pose"] not in ("raise", "exclude"):
            raise ValueError(f"on_invalid_pose: expected 'raise' or 'exclude', got {self.opts['on_invalid_pose']!r}")
        self.attention_inputs: List[torch.Tensor] = []
        self.projector_inputs: List[torch.Tensor] = []
        self.pending_pre: Optional[List[Dict[str, Any]]] = None
        self.pending_source: Optional[List[int]] = None

    def decoder(self) -> nn.Module:
        return self.model.get_model()

    def attach_points(self) -> List[nn.Module]:
        return [self.model, self.model.get_model()]

    def install(self, session: Any, stack: ExitStack) -> None:
        if session.pre is not None:
            attn = last_vision_attention(self.model)

            def on_attention(_m, args, kwargs):
                self.attention_inputs.append(kwargs.get("hidden_states", args[0] if args else None).detach())

            def on_projector(_m, args, kwargs):
                self.projector_inputs.append((args[0] if args else next(iter(kwargs.values()))).detach())

            stack.callback(attn.register_forward_pre_hook(on_attention, with_kwargs=True).remove)
            stack.callback(projector(self.model).register_forward_pre_hook(on_projector, with_kwargs=True).remove)

        def after_decoder(_m, _args, _kwargs, _out):
            session.finish()

        stack.callback(self.decoder().register_forward_hook(after_decoder, with_kwargs=True).remove)
        stack.callback(self.clear_captures)

    def clear_captures(self) -> None:
        self.attention_inputs.clear()
        self.projector_inputs.clear()


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
    """[P1] Prune the merged image features with the session's pre-LLM selector; else return them as is.

    image_features: the list of merged per-image features (list branch: single crop = (P + 1, D)
    with ``spatial*unpad`` merge, (P, D) with ``flat``/``spatial``), or the (N, P, D) tensor of the
    4-D ``images`` branch (one image per sample, no newline). split_sizes: crops per image.
    Returns a list of (T_i + newline, D) tensors, one per image, in the input order.
    """
    session = session_of(model)
    if session is None or session.pre is None:
        return image_features
    host = session.host
    from_list = not isinstance(image_features, torch.Tensor)
    feats = list(image_features) if from_list else list(image_features.unbind(0))
    n_img = len(feats)
    crops = list(split_sizes) if split_sizes is not None else [1] * n_img
    check_single_crop(crops, list(video_idx))
    newline = _newline_after_merge(model, from_list)

    attn_in, proj_in = list(host.attention_inputs), list(host.projector_inputs)
    host.clear_captures()
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
    per_sample = _images_per_sample(input_ids, n_img, image_token_index)
    geometry = geometry_per_sample(host.opts["views"], len(per_sample), grid, host.opts["patch"],
                                   on_invalid_pose=host.opts["on_invalid_pose"],
                                   compat_released=host.opts["compat_released"])
    out: List[torch.Tensor] = []
    records, source = [], []
    start = 0
    for b, n in enumerate(per_sample):
        sl = slice(start, start + n)
        saliency = received_attention(attn, hidden[sl])
        keep = run_selector(session.pre, saliency, pre[sl], geometry[b], grid)
        records.append(selection_record(keep, saliency, newline))
        source.append(n * (grid * grid + int(newline)))
        out.extend(compact_view(f, k, newline) for f, k in zip(feats[sl], keep))
        start += n
    host.pending_pre, host.pending_source = records, source
    return out


# --------------------------------------------------------------------------------------- P2
def segment_mask(segments: Sequence[torch.Tensor]) -> torch.Tensor:
    """Visual-token mask of one sample's spliced sequence.

    segments: the splice loop's ``cur_new_input_embeds`` list, alternating text and image features
    [text_0, image_0, text_1, image_1, ..., text_n]. Returns (sum of lengths,) bool, True on images
    (``shared.hosts.splice.segment_mask``).
    """
    return splice.segment_mask(segments)


def padded_visual_mask(masks: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """Place per-sample visual masks (untruncated, (n_b,) bool) on the padded (B, L) batch
    (``shared.hosts.splice.padded_visual_mask``)."""
    return splice.padded_visual_mask(
        masks, attention_mask,
        hint="; LLaVA-NeXT zips the batch with `modalities` when truncating, so a batch of B prompts needs "
             "modalities=['image'] * B",
    )


def publish_visual_mask(model: nn.Module, masks: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> None:
    """[P2] Hand the (B, L) visual mask of the spliced batch to the session (no-op without one)."""
    session = session_of(model)
    if session is None:
        return
    host = session.host
    mask = padded_visual_mask(masks, attention_mask)
    pre, source = host.pending_pre, host.pending_source
    host.pending_pre = host.pending_source = None
    session.prefill(
        visual_mask=mask, attention_mask=attention_mask.bool().clone(), query_index=host.opts["query_index"],
        sample_keys=host.opts["sample_keys"], pre_llm=pre,
        source_visual=None if source is None else torch.tensor(source, dtype=torch.long),
    )


# --------------------------------------------------------------------------------------- P3
def qwen2_forward(decoder: nn.Module, stock_forward: Callable, *args: Any, **kwargs: Any):
    """[P3] ``LlavaQwenModel.forward``: the session's engine while an in-LLM method is active, else
    ``stock_forward`` (``super().forward``) with the arguments unchanged."""
    session = session_of(decoder)
    if session is None:
        return stock_forward(*args, **kwargs)
    return session.decoder_forward(stock_forward, *args, **kwargs)


__all__ = [
    "IMAGE_TOKEN_INDEX",
    "LlavaNextHost",
    "last_vision_attention",
    "padded_visual_mask",
    "projector",
    "publish_visual_mask",
    "qwen2_forward",
    "segment_mask",
    "select_image_tokens",
]
