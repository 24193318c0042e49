"""LLaVA-3D-shaped prefill: vanilla vs PyramidDrop vs AdaToken-3D, measured side by side; and the cost of
AdaToken-3D's calibration (span-block sums) per prompt.

    PYTHONPATH=.venvs/tf-4.37.2 .venvs/base/bin/python benchmarks/adatoken_prefill.py   # LLaVA-3D's pin, CPU
    PYTHONPATH=.venvs/tf-5.23.0 .venvs/base/bin/python benchmarks/adatoken_prefill.py   # the latest transformers
    python benchmarks/adatoken_prefill.py --dims 7b --device cuda --dtype bfloat16       # the real 7B shape on a GPU

Decoder: the stock ``LlamaModel`` of the installed transformers (LLaVA-3D's decoder is 4.37.2's), 32 layers, random
weights. ``--dims scaled`` (default, CPU): d = 1024, m = 2752, 16 heads (head_dim 64); ``7b``: d = 4096, m = 11008,
32 heads (Vicuna-7B / LLaVA-3D-7B); ``tiny``: d = 64, m = 172, 4 heads (tests only). Sequence as LLaVA-3D splices it:
SYS 35 + N 1986 voxel tokens + PRM 36 = 2,057 tokens, the length Table III's 11.46 TFLOPs implies
(``shared/notes/hosts-and-methods/LLaVA-3D-AdaToken-3D.md`` §6.6).

Variants: vanilla (the stock forward); PyramidDrop λ = 0.5 and λ = r^(1/3) (last stage keeps r) at layers 8/16/24;
AdaToken-3D from a schedule fitted by ``fit_schedule`` at r (default 0.1) on a linear INF (``--schedule`` reads a
schedule JSON instead), ranking at every layer whose budget drops, and the same schedule sampled at ``prune_layers``
(8/16/24 and the unofficial ATE preset 4/8/12/16/18/20/22/24/26/28) to show the ranking overhead. PDrop and
AdaToken-3D run with compact positions (the released rule). Per variant:

- measured x: best stock time / best time of the variant (best of ``--rounds`` interleaved rounds, order reversed
  every other round, after one warm-up pass; ``spread`` = (worst − best)/best over the rounds);
- paper x: FLOPs speed-up in the FastV/PDrop/AdaToken-3D convention (Σ 4nd² + 2n²d + 2ndm, no ranking);
- true x: FLOPs speed-up in true FLOPs (2 per multiply-add, SwiGLU's 3 FFN matrices, exact GQA) plus the ranking
  probe at every ranking point (``shared.accounting.ranking_flops``: K projection of the n tokens, one query row);
- ratio = measured x / true x (goal >= 0.90); ratio_p = measured x / paper x.

The floor row is the stock forward on a sequence as long as AdaToken-3D's layer-averaged token count (no engine, no
ranking): its own ratio shows how far a shorter sequence alone falls short of its FLOPs speed-up on this hardware
(at small n the CPU's matmul throughput drops), so a variant's shortfall can be split into the hardware's and the
engine's.

Calibration: the calibration command's pass (``AdaTokenCalibration``: the stock forward plus the layer-by-layer chunked q/k probe, keys once per layer) on the unpruned 2,057-token prefill, per
chunk size (``--calib-chunks``), timed side by side with a stock prefill (best of ``--calib-rounds``); and its peak
extra memory against one decoder layer's (goal <= 2x). Memory: on CPU ``torch.profiler`` with
``profile_memory=True`` (the CPU allocator reports every allocation and the running total while profiling; the
peak is the largest total minus the total before the first allocation: live tensors created inside the measured
call, inputs and weights excluded); on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the
call. On CPU the calibration's memory is profiled over the first ``--mem-layers`` layers (default 2; the profiler's
trace of all 32 layers × chunks takes minutes and GBs): every layer of the unpruned prefill sees the same n tokens, so
the pattern, and its peak, repeats layer after layer (only the (3, L) float64 sums accumulate). "One layer" is one stock decoder layer called on the 2,057 tokens (its transient activations and its output;
its input, the mask and the RoPE tables are made before the measurement); the stock prefill's peak is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's shared, not an installed copy
    sys.path.insert(0, ROOT)

from shared import PyramidDrop, pruning  # noqa: E402
from shared.accounting import CONVENTIONS, DecoderDims, prefill_flops, ranking_flops  # noqa: E402
from shared.methods.adatoken import AdaToken3D, AdaTokenSchedule, fit_schedule  # noqa: E402

SYS, N_SPA, PRM = 35, 1986, 36
LAYERS = 32
PDROP_LAYERS = (8, 16, 24)
ATE_PRESET = (4, 8, 12, 16, 18, 20, 22, 24, 26, 28)
LAYER_DIMS = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4),
    "scaled": dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=16, num_key_value_heads=16),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
}
VANILLA = "vanilla (stock)"
FLOOR = "floor"


def build(dims: str, device: str, dtype: torch.dtype, impl: str):
    """The stock LlamaModel at ``dims`` with 32 layers, random weights (seed 0)."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=LAYERS, **LAYER_DIMS[dims])
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaModel(cfg).to(dtype).eval()


def load_schedule(path: Optional[str], r: float, visual: int) -> AdaTokenSchedule:
    """The schedule JSON at ``path``, else ``fit_schedule`` at r on a linear INF (1 → 0 over 32 layers)."""
    if path:
        with open(path) as f:
            sched = AdaTokenSchedule.from_json(f.read())
        if sched.num_layers != LAYERS:
            raise ValueError(f"--schedule: expected a schedule for {LAYERS} layers, got {sched.num_layers}")
        return sched
    return fit_schedule(np.linspace(1.0, 0.0, LAYERS), r, visual_tokens=visual,
                        provenance={"calibration": "benchmark: linear INF (no calibration)"})


def variants(sched: AdaTokenSchedule, r: float, visual: int, sampled: Sequence[Tuple[str, Sequence[int]]]
             ) -> Dict[str, object]:
    """name -> method config (None: the stock forward; FLOOR: the stock forward on a shorter sequence)."""
    lam = r ** (1.0 / 3.0)
    out: Dict[str, object] = {
        VANILLA: None,
        "PDrop λ=0.5 @8,16,24": PyramidDrop(layers=PDROP_LAYERS, ratio=0.5, positions="compact"),
        f"PDrop λ={lam:.3f} @8,16,24": PyramidDrop(layers=PDROP_LAYERS, ratio=lam, positions="compact"),
        f"AdaToken-3D r={r:g} every drop": AdaToken3D(sched, visual_tokens=visual),
    }
    for label, layers in sampled:
        out[f"AdaToken-3D r={r:g} @{label}"] = AdaToken3D(sched, visual_tokens=visual, prune_layers=tuple(layers))
    out[FLOOR] = FLOOR
    return out


def ranking_points(tokens: Sequence[int]) -> List[int]:
    """Token counts ranked over: n_{l−1} at every layer l whose count drops (PDrop/AdaToken-3D rank only there)."""
    return [a for a, b in zip(tokens, tokens[1:]) if b < a]


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: List[Tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        ef = e.extra_fields
        if type(ef).__name__ == "_ExtraFields_Allocation" and str(ef.device) == "cpu":
            events.append((int(e.start_time_ns), int(ef.alloc_size), int(ef.total_allocated)))
        stack.extend(e.children)
    if not events:
        raise RuntimeError("peak_extra_bytes: torch.profiler reported no CPU allocations (profile_memory unsupported?)")
    events.sort()
    base = events[0][2] - events[0][1]
    return int(max(t for _, _, t in events) - base)


@dataclass
class Result:
    """What one benchmark run measured. tokens: name -> tokens each layer saw; times: name -> seconds per round."""

    header: str
    dims: DecoderDims
    tokens: Dict[str, List[int]]
    times: Dict[str, List[float]]
    schedule: AdaTokenSchedule
    visual: int
    floor_visual: int
    calibration: List[Dict[str, float]] = field(default_factory=list)
    layer_peak: int = 0
    prefill_peak: int = 0
    mem_layers: int = LAYERS


def measure(args: argparse.Namespace, on_prefill: Optional[Callable[[Result], None]] = None) -> Result:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build(args.dims, args.device, dtype, args.attn)
    cfg = model.config
    visual = args.visual
    length = SYS + visual + PRM
    span = [(SYS, SYS + visual)]
    sched = load_schedule(args.schedule, args.r, visual)
    sampled = [("8,16,24", PDROP_LAYERS), ("ATE10", ATE_PRESET)]
    table = variants(sched, args.r, visual, sampled)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, length, cfg.hidden_size, generator=g) * 0.02).to(device=args.device, dtype=dtype)
    sync: Callable[[], None] = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    ada_name = next(k for k in table if k.endswith("every drop"))
    floor_visual = [0]

    def run(name: str) -> Tuple[float, List[int]]:
        method = table[name]
        with torch.no_grad():
            if method is None or method == FLOOR:
                inp = x if method is None else torch.cat([x[:, :SYS + floor_visual[0]], x[:, SYS + visual:]], dim=1)
                sync()
                t0 = time.perf_counter()
                model(inputs_embeds=inp, use_cache=False)
                sync()
                return time.perf_counter() - t0, [inp.shape[1]] * LAYERS
            with pruning(model, method) as eng:
                eng.prepare(visual_spans=span)
                sync()
                t0 = time.perf_counter()
                model(inputs_embeds=x, use_cache=False)
                sync()
                dt = time.perf_counter() - t0
                return dt, eng.last_stats.tokens[0].tolist()

    names = list(table)
    tokens: Dict[str, List[int]] = {}
    times: Dict[str, List[float]] = {k: [] for k in names}
    progress = _progress(len(names) * (args.rounds + 1), "prefill runs", args.quiet)
    for name in names:  # warm-up; the floor's length is AdaToken-3D's layer-averaged token count
        if name == FLOOR:
            floor_visual[0] = int(round(sum(tokens[ada_name]) / LAYERS)) - SYS - PRM
        tokens[name] = run(name)[1]
        progress.update()
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            dt, tok = run(name)
            if tok != tokens[name]:
                raise RuntimeError(f"{name}: token counts changed between runs: {tokens[name]} vs {tok}")
            times[name].append(dt)
            progress.update()
    progress.close()

    header = (f"LlamaModel (transformers {_tf_version()}) d={cfg.hidden_size} m={cfg.intermediate_size} L={LAYERS} "
              f"heads={cfg.num_attention_heads}, {args.device} {args.dtype} {args.attn}, sequence "
              f"SYS {SYS} + N {visual} + PRM {PRM} = {length}, best of {args.rounds} interleaved rounds, "
              f"threads={torch.get_num_threads()}")
    res = Result(header=header, dims=DecoderDims.from_config(cfg), tokens=tokens, times=times, schedule=sched,
                 visual=visual, floor_visual=floor_visual[0])
    if on_prefill is not None:
        on_prefill(res)
    if args.calib_chunks:
        res.mem_layers = args.mem_layers if args.device == "cpu" else LAYERS
        _calibration(args, model, x, res, sync)
    return res


def _calibration(args, model, x, res: Result, sync) -> None:
    """The calibration command's pass (``AdaTokenCalibration``'s runner: the stock forward plus the per-layer
    chunked q/k probe) per chunk size: time side by side with a stock prefill, and peak extra memory."""
    from shared.engine.adapters import DecoderAdapter
    from shared.methods.adatoken_calibration import AdaTokenCalibration

    visual = res.visual
    length = x.shape[1]
    spans = ((0, SYS), (SYS, SYS + visual), (SYS + visual, length))

    def stock():
        with torch.no_grad():
            model(inputs_embeds=x, use_cache=False)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    # one decoder layer on the full sequence, its inputs made beforehand (as the probe makes them)
    ad = DecoderAdapter(model)
    positions = torch.arange(length, device=x.device)[None]
    valid = torch.ones(1, length, dtype=torch.bool, device=x.device)
    with torch.no_grad(), ad.rope_shim() as shim:
        if shim is not None:
            shim.min_len = length
        mask = ad.attention_mask(valid, length, x.dtype)
        pos_emb = ad.position_embeddings(x, positions)
        res.layer_peak = peak_extra_bytes(lambda: ad.call_layer(0, x, mask, positions, None, False, pos_emb),
                                          args.device)
    res.prefill_peak = peak_extra_bytes(stock, args.device)
    progress = _progress(len(args.calib_chunks) * (2 * args.calib_rounds + 1), "calibration runs", args.quiet)
    for chunk in args.calib_chunks:
        def calib(c=chunk):
            with torch.no_grad(), pruning(model, AdaTokenCalibration(chunk=c)) as runner:
                runner.prepare(visual_spans=[spans[1]])
                model(inputs_embeds=x, use_cache=False)
            return runner.last

        t_stock, t_cal = [], []
        for r in range(args.calib_rounds):  # side by side, order alternating
            pair = [(t_stock, stock), (t_cal, calib)]
            for sink, fn in (pair if r % 2 == 0 else pair[::-1]):
                sink.append(timed(fn))
                progress.update()
        with _first_layers(model, args.mem_layers if args.device == "cpu" else LAYERS):
            peak = peak_extra_bytes(calib, args.device)
        progress.update()
        res.calibration.append({"chunk": chunk, "stock_s": min(t_stock), "calib_s": min(t_cal),
                                "spread": (max(t_cal) - min(t_cal)) / min(t_cal), "peak": peak})
    progress.close()


@contextmanager
def _first_layers(model, k: int) -> Iterator[None]:
    """The decoder reduced to its first k layers (the same modules) for the duration."""
    layers = model.layers
    model.layers = torch.nn.ModuleList(list(layers)[:k])
    try:
        yield
    finally:
        model.layers = layers


def report(res: Result, out=None, calibration: bool = True) -> None:
    out = out or sys.stdout
    pr = lambda s="": print(s, file=out)  # noqa: E731
    paper, exact = CONVENTIONS["fastv"], CONVENTIONS["exact"]
    base_t = min(res.times[VANILLA])
    base_p = prefill_flops(res.tokens[VANILLA], res.dims, paper)
    base_e = prefill_flops(res.tokens[VANILLA], res.dims, exact)
    pr(res.header)
    s = res.schedule
    pr(f"AdaToken-3D schedule: r={s.r:g} α={s.alpha:.4f} β={s.beta:.4f} L_c={s.L_c:.4f} M={s.M:.4f} "
       f"({json.dumps(s.provenance.get('calibration', 'from --schedule'))}); budgets for N={res.visual}: "
       f"{s.budgets_for(res.visual)}")
    head = (f"{'variant':<34}{'prefill s':>10}{'spread':>8}{'N_avg':>8}{'ranks':>6}{'measured x':>11}{'paper x':>9}"
            f"{'true x':>8}{'ratio':>7}{'ratio_p':>8}")
    pr(head)
    pr("-" * len(head))
    for name, tok in res.tokens.items():
        t = min(res.times[name])
        spread = (max(res.times[name]) - t) / t
        pts = ranking_points(tok)
        f_p = prefill_flops(tok, res.dims, paper)
        f_e = prefill_flops(tok, res.dims, exact) + ranking_flops(pts, res.dims, exact, query_rows=1)
        meas, anal_p, anal_e = base_t / t, base_p / f_p, base_e / f_e
        n_avg = sum(n - SYS - PRM for n in tok) / len(tok)
        label = name if name != FLOOR else f"stock on {tok[0]} tokens (floor)"
        pr(f"{label:<34}{t:>10.3f}{100 * spread:>7.1f}%{n_avg:>8.1f}{len(pts):>6}{meas:>11.2f}{anal_p:>9.2f}"
           f"{anal_e:>8.2f}{meas / anal_e:>7.2f}{meas / anal_p:>8.2f}")
    pr("measured x = stock time / variant time; paper x = FastV/PDrop-convention FLOPs speed-up (no ranking); "
       "true x = true FLOPs incl. the ranking probes; ratio = measured / true x (goal >= 0.90), ratio_p = measured / "
       "paper x; ranks = ranking points; the floor is the stock forward on AdaToken-3D's average length")
    if calibration and res.calibration:
        report_calibration(res, out)


def report_calibration(res: Result, out=None) -> None:
    out = out or sys.stdout
    pr = lambda s="": print(s, file=out)  # noqa: E731
    mib = 2.0 ** 20
    pr(f"Calibration (AdaTokenCalibration: stock forward + probe, on the unpruned {SYS + res.visual + PRM}-token prefill, per prompt): peak extra "
       f"memory of one stock decoder layer {res.layer_peak / mib:.1f} MiB, of the stock prefill "
       f"{res.prefill_peak / mib:.1f} MiB; calibration peak over the first {res.mem_layers} layers")
    head = f"{'chunk':>6}{'calib s':>10}{'spread':>8}{'stock s':>10}{'x stock':>9}{'peak MiB':>10}{'x layer':>9}"
    pr(head)
    pr("-" * len(head))
    for c in res.calibration:
        pr(f"{c['chunk']:>6}{c['calib_s']:>10.3f}{100 * c['spread']:>7.1f}%{c['stock_s']:>10.3f}"
           f"{c['calib_s'] / c['stock_s']:>9.2f}{c['peak'] / mib:>10.1f}{c['peak'] / max(res.layer_peak, 1):>9.2f}")
    pr("x stock = calibration time / stock prefill time (best of the side-by-side rounds); x layer = peak extra memory "
       "/ one stock decoder layer's (goal <= 2.00)")


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False)


def _chunks(text: str) -> List[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints (e.g. 64,256), got {text!r}")
    if any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive chunk sizes, got {text!r}")
    return out


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", choices=sorted(LAYER_DIMS), default="scaled")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--visual", type=int, default=N_SPA, help="voxel tokens N (default 1986: 2,057 tokens in all)")
    ap.add_argument("--r", type=float, default=0.1, help="last-layer retention for the fit and PDrop λ = r^(1/3)")
    ap.add_argument("--schedule", default=None, help="AdaToken-3D schedule JSON (default: fit on a linear INF)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calib-chunks", type=_chunks, default=[64, 256, 1024],
                    help="calibration probe chunk sizes, comma-separated; empty: skip the calibration section")
    ap.add_argument("--calib-rounds", type=int, default=1)
    ap.add_argument("--mem-layers", type=int, default=2, help="layers the CPU memory profile of the calibration runs")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.visual < 10:
        ap.error(f"--visual: expected at least 10 voxel tokens, got {args.visual}")
    if not 1 <= args.mem_layers <= LAYERS:
        ap.error(f"--mem-layers: expected 1..{LAYERS}, got {args.mem_layers}")
    if args.rounds < 1 or args.calib_rounds < 1:
        ap.error("--rounds / --calib-rounds: expected at least 1")
    if not 0.0 < args.r < 1.0:
        ap.error(f"--r: expected a fraction in (0, 1), got {args.r}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    def prefill_table(res: Result) -> None:  # printed before the (long) calibration section
        report(res, calibration=False)
        sys.stdout.flush()

    res = measure(parse(argv), prefill_table)
    if res.calibration:
        print()
        report_calibration(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
