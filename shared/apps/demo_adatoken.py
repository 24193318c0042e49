"""AdaToken-3D demo: calibrate → fit → schedule PNG → pruned generate, on a tiny random model (no download).

    python -m shared.apps.demo_adatoken --out outputs/adatoken_demo

1. Calibration: ``--k`` synthetic LLaVA-3D-shaped prompts ([SYS 35 | N visual | PRM ≈ 36]) run unpruned through
   ``shared.prune(model, AdaTokenCalibration())`` on a tiny random native LLaVA (host ``hf_llava``,
   ``shared.adatoken.tiny``); the span-block sums go to ``<out>/calibration_state.jsonl`` (started afresh).
2. Fit: Eq.1–4 (paper variant, per-row means), Eq.6, Eq.7 with λ = 1, SLSQP at ``--r`` →
   ``<out>/schedule_r<r>.json``.
3. ``<out>/schedule.png``: INF and I_norm per layer; the fitted O(i) against I_norm; visual tokens kept per layer.
4. A greedy generate on a held-out prompt with ``AdaToken3D`` (PyramidDrop ranking, compact positions) through
   ``shared.prune``: the visual tokens each layer saw, from the session record, checked against the budgets.

The model is tiny and random, so the INF curve and the schedule show the pipeline working, not LLaVA-3D's
information flow; ``python -m shared.adatoken calibrate --source llava3d ...`` runs the same steps on LLaVA-3D.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

import torch

from ..adatoken import fit_state, run_calibration, tiny_source, write_schedules
from ..adatoken.tiny import TinySpec, tiny_inputs, tiny_records
from ..methods.adatoken import AdaToken3D, AdaTokenSchedule
from ..session import prune

HELD_OUT_SEED = 10_000  # the generate prompt is drawn apart from the calibration prompts


def plot_schedule(schedule: AdaTokenSchedule, path: str) -> None:
    """Three panels: INF and I_norm per layer; O(i) vs I_norm; visual tokens kept per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prov = schedule.provenance
    inf = prov["information"]["inf"]
    norm = prov["fit"]["inf_norm"]
    layers = list(range(1, schedule.num_layers + 1))
    fig, ax = plt.subplots(1, 3, figsize=(13.5, 4.0), dpi=100)
    ax[0].plot(layers, inf, "o-", color="tab:blue", ms=3, label="INF(i) (Eq.4)")
    ax[0].set_xlabel("layer i")
    ax[0].set_ylabel("INF", color="tab:blue")
    twin = ax[0].twinx()
    twin.plot(layers, norm, "s--", color="tab:orange", ms=3, label="I_norm(i) (Eq.6)")
    twin.set_ylabel("I_norm", color="tab:orange")
    ax[0].set_title("information contribution per layer")
    ax[1].plot(layers, norm, "s", color="tab:orange", ms=4, label="I_norm(i)")
    ax[1].plot(layers, schedule.retention, "-", color="tab:green", lw=2,
               label=f"O(i), α={schedule.alpha:.3f} β={schedule.beta:.3f} L_c={schedule.L_c:.2f} M={schedule.M:.3f}")
    ax[1].axhline(schedule.r, color="grey", lw=0.8, ls=":")
    ax[1].set_xlabel("layer i")
    ax[1].set_title(f"fitted retention (Eq.5, SLSQP), r = {schedule.r:g}")
    ax[1].legend(fontsize=7)
    ax[2].step(layers, schedule.budgets, where="mid", color="tab:red")
    ax[2].set_xlabel("layer i")
    ax[2].set_ylabel("visual tokens kept")
    ax[2].set_title(f"budgets k_i for N = {schedule.visual_tokens}")
    fig.suptitle("AdaToken-3D on a tiny RANDOM model (pipeline demo, not LLaVA-3D's curve)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/adatoken_demo")
    ap.add_argument("--k", type=int, default=16, help="calibration prompts (the real default is 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (LLaVA-3D: 32)")
    ap.add_argument("--visual-tokens", type=int, default=144, help="N, a square number")
    ap.add_argument("--r", type=float, default=0.1, help="last-layer retention")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    spec = TinySpec(layers=args.layers, visual_tokens=args.visual_tokens)
    print(f"AdaToken-3D demo on a TINY RANDOM model (native LLaVA, {spec.layers} layers, hidden {spec.hidden}, "
          f"N = {spec.visual_tokens} visual tokens): it shows the pipeline, not LLaVA-3D's information flow.")

    # 1. calibration (afresh: the demo's own state file)
    state_path = os.path.join(args.out, "calibration_state.jsonl")
    if os.path.exists(state_path):
        os.remove(state_path)
    source = tiny_source(k=args.k, seed=args.seed, spec=spec)
    state = run_calibration(source, state_path)
    sec = state.stat("seconds")["mean"]
    print(f"calibrated {len(state.rows)} prompts ([SYS 35 | N {spec.visual_tokens} | PRM 32-40]), "
          f"{sec * 1000:.0f} ms per prompt -> {state_path}")

    # 2. fit
    schedule = fit_state(state, [args.r])[0]
    path = write_schedules([schedule], args.out)[0]
    inf = schedule.provenance["information"]["inf"]
    print(f"INF per layer (Eq.4): {' '.join(f'{v:.4f}' for v in inf)}")
    print(f"fit at r = {schedule.r:g}: alpha {schedule.alpha:.4f}, beta {schedule.beta:.4f}, L_c {schedule.L_c:.3f}, "
          f"M {schedule.M:.4f} -> {path}")
    print(f"budgets k_i (N = {schedule.visual_tokens}): {list(schedule.budgets)}")

    # 3. PNG
    png = os.path.join(args.out, "schedule.png")
    plot_schedule(schedule, png)
    print(f"wrote {png}")

    # 4. pruned generate on a held-out prompt
    model = source.model
    rec = tiny_records(1, HELD_OUT_SEED)[0]
    inputs = tiny_inputs(rec, spec)
    method = AdaToken3D(fitted=schedule, visual_tokens=spec.visual_tokens)
    with torch.no_grad():
        vanilla = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
        with prune(model, method) as session:
            pruned = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
    record = session.last
    seen: List[int] = record.stats.visual[0].tolist()
    n_in = inputs["input_ids"].shape[1]
    print(f"generate (greedy, {args.max_new_tokens} new tokens) on held-out prompt {rec['key']} "
          f"({n_in} prefill tokens):")
    print(f"  visual tokens per layer (session record): {seen}")
    print(f"  tokens per layer: {record.stats.tokens[0].tolist()}")
    print(f"  vanilla tokens: {vanilla[0, n_in:].tolist()}")
    print(f"  AdaToken-3D tokens: {pruned[0, n_in:].tolist()}")
    if seen != list(schedule.budgets):
        print(f"MISMATCH: the engine kept {seen}, the schedule's budgets are {list(schedule.budgets)}")
        return 1
    mean_kept = sum(seen) / (len(seen) * spec.visual_tokens)
    print(f"the engine kept exactly the schedule's budgets at every layer (mean retention {mean_kept:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
