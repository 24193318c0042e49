"""SeGPruner selection speed and saliency memory, measured side by side.

    python benchmarks/segpruner_selection.py                              # CPU, float32, 5 rounds
    python benchmarks/segpruner_selection.py --device cuda --dtype bfloat16

1. Selection (per_view, 12 views × 729 tokens, C = 1152, random features, centroids from a synthetic room
   seen by 12 pinhole cameras): ``SeGPruner(...).select`` against a transcription of the released
   ``farthest_point_sample`` selection run as the authors run it (features in the tower's dtype, float32 by
   default; their float32 ``distance`` buffer; cdist + a matrix-vector product per step, dx at step 0,
   boolean-mask running minimum). Reported: the speed-up, and EXACT counts of kept tokens that differ from
   that loop and from the same operations in float64 (the arithmetic of the project's rule, which must give
   0); how many row-steps had near-ties resolved with reference values; and floors measured in this run: a
   rows step reads every view's float32 features once (bytes / read bandwidth, from memory and
   cache-resident), the matrix strategy multiplies 10 of 16 Gram blocks (FLOPs / float32 GEMM rate). Then
   per_scene (T = 12 × 64 over the whole scene) against the same loop run once
   over the flattened scene. Rounds are interleaved, order reversed every other round; each time is the
   best round.
2. Saliency memory: peak extra memory of ``received_attention`` (SigLIP's last layer, one head at a time)
   against materialising a layer's full (12, 16, 729, 729) attention map as the eager tower does, measured;
   and the 26 maps that ``output_attentions=True`` keeps, computed. CPU: peak resident memory of a child
   process whose allocations above 64 KiB are all mmapped (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave
   the resident set at once; the peak is reset through ``/proc/self/clear_refs`` before the call (Linux).
   ``tracemalloc`` cannot be used: it sees Python's allocator only, not torch's tensors. CUDA:
   ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from shared.methods.segpruner_fps import fused_fps  # noqa: E402
from shared.methods.segpruner import SeGPruner  # noqa: E402
from shared.scoring import received_attention  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIGLIP = dict(hidden=1152, heads=16, layers=26, side=27)  # truncated so400m as LLaVA-OneVision runs it


# -- inputs -------------------------------------------------------------------------------------------------

def room_centroids(views: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """(V, side², 3) points where patch-centre rays of cameras inside a 6 × 5 × 3 m room hit its walls."""
    lo = torch.zeros(3, dtype=torch.float64)
    hi = torch.tensor([6.0, 5.0, 3.0], dtype=torch.float64)
    f = side / (2 * math.tan(math.radians(35)))  # 70° horizontal field of view
    uv = (torch.arange(side, dtype=torch.float64) + 0.5 - side / 2) / f
    vv, uu = torch.meshgrid(uv, uv, indexing="ij")
    rays = torch.stack([uu, vv, torch.ones_like(uu)], -1).reshape(-1, 3)  # camera frame: x right, y down, z fwd
    out = []
    for _ in range(views):
        origin = lo + 0.5 + torch.rand(3, generator=generator, dtype=torch.float64) * (hi - lo - 1.0)
        yaw = torch.rand((), generator=generator, dtype=torch.float64) * 2 * math.pi
        pitch = (torch.rand((), generator=generator, dtype=torch.float64) - 0.5) * 0.6
        fwd = torch.stack([torch.cos(yaw) * torch.cos(pitch), torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch)])
        right = torch.stack([-torch.sin(yaw), torch.cos(yaw), torch.zeros((), dtype=torch.float64)])
        down = torch.linalg.cross(fwd, right)
        d = rays @ torch.stack([right, down, fwd])
        d = d / d.norm(dim=-1, keepdim=True)
        bound = torch.where(d > 0, hi, lo)
        t = ((bound - origin) / d).nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("inf"))
        hit = origin + d * t.amin(dim=-1, keepdim=True)
        out.append(hit + 0.01 * torch.randn(hit.shape, generator=generator, dtype=torch.float64))
    return torch.stack(out)


def make_inputs(views: int, channels: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = SIGLIP["side"] ** 2
    saliency = torch.softmax(3.0 * torch.randn(views, p, generator=g), dim=-1)
    features = torch.randn(views, p, channels, generator=g)
    centroids = room_centroids(views, SIGLIP["side"], g)
    return saliency.to(device), features.to(device, dtype), centroids.to(device, torch.float32)


# -- the released loop, transcribed -------------------------------------------------------------------------------

def released_select(saliency, features, centroids, tokens: int, ratio: float, lam: float,
                    float64: bool = False) -> torch.Tensor:
    """Keep mask (V, P) of the released ``farthest_point_sample`` selection, step by step, run as the authors
    run it: features in the tower's dtype (normalised before the residual gather), centroids float32, the
    running ``distance`` made by ``torch.ones(V, R) * 1e10`` (the default dtype, float32), cdist in its
    default mode, dx at step 0, a boolean-mask index-put and ``torch.max`` for the next pick; saliency
    ``argsort(descending=True)``. With ``float64``: the same operations in float64 throughout (the
    arithmetic of the project's rule; the released code itself cannot run so, its float32 ``distance``
    refuses a float64 index-put)."""
    if float64:
        features, centroids = features.double(), centroids.double()
    else:
        centroids = centroids.float()
    v, n, _ = features.shape
    dev = features.device
    k = int(tokens * ratio)
    m = tokens - k
    ranked = saliency.argsort(dim=-1, descending=True)
    important, residual = ranked[:, :k], ranked[:, k:]
    rows = torch.arange(v, device=dev)
    xyz = centroids[rows.unsqueeze(-1), residual, :]
    unit = features / features.norm(dim=-1, keepdim=True)
    unit = unit[rows.unsqueeze(-1), residual, :]
    chosen = torch.zeros(v, m, dtype=torch.long, device=dev)
    distance = torch.ones(v, n - k, dtype=torch.float64 if float64 else None).to(dev) * 1e10
    far = torch.zeros(v, dtype=torch.long, device=dev)
    dx = None
    for i in range(m):
        chosen[:, i] = far
        centre = xyz[rows, far, :].view(v, 1, 3)
        dist = torch.cdist(xyz, centre).squeeze(-1)
        scores = (unit[rows, far, :].unsqueeze(1) @ unit.transpose(-1, -2)).squeeze(1)
        if i == 0:
            dx = dist.max(-1, keepdim=True)[0]
        fused = lam * dist / dx + (1 - lam) * (1 - scores)
        closer = fused < distance
        distance[closer] = fused[closer]
        far = torch.max(distance, -1)[1]
    kept = torch.cat([important, residual[rows.unsqueeze(-1), chosen]], dim=-1)
    return torch.zeros(v, n, dtype=torch.bool, device=dev).scatter_(1, kept, True)


def differing(ours: torch.Tensor, ref: torch.Tensor) -> str:
    """Exact count of kept tokens that differ: kept by ours and not by ref (as many as the reverse)."""
    per_view = (ours & ~ref).sum(dim=1)
    return f"{int(per_view.sum())} of {int(ours.sum())} ({int((per_view > 0).sum())} of {ours.shape[0]} views)"


# -- timing ---------------------------------------------------------------------------------------------------

def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def interleaved_best(fns: Dict[str, Callable[[], object]], rounds: int, sync) -> Dict[str, float]:
    best = {name: float("inf") for name in fns}
    names = list(fns)
    for fn in fns.values():  # warm-up
        fn()
    rng = range(rounds)
    try:
        from tqdm import tqdm
        rng = tqdm(rng, desc="rounds", leave=False, file=sys.stderr)
    except ImportError:
        pass
    for r in rng:
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            t = time.perf_counter()
            fns[name]()
            sync()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def read_bandwidth(t: torch.Tensor, sync, repeats: int) -> float:
    """Bytes per second of ``t.sum()`` (best of ``repeats``): a streaming read of t."""
    t.sum()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        t.sum()
        sync()
        best = min(best, time.perf_counter() - start)
    return t.numel() * t.element_size() / best


def gemm_rate(device: str, sync, repeats: int = 5) -> float:
    """float32 FLOP/s of a 2048 × 2048 × 2048 matrix product (best of ``repeats``)."""
    a = torch.randn(2048, 2048, device=device)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ a
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 ** 3 / best


def selection_table(args) -> None:
    dtype = DTYPES[args.dtype]
    sal, feats, cents = make_inputs(args.views, args.channels, args.device, dtype)
    sync = _sync(args.device)
    v, p = sal.shape
    step_bytes = v * p * args.channels * 4  # a rows step reads every view's float32 features once
    big = torch.ones(64 << 20, device=args.device)  # 256 MiB, far beyond any cache
    bw_mem = read_bandwidth(big, sync, 5)
    del big
    bw_cache = read_bandwidth(feats[0].float().contiguous(), sync, 200)  # one view's features: cache-resident
    flops = gemm_rate(args.device, sync)
    gram_flops = 10 / 16 * 2 * v * p * p * args.channels  # the matrix strategy's 10 upper Gram blocks of 4 × 4
    print(f"\nSelection, per_view: {v} views × {p} tokens, C = {args.channels}, features {args.dtype}, "
          f"r = {args.ratio}, λ = {args.lam}, device {args.device} ({torch.get_num_threads()} CPU threads), "
          f"best of {args.rounds} interleaved rounds")
    print(f"Measured in this run: read bandwidth (tensor.sum) {bw_mem / 1e9:.1f} GB/s from memory (256 MiB), "
          f"{bw_cache / 1e9:.1f} GB/s cache-resident (one view's features); float32 GEMM {flops / 1e9:.0f} GFLOP/s. "
          f"Floors: rows = steps × {step_bytes / 1e6:.1f} MB / bandwidth; matrix = {gram_flops / 1e9:.2f} GFLOP "
          f"of Gram blocks / GEMM rate.")
    print(f"| T | FPS steps | strategy | ours s | released loop ({args.dtype}) s | speed-up | kept tokens differing "
          "from the released loop | from its float64 arithmetic | row-steps resolved | floor rows, memory s | "
          "floor rows, cache s | floor matrix s | ours / floor of the strategy run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        method = SeGPruner(tokens=tokens, important_ratio=args.ratio, lam=args.lam, mode="per_view")
        m = method.diverse_count
        fns = {
            "ours": lambda: method.select(sal, feats, cents),
            "released": lambda: released_select(sal, feats, cents, tokens, args.ratio, args.lam),
        }
        ours, rel = fns["ours"](), fns["released"]()
        rule = released_select(sal, feats, cents, tokens, args.ratio, args.lam, float64=True)
        stats = run_stats(sal, feats, cents, method)
        t = interleaved_best(fns, args.rounds, sync)
        floors = {"rows memory": m * step_bytes / bw_mem, "rows cache": m * step_bytes / bw_cache,
                  "matrix": gram_flops / flops}
        strategy = stats.get("strategy", "-")
        floor = floors["matrix"] if strategy == "matrix" else floors["rows cache"]
        print(f"| {tokens} | {m} | {strategy} {stats.get('precision', '')} | {t['ours']:.3f} | "
              f"{t['released']:.3f} | {t['released'] / t['ours']:.2f}× | {differing(ours, rel)} | "
              f"{differing(ours, rule)} | {stats.get('resolved', 0)} of {v * max(0, m - 1)} | "
              f"{floors['rows memory']:.3f} | {floors['rows cache']:.3f} | {floors['matrix']:.3f} | "
              f"{t['ours'] / floor:.2f} |")


def run_stats(sal, feats, cents, method: SeGPruner) -> dict:
    """Strategy, precision and near-ties resolved of ``method.select`` (per_view, no invalid geometry)."""
    stats: dict = {}
    if method.diverse_count > 0:
        order = torch.sort(sal, dim=1, descending=True, stable=True).indices[:, method.important_count:]
        fused_fps(cents, feats, method.diverse_count, method.lam, order=order, normalizer=method.normalizer,
                  stats=stats)
    return stats


def scene_table(args) -> None:
    """per_scene: one FPS over all views' tokens, against the released loop run on the flattened scene."""
    dtype = DTYPES[args.dtype]
    sal, feats, cents = make_inputs(args.views, args.channels, args.device, dtype)
    sync = _sync(args.device)
    v, p = sal.shape
    tokens = args.scene_tokens
    method = SeGPruner(tokens=tokens, important_ratio=args.ratio, lam=args.lam, mode="per_scene")
    flat_sal = (sal / sal.sum(dim=1, keepdim=True)).reshape(1, -1)
    flat = (feats.reshape(1, v * p, -1), cents.reshape(1, v * p, 3))
    fns = {
        "ours": lambda: method.select(sal, feats, cents),
        "released": lambda: released_select(flat_sal, *flat, tokens, args.ratio, args.lam).view(v, p),
    }
    ours, rel = fns["ours"](), fns["released"]()
    rule = released_select(flat_sal, *flat, tokens, args.ratio, args.lam, float64=True).view(v, p)
    t = interleaved_best(fns, args.rounds, sync)
    print(f"\nSelection, per_scene: T = {tokens} over {v} × {p} tokens, r = {args.ratio}, λ = {args.lam}")
    print(f"| T | ours s | released loop on the flattened scene ({args.dtype}) s | speed-up | kept tokens "
          "differing from that loop | from its float64 arithmetic | kept per view |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {tokens} | {t['ours']:.3f} | {t['released']:.3f} | {t['released'] / t['ours']:.2f}× | "
          f"{int((ours & ~rel).sum())} of {tokens} | {int((ours & ~rule).sum())} of {tokens} | "
          f"{' '.join(str(int(c)) for c in ours.sum(dim=1))} |")


# -- saliency memory --------------------------------------------------------------------------------------------

class _Attn(nn.Module):
    """The attributes ``received_attention`` reads from a SigLIP attention block (q/k only)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)


def eager_layer_map(attn: _Attn, hidden: torch.Tensor) -> torch.Tensor:
    """One layer's full map as an eager SigLIP block keeps it: softmax in float32, stored in the model dtype."""
    b, n, _ = hidden.shape
    h, dh = attn.num_heads, attn.head_dim
    q = attn.q_proj(hidden).view(b, n, h, dh).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, n, h, dh).transpose(1, 2)
    return torch.softmax((q @ k.transpose(-1, -2)) * dh**-0.5, dim=-1, dtype=torch.float32).to(hidden.dtype)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_worker(what: str, device: str, dtype_name: str, views: int) -> int:
    """Peak extra bytes of one saliency computation (run in a fresh process on CPU)."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    n = SIGLIP["side"] ** 2
    attn = _Attn(SIGLIP["hidden"], SIGLIP["heads"]).to(device, dtype)
    hidden = torch.randn(views, n, SIGLIP["hidden"]).to(device, dtype)
    fn = {"received": lambda: received_attention(attn, hidden), "layer_map": lambda: eager_layer_map(attn, hidden)}[what]
    with torch.no_grad():
        out = fn()  # warm-up: thread pools, kernels
        del out
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the resident-set high-water mark
        out = fn()
        return (_rss_kib("VmHWM") - base) * 1024


def measure(what: str, args) -> int:
    if args.device.startswith("cuda"):
        return memory_worker(what, args.device, args.dtype, args.views)
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("device: CPU memory is measured through /proc/self/clear_refs (Linux); use --device cuda")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", what, "--device", args.device,
           "--dtype", args.dtype, "--views", str(args.views)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(json.loads(res.stdout.strip().splitlines()[-1])["bytes"])


def memory_table(args) -> None:
    dtype = DTYPES[args.dtype]
    n, h, layers = SIGLIP["side"] ** 2, SIGLIP["heads"], SIGLIP["layers"]
    esize = torch.empty((), dtype=dtype).element_size()
    ours = measure("received", args)
    one = measure("layer_map", args)
    map_bytes = args.views * h * n * n * esize
    all_maps = layers * map_bytes
    mib = 1 << 20
    print(f"\nSaliency peak extra memory: {args.views} views × {n} tokens, {h} heads, {args.dtype} tower, "
          f"device {args.device}")
    print("| saliency path | bytes | MiB | × ours |")
    print("|---|---|---|---|")
    print(f"| received_attention, last layer, one head at a time (measured) | {ours} | {ours / mib:.1f} | 1.00 |")
    print(f"| one layer's full map, eager (measured peak) | {one} | {one / mib:.1f} | {one / ours:.2f} |")
    print(f"| one layer's retained map {args.views}×{h}×{n}²×{esize} B (computed) | {map_bytes} | "
          f"{map_bytes / mib:.1f} | {map_bytes / ours:.2f} |")
    print(f"| all {layers} layers' maps, output_attentions=True (computed) | {all_maps} | {all_maps / mib:.1f} | "
          f"{all_maps / ours:.1f} |")


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--views", type=int, default=12)
    ap.add_argument("--channels", type=int, default=SIGLIP["hidden"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 196, 393])
    ap.add_argument("--ratio", type=float, default=0.0, help="important_ratio r (0: every kept token from FPS)")
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--scene-tokens", type=int, default=768, help="per_scene budget T (0: skip; 768 = 12 × 64)")
    ap.add_argument("--skip-selection", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-worker", choices=["received", "layer_map"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds: expected an int >= 1")
    if args.dtype == "float64" and not args.skip_selection and not args.memory_worker:
        ap.error("--dtype: the released loop cannot run in float64 (its float32 distance buffer refuses a float64 "
                 "index-put); use float32, bfloat16 or float16, or --skip-selection")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps({"bytes": memory_worker(args.memory_worker, args.device, args.dtype, args.views)}))
        return
    if not args.skip_selection:
        selection_table(args)
        if args.scene_tokens > 0:
            scene_table(args)
    if not args.skip_memory:
        memory_table(args)


if __name__ == "__main__":
    main()
