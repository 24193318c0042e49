#!/usr/bin/env bash
# LLaVA-3D on ScanQA / SQA3D / Scan2Cap, unpruned or pruned (AdaToken-3D, PyramidDrop, FastV), one process per GPU.
#
# Usage:
#   eval/LLaVA-3D/eval.sh scanqa|sqa3d|scan2cap --model-path <LLaVA-3D-7B> --data-root <playground/data> \
#       --out <run dir> [--method NAME --method-args K=V ...] [eval_llava3d.py options]
#   eval/LLaVA-3D/eval.sh table RUN_DIR [RUN_DIR ...] --out DIR
#   eval/LLaVA-3D/eval.sh --help      this text and eval_llava3d.py's options (no GPU, no checkout needed)
#
# Runs eval/LLaVA-3D/eval_llava3d.py on every visible GPU (torchrun; NGPUS=<n> to choose), then merges
# the shards in question-file order and writes <run dir>/summary.json, <task>_pred.jsonl (LLaVA-3D's format),
# table.md and table.csv. Rerunning the same command resumes (keep NGPUS). PYTHONPATH gets the patched
# LLaVA-3D checkout (bash scripts/apply_patches.sh LLaVA-3D; environment: bash eval/setup_env.sh LLaVA-3D).
# Environment: PYTHON (default python), NGPUS (default: all GPUs), LLAVA3D (default: ./LLaVA-3D).
#
# Examples:
#   eval/LLaVA-3D/eval.sh scanqa --model-path ckpt/LLaVA-3D-7B --data-root playground/data --out out/l3d/vanilla
#   eval/LLaVA-3D/eval.sh sqa3d ... --out out/l3d/ada10 --method adatoken3d --method-args fitted=schedule_r10.json
#   eval/LLaVA-3D/eval.sh sqa3d ... --out out/l3d/pdrop --method pdrop --method-args ratio=0.5
#   eval/LLaVA-3D/eval.sh sqa3d ... --compat adatoken --question-file v1_balanced_questions_test_scannetv2.json \
#       --answer-file v1_balanced_sqa_annotations_test_scannetv2.json --scene-subset adatoken_public22
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python}"
DRIVER="$HERE/eval_llava3d.py"
export PYTHONPATH="${LLAVA3D:-$ROOT/LLaVA-3D}:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

for a in "$@"; do
    [[ "$a" == "--" ]] && break
    if [[ "$a" == "--help" || "$a" == "-h" ]]; then
        sed -n '2,/^set -euo pipefail$/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        echo
        echo "Options of $DRIVER (passed through):"
        exec "$PY" "$DRIVER" "${1:-scanqa}" --help
    fi
done
[[ $# -ge 1 ]] || { sed -n '2,/^set -euo pipefail$/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 2; }
case "$1" in
    scanqa|sqa3d|scan2cap) ;;
    table) exec "$PY" "$DRIVER" "$@" ;;
    *) echo "eval.sh: the first argument is the task: scanqa, sqa3d, scan2cap or table" >&2; exit 2 ;;
esac
for a in "$@"; do
    if [[ "$a" == "--merge-only" ]]; then
        echo "eval.sh: $a is set by this script; call eval_llava3d.py directly for it" >&2
        exit 2
    fi
done
if [[ ! -d "${LLAVA3D:-$ROOT/LLaVA-3D}/llava" ]]; then
    echo "eval.sh: no LLaVA-3D checkout at ${LLAVA3D:-$ROOT/LLaVA-3D} (git submodule update --init LLaVA-3D;" \
         "bash scripts/apply_patches.sh LLaVA-3D), or set LLAVA3D" >&2
    exit 1
fi
if [[ -z "${NGPUS:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then NGPUS="$(nvidia-smi -L | wc -l)"; else NGPUS=0; fi
fi
if [[ "$NGPUS" -lt 1 ]]; then
    echo "eval.sh: no GPU found (a 7B LLaVA-3D needs one); set NGPUS if nvidia-smi is missing" >&2
    exit 1
fi
if [[ "$NGPUS" -gt 1 ]]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" "$DRIVER" "$@"
    "$PY" "$DRIVER" "$@" --merge-only
else
    "$PY" "$DRIVER" "$@"
fi
