#!/usr/bin/env bash
# The main job on its embedded default: sets up the base environment and transformers 5.x, then
# runs FastV and PyramidDrop through the engine on a tiny random LLaVA (no downloads) and prints
# tokens per layer, timings, FLOPs at 7B dims and the papers' efficiency figures beside ours.
# Extra arguments go to `python -m shared.demo` (e.g. --model DIR --image FILE for real weights).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_test_envs.sh 5.23.0 >&2
PYTHONPATH=.venvs/tf-5.23.0 exec .venvs/base/bin/python -m shared.demo "$@"
