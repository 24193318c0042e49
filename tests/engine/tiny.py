"""Tiny random decoders of the real classes, for whatever transformers version is installed."""
from __future__ import annotations

import importlib
from typing import List, Tuple

import torch

KINDS = ("llama", "qwen2")


def _classes(kind: str):
    if kind == "llama":
        mod = importlib.import_module("transformers.models.llama.modeling_llama")
        cfg = importlib.import_module("transformers.models.llama.configuration_llama").LlamaConfig
        return cfg, mod.LlamaForCausalLM
    mod = importlib.import_module("transformers.models.qwen2.modeling_qwen2")
    cfg = importlib.import_module("transformers.models.qwen2.configuration_qwen2").Qwen2Config
    return cfg, mod.Qwen2ForCausalLM


def available() -> List[Tuple[str, str]]:
    """(kind, attn_implementation) pairs this transformers version supports."""
    import transformers

    out = []
    for kind in KINDS:
        try:
            _classes(kind)
        except (ImportError, AttributeError):
            continue
        impls = ["eager"]
        major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
        if major_minor >= (4, 36):
            impls.append("sdpa")
        out += [(kind, i) for i in impls]
    return out


def build(kind: str, impl: str = "eager", layers: int = 4, seed: int = 0, vocab: int = 128, max_positions: int = 512,
          kv_heads: int = 2, **overrides):
    """A float32 causal LM with 4 query heads / ``kv_heads`` KV heads (GQA by default), eval mode.
    ``overrides``: further config fields (e.g. a sliding window)."""
    cfg_cls, model_cls = _classes(kind)
    cfg = cfg_cls(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        tie_word_embeddings=False,
        **overrides,
    )
    if impl != "eager" or hasattr(cfg, "_attn_implementation"):
        cfg._attn_implementation = impl
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    # Random init of tiny models gives near-uniform attention; sharpen it so rankings are decisive.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model
