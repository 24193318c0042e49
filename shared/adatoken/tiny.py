"""A tiny random LLaVA-3D-shaped calibration source (``--source tiny``): no checkout, no download.

Host: a native transformers 5.x ``LlavaForConditionalGeneration`` (host ``hf_llava``) with a tiny random CLIP
tower and a tiny random LLaMA decoder, so calibration runs through the same session path as on a real host.
Prompts follow LLaVA-3D's layout ``[SYS (35 tokens: BOS + system text + "USER: ")] [N visual tokens]
[PRM ≈ 36 tokens: "\\n" + question + " ASSISTANT:"]``: SYS is the same for every prompt, each PRM has 32–40
random question ids from the prompt's seed and ends in the same 3 ids, and each prompt's image is random
pixels from its seed. The model is random: its schedule shows the pipeline, not LLaVA-3D's information flow.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

import torch
from torch import nn

SYS_TOKENS = 35  # LLaVA-3D: BOS + the llava_v1 system prompt + "USER: " under Vicuna's tokenizer
PRM_RANGE = (32, 40)  # tokens after the scene ("\n" + question + " ASSISTANT:"), ≈ 36 as in LLaVA-3D
VOCAB = 512
IMAGE_TOKEN = VOCAB - 1
BOS = 1
ASSISTANT = (201, 202, 203)  # the fixed ids closing every prompt (" ASSISTANT:")


@dataclass
class TinySpec:
    """layers: decoder depth (LLaVA-3D: 32); visual_tokens: N per prompt (a square: the CLIP grid); hidden /
    heads: decoder width and heads; init: the decoder's initializer range (larger than HF's 0.02 so that the
    random attention is not uniform); seed: weights."""

    layers: int = 32
    visual_tokens: int = 256
    hidden: int = 64
    heads: int = 4
    init: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "visual_tokens", "hidden", "heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        grid = math.isqrt(self.visual_tokens)
        if grid * grid != self.visual_tokens:
            raise ValueError(f"visual_tokens: the tiny CLIP grid is square, expected a square number (e.g. 256), "
                             f"got {self.visual_tokens}")
        if self.hidden % self.heads:
            raise ValueError(f"heads: expected a divisor of hidden={self.hidden}, got {self.heads}")

    @property
    def grid(self) -> int:
        return math.isqrt(self.visual_tokens)

    def describe(self) -> Dict[str, Any]:
        return {"host": "hf_llava (LlavaForConditionalGeneration, tiny random)", **asdict(self),
                "sys_tokens": SYS_TOKENS, "prm_tokens": list(PRM_RANGE)}


def _check_transformers() -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise RuntimeError(f"--source tiny: the tiny host is transformers 5.x's native LlavaForConditionalGeneration "
                           f"(host hf_llava); this environment has transformers {transformers.__version__}")


def tiny_model(spec: TinySpec) -> nn.Module:
    """The tiny random host model (float32, eval mode)."""
    _check_transformers()
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    patch = 4
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=patch * spec.grid, patch_size=patch, projection_dim=32)
    tc = LlamaConfig(hidden_size=spec.hidden, intermediate_size=2 * spec.hidden, num_hidden_layers=spec.layers,
                     num_attention_heads=spec.heads, num_key_value_heads=spec.heads, vocab_size=VOCAB,
                     max_position_embeddings=4096, pad_token_id=0, bos_token_id=BOS, eos_token_id=2,
                     initializer_range=spec.init)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, image_seq_length=spec.visual_tokens)
    torch.manual_seed(spec.seed)
    return LlavaForConditionalGeneration(cfg).eval()


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def tiny_records(k: int, seed: int) -> List[Dict[str, Any]]:
    """K synthetic prompt records (``key``, ``question_ids``, ``pixel_seed``) drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        n = int(torch.randint(PRM_RANGE[0], PRM_RANGE[1] + 1, (1,), generator=g))
        q = torch.randint(3, 200, (n - len(ASSISTANT),), generator=g).tolist()
        out.append({"key": f"tiny-{seed}-{i:04d}", "question_ids": q + list(ASSISTANT),
                    "pixel_seed": int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))})
    return out


def system_ids() -> List[int]:
    g = torch.Generator().manual_seed(_seed("tiny-llava3d-system") % (2 ** 63))
    return [BOS] + torch.randint(3, 200, (SYS_TOKENS - 1,), generator=g).tolist()


def tiny_inputs(record: Dict[str, Any], spec: TinySpec) -> Dict[str, torch.Tensor]:
    """Forward kwargs (``input_ids`` (1, n), ``pixel_values`` (1, 3, H, W)) of one record."""
    ids = system_ids() + [IMAGE_TOKEN] * spec.visual_tokens + list(record["question_ids"])
    g = torch.Generator().manual_seed(int(record["pixel_seed"]))
    side = 4 * spec.grid
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, side, side, generator=g)}


__all__ = ["SYS_TOKENS", "TinySpec", "system_ids", "tiny_inputs", "tiny_model", "tiny_records"]
