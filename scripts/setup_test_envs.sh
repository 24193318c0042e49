#!/usr/bin/env bash
# Create the test environments CI needs (idempotent).
#
#   .venvs/base            python3 -m venv with torch==2.13.0 (CPU), numpy, scipy, pytest,
#                          tqdm, pillow, pycocoevalcap, matplotlib, einops and this repo (editable).
#   .venvs/tf-<version>    `pip install --target` dirs, one per transformers version,
#                          used as  PYTHONPATH=.venvs/tf-<version> .venvs/base/bin/python ...
#                          They hold transformers and its pure deps (huggingface_hub,
#                          safetensors, tokenizers, regex, ...) but never torch or numpy:
#                          those always come from the base venv.
#
# Usage:  scripts/setup_test_envs.sh [--force] [--verify] [VERSION ...]
#   VERSION   only set up these transformers versions (default: all of TF_VERSIONS)
#   --force   rebuild even when the stamp file says the env is up to date
#   --verify  run scripts/check_tf_env.py for every selected env, also those already built
#             (freshly built envs are always checked before they are stamped)
#   --no-tf   only set up the base venv
#   --no-yolo skip .venvs/yolo
#   --no-base use .venvs/base as it is (a worktree whose .venvs links to another checkout's: the
#             base stamp names that checkout, so checking it from here would rebuild it)
#
#   .venvs/yolo            a separate venv for the tests that need torchvision, which PyPI's wheels
#                          cannot load beside the local torch 2.13 CPU wheel, so this env takes
#                          torch 2.14.1 + torchvision 0.29.1 (~5.5 GB, from this machine's local wheel
#                          store): the real (untrained) YOLO11-seg test (ultralytics), the SAM mask
#                          source tests (segment-anything 1.0 on tiny random SAMs, tests/test_segfirst_sam.py),
#                          and the real
#                          LISA tests (tests/hosts/test_lisa_real.py, run with
#                          PYTHONPATH=.venvs/tf-4.31.0): LISA's vendored SAM imports torchvision, its
#                          ValDataset opencv, pycocotools and scikit-image (utils/refer.py), its LLaVA
#                          einops, its slow LLaMA tokenizer sentencepiece, and its loaders
#                          (from_pretrained(low_cpu_mem_usage=True) on transformers 4.31) accelerate;
#                          and the real Chat-Scene tests (tests/hosts/test_chat_scene_real.py, with
#                          PYTHONPATH=.venvs/tf-4.39.3, whose target also holds tf_nodeps_pins):
#                          its dataset package imports torchvision, its peft accelerate and psutil.
#
# Each env is stamped (.venvs/<env>/.setup-stamp) with the spec it was built from; an env
# whose stamp matches is skipped, one whose spec changed is rebuilt from scratch.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$(pwd)"

PYTHON="${PYTHON:-python3}"
VENVS="$REPO_ROOT/.venvs"
BASE="$VENVS/base"
BASE_PY="$BASE/bin/python"

# torch==2.13.0 resolves to the local CPU wheel on this machine (pip only; keep pip for it).
TORCH_SPEC="torch==2.13.0"
# pillow: image I/O (scenes, Seg-First); pycocoevalcap (+pycocotools): the official caption/QA scorer;
# matplotlib: demo pictures; einops: imported by the LLaVA-NeXT fork's model code (fork tests).
BASE_PKGS=(numpy scipy pytest tqdm pillow pycocoevalcap matplotlib einops)

TF_VERSIONS=(4.31.0 4.37.2 4.39.3 4.40.2 5.23.0)

# Extra pins per transformers version, installed together with transformers.
# All deps are resolved by pip; numpy (and torch, should anything pull it) is then
# removed from the target so the base venv's copies are used.
tf_extra_pins() {
    case "$1" in
        # tokenizers<0.14 is what 4.31 wants; 0.13.3 ships cp311 wheels.
        4.31.0) echo "tokenizers==0.13.3" ;;
        *) echo "" ;;
    esac
}

# Extras installed with --no-deps after transformers (their other deps come from the venv that runs
# them): resolving them would pull a second torch (peft -> torch, accelerate -> torch) into the target.
# 4.39.3 carries what Chat-Scene's imported modules need beside transformers (tests/hosts/
# test_chat_scene_real.py runs with .venvs/yolo, which has torch, torchvision, accelerate, psutil,
# sentencepiece, scipy, pycocotools): peft (LoRA, models/chat3d.py), protobuf (LlamaTokenizer
# legacy=False reads the sentencepiece model through it), plyfile + trimesh (utils/pc_util.py, imported by
# models/position_embedding.py), pycocoevalcap (Chat-Scene's caption metrics). Versions: its requirements.txt.
tf_nodeps_pins() {
    case "$1" in
        4.39.3) echo "peft==0.9.0 protobuf==4.25.3 plyfile==1.0.1 trimesh==3.23.1 pycocoevalcap==1.2" ;;
        *) echo "" ;;
    esac
}

YOLO="$VENVS/yolo"
# ultralytics brings opencv-python, matplotlib, pillow, pyyaml; segment-anything (Apache-2.0, pure Python,
# needs torchvision) is the SAM mask source; the rest after it is for LISA's code (accelerate pinned to the
# release checked against transformers 4.31's loaders).
YOLO_PKGS=("torch==2.14.1" "torchvision==0.29.1" "ultralytics==8.4.190" "segment-anything==1.0" pytest numpy
           pycocotools scikit-image sentencepiece einops tqdm "accelerate==1.16.0")

FORCE=0
VERIFY_ALL=0
DO_TF=1
DO_YOLO=1
DO_BASE=1
SELECTED=()
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --verify) VERIFY_ALL=1 ;;
        --no-tf) DO_TF=0 ;;
        --no-yolo) DO_YOLO=0 ;;
        --no-base) DO_BASE=0 ;;
        -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
        -*) echo "unknown option: $arg" >&2; exit 2 ;;
        *) SELECTED+=("$arg") ;;
    esac
done
if [ ${#SELECTED[@]} -eq 0 ]; then SELECTED=("${TF_VERSIONS[@]}"); fi

log() { printf '[setup_test_envs] %s\n' "$*"; }
run() { printf '[setup_test_envs] + %s\n' "$*"; "$@"; }

stamp_ok() {  # stamp_ok DIR SPEC
    [ "$FORCE" -eq 0 ] && [ -f "$1/.setup-stamp" ] && [ "$(cat "$1/.setup-stamp")" = "$2" ]
}

# Pip args shared by every install: binary wheels only (no sdist builds in CI).
PIP_COMMON=(--disable-pip-version-check --progress-bar off)

# ---------------------------------------------------------------- base venv
setup_base() {
    local spec
    spec="python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') $TORCH_SPEC ${BASE_PKGS[*]} editable=$REPO_ROOT v1"
    if stamp_ok "$BASE" "$spec" && [ -x "$BASE_PY" ]; then
        log "base venv up to date ($BASE)"
        return
    fi
    log "building base venv at $BASE"
    rm -rf "$BASE"
    mkdir -p "$VENVS"
    run "$PYTHON" -m venv "$BASE"
    run "$BASE_PY" -m pip install "${PIP_COMMON[@]}" --upgrade pip
    # torch first and on its own, so that it is the local CPU wheel.
    run "$BASE_PY" -m pip install "${PIP_COMMON[@]}" "$TORCH_SPEC"
    run "$BASE_PY" -m pip install "${PIP_COMMON[@]}" "$TORCH_SPEC" "${BASE_PKGS[@]}"
    run "$BASE_PY" -m pip install "${PIP_COMMON[@]}" --no-build-isolation -e "$REPO_ROOT" \
        || run "$BASE_PY" -m pip install "${PIP_COMMON[@]}" -e "$REPO_ROOT"
    run "$BASE_PY" - <<'EOF'
import sys, torch, numpy, scipy, pytest, tqdm, PIL, pycocoevalcap, matplotlib, einops, shared
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("base ok: python", sys.version.split()[0], "torch", torch.__version__,
      "numpy", numpy.__version__, "scipy", scipy.__version__, "pytest", pytest.__version__)
EOF
    if "$BASE_PY" -c 'import transformers' 2>/dev/null; then
        echo "ERROR: transformers is importable from the base venv; it must only live in .venvs/tf-*" >&2
        exit 1
    fi
    echo "$spec" > "$BASE/.setup-stamp"
    log "base venv ready"
}

# ---------------------------------------------------------------- transformers targets
check_tf() {  # check_tf VERSION
    log "checking transformers $1"
    PYTHONPATH="$VENVS/tf-$1" run "$BASE_PY" "$REPO_ROOT/scripts/check_tf_env.py" "$1"
}

setup_tf() {  # setup_tf VERSION
    local ver="$1" dir="$VENVS/tf-$1" pins nodeps spec
    pins="$(tf_extra_pins "$ver")"
    nodeps="$(tf_nodeps_pins "$ver")"
    spec="transformers==$ver $pins base=$(cat "$BASE/.setup-stamp") v1"
    [ -n "$nodeps" ] && spec="$spec nodeps=$nodeps"
    if stamp_ok "$dir" "$spec"; then
        log "tf-$ver up to date ($dir)"
        [ "$VERIFY_ALL" -eq 1 ] && check_tf "$ver"
        return 0
    fi
    # built beside the old one and swapped in once checked: runs using the old env are not broken
    local stage="$dir.building"
    log "building tf-$ver at $stage (replaces $dir when checked)"
    rm -rf "$stage"
    # shellcheck disable=SC2086
    run "$BASE_PY" -m pip install "${PIP_COMMON[@]}" --only-binary :all: --target "$stage" \
        "transformers==$ver" $pins
    if [ -n "$nodeps" ]; then
        # shellcheck disable=SC2086
        run "$BASE_PY" -m pip install "${PIP_COMMON[@]}" --only-binary :all: --no-deps --target "$stage" $nodeps
    fi
    # numpy/torch must come from the base venv: drop any copy the resolver pulled in.
    local removed=0 p
    for p in "$stage"/numpy "$stage"/numpy-*.dist-info "$stage"/numpy.libs \
             "$stage"/torch "$stage"/torch-*.dist-info "$stage"/torchgen "$stage"/functorch \
             "$stage"/bin/f2py "$stage"/bin/numpy-config; do
        if [ -e "$p" ]; then rm -rf "$p"; removed=1; fi
    done
    [ "$removed" -eq 1 ] && log "removed numpy/torch copies from $stage (base venv provides them)"
    if compgen -G "$stage/numpy*" >/dev/null || compgen -G "$stage/torch*" >/dev/null; then
        echo "ERROR: numpy/torch still present in $stage" >&2
        exit 1
    fi
    log "checking transformers $ver"
    PYTHONPATH="$stage" run "$BASE_PY" "$REPO_ROOT/scripts/check_tf_env.py" "$ver"
    echo "$spec" > "$stage/.setup-stamp"
    rm -rf "$dir.old"
    if [ -e "$dir" ]; then mv "$dir" "$dir.old"; fi
    mv "$stage" "$dir"
    rm -rf "$dir.old"
    log "tf-$ver ready"
}

# ---------------------------------------------------------------- YOLO venv
setup_yolo() {
    local spec py="$YOLO/bin/python"
    spec="python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ${YOLO_PKGS[*]} editable=$REPO_ROOT v1"
    if stamp_ok "$YOLO" "$spec" && [ -x "$py" ]; then
        log "yolo venv up to date ($YOLO)"
        return
    fi
    log "building yolo venv at $YOLO"
    rm -rf "$YOLO"
    run "$PYTHON" -m venv "$YOLO"
    run "$py" -m pip install "${PIP_COMMON[@]}" "${YOLO_PKGS[@]}"
    run "$py" -m pip install "${PIP_COMMON[@]}" --no-build-isolation --no-deps -e "$REPO_ROOT"
    YOLO_OFFLINE=1 run "$py" -c 'import torchvision, ultralytics, segment_anything, shared, cv2, pycocotools.mask, skimage.io, sentencepiece, einops, tqdm, accelerate; print("yolo ok: ultralytics", ultralytics.__version__)'
    echo "$spec" > "$YOLO/.setup-stamp"
    log "yolo venv ready"
}

if [ "$DO_BASE" -eq 1 ]; then
    setup_base
elif [ ! -x "$BASE_PY" ] || [ ! -f "$BASE/.setup-stamp" ]; then
    echo "ERROR: --no-base, but $BASE is not built" >&2
    exit 1
else
    log "base venv used as it is (--no-base)"
fi
if [ "$DO_YOLO" -eq 1 ]; then setup_yolo; fi
if [ "$DO_TF" -eq 1 ]; then
    for v in "${SELECTED[@]}"; do
        setup_tf "$v"
    done
fi
if [ "$DO_TF" -eq 1 ]; then log "done: base=$BASE tf=[${SELECTED[*]}]"; else log "done: base=$BASE"; fi
