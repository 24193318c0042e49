"""What a method needs from a host, and how a missing need is refused.

A method declares the inputs it needs (``method.needs()``); a host adapter declares what it provides
(``host.provides()``, some only when the user passes an option, e.g. ``views=`` for geometry). A
session checks one against the other before anything is installed and refuses with the method, the
need and the host named.
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, Iterable, Mapping

#: The vocabulary of needs: name → what the host must provide.
NEEDS: Dict[str, str] = {
    "decoder": "the LLaMA/Qwen2 decoder the engine drives, with the visual tokens' positions per sample",
    "guidance_token": "a guidance token in the prompt (LISA's [SEG]) whose attention ranks the visual tokens",
    "cls_attention": "the vision tower's last-layer [CLS] attention over each image's patches",
    "cls_token": "a [CLS] token in the vision tower (CLIP has one, SigLIP none)",
    "vision_features": "the vision tower's features before the projector and one tower layer's attention input",
    "token_subset": "a way to send only some of an image's tokens to the LLM",
    "token_merge": "a way to send new (merged) tokens, any number per image, to the LLM in place of the tower's",
    "geometry": "per-token 3D positions (posed RGB-D views)",
    "instance_masks": "instance masks of each original image (Seg-First)",
    "object_groups": "the visual tokens grouped by scene object",
}


def check_known(needs: Iterable[str], who: str) -> FrozenSet[str]:
    out = frozenset(needs)
    unknown = sorted(out - set(NEEDS))
    if unknown:
        raise ValueError(f"needs: {who} names unknown needs {unknown}; known: {', '.join(sorted(NEEDS))}")
    return out


def method_needs(method: Any) -> FrozenSet[str]:
    """The needs of a method config (``method.needs()``; in-LLM methods need at least the decoder)."""
    fn = getattr(method, "needs", None)
    needs = fn() if callable(fn) else frozenset({"decoder"})
    return check_known(needs, type(method).__name__)


class MissingNeed(ValueError):
    """A method needs something its host cannot provide."""


def refuse(method: Any, host: Any, missing: Iterable[str], optional: Mapping[str, str] = ()) -> MissingNeed:
    """The error for ``method`` on ``host`` lacking ``missing`` (``optional``: need → host option providing it)."""
    name = getattr(method, "name", "") or type(method).__name__
    parts = []
    for need in sorted(missing):
        hint = f" (pass {optional[need]} to provide it)" if need in dict(optional) else ""
        parts.append(f"'{need}' ({NEEDS[need]}){hint}")
    return MissingNeed(
        f"method: {name} needs {', '.join(parts)}, which host '{host.name}' does not provide"
    )


__all__ = ["MissingNeed", "NEEDS", "check_known", "method_needs", "refuse"]
