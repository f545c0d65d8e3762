#!/usr/bin/env bash
# The accelerator check (issue 9): one script, under 8 minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; uses python3 (or $PYTHON)
#
# Needs a Python with jax (CUDA plugin), flax and pytest; nothing is installed and no
# network is used. altair/vl-convert are not needed; step 4 also reads pandas,
# safetensors and tokenizers, which the GPU image has.
# Steps, each under its own time limit; a failing step is reported and the next runs:
#   0. environment: python, jax, devices;
#   1. what attention(impl="auto") picks here (Pallas or the blockwise fallback) and why;
#   2. tests/test_pallas.py, tests/test_kernels.py (and test_kernels_gqa.py) with the
#      Pallas kernels compiled for the GPU (Triton; GQA, windows and soft caps included,
#      plus model-sized cases);
#   3. benchmarks/kernels.py: forward TFLOP/s, bf16, head_dim 64/128, causal and not,
#      T = 1k, 4k, 16k, GQA and sliding-window rows; attnjax Pallas with and without
#      statistics beside jax.nn.dot_product_attention (cudnn, xla);
#   4. benchmarks/gpu_model_check.py: a 2-layer SmolLM-shaped decoder at 4k tokens with
#      Capture(stats=True, qkv=True) through "auto" (Pallas) and "blockwise", statistics
#      and every head score compared (induction from q, k and lse), and generate after a
#      2040-token prompt (the prefill on the model's kernel).
# Worst case (every step at its limit) about 9.2 minutes.
# Logs (full pytest tracebacks as JUnit XML, every step's output) go to
# $OUT/gpu_check/ when $OUT is set, else /tmp/gpu_check/.
# Limits (seconds) can be changed with GPU_CHECK_AUTO_S, GPU_CHECK_TESTS_S, GPU_CHECK_BENCH_S,
# GPU_CHECK_MODEL_S.

set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
LOGS="${OUT:-/tmp}/gpu_check"
mkdir -p "$LOGS"
AUTO_S="${GPU_CHECK_AUTO_S:-100}"
TESTS_S="${GPU_CHECK_TESTS_S:-170}"
BENCH_S="${GPU_CHECK_BENCH_S:-160}"
MODEL_S="${GPU_CHECK_MODEL_S:-90}"
SCRIPT_START=$(date +%s)
SUMMARY=()

# run_step NAME LIMIT_S CMD...: run CMD under a time limit, its whole output to a log
# and to stdout (less the lines matching $HIDE), and record how it ended. Never stops
# the script.
HIDE='^$'
run_step() {
    local name="$1" limit="$2"
    shift 2
    local log="$LOGS/${name// /_}.log" start rc
    echo
    echo "=== ${name} (limit ${limit} s, log ${log})"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log" | grep --line-buffered -v -E "$HIDE"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start ))
    case "$rc" in
        0) SUMMARY+=("${name}: ok (${took} s)") ;;
        124|137) SUMMARY+=("${name}: TIMED OUT after ${took} s (limit ${limit} s; partial output above)") ;;
        *) SUMMARY+=("${name}: FAILED, exit ${rc} (${took} s)") ;;
    esac
    echo "=== ${name}: exit ${rc} after ${took} s"
}

run_step "environment" 30 "$PY" - <<'PYTHON'
import sys
import jax
print("python", sys.version.split()[0], "| jax", jax.__version__, "| backend", jax.default_backend())
print("devices:", ", ".join(f"{d.platform}:{getattr(d, 'device_kind', d)}" for d in jax.devices()))
import flax, pytest
print("flax", flax.__version__, "| pytest", pytest.__version__)
import attnjax.kernels  # noqa: F401 - no altair needed
print("attnjax.kernels imports")
if jax.default_backend() != "gpu":
    sys.exit("no GPU here: the Pallas kernels would run in the interpreter (this check is for a GPU machine)")
PYTHON
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# float32 first: attnjax.load gives float32 models by default.
run_step "auto impl" "$AUTO_S" "$PY" benchmarks/kernels.py --auto --dtypes float32 bfloat16 --head-dims 64 128

TEST_FILES=()
for file in tests/test_pallas.py tests/test_kernels.py tests/test_kernels_gqa.py; do
    [ -f "$file" ] && TEST_FILES+=("$file")
done
# Deprecation warnings (the Triton backend's, on JAX 0.11) are reported once by the step
# above; here they would repeat for every test. (The fallback test, which pretends that
# a GPU cannot compile the kernels, skips itself off the CPU.)
# One line per test in the log (so a timeout still shows which ran); stdout hides the
# passing ones. Full tracebacks: $LOGS/kernel_tests.xml (written when pytest finishes).
HIDE=' PASSED'
run_step "kernel tests" "$TESTS_S" "$PY" -m pytest "${TEST_FILES[@]}" \
    -v -p no:cacheprovider -W ignore::DeprecationWarning --tb=line -rfEs --durations=10 \
    --junitxml="$LOGS/kernel_tests.xml"
HIDE='^$'

# Three lengths across 1k-16k keep the table inside the limit (each row compiles five
# kernels); rows print as they finish, and --budget-s stops starting new ones in time.
run_step "forward throughput" "$BENCH_S" "$PY" benchmarks/kernels.py \
    --lengths 1024 4096 16384 --iters 5 --repeats 3 --no-jax-mha --budget-s $(( BENCH_S - 40 ))

# A whole model: Pallas inside the decoder, the map-only scores from q and k, generation.
run_step "model check" "$MODEL_S" "$PY" benchmarks/gpu_model_check.py --length 4096 --prompt 2040 --layers 2

echo
echo "=== summary ($(( $(date +%s) - SCRIPT_START )) s in all; logs in ${LOGS})"
for line in "${SUMMARY[@]}"; do
    echo "  ${line}"
done
