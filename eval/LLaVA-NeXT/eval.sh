#!/usr/bin/env bash
# SeGPruner evaluation on LLaVA-OneVision: ScanQA / OpenEQA predictions, metrics and the paper-style table.
#
# Usage:
#   eval/LLaVA-NeXT/eval.sh scanqa|openeqa --model-path M --data-root Q --frames-root F --out O [options]
#   eval/LLaVA-NeXT/eval.sh table RUN_DIR [RUN_DIR ...] --out DIR
#   NPROC=8 eval/LLaVA-NeXT/eval.sh scanqa ...      # one process per GPU via torchrun; rank 0 merges
#
# Options are those of eval/LLaVA-NeXT/eval_3dqa.py (--help): --preset paper, --method NAME --method-args K=V,
# --pre NAME --pre-args K=V, --backend llava|hf, --limit N, --max-new-tokens 128, --on-error raise|skip,
# --judge openai:<base_url>:<model>|hf:<path>, --use-java auto|yes|no, --merge-only ...
# PYTHON selects the interpreter (default: python; e.g. PYTHON=.venvs/LLaVA-NeXT/bin/python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[[ $# -ge 1 ]] || { sed -n '2,13p' "$0"; exit 2; }
task="$1"; shift
case "$task" in
    scanqa|openeqa|table) ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "eval.sh: unknown task '$task' (scanqa, openeqa or table)" >&2; exit 2 ;;
esac
PY="${PYTHON:-python}"
if [[ "$task" != table && "${NPROC:-1}" -gt 1 ]]; then
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" eval/LLaVA-NeXT/eval_3dqa.py "$task" "$@"
fi
exec "$PY" eval/LLaVA-NeXT/eval_3dqa.py "$task" "$@"
