"""What differs between decoder generations, found by feature detection (not version strings).

Supported decoders: ``LlamaModel`` and ``Qwen2Model`` (and host subclasses such as LLaVA's
``LlavaLlamaModel``/``LlavaQwenModel`` or LISA's ``LisaModel``) from transformers 4.31 to 5.x:

| generation | layer past-kv kwarg | RoPE                                   | cache            |
|------------|---------------------|----------------------------------------|------------------|
| 4.31       | ``past_key_value``  | per layer, ``forward(x, seq_len)``      | legacy tuples    |
| 4.37/4.40  | ``past_key_value``  | per layer, ``forward(x, seq_len)``      | ``DynamicCache`` |
| 4.38-4.39  | ``past_key_value``  | per layer, ``forward(x, position_ids)`` | ``DynamicCache`` |
| 5.x        | ``past_key_values`` | model level, ``position_embeddings``    | ``DynamicCache`` |

Rotary modules of the ``seq_len`` kind slice their cos/sin table to the layer's KV length and then
index it with ``position_ids``; with original (gapped) positions on a pruned layer that index runs
past the slice. ``RopeShim`` raises the requested length to ``max(position) + 1`` while the engine
runs, which returns the same table rows the unpruned model uses.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

_SUPPORTED_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer")


def _params(fn: Callable) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


@contextmanager
def patched_forward(module: nn.Module, fn: Callable) -> Iterator[None]:
    """Set ``module.forward = fn`` for the duration of the block, restoring whatever instance-level
    forward was there before (e.g. an accelerate hook)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _sdpa_is_causal_without_mask(attn: nn.Module) -> bool:
    """Does this attention's SDPA path turn ``attention_mask=None`` into ``is_causal=True``?

    True for transformers 4.37/4.40 (``is_causal=... attention_mask is None and q_len > 1``) and 5.x
    (``sdpa_attention_forward``); False for 4.38-4.39 Llama, whose SDPA path always needs the mask.
    """
    try:
        src = inspect.getsource(type(attn).forward)
        if "attention_interface" in src or "ALL_ATTENTION_FUNCTIONS" in src:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            src = inspect.getsource(sdpa_attention_forward)
        else:
            mod = inspect.getmodule(type(attn))
            sdpa = [c for n, c in vars(mod).items() if n.endswith("SdpaAttention") and isinstance(c, type)]
            src = "".join(inspect.getsource(c.forward) for c in sdpa)
    except (ImportError, OSError, TypeError):
        return False
    return "is_causal" in src and ("attention_mask is None" in src or "causal_mask is None" in src)


def _sliding_window(cfg: Any) -> Optional[int]:
    """The attention window the stock decoder applies, or None.

    transformers 5.x marks windowed layers in ``config.layer_types`` ("sliding_attention"); the 4.3x/4.4x
    Qwen2 decoders pass ``config.sliding_window`` to their eager/SDPA mask builder whatever
    ``use_sliding_window`` says (LLaMA configs have no window)."""
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool):
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return window if "sliding_attention" in types else None
    return window


class RopeShim:
    """Raises the ``seq_len`` handed to legacy rotary modules to cover the largest original position."""

    def __init__(self) -> None:
        self.min_len: Optional[int] = None

    def wrap(self, original: Callable) -> Callable:
        def forward(x: torch.Tensor, seq_len: Optional[int] = None, **kw: Any):
            if self.min_len is not None and (seq_len is None or seq_len < self.min_len):
                seq_len = self.min_len
            return original(x, seq_len=seq_len, **kw)

        return forward


class DecoderAdapter:
    """Uniform access to one decoder (``model.layers``, ``model.norm``, rotary, cache, masks)."""

    def __init__(self, decoder: nn.Module) -> None:
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not hasattr(decoder, "norm"):
            raise TypeError(
                f"model: expected a LLaMA/Qwen2-style decoder with `.layers` and `.norm` "
                f"(LlamaModel, Qwen2Model or a host subclass), got {type(decoder).__name__}"
            )
        layer_cls = type(layers[0]).__name__
        if layer_cls not in _SUPPORTED_LAYERS:
            raise TypeError(
                f"model: unsupported decoder layer class {layer_cls}; supported: {', '.join(_SUPPORTED_LAYERS)}"
            )
        self.decoder = decoder
        self.layers = layers
        self.config = decoder.config
        self.num_layers = len(layers)
        sig = _params(layers[0].forward)
        self.past_kw = "past_key_values" if "past_key_values" in sig else "past_key_value"
        self.pass_position_embeddings = "position_embeddings" in sig
        self.pass_cache_position = "cache_position" in sig
        self.pass_output_attentions = "output_attentions" in sig
        self.model_rotary = getattr(decoder, "rotary_emb", None) if self.pass_position_embeddings else None
        attn0 = layers[0].self_attn
        layer_rotary = getattr(attn0, "rotary_emb", None)
        self.layer_rotary = layer_rotary
        rp = _params(layer_rotary.forward) if layer_rotary is not None else set()
        self.legacy_rope = layer_rotary is not None and "seq_len" in rp and "position_ids" not in rp
        if self.model_rotary is None and layer_rotary is None:
            raise TypeError(f"model: cannot find the rotary embedding of {type(decoder).__name__}")
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa") and not impl.startswith("flash_attention"):
            raise ValueError(
                f"attn_implementation: '{impl}' is not supported by the pruning engine; use 'eager', 'sdpa' "
                f"or 'flash_attention_2'"
            )
        self.attn_impl = impl
        self.sdpa_causal_without_mask = impl == "sdpa" and _sdpa_is_causal_without_mask(attn0)
        cfg = self.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(attn0, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scaling = getattr(attn0, "scaling", None) or self.head_dim ** -0.5
        try:
            from transformers.cache_utils import Cache, DynamicCache  # noqa: F401

            self.cache_cls: Optional[type] = DynamicCache
            self.cache_base: Optional[type] = Cache
        except ImportError:  # transformers 4.31: legacy tuples only
            self.cache_cls = None
            self.cache_base = None
        self.cache_takes_config = self.cache_cls is not None and "config" in _params(self.cache_cls.__init__)
        self.sliding_window = _sliding_window(cfg)

    # ---------------------------------------------------------------- rotary
    @contextmanager
    def rope_shim(self) -> Iterator[Optional[RopeShim]]:
        """Install the legacy-RoPE shim on every layer's rotary module (no-op on newer decoders)."""
        if not self.legacy_rope:
            yield None
            return
        shim = RopeShim()
        modules: List[nn.Module] = []
        for layer in self.layers:
            m = layer.self_attn.rotary_emb
            if all(m is not x for x in modules):
                modules.append(m)
        stack: List[Any] = []
        try:
            for m in modules:
                cm = patched_forward(m, shim.wrap(m.forward))
                cm.__enter__()
                stack.append(cm)
            yield shim
        finally:
            for cm in reversed(stack):
                cm.__exit__(None, None, None)

    def cos_sin(self, layer_idx: int, x: torch.Tensor, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for ``positions`` (B, n): each (B, n, head_dim), in ``x.dtype``."""
        if self.model_rotary is not None:
            return self.model_rotary(x, positions)
        rot = self.layers[layer_idx].self_attn.rotary_emb
        if not self.legacy_rope:
            return rot(x, positions)
        need = int(positions.max()) + 1
        cos, sin = rot(x, seq_len=need)
        cos = cos.reshape(-1, cos.shape[-1])[:need]
        sin = sin.reshape(-1, sin.shape[-1])[:need]
        return cos[positions], sin[positions]

    def position_embeddings(self, x: torch.Tensor, positions: torch.Tensor):
        """Model-level (cos, sin) for decoders whose layers take ``position_embeddings``."""
        if self.model_rotary is None:
            return None
        return self.model_rotary(x, positions)

    # ----------------------------------------------------------------- cache
    def is_cache(self, past: Any) -> bool:
        return self.cache_base is not None and isinstance(past, self.cache_base)

    def new_cache(self) -> Any:
        if self.cache_cls is None:
            return [None] * self.num_layers
        if self.cache_takes_config:
            return self.cache_cls(config=self.config)
        return self.cache_cls()

    def from_incoming(self, past: Any) -> Any:
        """Turn what the caller passed as ``past_key_values`` into the engine's working cache."""
        if past is None:
            return None
        if self.is_cache(past):
            if not isinstance(past, self.cache_cls):
                raise ValueError(
                    f"past_key_values: {type(past).__name__} is not supported while pruning; layers keep KV caches "
                    f"of different lengths, which needs a DynamicCache"
                )
            return past
        if self.cache_cls is None:
            return list(past)
        return self.cache_cls.from_legacy_cache(tuple(past))

    def cache_length(self, cache: Any, layer_idx: int) -> int:
        if cache is None:
            return 0
        if isinstance(cache, list):
            entry = cache[layer_idx]
            return 0 if entry is None else int(entry[0].shape[-2])
        if hasattr(cache, "layers"):  # transformers 5.x
            if layer_idx >= len(cache.layers):
                return 0
            return int(cache.get_seq_length(layer_idx))
        return int(cache.get_seq_length(layer_idx))

    def outgoing(self, cache: Any, incoming_was_cache: bool) -> Any:
        """What the decoder returns as ``past_key_values``, following the stock convention."""
        if cache is None:
            return None
        if isinstance(cache, list):
            return tuple(cache)
        if incoming_was_cache or not hasattr(cache, "to_legacy_cache") or hasattr(cache, "layers"):
            return cache
        return cache.to_legacy_cache()

    # ----------------------------------------------------------------- layers
    def attention_mask(self, key_valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        from .masks import additive_mask, padding_mask_2d

        if self.attn_impl.startswith("flash_attention"):
            return padding_mask_2d(key_valid)
        if self.sdpa_causal_without_mask and bool(key_valid.all()) and (q_len == key_valid.shape[1] or q_len == 1):
            return None  # SDPA's is_causal path: same result, and the fast (flash/fused) kernels
        return additive_mask(key_valid, q_len, dtype)

    def call_layer(
        self,
        idx: int,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor],
        position_ids: torch.Tensor,
        cache: Any,
        use_cache: bool,
        position_embeddings: Any,
        output_attentions: bool = False,
    ) -> torch.Tensor:
        """Run decoder layer ``idx``; returns its output hidden states. ``output_attentions``: ask layers
        of the 4.x generations to compute their attention weights (read them with a hook on
        ``self_attn``; 5.x eager attention always returns them)."""
        layer = self.layers[idx]
        kwargs: dict = {"attention_mask": mask, "position_ids": position_ids, "use_cache": use_cache}
        if isinstance(cache, list):
            kwargs[self.past_kw] = cache[idx]
        else:
            kwargs[self.past_kw] = cache
        if self.pass_position_embeddings:
            kwargs["position_embeddings"] = position_embeddings
        if self.pass_cache_position:
            start = self.cache_length(cache, idx) if cache is not None else 0
            kwargs["cache_position"] = torch.arange(start, start + hidden.shape[1], device=hidden.device)
        if self.pass_output_attentions:
            kwargs["output_attentions"] = bool(output_attentions)
        out = layer(hidden, **kwargs)
        if isinstance(out, tuple):
            if use_cache and isinstance(cache, list):
                cache[idx] = out[-1]
            return out[0]
        return out
