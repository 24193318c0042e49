"""AdaToken-3D calibration command: ``python -m shared.adatoken calibrate|fit ...``.

    python -m shared.adatoken calibrate --source llava3d --model-path DIR --data-root playground/data \
        --out runs/adatoken --r 0.1 0.2
    python -m shared.adatoken calibrate --source tiny --out /tmp/ada --k 16
    python -m shared.adatoken fit --state runs/adatoken/calibration_state.jsonl --out runs/adatoken --r 0.3

``calibrate`` runs each calibration prompt's unpruned prefill through ``shared.prune(model,
AdaTokenCalibration())`` (``shared.methods.adatoken_calibration``) and appends its span-block sums to
``<out>/calibration_state.jsonl`` (``shared.adatoken.state``: rerunning resumes, other settings are refused);
then sums over prompts, Eq.1–4 (``--variant``, ``--scale``), Eq.6, Eq.7 (λ = 1) and an SLSQP fit per ``--r``
write ``<out>/schedule_r<r>.json`` (``AdaTokenSchedule.to_json``). ``fit`` refits from a state file.

Schedule JSON: ``r``, ``theta`` (alpha, beta, L_c, M), ``retention`` O(i), ``budgets`` k_i for
``visual_tokens`` N, and ``provenance``: ``calibration`` (source, model path, K, seed, question files, prompt
keys digest, per-prompt token statistics), ``information`` (variant, scale, constants, per-layer S_self, F,
S_cross, INF), ``block_sums`` (summed SPA→SPA, PRM→SPA, SPA→SYS and row counts), ``fit`` (SLSQP settings,
loss, I_norm), ``software`` (versions, git commit) and ``run`` (timestamps, seconds per prompt).
"""
from __future__ import annotations

from .calibrate import Source, fit_state, llava3d_source, run_calibration, tiny_source, write_schedules
from .state import CalibrationState

__all__ = ["CalibrationState", "Source", "fit_state", "llava3d_source", "run_calibration", "tiny_source",
           "write_schedules"]
