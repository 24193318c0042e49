#!/usr/bin/env bash
# The test command: builds the test environments if needed, then runs the suite once per
# transformers version the hosts pin (4.31 LISA, 4.37.2 LLaVA-3D, 4.39.3 Chat-Scene, 4.40.2
# LLaVA-NeXT) and the latest 5.x (native path), then the real-host tests (tests/hosts: the patched
# upstream code from the submodule or ../shared/upstream) on their pins (LISA, Chat-Scene), and the
# real-YOLO Seg-First test in .venvs/yolo. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_test_envs.sh || { echo "test environments could not be set up" >&2; exit 1; }

VERSIONS=(4.31.0 4.37.2 4.39.3 4.40.2 5.23.0)
LATEST=${VERSIONS[-1]}
failed=0
passed_total=0
failed_total=0
# run_suite LABEL COMMAND...: run one pytest invocation, print it, add its counts to the totals
run_suite() {
    local label="$1" log rc p f
    shift
    echo "=== $label"
    log=$(mktemp)
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 5 ]; then rc=0; echo "(no tests collected for $label)"; fi
    [ "$rc" = 0 ] || failed=1
    p=$(grep -Eo '[0-9]+ passed' "$log" | tail -1 | grep -Eo '[0-9]+' || true)
    f=$(grep -Eo '[0-9]+ (failed|errors?)' "$log" | tail -2 | awk '{s += $1} END {print s + 0}')
    passed_total=$((passed_total + ${p:-0}))
    failed_total=$((failed_total + ${f:-0}))
    rm -f "$log"
}

for v in "${VERSIONS[@]}"; do
    # version-independent tests (accounting, tooling, metrics) run once, with the latest transformers;
    # the engine runs on every pin, and LISA's host code also on its own pin (4.31), the patched
    # LLaVA-NeXT fork on its own (4.40.2; HOST_TESTS_REQUIRED=1: a broken env fails, never skips)
    required=0
    if [ "$v" = "$LATEST" ]; then
        targets=(tests)
    elif [ "$v" = 4.31.0 ]; then
        targets=(tests/engine tests/test_lisa_host.py tests/test_prellm_baselines.py tests/test_fast3d_targets.py
                 tests/test_fast3d_gap.py)
    elif [ "$v" = 4.39.3 ]; then
        # Chat-Scene's pin: Fast3D's GAP targets and the GAP network's RoBERTa
        targets=(tests/engine tests/test_fast3d_targets.py tests/test_fast3d_gap.py)
    elif [ "$v" = 4.37.2 ]; then
        # LLaVA-3D's pin: AdaToken-3D calibration through the engine entry on the stock LlamaModel
        targets=(tests/engine tests/test_adatoken_calibrate.py)
    elif [ "$v" = 4.40.2 ]; then
        targets=(tests/engine tests/hosts/test_llava_next_fork.py)
        required=1
    else
        targets=(tests/engine)
    fi
    run_suite "transformers $v: ${targets[*]}" \
        env PYTHONPATH=".venvs/tf-$v" HOST_TESTS_REQUIRED=$required \
        .venvs/base/bin/python -m pytest "${targets[@]}" -q -p no:cacheprovider "$@"
done
# the real patched LISA needs torchvision (its vendored SAM), which only .venvs/yolo can load
run_suite "transformers 4.31.0 + .venvs/yolo (torchvision): real patched LISA through eval/LISA/eval_seg.py" \
    env PYTHONPATH=".venvs/tf-4.31.0" HOST_TESTS_REQUIRED=1 \
    .venvs/yolo/bin/python -m pytest tests/hosts/test_lisa_real.py -q -p no:cacheprovider "$@"
# accelerate (GAP training) lives in .venvs/yolo only; transformers from the latest target dir
run_suite ".venvs/yolo (accelerate) + transformers $LATEST: Fast3D GAP training, resume, predict" \
    env PYTHONPATH=".venvs/tf-$LATEST" HOST_TESTS_REQUIRED=1 \
    .venvs/yolo/bin/python -m pytest tests/test_fast3d_train.py -q -p no:cacheprovider "$@"
# the real patched Chat-Scene: its dataset package imports torchvision; peft, protobuf, plyfile, trimesh and
# pycocoevalcap come with the tf-4.39.3 target (scripts/setup_test_envs.sh, tf_nodeps_pins)
run_suite "transformers 4.39.3 + .venvs/yolo (torchvision): real patched Chat-Scene through eval/Chat-Scene/eval_chatscene.py" \
    env PYTHONPATH=".venvs/tf-4.39.3" HOST_TESTS_REQUIRED=1 \
    .venvs/yolo/bin/python -m pytest tests/hosts/test_chat_scene_real.py -q -p no:cacheprovider "$@"
# the real patched LLaVA-3D (4.37.2; its processor imports cv2): fork tests and eval/LLaVA-3D/eval_llava3d.py end to
# end. LLaVA-3D has no license file, so no snapshot is shared and CI has no source: HOST_TESTS_REQUIRED=0, the tests
# skip with that reason unless the submodule is checked out
run_suite "transformers 4.37.2 + .venvs/yolo (cv2): real patched LLaVA-3D + its eval driver + calibration (skip without the LLaVA-3D submodule)" \
    env PYTHONPATH=".venvs/tf-4.37.2" HOST_TESTS_REQUIRED=0 \
    .venvs/yolo/bin/python -m pytest tests/hosts/test_llava_3d_fork.py tests/hosts/test_llava_3d_eval.py tests/hosts/test_llava_3d_calibrate.py -q -p no:cacheprovider "$@"
run_suite ".venvs/yolo: real (untrained) YOLO11n-seg through Seg-First" \
    env YOLO_OFFLINE=1 .venvs/yolo/bin/python -m pytest tests/test_segfirst.py -k yolo -q -p no:cacheprovider "$@"
run_suite ".venvs/yolo (segment-anything): SAM mask source, standalone and shared-encoder, on tiny random SAMs" \
    env HOST_TESTS_REQUIRED=1 .venvs/yolo/bin/python -m pytest tests/test_segfirst_sam.py -q -p no:cacheprovider "$@"
echo "all environments: ${passed_total} passed, ${failed_total} failed"
exit $failed
