#!/usr/bin/env bash
# Create the evaluation environment for one host.
#
# Usage:
#   eval/setup_env.sh [--print] <Host>        Host: LLaVA-NeXT | LLaVA-3D | Chat-Scene | LISA
#
#   --print   print the commands that would run (one per line, shell-quoted), run nothing.
#
# Needs a GPU machine with network access (PyTorch CUDA index, PyPI, GitHub); it cannot run offline.
#
# What it does, in order:
#   1. creates the environment: a conda env if `conda` is on PATH, otherwise a venv at
#      .venvs/<Host> made with `python3.X -m venv` (X = the host's Python version; error if absent);
#   2. installs torch/torchvision[/torchaudio] (the `torch*==` lines of eval/<Host>/requirements.txt)
#      from the host's PyTorch CUDA index (table below), and freezes them in a pip constraints file
#      so that no later step can replace them with a PyPI build;
#   3. host-specific extras that need torch at build time (torch-scatter for LLaVA-3D);
#   4. `pip install -r eval/<Host>/requirements.txt`, then optional extras (ultralytics for LISA),
#      then flash-attn with --no-build-isolation (required for Chat-Scene, optional elsewhere);
#   5. `scripts/apply_patches.sh <Host>` (inits the submodule, checks the pin, applies the series);
#      an "already patched" submodule (exit 3) is accepted with a warning so reruns are possible;
#   6. installs the host: `pip install --no-deps -e <Host>` for LLaVA-NeXT and LLaVA-3D (both ship a
#      pyproject; --no-deps because eval/<Host>/requirements.txt already carries the pins), or, for
#      Chat-Scene and LISA, which are not packages, prints the PYTHONPATH/CWD to use;
#   7. `pip install -e .` (this repo's `shared` package), then `pip check` (warning only), and writes
#      `pip freeze` to outputs/envs/<Host>.freeze.txt.
#
# Per-host choices (reasons in eval/<Host>/requirements.txt):
#   Host        Python  PyTorch index (CUDA)                         extra build step
#   LLaVA-NeXT  3.10    https://download.pytorch.org/whl/cu121       flash-attn==2.5.7 only if WITH_FLASH_ATTN=1
#   LLaVA-3D    3.10    https://download.pytorch.org/whl/cu118       torch-scatter==2.1.2 from data.pyg.org
#   Chat-Scene  3.9     https://download.pytorch.org/whl/cu118       flash_attn==2.5.6 (required; SKIP_FLASH_ATTN=1 skips)
#   LISA        3.10    https://download.pytorch.org/whl/cu118       ultralytics only if WITH_ULTRALYTICS=1
#   All cu118/cu121 wheels used here include sm_90 (H100/H200) kernels.
#
# Environment overrides:
#   ENV_KIND=auto|conda|venv   (default auto: conda if available, else venv)
#   ENV_NAME=<name>            conda env name (default prune-<host in lower case>)
#   VENV_DIR=<dir>             venv location (default <repo>/.venvs/<Host>)
#   TORCH_INDEX_URL=<url>      replace the PyTorch index from the table
#   WITH_FLASH_ATTN=1          also install flash-attn for LLaVA-NeXT / LLaVA-3D
#   SKIP_FLASH_ATTN=1          do not install flash-attn for Chat-Scene (then load with another attn impl)
#   WITH_ULTRALYTICS=1         LISA: install ultralytics (AGPL-3.0; Seg-First sampler)
#   MAX_JOBS=<n>               parallel jobs if flash-attn has to be compiled (default 8)

set -euo pipefail

usage() {
    echo "usage: $0 [--print] <LLaVA-NeXT|LLaVA-3D|Chat-Scene|LISA>" >&2
    exit 2
}

PRINT=0
HOST=""
for arg in "$@"; do
    case "$arg" in
        --print) PRINT=1 ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $arg" >&2; usage ;;
        *) [[ -z "$HOST" ]] || usage; HOST="$arg" ;;
    esac
done
[[ -n "$HOST" ]] || usage

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/.." && pwd))"
REQ="$ROOT/eval/$HOST/requirements.txt"

# ---- per-host configuration -------------------------------------------------------------------
FLASH_ATTN=""          # pip spec, installed with --no-build-isolation
FLASH_REQUIRED=0
HOST_INSTALL=""        # editable | pythonpath
EXTRA_FIND_LINKS=""    # for torch-scatter
EXTRA_PKGS=()          # need torch at build time: installed right after torch
POST_PKGS=()           # optional extras: installed after the requirements (keeps their pins)
NEEDS_JAVA=1           # pycocoevalcap (PTBTokenizer, METEOR)
case "$HOST" in
    LLaVA-NeXT)
        PYVER=3.10
        TORCH_INDEX_DEFAULT=https://download.pytorch.org/whl/cu121
        HOST_INSTALL=editable
        [[ "${WITH_FLASH_ATTN:-0}" == 1 ]] && FLASH_ATTN="flash-attn==2.5.7"
        ;;
    LLaVA-3D)
        PYVER=3.10
        TORCH_INDEX_DEFAULT=https://download.pytorch.org/whl/cu118
        HOST_INSTALL=editable
        # Prebuilt torch-scatter wheels (PyPI has only the sdist); the page for torch 2.1.0 serves 2.1.x.
        EXTRA_FIND_LINKS=https://data.pyg.org/whl/torch-2.1.0+cu118.html
        EXTRA_PKGS=("torch-scatter==2.1.2")
        [[ "${WITH_FLASH_ATTN:-0}" == 1 ]] && FLASH_ATTN="flash-attn==2.5.0"
        ;;
    Chat-Scene)
        PYVER=3.9
        TORCH_INDEX_DEFAULT=https://download.pytorch.org/whl/cu118
        HOST_INSTALL=pythonpath
        if [[ "${SKIP_FLASH_ATTN:-0}" != 1 ]]; then
            FLASH_ATTN="flash_attn==2.5.6"
            FLASH_REQUIRED=1
        fi
        ;;
    LISA)
        PYVER=3.10
        TORCH_INDEX_DEFAULT=https://download.pytorch.org/whl/cu118
        HOST_INSTALL=pythonpath
        NEEDS_JAVA=0
        [[ "${WITH_ULTRALYTICS:-0}" == 1 ]] && POST_PKGS=("ultralytics==8.3.40")
        ;;
    *)
        echo "unknown host: $HOST" >&2
        usage ;;
esac
TORCH_INDEX="${TORCH_INDEX_URL:-$TORCH_INDEX_DEFAULT}"
HOST_LC="$(echo "$HOST" | tr '[:upper:]' '[:lower:]')"

[[ -f "$REQ" ]] || { echo "missing $REQ" >&2; exit 1; }
mapfile -t TORCH_PINS < <(grep -E '^(torch|torchvision|torchaudio)==' "$REQ" | sed 's/[[:space:]]*#.*$//')
[[ ${#TORCH_PINS[@]} -gt 0 ]] || { echo "no torch==... line in $REQ" >&2; exit 1; }

# ---- helpers -----------------------------------------------------------------------------------
# run CMD...: print it shell-quoted; execute it unless --print.
run() {
    local q
    printf -v q '%q ' "$@"
    echo "+ ${q% }"
    if [[ "$PRINT" == 0 ]]; then
        "$@"
    fi
}
note() { echo "# $*"; }
warn() { echo "WARNING: $*" >&2; }

# ---- 1. environment ----------------------------------------------------------------------------
KIND="${ENV_KIND:-auto}"
if [[ "$KIND" == auto ]]; then
    if command -v conda >/dev/null 2>&1; then KIND=conda; else KIND=venv; fi
fi

note "host=$HOST python=$PYVER env=$KIND torch_index=$TORCH_INDEX root=$ROOT"
case "$KIND" in
    conda)
        ENV_NAME="${ENV_NAME:-prune-$HOST_LC}"
        if [[ "$PRINT" == 0 ]] && conda env list | awk '{print $1}' | grep -qx "$ENV_NAME"; then
            note "conda env $ENV_NAME exists; reusing it"
        else
            run conda create -y -n "$ENV_NAME" "python=$PYVER"
        fi
        PY=(conda run --no-capture-output -n "$ENV_NAME" python)
        if [[ "$NEEDS_JAVA" == 1 ]]; then
            # pycocoevalcap's PTBTokenizer and METEOR run `java`.
            run conda install -y -n "$ENV_NAME" -c conda-forge "openjdk=17"
        fi
        ;;
    venv)
        VENV_DIR="${VENV_DIR:-$ROOT/.venvs/$HOST}"
        BASE_PY=""
        for cand in "python$PYVER" python3 python; do
            if command -v "$cand" >/dev/null 2>&1 &&
               [[ "$("$cand" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" == "$PYVER" ]]; then
                BASE_PY="$(command -v "$cand")"
                break
            fi
        done
        if [[ -z "$BASE_PY" ]]; then
            if [[ "$PRINT" == 1 ]]; then
                BASE_PY="python$PYVER"
                note "python$PYVER not found here; a real run would stop at this point"
            else
                echo "ERROR: $HOST needs Python $PYVER (python$PYVER not found on PATH)." >&2
                echo "Install it (e.g. apt install python$PYVER python$PYVER-venv, pyenv, or uv python install $PYVER) or install conda." >&2
                exit 1
            fi
        fi
        if [[ -x "$VENV_DIR/bin/python" ]]; then
            note "venv $VENV_DIR exists; reusing it"
        else
            run "$BASE_PY" -m venv "$VENV_DIR"
        fi
        PY=("$VENV_DIR/bin/python")
        if [[ "$NEEDS_JAVA" == 1 ]] && ! command -v java >/dev/null 2>&1; then
            warn "no 'java' on PATH: pycocoevalcap (PTBTokenizer/METEOR) needs a JRE, e.g. apt install openjdk-17-jre-headless"
        fi
        ;;
    *)
        echo "ENV_KIND must be auto, conda or venv" >&2; exit 2 ;;
esac
PIP=("${PY[@]}" -m pip)

run "${PIP[@]}" install --upgrade pip setuptools wheel

# ---- 2. torch from the CUDA index, then freeze it as a constraint ----------------------------------
run "${PIP[@]}" install --index-url "$TORCH_INDEX" "${TORCH_PINS[@]}"

CONSTRAINTS="$ROOT/outputs/envs/$HOST.constraints.txt"
note "constraints file $CONSTRAINTS pins: ${TORCH_PINS[*]}"
if [[ "$PRINT" == 0 ]]; then
    mkdir -p "$(dirname "$CONSTRAINTS")"
    printf '%s\n' "${TORCH_PINS[@]}" > "$CONSTRAINTS"
fi

# ---- 3. packages that need torch at build time ------------------------------------------------------
if [[ ${#EXTRA_PKGS[@]} -gt 0 ]]; then
    FL=()
    [[ -n "$EXTRA_FIND_LINKS" ]] && FL=(-f "$EXTRA_FIND_LINKS")
    run "${PIP[@]}" install --no-build-isolation -c "$CONSTRAINTS" "${FL[@]}" "${EXTRA_PKGS[@]}"
fi

# ---- 4. host requirements -----------------------------------------------------------------------------
run "${PIP[@]}" install -c "$CONSTRAINTS" -r "$REQ"

if [[ ${#POST_PKGS[@]} -gt 0 ]]; then
    run "${PIP[@]}" install -c "$CONSTRAINTS" "${POST_PKGS[@]}"
fi

# flash-attn: after the requirements (it needs torch, packaging, ninja helps compile if no wheel matches).
if [[ -n "$FLASH_ATTN" ]]; then
    run "${PIP[@]}" install -c "$CONSTRAINTS" ninja packaging
    if [[ "$PRINT" == 1 ]]; then
        run env MAX_JOBS="${MAX_JOBS:-8}" "${PIP[@]}" install --no-build-isolation -c "$CONSTRAINTS" "$FLASH_ATTN"
    elif ! run env MAX_JOBS="${MAX_JOBS:-8}" "${PIP[@]}" install --no-build-isolation -c "$CONSTRAINTS" "$FLASH_ATTN"; then
        if [[ "$FLASH_REQUIRED" == 1 ]]; then
            echo "ERROR: $FLASH_ATTN failed to install; $HOST loads its LLM with flash_attention_2." >&2
            echo "Rerun with SKIP_FLASH_ATTN=1 only if you load with another attn_implementation." >&2
            exit 1
        fi
        warn "$FLASH_ATTN failed to install; use attn_implementation=\"sdpa\""
    fi
fi

# ---- 5. patches -----------------------------------------------------------------------------------------
if [[ "$PRINT" == 1 ]]; then
    run "$ROOT/scripts/apply_patches.sh" "$HOST"
else
    set +e
    run "$ROOT/scripts/apply_patches.sh" "$HOST"
    rc=$?
    set -e
    if [[ $rc -eq 3 ]]; then
        warn "$HOST is already patched (see above); continuing with the submodule as it is"
    elif [[ $rc -ne 0 ]]; then
        echo "ERROR: scripts/apply_patches.sh $HOST failed (exit $rc)" >&2
        exit "$rc"
    fi
fi

# ---- 6. the host itself -------------------------------------------------------------------------------------
case "$HOST_INSTALL" in
    editable)
        run "${PIP[@]}" install --no-deps -e "$ROOT/$HOST"
        ;;
    pythonpath)
        note "$HOST is not a Python package (no setup.py/pyproject.toml); nothing to pip-install."
        note "Run its scripts from $ROOT/$HOST, or export PYTHONPATH=$ROOT/$HOST"
        ;;
esac

# ---- 7. this repo's shared package, checks, freeze ------------------------------------------------------------
run "${PIP[@]}" install -c "$CONSTRAINTS" -e "$ROOT"

if [[ "$PRINT" == 1 ]]; then
    run "${PIP[@]}" check
    run "${PY[@]}" -c "import torch, transformers, shared; print(torch.__version__, torch.version.cuda, transformers.__version__)"
    note "pip freeze > $ROOT/outputs/envs/$HOST.freeze.txt"
else
    run "${PIP[@]}" check || warn "pip check reported conflicts (upstream pins are not all mutually consistent); review above"
    run "${PY[@]}" -c "import torch, transformers, shared; print(torch.__version__, torch.version.cuda, transformers.__version__)"
    "${PIP[@]}" freeze > "$ROOT/outputs/envs/$HOST.freeze.txt"
    note "wrote $ROOT/outputs/envs/$HOST.freeze.txt"
fi

case "$KIND" in
    conda) note "done: conda activate $ENV_NAME" ;;
    venv)  note "done: source $VENV_DIR/bin/activate" ;;
esac
if [[ "$HOST_INSTALL" == pythonpath ]]; then
    note "remember: PYTHONPATH=$ROOT/$HOST (or cd $ROOT/$HOST)"
fi
