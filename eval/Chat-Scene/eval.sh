#!/usr/bin/env bash
# Chat-Scene on its five benchmarks under visual-token pruning (Fast3D, FastV, random), one process per GPU.
#
# Usage:
#   eval/Chat-Scene/eval.sh <scanrefer|multi3dref|scan2cap|scanqa|sqa3d|all> --llm <vicuna-7b-v1.5> \
#       --ckpt <ckpt_01_3446.pth> --anno-root <annotations> --out <run dir> [eval_chatscene.py options]
#   eval/Chat-Scene/eval.sh targets --tasks <...|all> --split <train|val> --llm ... --ckpt ... --anno-root ... \
#       --out <targets dir> [--preset fast3d] [--chunk 64]     GAP training targets from the frozen LLM
#   eval/Chat-Scene/eval.sh --help      this text and eval_chatscene.py's options (no GPU, no checkout needed)
#
# The first argument picks the benchmark (several: "scanrefer,scanqa"; all: the five). Runs
# eval/Chat-Scene/eval_chatscene.py on every visible GPU (torchrun, one process each; NGPUS=<n> to
# choose), then merges the shards (in annotation order, no padded duplicates) and writes <run dir>/
# summary.json, preds_<task>.json, table.md and table.csv. Rerunning the same command resumes: finished
# annotations are skipped (keep NGPUS the same as in the interrupted run). Needs the patched Chat-Scene
# submodule (bash scripts/apply_patches.sh Chat-Scene) and its environment (bash eval/setup_env.sh
# Chat-Scene). Environment: PYTHON (default python), NGPUS (default: all GPUs).
#
# Examples:
#   eval/Chat-Scene/eval.sh all --llm llm/vicuna-7b-v1.5 --ckpt ckpt/ckpt_01_3446.pth --anno-root annotations \
#       --out out/chatscene/vanilla
#   eval/Chat-Scene/eval.sh all ... --out out/chatscene/fast3d-vanilla --preset fast3d
#   eval/Chat-Scene/eval.sh scanrefer ... --out out/chatscene/fastv --method fastv --method-args layer=2 keep=15
#   eval/Chat-Scene/eval.sh scanrefer ... --out out/chatscene/gap --method fast3d --method-args layer=2 keep=15 \
#       --object-scores scanrefer=gap/infer_attn_maps_val_scanrefer.pt       # GAP predictions (logits)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
DRIVER="$HERE/eval_chatscene.py"

# --help / -h first: print this header and the driver's options, before any GPU check.
for a in "$@"; do
    [[ "$a" == "--" ]] && break
    if [[ "$a" == "--help" || "$a" == "-h" ]]; then
        sed -n '2,/^set -euo pipefail$/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        echo
        if [[ "${1:-}" == "targets" ]]; then
            echo "Options of $DRIVER targets (passed through):"
            exec "$PY" "$DRIVER" targets --help
        fi
        echo "Options of $DRIVER (passed through):"
        exec "$PY" "$DRIVER" --help
    fi
done

SUB=()
if [[ "${1:-}" == "targets" ]]; then
    # eval_chatscene.py targets on every GPU, then the rank files merged; rerunning resumes (same NGPUS)
    SUB=(targets)
    shift
    for a in "$@"; do
        if [[ "$a" == "--merge-only" ]]; then
            echo "eval.sh: $a is set by this script; call eval_chatscene.py targets directly for it" >&2
            exit 2
        fi
    done
elif [[ $# -lt 1 || "$1" == -* ]]; then
    echo "eval.sh: the first argument is the benchmark: scanrefer, multi3dref, scan2cap, scanqa, sqa3d or all" >&2
    exit 2
fi
if [[ ${#SUB[@]} -eq 0 ]]; then
    TASKS="${1//,/ }"
    shift
    for a in "$@"; do
        if [[ "$a" == "--merge-only" || "$a" == "--tasks" ]]; then
            echo "eval.sh: $a is set by this script; call eval_chatscene.py directly for it" >&2
            exit 2
        fi
    done
fi

if [[ -z "${NGPUS:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        NGPUS="$(nvidia-smi -L | wc -l)"
    else
        NGPUS=0
    fi
fi
if [[ "$NGPUS" -lt 1 ]]; then
    echo "eval.sh: no GPU found (a 7B Chat-Scene needs one); set NGPUS if nvidia-smi is missing" >&2
    exit 1
fi

if [[ ${#SUB[@]} -gt 0 ]]; then
    if [[ "$NGPUS" -gt 1 ]]; then
        "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" "$DRIVER" targets "$@"
        "$PY" "$DRIVER" targets "$@" --merge-only
    else
        "$PY" "$DRIVER" targets "$@"
    fi
    exit 0
fi

# shellcheck disable=SC2086
if [[ "$NGPUS" -gt 1 ]]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" "$DRIVER" --tasks $TASKS "$@"
    "$PY" "$DRIVER" --tasks $TASKS "$@" --merge-only
else
    "$PY" "$DRIVER" --tasks $TASKS "$@"
fi
