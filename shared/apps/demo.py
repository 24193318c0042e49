"""Main job: in-decoder pruning on a LLaVA model, with exact accounting and the papers' figures.

    python -m shared.apps.demo                                   # tiny random LLaVA-1.5 built from config
    python -m shared.apps.demo --model /path/llava-1.5-7b-hf --image img.jpg --prompt "What is in the image?"

It runs the unpruned model, FastV, PyramidDrop and LVLM_CSP through the engine on the same prompt
(576 image tokens, as LLaVA-1.5 at 336 px), prints the visual tokens each decoder layer saw, the
generated tokens, the measured prefill time, the prefill FLOPs of the same schedules at LLaMA-7B
dims, and then our efficiency figures beside the papers' (``shared.paper_tables``).
Nothing is downloaded: the default model is random, and ``--model`` must be a local folder.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Optional

import torch

from ..accounting import CONVENTIONS, DIMS, Efficiency
from ..session import prune
from ..methods import FastV, PyramidDrop
from ..methods.lvlm_csp import LVLMCSP, preset
from .paper_tables import all_rows, format_rows


def tiny_llava(layers: int = 8, seed: int = 0):
    """A random ``LlavaForConditionalGeneration`` with LLaVA-1.5's geometry (336 px, 14 px patches:
    576 image tokens) and a small LLaMA decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=64)
    text = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=1000, max_position_embeddings=2048, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=999, image_seq_length=576,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(1, 990, (1, 35), generator=g), torch.full((1, 576), 999),
                     torch.randint(1, 990, (1, 40), generator=g)], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, 336, 336, generator=g)}
    return model, inputs


def real_llava(path: str, image: str, prompt: str):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, torch_dtype=torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    text = f"USER: <image>\n{prompt} ASSISTANT:"
    inputs = processor(images=Image.open(image).convert("RGB"), text=text, return_tensors="pt").to(device)
    return model, dict(inputs), processor


def _timed_prefill(model, inputs, method, repeats: int) -> List[float]:
    out = []
    with torch.no_grad():
        for _ in range(repeats):
            with prune(model, method):
                sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
                sync()
                t0 = time.perf_counter()
                model(**inputs, use_cache=False)
                sync()
                out.append(time.perf_counter() - t0)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="local folder of a transformers LLaVA checkpoint (default: tiny random model)")
    ap.add_argument("--image", help="image path, with --model")
    ap.add_argument("--prompt", default="What is shown in this image?")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="prefill timings per method (median)")
    args = ap.parse_args(argv)
    processor = None
    if args.model:
        if not args.image:
            ap.error("--image: required with --model")
        model, inputs, processor = real_llava(args.model, args.image, args.prompt)
    else:
        model, inputs = tiny_llava()
    layers = model.config.text_config.num_hidden_layers
    s = layers / 32
    # (name, method at this decoder's depth, the same method at the papers' 32-layer settings)
    k = max(1, round(2 * s))
    stages = tuple(round(x * s) for x in (8, 16, 24))
    runs = [
        ("unpruned", None, None),
        (f"FastV K={k} R=25%", FastV(layer=k, keep_ratio=0.25), FastV(layer=2, keep_ratio=0.25)),
        (f"PDrop λ=0.5 at {list(stages)}", PyramidDrop(layers=stages, ratio=0.5), PyramidDrop(ratio=0.5)),
        # LVLM_CSP, CLS clustering from the CLIP tower's last layer, pruning ranked by the last prompt token
        # (this prompt has no [SEG]); the paper's 336-px (6,128,9,32) at 32 layers
        (
            f"LVLM_CSP CLS (Lc,Nc,Ls,Np)=({max(1, round(6 * s))},128,{max(1, round(9 * s))},32)",
            LVLMCSP(max(1, round(6 * s)), 128, max(1, round(9 * s)), 32, clustering="cls", seg_query="query"),
            preset("7b-336/6-128-9-32", clustering="cls"),
        ),
    ]
    ids = inputs["input_ids"]
    n_vis = int((ids == model.config.image_token_id).sum())
    n_text = ids.shape[1] - n_vis
    print(f"model: {'random tiny LLaVA-1.5 geometry' if not args.model else args.model}; decoder layers={layers}, "
          f"prompt {ids.shape[1]} tokens = {n_vis} image + {n_text} text\n")
    base_time = None
    for name, method, at_7b in runs:
        with torch.no_grad(), prune(model, method) as session:
            gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            stats = session.last.stats
        new = gen[0, ids.shape[1]:]
        text = processor.decode(new, skip_special_tokens=True) if processor is not None else new.tolist()
        vis = stats.visual[0].tolist()
        t = statistics.median(_timed_prefill(model, inputs, method, args.repeats))
        base_time = base_time or t
        print(f"[{name}]")
        print(f"  visual tokens per layer: {vis}")
        print(f"  generated: {text}")
        print(f"  prefill: {t * 1000:.1f} ms (speed-up x{base_time / t:.2f})")
        sched = at_7b.schedule(n_vis, 32) if at_7b is not None else [n_vis] * 32
        eff = Efficiency(sched, n_text, DIMS["llama-7b"], CONVENTIONS["fastv"], visual_tokens=n_vis)
        print(f"  at LLaMA-7B dims ({at_7b or 'unpruned'}): N_avg {eff.n_avg:.1f}, "
              f"{eff.tflops:.2f} TFLOPs (4nd²+2n²d+2ndm, 32 layers)\n")
    print("Efficiency figures, ours beside the papers' (python -m shared.paper_tables):\n")
    print(format_rows(all_rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
