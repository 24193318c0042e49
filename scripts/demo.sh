#!/usr/bin/env bash
# The main job on its embedded default (no downloads): sets up the base environment and
# transformers 5.x, then
#   1. SeGPruner (per_view and per_scene) on a synthetic 12-view RGB-D room through a tiny random
#      LLaVA-OneVision at the real 27x27 SigLIP grid: tokens kept, TFLOPs at Qwen2-7B dims, measured
#      prefill speed-up, and PNGs (kept tokens over each view; kept-token centroids in 3D) in
#      outputs/segpruner_demo/;
#   2. FastV, PyramidDrop and LVLM_CSP through the in-decoder engine on a tiny random LLaVA-1.5
#      (576 image tokens), with FLOPs at LLaMA-7B dims and the papers' efficiency figures beside ours;
#   3. Fast3D on a synthetic Chat-Scene scene (100 objects x 3 tokens): a tiny random GAP scores the
#      objects, SAP picks k*, and vanilla / SAP / FastV / Fast3D GAP generate (beam 5) through the engine
#      on a Chat-Scene-shaped stand-in LLaMA: tokens per layer, FLOPs at Vicuna-7B dims with GAP's own,
#      measured prefill speed-up, and outputs/fast3d_demo/kept_objects.png;
#   4. AdaToken-3D on a tiny random LLaVA-3D-shaped model: calibration (span-block sums through the session),
#      SLSQP schedule at r = 0.1, outputs/adatoken_demo/schedule.png (INF / I_norm, fitted O(i), tokens kept per
#      layer) and a pruned generate whose per-layer visual tokens are checked against the schedule's budgets.
#
#   bash scripts/demo.sh                                   # all four, on the embedded defaults
#   bash scripts/demo.sh segpruner --model DIR --scene DIR # a real LLaVA-OneVision (HF folder) on a real scene
#   bash scripts/demo.sh llava --model DIR --image FILE    # a real LLaVA-1.5 (HF folder)
#   bash scripts/demo.sh fast3d [--alpha 0.21 ...]         # the Fast3D section alone
#   bash scripts/demo.sh adatoken [--k 16 --r 0.1 ...]     # the AdaToken-3D section alone
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_test_envs.sh --no-yolo 5.23.0 >&2
PY=(env PYTHONPATH=.venvs/tf-5.23.0 .venvs/base/bin/python)
which="${1:-all}"
case "$which" in
    segpruner) shift; exec "${PY[@]}" -m shared.apps.demo_segpruner --out outputs/segpruner_demo "$@" ;;
    llava) shift; exec "${PY[@]}" -m shared.apps.demo "$@" ;;
    fast3d) shift; exec "${PY[@]}" -m shared.apps.demo_fast3d --out outputs/fast3d_demo "$@" ;;
    adatoken) shift; exec "${PY[@]}" -m shared.apps.demo_adatoken --out outputs/adatoken_demo "$@" ;;
    all)
        [ $# -le 1 ] || { echo "usage: scripts/demo.sh [segpruner|llava|fast3d|adatoken [ARGS...]]" >&2; exit 2; }
        "${PY[@]}" -m shared.apps.demo_segpruner --out outputs/segpruner_demo
        echo
        "${PY[@]}" -m shared.apps.demo
        echo
        "${PY[@]}" -m shared.apps.demo_fast3d --out outputs/fast3d_demo
        echo
        "${PY[@]}" -m shared.apps.demo_adatoken --out outputs/adatoken_demo ;;
    *) echo "usage: scripts/demo.sh [segpruner|llava|fast3d|adatoken [ARGS...]]" >&2; exit 2 ;;
esac
