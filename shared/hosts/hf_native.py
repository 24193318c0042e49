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

from contextlib import contextmanager
from typing import Any, Iterator, Optional

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


@contextmanager
def prune(model: nn.Module, method: Any, query_index: Optional[torch.Tensor] = None) -> Iterator[DecoderRunner]:
    """Apply ``method`` to ``model``'s decoder for the duration of the block (hooks always removed)."""
    decoder = find_decoder(model)
    token = _image_token_id(model) if decoder is not model else None
    with pruning(decoder, method) as engine:
        handle = None
        if token is not None and method is not None:

            def capture(_module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is None or not _is_prefill(kwargs.get("past_key_values")):
                    return None
                visual = ids == token
                if not bool(visual.any()):
                    raise ValueError(
                        f"input_ids: no image placeholder (id {token}) in the prompt; expand images with the model's processor"
                    )
                engine.prepare(visual_mask=visual, query_index=query_index)
                return None

            handle = model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            yield engine
        finally:
            if handle is not None:
                handle.remove()
