"""Host adapter: native transformers 5.x ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2).

Multi-view prompts as the processor builds them for nested image lists (``processor(images=[[v1, ...,
vV]], text=[prompt])``): each view is one square crop, spliced as grid² row-major SigLIP tokens then one
``image_newline`` (27² + 1 = 730 at 384 px). A sample with a single image is anyres-patched by
transformers and has another layout: it is refused with the count of placeholders it has.

Per prefill, hooks capture the input of the attention layer that produces the features
(``vision_feature_layer``) and the projector's input, both from the model's own tower forward. A
pre-LLM selector (SeGPruner) then runs per sample on its views, with the saliency recomputed from that
layer's q/k (``shared.scoring.received_attention``) and the geometry given as the ``views=`` option;
its dropped grid tokens leave the LLM input (``input_keep``, newlines always kept). The LLM then sees
exactly the sequence a collapsed prompt would give it: the kept tokens in row-major order per view, at
renumbered positions (the projector is token-wise, so projecting every token and dropping some equals
projecting only the kept ones).

Options: ``views`` (per sample a ``shared.datasets.PreparedViews``, a ``SceneGeometry`` or None),
``patch`` (pixels per token side, 14), ``on_invalid_pose`` / ``compat_released`` (see
``geometry_from_views``), and the native options of ``hf_llava`` (``query_index``,
``guidance_token_id``/``guidance_index``, ``sample_keys``).
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from ..scoring import capture_input, received_attention, tower_layers
from .base import register_host
from .hf_llava import NativeHost
from .selection import DEFAULT_PATCH, geometry_per_sample, run_selector, selection_record


def grid_of(model: nn.Module) -> int:
    """Tokens per side of one crop: vision image_size // patch_size (27 for LLaVA-OneVision)."""
    vc = model.config.vision_config
    return int(vc.image_size) // int(vc.patch_size)


def producer_attention(model: nn.Module) -> nn.Module:
    """``self_attn`` of the tower layer whose output is ``hidden_states[vision_feature_layer]``."""
    layer = getattr(model.config, "vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise NotImplementedError(
            f"model: vision_feature_layer={layer!r} concatenates several layers; the saliency is defined for one layer"
        )
    if getattr(model.config, "vision_feature_select_strategy", "full") == "default":
        raise NotImplementedError("model: vision_feature_select_strategy='default' (CLS dropped) is not an OV layout")
    layers = tower_layers(model.model.vision_tower)
    producer = layer % (len(layers) + 1) - 1  # hidden_states[i] is the output of encoder layer i - 1
    if producer < 0:
        raise ValueError(f"model: vision_feature_layer={layer} selects the embeddings, not an encoder layer")
    return layers[producer].self_attn


@register_host
class HFOneVisionHost(NativeHost):
    name = "hf_onevision"
    always = frozenset({"decoder", "vision_features", "token_subset"})
    optional = {"guidance_token": "guidance_token_id", "geometry": "views"}
    options = {"query_index": None, "guidance_index": None, "guidance_token_id": None, "sample_keys": None,
               "views": None, "patch": DEFAULT_PATCH, "on_invalid_pose": "raise", "compat_released": False}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaOnevisionForConditionalGeneration"

    def check_options(self) -> None:
        super().check_options()
        if self.opts["on_invalid_pose"] not in ("raise", "exclude"):
            raise ValueError(f"on_invalid_pose: expected 'raise' or 'exclude', got {self.opts['on_invalid_pose']!r}")

    def capture(self, session: Any, stack: ExitStack) -> None:
        self._attn_box = self._proj_box = None
        if session.pre is not None:
            self._attn = producer_attention(self.model)
            self._attn_box = stack.enter_context(capture_input(self._attn))
            self._proj_box = stack.enter_context(capture_input(self.core().multi_modal_projector))

    def check_prompt(self, session: Any, prompt: Dict[str, Any], model_kwargs: Dict[str, Any]) -> None:
        if session.pre is not None:
            p = grid_of(self.model) ** 2
            _check_views(prompt["visual"].sum(1).tolist(), model_kwargs.get("batch_num_images"), p)

    def prefill(self, session: Any, prompt: Dict[str, Any], kwargs: Dict[str, Any]) -> None:
        pre = session.pre
        grid = grid_of(self.model)
        p = grid * grid
        ids, visual, gi = prompt["ids"], prompt["visual"], prompt["guidance"]
        rows = ids.shape[0]
        counts = visual.sum(1)
        input_keep, pre_llm = None, None
        if pre is not None:
            _check_views(counts.tolist(), None, p)
            views = [int(c) // (p + 1) for c in counts]
            feats, hidden = self._proj_box.get(), self._attn_box.get()
            k = _rows_per_sample(rows, views, feats.shape[0])
            starts, s = [], 0
            for v in views[::k]:
                starts.append(s)
                s += v
            geometry = geometry_per_sample(self.opts["views"], len(starts), grid, self.opts["patch"],
                                           on_invalid_pose=self.opts["on_invalid_pose"],
                                           compat_released=self.opts["compat_released"])
            keeps, pre_llm = [], []
            for i, (s0, v) in enumerate(zip(starts, views[::k])):
                sl = slice(s0, s0 + v)
                sal = received_attention(self._attn, hidden[sl])
                keep = run_selector(pre, sal, feats[sl], geometry[i], grid)
                keeps.append(keep)
                pre_llm.append(selection_record(keep, sal, newline=True))
            input_keep = torch.ones_like(visual)
            for b in range(rows):
                grid_pos = torch.nonzero(visual[b], as_tuple=False).flatten().view(-1, p + 1)[:, :p]
                input_keep[b, grid_pos[~keeps[b // k].to(grid_pos.device)]] = False
        session.prefill(
            visual_mask=visual, attention_mask=kwargs.get("attention_mask"), query_index=self.opts["query_index"],
            guidance_index=gi, sample_keys=self.opts["sample_keys"], input_keep=input_keep, pre_llm=pre_llm,
            source_visual=counts if input_keep is not None else None,
        )


def _check_views(counts: List[int], batch_num_images: Any, p: int) -> None:
    """Each row's placeholders must be its views × (P grid + 1 newline): single-crop views."""
    per_row = None if batch_num_images is None else [int(n) for n in torch.as_tensor(batch_num_images).reshape(-1)]
    for b, c in enumerate(counts):
        want = None if per_row is None or len(per_row) != len(counts) else per_row[b] * (p + 1)
        if c % (p + 1) != 0 or (want is not None and c != want):
            raise ValueError(
                f"input_ids: sample {b} has {c} image placeholders, not views x ({p} grid + 1 newline)"
                f"{'' if want is None else f' = {want}'}; give the views as nested image lists ([[v1, ..., vV]]) so "
                f"each is one square crop"
            )


def _rows_per_sample(rows: int, views_per_row: List[int], total: int) -> int:
    """k such that the captured ``total`` views are those of every k-th row (generate repeats each
    sample k times for beams, after or before encoding its images)."""
    for k in range(1, rows + 1):
        if rows % k == 0 and sum(views_per_row[::k]) == total:
            return k
    raise ValueError(
        f"pixel_values: {total} views were encoded for prompts holding {sum(views_per_row)} view placeholders in "
        f"{rows} rows"
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


__all__ = ["HFOneVisionHost", "grid_of", "multiview_inputs", "producer_attention"]
