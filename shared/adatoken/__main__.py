"""``python -m shared.adatoken calibrate|fit ...`` (see ``shared/adatoken/__init__.py``)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from ..methods.adatoken import SCALES, VARIANTS

STATE_NAME = "calibration_state.jsonl"


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a last-layer retention fraction in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a last-layer retention fraction in (0, 1), got {text!r}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _fit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--r", type=_fraction, nargs="+", default=[0.1], metavar="R",
                   help="last-layer retention O(L) = r, one schedule per value (default 0.1)")
    p.add_argument("--variant", choices=VARIANTS, default="paper",
                   help="Eq.4 as published (paper) or the unofficial code's linear combination (code_linear)")
    p.add_argument("--scale", choices=SCALES, default="row_mean", help="per-row means (row_mean) or raw sums (raw)")
    p.add_argument("--visual-tokens", type=_positive, default=None, metavar="N",
                   help="N for the stored budgets (default: the calibration prompts' mean N)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m shared.adatoken", description="AdaToken-3D calibration and fit")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="run the calibration prompts (resumable), then fit")
    c.add_argument("--source", choices=("llava3d", "tiny"), default="llava3d")
    c.add_argument("--out", required=True, help="folder for the state file and the schedule JSONs")
    c.add_argument("--state", default=None, help=f"state file (default <out>/{STATE_NAME})")
    c.add_argument("--k", type=_positive, default=64, help="calibration prompts (default 64)")
    c.add_argument("--seed", type=_int, default=0, help="seed of the prompt draw (default 0)")
    c.add_argument("--chunk", type=_positive, default=64, help="query rows scored at once per layer (default 64)")
    c.add_argument("--stop-after", type=_positive, default=None, metavar="M",
                   help="calibrate at most M new prompts this run, then stop without fitting (resume later)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = c.add_argument_group("--source llava3d")
    g.add_argument("--model-path", default=None, help="LLaVA-3D checkpoint folder")
    g.add_argument("--model-base", default=None)
    g.add_argument("--data-root", default=None, help="LLaVA-3D's playground/data (annotations/ below it)")
    g.add_argument("--question-files", nargs="+", default=(), metavar="FILE",
                   help="calibration question files (default: ScanQA-train and SQA3D-train under --data-root)")
    g.add_argument("--exclude-scenes-from", nargs="*", default=None, metavar="FILE",
                   help="question files whose scenes are excluded (default: ScanQA-val and SQA3D-test under "
                        "--data-root, where present)")
    g.add_argument("--video-folder", default=None,
                   help="folder holding scannet/<scene> (default: <data-root>/LLaVA-3D-Pretrain)")
    g.add_argument("--device", default="cuda")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    g.add_argument("--compat", default=None, help="build_inputs compat mode (e.g. adatoken)")
    t = c.add_argument_group("--source tiny")
    t.add_argument("--tiny-layers", type=_positive, default=32)
    t.add_argument("--tiny-visual-tokens", type=_positive, default=256, help="N (a square number)")
    t.add_argument("--tiny-seed", type=_int, default=0, help="seed of the tiny model's weights")
    _fit_flags(c)
    f = sub.add_parser("fit", help="refit schedules from a state file (no model run)")
    f.add_argument("--state", required=True)
    f.add_argument("--out", required=True, help="folder for the schedule JSONs")
    f.add_argument("--partial", action="store_true", help="fit although some calibration prompts are not done")
    _fit_flags(f)
    return ap


def _source(args: argparse.Namespace):
    from .calibrate import llava3d_source, tiny_source

    if args.source == "tiny":
        from .tiny import TinySpec

        try:
            spec = TinySpec(layers=args.tiny_layers, visual_tokens=args.tiny_visual_tokens, seed=args.tiny_seed)
        except ValueError as e:
            raise ValueError(f"--tiny-{str(e).split(':')[0].replace('_', '-')}: {str(e).split(': ', 1)[1]}") from None
        return tiny_source(k=args.k, seed=args.seed, spec=spec)
    return llava3d_source(args.model_path, data_root=args.data_root, question_files=args.question_files,
                          exclude_from=args.exclude_scenes_from, k=args.k, seed=args.seed,
                          model_base=args.model_base, device=args.device, dtype=args.dtype, compat=args.compat,
                          video_folder=args.video_folder)


def _fit_and_write(state, args: argparse.Namespace, partial: bool = False) -> List[str]:
    from .calibrate import fit_state, write_schedules

    schedules = fit_state(state, args.r, variant=args.variant, scale=args.scale, visual_tokens=args.visual_tokens,
                          partial=partial)
    paths = write_schedules(schedules, args.out)
    for s, p in zip(schedules, paths):
        print(f"r = {s.r:g}: alpha {s.alpha:.4f}, beta {s.beta:.4f}, L_c {s.L_c:.3f}, M {s.M:.4f}; budgets for "
              f"N = {s.visual_tokens}: {list(s.budgets)} -> {p}")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "calibrate":
            from .calibrate import run_calibration

            state_path = args.state or os.path.join(args.out, STATE_NAME)
            source = _source(args)
            state = run_calibration(source, state_path, chunk=args.chunk, stop_after=args.stop_after,
                                    progress=not args.no_progress)
            done, total = len(state.rows), len(source.records)
            if done < total:
                print(f"calibrated {done} of {total} prompts into {state_path}; run the same command again to resume")
                return 0
            print(f"calibrated {total} prompts ({state_path})")
            _fit_and_write(state, args)
        else:
            from .state import CalibrationState

            _fit_and_write(CalibrationState.load(args.state), args, partial=args.partial)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
