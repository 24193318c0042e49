"""In-decoder token engine: drop, keep and re-activate visual tokens between decoder layers.

Entry point::

    with pruning(decoder, FastV(layer=2, keep=64)) as engine:
        engine.prepare(visual_spans=[(35, 611)])
        out = decoder(inputs_embeds=x, attention_mask=m)

``decoder`` is the host's LLaMA/Qwen2 decoder (``LlamaModel``/``Qwen2Model`` or a subclass).
Inside the block its ``forward`` is the engine's; on exit the original is restored, also on error.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from .adapters import DecoderAdapter, patched_forward
from .plan import LayerView, Plan, PruningRequest
from .runner import DecoderRunner, PrefillStats
from .state import ActiveSet

__all__ = [
    "ActiveSet",
    "DecoderAdapter",
    "DecoderRunner",
    "LayerView",
    "Plan",
    "PrefillStats",
    "PruningRequest",
    "pruning",
]


@contextmanager
def pruning(decoder: nn.Module, method: Any) -> Iterator[DecoderRunner]:
    """Run ``decoder`` through the engine with ``method`` (a method config, or None for a pass-through
    that must reproduce the stock decoder). Yields the runner (``prepare``, ``last_stats``); a method
    with ``make_runner`` (Fast3D's compat mode) brings its own."""
    make_runner = getattr(method, "make_runner", None)
    if method is not None and not callable(getattr(method, "make_plan", None)) and not callable(make_runner):
        raise TypeError(
            f"method: {type(method).__name__} is not an in-decoder method (it builds no plan); pre-LLM "
            f"reducers and selectors run on the vision side (see shared.hosts.selection / shared.hosts.lisa)"
        )
    runner = make_runner(decoder) if callable(make_runner) else DecoderRunner(decoder, method)
    with patched_forward(decoder, runner.forward):
        yield runner
