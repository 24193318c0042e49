"""LVLM_CSP prefill: measured vs analytic speed-up at 256 and 576 image tokens, and clustering overhead.

    python benchmarks/csp_prefill.py                          # CPU, scaled LLaMA (d=1024, 32 layers)
    python benchmarks/csp_prefill.py --dims 7b --device cuda --dtype bfloat16
    # with the real YOLO11n-seg call timed too (needs ultralytics + torchvision; see scripts/setup_test_envs.sh):
    YOLO_OFFLINE=1 PYTHONPATH=.venvs/tf-5.23.0 .venvs/yolo/bin/python benchmarks/csp_prefill.py --yolo

The sequence is LISA's: 35 system tokens, N image tokens, 27 user/answer tokens with [SEG] third
from the end (T = 62 text tokens, the length the paper's 224-px rows imply). Three Table 6
configurations per N run through the engine beside the stock decoder, interleaved (order
reversed every other round); each time is its best round. "FLOPs x" is the exact-matmul speed-up
of the measured per-layer token counts. Clustering overhead is the time of the Seg-First selection
(mask source → CLIP grid → quotas → sampling) as a share of the pruned prefill, with a synthetic
mask source (8 rectangles) and, with --yolo, an untrained YOLO11n-seg from its model YAML (the
same network and cost as the trained weights: 10.4 GFLOPs at 640 px) on a 480×640 image.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from shared import pruning
from shared.accounting import CONVENTIONS, DecoderDims, prefill_flops
from shared.methods.lvlm_csp import LVLMCSP, preset

DIMS = {  # 32 layers: Table 6's schedules are for LLaMA-7B depth
    "scaled": dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=16),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32),
}
CONFIGS = {256: ["7b-224/6-96-8-8", "7b-224/8-64-6-16", "7b-224/12-32-2-2"],
           576: ["7b-336/6-128-9-32", "7b-336/7-64-7-16", "7b-336/11-32-3-2"]}
SYS, AFTER = 35, 27


def synthetic_masks(height: int = 480, width: int = 640, count: int = 8, seed: int = 0) -> Callable:
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        h, w = rng.integers(40, 200), rng.integers(40, 260)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        boxes.append((y, x, h, w))

    def source(image: np.ndarray) -> np.ndarray:
        out = np.zeros((len(boxes),) + image.shape[:2], dtype=bool)
        for i, (y, x, h, w) in enumerate(boxes):
            out[i, y : y + h, x : x + w] = True
        return out

    return source


def time_best(fn: Callable[[], object], rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", choices=sorted(DIMS), default="scaled")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--yolo", action="store_true", help="also time an untrained YOLO11n-seg on the CPU")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaModel

    dtype = getattr(torch, args.dtype)
    lcfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=32, **DIMS[args.dims])
    lcfg._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaModel(lcfg).to(dtype).eval()
    cfg = model.config
    layers = cfg.num_hidden_layers
    dims = DecoderDims.from_config(cfg)
    conv = CONVENTIONS["exact"]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"decoder d={cfg.hidden_size} m={cfg.intermediate_size} L={layers}, {args.device} {args.dtype} {args.attn}, "
          f"text {SYS}+{AFTER} tokens, best of {args.rounds} interleaved rounds, threads={torch.get_num_threads()}")
    head = f"{'N':>4} {'configuration (Lc,Nc,Ls,Np)':<30}{'prefill s':>10}{'N_avg':>7}{'measured x':>11}{'FLOPs x':>9}{'ratio':>7}"
    print(head)
    print("-" * len(head))
    pruned_times: Dict[str, float] = {}
    for n in (256, 576):
        length = SYS + n + AFTER
        g = torch.Generator().manual_seed(n)
        x = (torch.randn(1, length, cfg.hidden_size, generator=g) * 0.02).to(device=args.device, dtype=dtype)
        methods: Dict[str, Optional[LVLMCSP]] = {"unpruned (stock)": None}
        for name in CONFIGS[n]:
            methods[name] = preset(name)
        times: Dict[str, List[float]] = {k: [] for k in methods}
        tokens: Dict[str, List[int]] = {}

        def run(method):
            with torch.no_grad():
                if method is None:
                    sync()
                    t0 = time.perf_counter()
                    model(inputs_embeds=x, use_cache=False)
                    sync()
                    return time.perf_counter() - t0, [length] * layers
                with pruning(model, method) as eng:
                    eng.prepare(visual_spans=[(SYS, SYS + n)], guidance_index=[length - 3])
                    sync()
                    t0 = time.perf_counter()
                    model(inputs_embeds=x, use_cache=False)
                    sync()
                    return time.perf_counter() - t0, eng.last_stats.tokens[0].tolist()

        for m in methods.values():
            run(m)
        for r in range(args.rounds):
            order = list(methods.items())
            for name, m in order if r % 2 == 0 else order[::-1]:
                dt, tok = run(m)
                times[name].append(dt)
                tokens[name] = tok
        base_t, base_f = min(times["unpruned (stock)"]), prefill_flops(tokens["unpruned (stock)"], dims, conv)
        for name in methods:
            t = min(times[name])
            f = prefill_flops(tokens[name], dims, conv)
            n_avg = sum(v - SYS - AFTER for v in tokens[name]) / layers
            label = name if methods[name] is None else f"{name} {methods[name].paper_tuple}"
            meas, anal = base_t / t, base_f / f
            print(f"{n:>4} {label:<30}{t:>10.3f}{n_avg:>7.1f}{meas:>11.2f}{anal:>9.2f}{meas / anal:>7.2f}")
            if methods[name] is not None:
                pruned_times[name] = t

    # ---- clustering overhead (Seg-First), as a share of the cheapest and dearest pruned prefill
    from shared.segfirst import CallableMaskSource, seg_first_select

    image = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    lo, hi = min(pruned_times.values()), max(pruned_times.values())
    print()
    print(f"Seg-First clustering overhead on a 480x640 image (share of a pruned prefill: {lo:.3f} s .. {hi:.3f} s)")
    for size, nc in ((224, 64), (336, 128)):
        src = CallableMaskSource(synthetic_masks())
        t = time_best(lambda: seg_first_select(image, src, nc, torch.Generator().manual_seed(0), size=size), 5)
        print(f"  synthetic masks (8 instances) -> {size}px grid, Nc={nc}: {1e3 * t:.2f} ms = "
              f"{100 * t / hi:.2f}% .. {100 * t / lo:.2f}%")
    if args.yolo:
        from shared.segfirst import YoloMaskSource

        yolo = YoloMaskSource.from_yaml("yolo11n-seg.yaml", device="cpu")
        t = time_best(lambda: yolo(image), 3)
        tg = time_best(lambda: seg_first_select(image, yolo, 64, torch.Generator().manual_seed(0)), 3)
        print(f"  YOLO11n-seg (untrained, same network) call on CPU: {1e3 * t:.1f} ms = "
              f"{100 * t / hi:.1f}% .. {100 * t / lo:.1f}% of a pruned prefill; whole selection {1e3 * tg:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
