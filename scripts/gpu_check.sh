#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, run the CUDA tests and the training and
# service benchmarks on the GPU, print the numbers, exit non-zero on any failure.
# Bounded: every step has a timeout and the whole run stays under GPU_CHECK_BUDGET_S
# (default 450 s, i.e. under 8 minutes).
#
#   scripts/gpu_check.sh                     # from anywhere; works in the repository root
#   scripts/gpu_check.sh --prepare-wheels    # on a machine WITH PyPI access: download the
#                                            # service's pure-Python dependencies into .whl/
#                                            # for a GPU box that has torch but no FastAPI
#
# Environment:
#   PYTHON              interpreter with a CUDA torch (default: python3)
#   GPU_CHECK_BUDGET_S  total seconds (default 450)
#   GPU_CHECK_OUT       where logs and JSON results go (default: $OUT if set, else /tmp/gpu_check)
#   WHEELS_DIR          wheels to install first, if the directory exists (default: .whl)
#   GPU_CHECK_SKIP      comma-separated steps to leave out (e.g. meta-step,train-smoke)
#
# Steps:
#   1. the GPU and torch's view of it (fails at once without CUDA)
#   2. pytest -m cuda on every test file that has CUDA tests (tests/test_cuda.py ...)
#   3. a short `metalearn train` on the GPU (the trainer's device path, iterations/s)
#   4. bench/meta_step.py --device cuda       (meta-gradient strategies on the GPU)
#   5. bench/engine_graphs.py                 (the engine with and without CUDA graphs, in process)
#   6. bench/service_bench.py --device cuda   (throughput/latency, concurrency up to 64; the service
#                                              with CUDA graphs, without them, and the baseline)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS_DIR=${WHEELS_DIR:-.whl}
PY_TAG=${PY_TAG:-3.12}

if [[ "${1:-}" == "--prepare-wheels" ]]; then
    # Pure-Python (or manylinux) wheels of what the service needs beyond torch/numpy.
    mkdir -p "$WHEELS_DIR"
    grep -qx "/$WHEELS_DIR/" .git/info/exclude 2>/dev/null || echo "/$WHEELS_DIR/" >> .git/info/exclude
    exec "$PY" -m pip download --only-binary=:all: --python-version "$PY_TAG" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS_DIR" fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv \
        annotated-types typing-inspection typing-extensions redis python-multipart pybase64 \
        prometheus-client httpx
fi

OUTDIR=${GPU_CHECK_OUT:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$SECONDS
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

STRAY="uvicorn service.app|service_bench.py --baseline-server|metalearn serve"
declare -a SUMMARY=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# step NAME MAX_SECONDS CMD...: run CMD with a timeout (capped by what is left of the budget)
step() {
    local name=$1 max=$2
    shift 2
    if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
        say "== $name: skipped (GPU_CHECK_SKIP)"
        return 0
    fi
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((max < left ? max : left))
    if ((limit < 10)); then
        say "== $name: SKIPPED, time budget spent"
        SUMMARY+=("$(printf '%-14s %-8s %5s s' "$name" FAIL "-")  (no time left)")
        FAILED=$((FAILED + 1))
        return 1
    fi
    say ""
    say "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc before
    before=" $(pgrep -d ' ' -f "$STRAY" || true) "
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    # servers a killed benchmark left behind (only those this step started)
    local pid
    for pid in $(pgrep -f "$STRAY" || true); do
        [[ "$before" == *" $pid "* ]] || kill -9 "$pid" 2>/dev/null || true
    done
    local took=$((SECONDS - t0)) status=PASS
    if ((rc != 0)); then
        status=FAIL
        FAILED=$((FAILED + 1))
        ((rc == 124)) && status=TIMEOUT
    fi
    SUMMARY+=("$(printf '%-14s %-8s %5s s' "$name" "$status" "$took")  (exit $rc)")
    return "$rc"
}

fail_step() {
    say "== $1: FAIL: $2"
    SUMMARY+=("$(printf '%-14s %-8s %5s s' "$1" FAIL "-")  ($2)")
    FAILED=$((FAILED + 1))
}

supports() { # supports SCRIPT FLAG: the script's --help mentions FLAG
    timeout 60 "$PY" "$1" --help 2>/dev/null | grep -q -- "$2"
}

# 0. wheels carried for a bare GPU image (see --prepare-wheels)
shopt -s nullglob
WHEELS=("$WHEELS_DIR"/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]} > 0)); then
    say "installing ${#WHEELS[@]} wheel(s) from $WHEELS_DIR into /tmp/gpu_check_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site "${WHEELS[@]}" 2>&1 | tail -3 | tee -a "$LOG"
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

# 1. the GPU
say "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"; then
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} CUDA {torch.version.cuda} on {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
EOF
    say "no usable CUDA GPU: nothing checked"
    exit 2
fi

# 2. the CUDA tests (only files that have them: the others may need packages a GPU image lacks)
mapfile -t CUDA_TESTS < <(grep -l "mark.cuda" tests/test_*.py 2>/dev/null)
if ((${#CUDA_TESTS[@]} == 0)); then
    fail_step cuda-tests "no test file has tests marked cuda"
else
    step cuda-tests 180 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml="$OUTDIR/cuda-tests.xml" "${CUDA_TESTS[@]}"
fi

# 3. the trainer on the GPU: a short Omniglot MAML run
TRAIN_OUT=$(mktemp -d /tmp/gpu_check_train.XXXXXX)
step train-smoke 90 "$PY" -c "import sys; from metalearn.cli import main; sys.exit(main(sys.argv[1:]))" \
    train --task omniglot --algorithm maml --ways 5 --shots 1 --queries 15 --meta-batch 32 --inner-steps 1 \
    --inner-lr 0.4 --iterations 30 --val-interval 30 --val-episodes 20 --device cuda --no-progress \
    --out "$TRAIN_OUT/omniglot-5way"

# 4. the meta-training benchmark on the GPU
if [[ ! -f bench/meta_step.py ]]; then
    fail_step meta-step "bench/meta_step.py is missing"
elif ! supports bench/meta_step.py --device; then
    fail_step meta-step "bench/meta_step.py has no --device flag: it cannot run on the GPU"
else
    step meta-step 150 "$PY" bench/meta_step.py --device cuda --workloads W1,W2,W3 --orders second --reps 1 --strategies auto,chunked:8
fi

# 5. the engine with and without CUDA graphs, in process
step engine-graphs 120 "$PY" bench/engine_graphs.py --rows 1,8,64 --reps 9

# 6. the service benchmark on the GPU (adaptations/s up to concurrency 64)
if [[ ! -f bench/service_bench.py ]]; then
    fail_step service-bench "bench/service_bench.py is missing"
else
    step service-bench 240 "$PY" bench/service_bench.py --device cuda --models maml,anil --modes stateless,session \
        --concurrency 1,8,64 --duration 2 --warmup 1 --reps 1 --threads 4 --max-batch 64 \
        --servers service,service-eager,baseline --json "$OUTDIR/service_bench.json"
fi
rm -rf "$TRAIN_OUT"

say ""
say "== summary ($((SECONDS - START)) s of ${BUDGET} s; log: $LOG)"
for line in "${SUMMARY[@]}"; do say "$line"; done
if ((FAILED > 0)); then
    say "GPU check FAILED ($FAILED step(s))"
    exit 1
fi
say "GPU check passed"
