"""Pre-LLM selection (SeGPruner) on a native transformers ``LlavaOnevisionForConditionalGeneration``.

Done outside the model's forward, so it does not depend on HF internals beyond public modules:

1. run the vision tower once on all views; a forward pre-hook on the attention of the layer that
   produces the features (``vision_feature_layer``; the last layer of the 26-layer OV tower)
   records its input, from which the received-attention saliency is recomputed
   (``shared.scoring.received_attention``; no attention maps, any attention backend);
2. select per sample with the active ``scene_context`` (views of one sample together);
3. project **only the kept tokens** with ``multi_modal_projector`` and append ``image_newline``
   per view (T_v + 1 tokens, as LLaVA-OneVision's single-crop layout with the grid pruned);
4. collapse each view's grid² + 1 placeholders in ``input_ids`` to T_v + 1 (attention mask rebuilt,
   padding side kept), embed, ``masked_scatter`` the features, and call
   ``model.generate(inputs_embeds=..., attention_mask=...)`` without ``pixel_values``.

Inputs are the processor's output for **single-crop multi-image** prompts: pass images as nested
lists, one list per sample (``processor(images=[[v1, ..., v12]], text=[prompt])``): transformers
>= 4.53 then pads each view to a square (mean colour), resizes it to the tower's size and sets
``batch_num_images``; a sample with one image is anyres-patched and refused here. A (N, 3, H, W)
``pixel_values`` built by hand with ``batch_num_images`` is accepted too.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..scoring import capture_input, received_attention, tower_layers
from .selection import SelectionContext, SelectionRecord, active_context, check_single_crop, scene_context


def _core(model: nn.Module) -> nn.Module:
    core = getattr(model, "model", None)
    if core is None or not hasattr(core, "vision_tower") or not hasattr(core, "multi_modal_projector"):
        raise TypeError(
            f"model: expected a transformers LlavaOnevisionForConditionalGeneration (model.model.vision_tower, "
            f"multi_modal_projector), got {type(model).__name__}"
        )
    return core


def grid_of(model: nn.Module) -> int:
    """Tokens per side of one crop: vision image_size // patch_size (27 for LLaVA-OneVision)."""
    vc = model.config.vision_config
    return int(vc.image_size) // int(vc.patch_size)


@dataclass
class ViewEncoding:
    """features: (N, P, C) pre-projector features (``vision_feature_layer`` output); saliency: (N, P) float32."""

    features: torch.Tensor
    saliency: torch.Tensor


def encode_views(model: nn.Module, pixel_values: torch.Tensor) -> ViewEncoding:
    """One vision-tower forward over N single-crop views (N, 3, H, W) -> features and saliency."""
    core = _core(model)
    cfg = model.config
    layer = getattr(cfg, "vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise NotImplementedError(
            f"model: vision_feature_layer={layer!r} concatenates several layers; the saliency is defined for one layer"
        )
    tower = core.vision_tower
    layers = tower_layers(tower)
    n_hidden = len(layers) + 1
    producer = layer % n_hidden - 1  # hidden_states[i] is the output of encoder layer i - 1
    if producer < 0:
        raise ValueError(f"model: vision_feature_layer={layer} selects the embeddings, not an encoder layer")
    attn = layers[producer].self_attn
    param = next(tower.parameters())
    with capture_input(attn) as box:
        out = tower(pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
    feats = out.hidden_states[layer]
    if getattr(cfg, "vision_feature_select_strategy", "full") == "default":
        raise NotImplementedError("model: vision_feature_select_strategy='default' (CLS dropped) is not an OV layout")
    saliency = received_attention(attn, box.get())
    return ViewEncoding(features=feats, saliency=saliency)


def _flat_pixels(inputs: Mapping[str, Any], model: nn.Module) -> Tuple[torch.Tensor, List[int]]:
    """(N, 3, H, W) single crops and the images per sample, from the processor's output."""
    pv = inputs.get("pixel_values")
    ids = inputs["input_ids"]
    if pv is None:
        raise ValueError("pixel_values: required (the views of each sample)")
    bni = inputs.get("batch_num_images")
    if bni is None:
        if ids.shape[0] != 1:
            raise ValueError("batch_num_images: required for a batch of several samples")
        per_sample = [int(pv.shape[0])]
    else:
        per_sample = [int(n) for n in torch.as_tensor(bni).reshape(-1).tolist()]
    if sum(per_sample) != pv.shape[0]:
        raise ValueError(f"pixel_values: {pv.shape[0]} images, but batch_num_images sums to {sum(per_sample)}")
    if pv.dim() == 4:
        return pv, per_sample
    if pv.dim() != 5:
        raise ValueError(f"pixel_values: expected (N, 3, H, W) or (N, crops, 3, H, W), got {tuple(pv.shape)}")
    # the processor pads the crop axis; HF patches a sample's image only when the sample has one image
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    sizes = inputs.get("image_sizes")
    crops = []
    for b, n in enumerate(per_sample):
        for _ in range(n):
            if n > 1:
                crops.append(1)
            else:
                i = len(crops)
                crops.append(
                    image_size_to_num_patches(sizes[i], model.config.image_grid_pinpoints, model.config.vision_config.image_size)
                    if sizes is not None else pv.shape[1]
                )
    check_single_crop(crops)
    return pv[:, 0], per_sample


@dataclass
class PrunedInputs:
    """What ``generate`` receives, plus the bookkeeping of the selection.

    inputs_embeds (B, L', D), attention_mask (B, L'), input_ids (B, L') with the collapsed
    placeholders; keep: per sample (V_b, P) bool; records: the selection records (one per sample);
    visual_tokens / text_tokens: per sample, tokens the LLM sees.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    keep: List[torch.Tensor]
    records: List[SelectionRecord]
    visual_tokens: List[int]
    text_tokens: List[int]
    original_length: int


def _padding_left(mask: torch.Tensor) -> bool:
    """True if some row is left-padded (its first column is padding while a later one is not)."""
    return bool(((mask[:, 0] == 0) & (mask.sum(1) > 0)).any())


def prune_inputs(model: nn.Module, inputs: Mapping[str, Any], ctx: Optional[SelectionContext] = None) -> PrunedInputs:
    """Steps 1-4 of the module docstring with the active ``scene_context`` (or ``ctx``)."""
    ctx = ctx if ctx is not None else active_context()
    if ctx is None:
        raise RuntimeError("pruner: no selector; call inside `with scene_context(pruner, views):` or pass pruner=")
    core = _core(model)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask: expected shape {tuple(ids.shape)} like input_ids, got {tuple(mask.shape)}")
    image_token = int(model.config.image_token_id)
    pixels, per_sample = _flat_pixels(inputs, model)
    grid = grid_of(model)
    p = grid * grid
    if ctx.grid is not None and ctx.grid != grid:
        raise ValueError(f"grid: the scene_context was made for a {ctx.grid}x{ctx.grid} grid, the model has {grid}x{grid}")
    counts = (ids == image_token).sum(dim=1).tolist()
    for b, (c, n) in enumerate(zip(counts, per_sample)):
        if c != n * (p + 1):
            raise ValueError(
                f"input_ids: sample {b} has {c} image placeholders, expected {n} views x ({p} grid + 1 newline) = "
                f"{n * (p + 1)}; build the prompt with the model's processor and nested image lists"
            )

    with torch.no_grad():
        enc = encode_views(model, pixels)
        newline = core.image_newline
        proj = core.multi_modal_projector
        embed = model.get_input_embeddings()
        rows: List[torch.Tensor] = []
        keeps: List[torch.Tensor] = []
        start = 0
        for b, n in enumerate(per_sample):
            sl = slice(start, start + n)
            keep = ctx.select(enc.saliency[sl], enc.features[sl], sample=b, newline=True)
            keeps.append(keep)
            feats = enc.features[sl]
            kept = proj(feats[keep][None])[0]  # only the kept tokens, view-major, row-major inside a view
            nl = newline.to(kept.device, kept.dtype)[None]
            for v, chunk in enumerate(kept.split(keep.sum(dim=1).tolist())):
                rows.append(torch.cat([chunk, nl]))
            start += n
        records = ctx.records[-len(per_sample):]

        # collapse the placeholder runs and re-pad
        left = _padding_left(mask)
        pad_id = getattr(model.config.text_config, "pad_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
        seqs, vis, txt = [], [], []
        for b in range(ids.shape[0]):
            row = ids[b][mask[b].bool()]
            keep_pos = torch.ones_like(row, dtype=torch.bool)
            img_pos = (row == image_token).nonzero().flatten()
            per_view = keeps[b].sum(dim=1).tolist()
            for v, t in enumerate(per_view):
                run = img_pos[v * (p + 1):(v + 1) * (p + 1)]
                keep_pos[run[t + 1:]] = False  # keep T_v + 1 placeholders of this view
            new = row[keep_pos]
            seqs.append(new)
            vis.append(int((new == image_token).sum()))
            txt.append(int(new.shape[0]) - vis[-1])
        length = max(s.shape[0] for s in seqs)
        new_ids = torch.full((len(seqs), length), pad_id, dtype=ids.dtype, device=ids.device)
        new_mask = torch.zeros((len(seqs), length), dtype=mask.dtype, device=ids.device)
        for b, s in enumerate(seqs):
            if left:
                new_ids[b, length - s.shape[0]:] = s
                new_mask[b, length - s.shape[0]:] = 1
            else:
                new_ids[b, : s.shape[0]] = s
                new_mask[b, : s.shape[0]] = 1
        embeds = embed(new_ids)
        feats_all = torch.cat(rows).to(embeds.device, embeds.dtype)
        slots = (new_ids == image_token) & new_mask.bool()
        if int(slots.sum()) != feats_all.shape[0]:
            raise RuntimeError(f"internal: {int(slots.sum())} placeholders for {feats_all.shape[0]} visual tokens")
        embeds = embeds.masked_scatter(slots[..., None].to(embeds.device), feats_all)
    return PrunedInputs(
        inputs_embeds=embeds, attention_mask=new_mask, input_ids=new_ids, keep=[k.cpu() for k in keeps],
        records=list(records), visual_tokens=vis, text_tokens=txt, original_length=int(ids.shape[1]),
    )


def multiview_inputs(
    model: nn.Module, tokenizer: Any, image_processor: Any, prompt: str, images: Sequence[Any]
) -> Dict[str, torch.Tensor]:
    """Model inputs of one sample with V single-crop views, as the processor builds them for nested
    image lists: each ``<image>`` of ``prompt`` (V of them) becomes grid² + 1 placeholders.

    images: V PIL images or (H, W, 3) uint8 arrays (square canvases; the image processor pads to a
    square with the mean colour and resizes to the tower's size). Tensors on the model's device;
    pixel values in the model's dtype.
    """
    grid = grid_of(model)
    image_id = int(model.config.image_token_id)
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if ids.count(image_id) != len(images):
        raise ValueError(
            f"prompt: expected one <image> per view ({len(images)}) tokenised as the model's image token {image_id}, "
            f"found {ids.count(image_id)}"
        )
    expanded: List[int] = []
    for t in ids:
        expanded.extend([t] * (grid * grid + 1) if t == image_id else [t])
    pix = image_processor(images=[list(images)], return_tensors="pt")
    param = next(model.parameters())
    input_ids = torch.tensor([expanded], device=param.device)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=pix["pixel_values"].to(param.device, param.dtype),
                image_sizes=pix["image_sizes"].to(param.device), batch_num_images=pix["batch_num_images"])


@dataclass
class PrunedGeneration:
    """sequences: (B, new) generated token ids (prompt not included); inputs: the pruned inputs."""

    sequences: torch.Tensor
    inputs: PrunedInputs


def segprune_generate(
    model: nn.Module,
    inputs: Mapping[str, Any],
    pruner: Any = None,
    views: Any = None,
    *,
    patch: int = 14,
    on_invalid_pose: str = "raise",
    **generate_kwargs: Any,
) -> PrunedGeneration:
    """Select, project the kept tokens, and ``generate`` (see the module docstring).

    inputs: the processor output (``input_ids``, ``attention_mask``, ``pixel_values``,
    ``image_sizes``, ``batch_num_images``). pruner/views: a selector and the views' geometry (one
    entry per sample) for a ``scene_context`` opened here; without them the active one is used.
    on_invalid_pose: "raise" or "exclude" (views with a non-finite pose get no geometry).
    generate_kwargs: passed to ``model.generate`` (e.g. ``max_new_tokens``, ``do_sample=False``).
    """
    with ExitStack() as stack:
        if pruner is not None:
            stack.enter_context(
                scene_context(pruner, views, grid=grid_of(model), patch=patch, on_invalid_pose=on_invalid_pose)
            )
        elif views is not None:
            raise ValueError("views: given without a pruner; pass pruner= too or open a scene_context")
        pruned = prune_inputs(model, inputs)
    extra: Dict[str, Any] = dict(generate_kwargs)
    for key in ("pixel_values", "image_sizes", "batch_num_images", "input_ids", "attention_mask", "inputs_embeds"):
        if key in extra:
            raise ValueError(f"{key}: set from the pruned inputs; do not pass it to segprune_generate")
    with torch.no_grad():
        out = model.generate(inputs_embeds=pruned.inputs_embeds, attention_mask=pruned.attention_mask, **extra)
    seq = out.sequences if hasattr(out, "sequences") else out
    return PrunedGeneration(sequences=seq, inputs=pruned)


__all__ = [
    "PrunedGeneration",
    "PrunedInputs",
    "ViewEncoding",
    "encode_views",
    "grid_of",
    "multiview_inputs",
    "prune_inputs",
    "segprune_generate",
]
