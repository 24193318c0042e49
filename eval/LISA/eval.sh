#!/usr/bin/env bash
# LISA referring / reasoning segmentation under visual-token pruning, one process per GPU.
#
# Usage:
#   eval/LISA/eval.sh --version <LISA ckpt> --dataset-dir <dataset> --out <run dir> [eval_seg.py options]
#   eval/LISA/eval.sh --help      this text and eval_seg.py's options (needs no GPU and no LISA checkout)
#
# Runs eval/LISA/eval_seg.py on every visible GPU (torchrun, one process each; NGPUS=<n> to choose),
# then merges the shards and writes <run dir>/summary.json, table.md and table.csv. Rerunning the same
# command resumes: finished expressions are skipped (keep NGPUS the same as in the interrupted run).
# Needs the patched LISA submodule (bash scripts/apply_patches.sh LISA) and its environment
# (bash eval/setup_env.sh LISA). Environment: PYTHON (default python), NGPUS (default: all GPUs).
#
# Examples (see eval/LISA/README.md):
#   eval/LISA/eval.sh --version ckpt/LISA-7B-v1 --dataset-dir dataset --out out/lisa7b/none
#   eval/LISA/eval.sh --version ckpt/LISA-7B-v1 --dataset-dir dataset --out out/lisa7b/csp \
#       --method lvlm_csp --method-args preset=7b-224/8-64-6-16 clustering=uniform
#   eval/LISA/eval.sh --version ckpt/LISA-7B-v1 --dataset-dir dataset --out out/lisa7b/paper --preset paper
#   eval/LISA/eval.sh --version ckpt/LISA-7B-v1 --dataset-dir dataset --out out/lisa7b/csp-sam \
#       --method lvlm_csp --method-args preset=7b-224/8-64-6-16 clustering=seg_first \
#       --csp-masks sam-shared:ckpt/sam_vit_h_4b8939.pth      # or yolo:yolo11n-seg.pt, sam:sam_vit_b_01ec64.pth
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
DRIVER="$HERE/eval_seg.py"

# --help / -h first: print this header and the driver's options, before any GPU check.
for a in "$@"; do
    [[ "$a" == "--" ]] && break
    if [[ "$a" == "--help" || "$a" == "-h" ]]; then
        sed -n '2,/^set -euo pipefail$/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        echo
        echo "Options of $DRIVER (passed through):"
        exec "$PY" "$DRIVER" --help
    fi
done

for a in "$@"; do
    if [[ "$a" == "--merge-only" ]]; then
        echo "eval.sh: --merge-only is added by this script; call eval_seg.py directly for a merge alone" >&2
        exit 2
    fi
done

if [[ -z "${NGPUS:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        NGPUS="$(nvidia-smi -L | wc -l)"
    else
        NGPUS=0
    fi
fi
if [[ "$NGPUS" -lt 1 ]]; then
    echo "eval.sh: no GPU found (LISA's model_forward needs CUDA); set NGPUS if nvidia-smi is missing" >&2
    exit 1
fi

if [[ "$NGPUS" -gt 1 ]]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" "$DRIVER" "$@"
    "$PY" "$DRIVER" "$@" --merge-only
else
    "$PY" "$DRIVER" "$@"
fi
