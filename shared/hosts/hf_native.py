"""One-call pruning on native transformers models (5.x ``LlavaForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``, or any LLaMA/Qwen2 ``*ForCausalLM``)::

    with prune(model, FastV(layer=2, keep_ratio=0.25)) as engine:
        out = model.generate(**inputs, max_new_tokens=32)
    engine.last_stats  # tokens per layer of the prefill

For multimodal models the visual positions are the ``image_token_id`` placeholders of
``input_ids`` (already expanded by the processor), read at each prefill by a forward pre-hook that
is removed on exit. For a text-only ``*ForCausalLM`` call ``engine.prepare(...)`` before each prefill.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..engine import DecoderRunner, pruning


def find_decoder(model: nn.Module) -> nn.Module:
    """The LLaMA/Qwen2 decoder inside a native model (``model.model.language_model`` or ``model.model``)."""
    inner = getattr(model, "model", None)
    for cand in (getattr(inner, "language_model", None), getattr(model, "language_model", None), inner, model):
        if cand is not None and isinstance(getattr(cand, "layers", None), nn.ModuleList):
            return cand
    raise TypeError(f"model: no LLaMA/Qwen2 decoder found inside {type(model).__name__}")


def _image_token_id(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def _is_prefill(past: Any) -> bool:
    if past is None:
        return True
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length()) == 0
    return len(past) == 0


def _vision_last_attention(model: nn.Module) -> nn.Module:
    from ..scoring import tower_layers

    tower = getattr(getattr(model, "model", None), "vision_tower", None) or getattr(model, "vision_tower", None)
    if tower is None:
        raise TypeError(f"model: no vision tower in {type(model).__name__}")
    return tower_layers(tower)[-1].self_attn


def _guidance_positions(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """(B,) position of the last ``token_id`` in each row of ``ids``; error if a row has none."""
    hit = ids == token_id
    if not bool(hit.any(dim=1).all()):
        rows = (~hit.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"guidance_token_id: token {token_id} is absent from row(s) {rows} of input_ids")
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return torch.where(hit, pos, torch.full_like(pos, -1)).max(dim=1).values


def _csp_selection(method: Any, visual: torch.Tensor, cls_scores: Optional[torch.Tensor], grid_masks) -> Optional[list]:
    """Per-sample LVLM_CSP clustering selection for one-image-per-sample prompts (``cls``/``seg_first``)."""
    mode = getattr(method, "clustering", None)
    if mode not in ("cls", "seg_first") or getattr(method, "cluster_layers", 0) == 0:
        return None
    counts = [int(n) for n in visual.sum(dim=1)]
    out = []
    for b, n in enumerate(counts):
        if mode == "cls":
            if cls_scores is None or cls_scores.shape[0] != len(counts) or cls_scores.shape[1] != n:
                raise ValueError(
                    f"pixel_values: clustering='cls' needs one image per sample whose patches are the sample's "
                    f"{n} image tokens (got [CLS] scores of shape {None if cls_scores is None else tuple(cls_scores.shape)})"
                )
            out.append(method.cluster(n, cls_scores=cls_scores[b])[0])
        else:
            if grid_masks is None or len(grid_masks) != len(counts):
                raise ValueError(
                    f"grid_masks: clustering='seg_first' needs one shared.segfirst.GridMasks per sample "
                    f"({len(counts)}), got {None if grid_masks is None else len(grid_masks)}"
                )
            out.append(method.cluster(n, grid_masks=grid_masks[b])[0])
    return out


@contextmanager
def prune(
    model: nn.Module,
    method: Any,
    query_index: Optional[torch.Tensor] = None,
    guidance_index: Optional[torch.Tensor] = None,
    guidance_token_id: Optional[int] = None,
    grid_masks: Optional[Sequence[Any]] = None,
) -> Iterator[DecoderRunner]:
    """Apply ``method`` to ``model``'s decoder for the duration of the block (hooks always removed).

    query_index / guidance_index: (B,) positions in the expanded prompt (defaults: last valid
    token / none). guidance_token_id: instead of ``guidance_index``, use each row's last occurrence
    of this token id (e.g. LISA's [SEG]). grid_masks: per sample, the ``shared.segfirst.GridMasks``
    of its image, for LVLM_CSP's ``seg_first`` clustering; ``cls`` clustering reads the vision
    tower's last layer through a hook.
    """
    if guidance_index is not None and guidance_token_id is not None:
        raise ValueError("guidance_index/guidance_token_id: give at most one of them")
    decoder = find_decoder(model)
    token = _image_token_id(model) if decoder is not model else None
    with ExitStack() as stack:
        engine = stack.enter_context(pruning(decoder, method))
        if token is None or method is None:
            yield engine
            return
        pending: dict = {}
        cls_box = None
        if getattr(method, "clustering", None) == "cls" and getattr(method, "cluster_layers", 0) > 0:
            from ..scoring import capture_input

            cls_box = stack.enter_context(capture_input(_vision_last_attention(model)))

        def on_model(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or not _is_prefill(kwargs.get("past_key_values")):
                return None
            visual = ids == token
            if not bool(visual.any()):
                raise ValueError(
                    f"input_ids: no image placeholder (id {token}) in the prompt; expand images with the model's processor"
                )
            gi = guidance_index
            if guidance_token_id is not None:
                gi = _guidance_positions(ids, guidance_token_id)
            pending.update(visual=visual, guidance=gi)
            return None

        def on_decoder(_module, args, kwargs):
            if not pending:
                return None
            visual, gi = pending.pop("visual"), pending.pop("guidance")
            cls_scores = None
            if cls_box is not None:
                from ..scoring import cls_attention

                cls_scores = cls_attention(_vision_last_attention(model), cls_box.get())
            engine.prepare(
                visual_mask=visual,
                query_index=query_index,
                guidance_index=gi,
                visual_selection=_csp_selection(method, visual, cls_scores, grid_masks),
            )
            return None

        stack.callback(model.register_forward_pre_hook(on_model, with_kwargs=True).remove)
        stack.callback(decoder.register_forward_pre_hook(on_decoder, with_kwargs=True).remove)
        yield engine
