"""LVLM_CSP prefill: measured vs analytic speed-up at 256 and 576 image tokens, and clustering overhead.

    python benchmarks/csp_prefill.py                          # CPU, scaled LLaMA (d=1024, 32 layers)
    python benchmarks/csp_prefill.py --dims 7b --device cuda --dtype bfloat16
    # the Seg-First mask sources side by side (YOLO11n-seg, SAM standalone, SAM on a shared encoder; needs
    # ultralytics, segment-anything and torchvision: .venvs/yolo, see scripts/setup_test_envs.sh):
    YOLO_OFFLINE=1 PYTHONPATH=.:.venvs/tf-5.23.0 .venvs/yolo/bin/python benchmarks/csp_prefill.py --yolo --sam
    # the same on a GPU (7B decoder dims, bf16 LLM, masks on the GPU):
    YOLO_OFFLINE=1 PYTHONPATH=.:.venvs/tf-5.23.0 .venvs/yolo/bin/python benchmarks/csp_prefill.py --dims 7b \
        --device cuda --dtype bfloat16 --yolo --sam

The sequence is LISA's: 35 system tokens, N image tokens, 27 user/answer tokens with [SEG] third
from the end (T = 62 text tokens, the length the paper's 224-px rows imply). Three Table 6
configurations per N run through the engine beside the stock decoder, interleaved (order
reversed every other round); each time is its best round. "FLOPs x" is the exact-matmul speed-up
of the measured per-layer token counts. Clustering overhead is the time of the Seg-First selection
(mask source → CLIP grid → quotas → sampling) as a share of the pruned prefill, with a synthetic
mask source (8 rectangles) and, with --yolo, an untrained YOLO11n-seg from its model YAML (the
same network and cost as the trained weights: 10.4 GFLOPs at 640 px) on a 480×640 image.

--sam times ``shared.segfirst_sam.SamMaskSource`` with vit_b shapes and random weights (the cost of the
network does not depend on its weights): standalone (SAM's ViT-B encoder on the 1024-px input, then the
automatic mask generator's ``--sam-points``² prompts through the prompt encoder and mask decoder) and
shared-encoder (the same generator on embeddings a host already computed: LISA's ViT-H, so only the
decoder side is paid), and the encoder alone (what sharing saves). Random weights make SAM's IoU/stability filters drop most masks, so the
generator's per-mask post-processing (RLE) is lighter than with trained weights; the count kept is printed.
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


def mask_source_costs(args: argparse.Namespace, image: np.ndarray, lo: float, hi: float) -> None:
    """The Seg-First mask sources side by side: one call's wall time (best round) and its share of the
    cheapest .. dearest pruned prefill measured above."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []  # (label, seconds, masks, note)
    if args.yolo:
        from shared.segfirst import YoloMaskSource

        yolo = YoloMaskSource.from_yaml("yolo11n-seg.yaml", device=args.device)
        t = time_best(lambda: yolo(image), 3)
        rows.append(("YOLO11n-seg (untrained, 640 px)", t, yolo.last_count, "10.4 GFLOPs; AGPL-3.0"))
    if args.sam:
        from segment_anything import sam_model_registry

        from shared.segfirst_sam import SamMaskSource, padded_input_size

        torch.manual_seed(0)
        sam = sam_model_registry["vit_b"](checkpoint=None).eval()
        probe = SamMaskSource(model=sam, device=args.device)
        seen = []
        hook = probe.model.image_encoder.register_forward_hook(lambda _m, a, o: seen.append((a[0], o)))

        def encoder_only():
            with torch.no_grad():
                probe.generator.predictor.set_image(image)
            sync()

        t_enc = time_best(encoder_only, args.sam_rounds)
        hook.remove()
        enc_in, emb = seen[-1]
        size = padded_input_size(enc_in)
        rows.append(("SAM vit_b image encoder alone", t_enc, None, "1024-px input; what sharing saves"))
        for points in args.sam_points:
            alone = SamMaskSource(model=sam, points_per_side=points, device=args.device)
            shared = SamMaskSource(model=sam, shared_encoder=True, points_per_side=points, device=args.device)

            def decode():
                shared.set_embeddings(emb, size)
                return shared(image)

            t_alone = time_best(lambda: alone(image), args.sam_rounds)
            t_shared = time_best(decode, args.sam_rounds)
            rows.append((f"SAM vit_b standalone, {points}x{points} points", t_alone, alone.last_count, "Apache-2.0"))
            rows.append((f"SAM shared encoder, {points}x{points} points", t_shared, shared.last_count,
                         f"{t_alone / t_shared:.2f}x cheaper than standalone"))
    print()
    print(f"Seg-First mask sources on a 480x640 image, {args.device} (share of a pruned prefill: {lo:.3f} s .. {hi:.3f} s)")
    head = f"  {'source':<40}{'ms':>10}{'masks':>7}{'% of prefill':>16}  note"
    print(head)
    for label, t, count, note in rows:
        share = f"{100 * t / hi:.0f}..{100 * t / lo:.0f}"
        print(f"  {label:<40}{1e3 * t:>10.1f}{'-' if count is None else count:>7}{share:>16}  {note}")


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
    ap.add_argument("--yolo", action="store_true", help="also time an untrained YOLO11n-seg (on --device)")
    ap.add_argument("--sam", action="store_true",
                    help="also time SAM automatic masks (vit_b shapes, random weights): standalone and shared-encoder")
    ap.add_argument("--sam-points", type=int, nargs="+", default=[32],
                    help="SAM points_per_side, one or more (SamAutomaticMaskGenerator's default: 32)")
    ap.add_argument("--sam-rounds", type=int, default=2, help="timed rounds of each SAM source (after one warm-up)")
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
    if args.yolo or args.sam:
        mask_source_costs(args, image, lo, hi)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
