#!/usr/bin/env bash
# One command for a GPU machine: the CUDA subset of the tests, the model-overhead, serving,
# batched-projection and pool-call benchmarks in bfloat16, and the paper-scale check (8 tenants at Mixtral-8x7B's shape on one GPU).
#
#   scripts/gpu_check.sh OUT                        # on the GPU machine (device tool: run it with $OUT)
#   scripts/gpu_check.sh OUT --device cpu --quick   # the dry run the test suite makes: tiny shapes, no wheels
#
# Such a machine has its own Python with torch and an older transformers, and no network: the
# packages multimoe needs travel as wheels in .whl/ (kept out of git; docs/benchmarks.md gives the
# line that fetches them) and are installed first. Every figure lands in OUT (at most 8 files, as
# the device tool brings back): install.log, tests.log, model_overhead.txt, serving.txt,
# kernels.txt, paper_scale.txt, paper_scale.json, summary.md (which starts with the versions).
# Designed to finish in under 5 minutes on an H200.
set -uo pipefail

usage() { echo "usage: $0 OUT [--device cuda|cpu] [--quick]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DEVICE=cuda; QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) usage ;;
    esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS FILE COMMAND...: run one part, its output into FILE, note a failure
    local name=$1 seconds=$2 file=$3; shift 3
    echo "== $name" | tee -a "$OUT/summary.md"
    if ! timeout "$seconds" "$@" >"$OUT/$file" 2>&1; then
        failed+=("$name")
        echo "FAILED (see $file)" | tee -a "$OUT/summary.md"
    fi
    tail -n 20 "$OUT/$file" >>"$OUT/summary.md"
}

: >"$OUT/summary.md"
if [ "$QUICK" = 0 ] && [ -d .whl ]; then
    # The wheels first, then multimoe itself, all offline; what the machine already has stays.
    step "install wheels from .whl" 120 install.log \
        bash -c 'python -m pip install --no-index --find-links .whl --no-deps .whl/*.whl && python -m pip install --no-index --no-deps --no-build-isolation -e .'
fi
python - >>"$OUT/summary.md" 2>&1 <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

if [ "$QUICK" = 1 ]; then
    OVERHEAD=(--layers 2 --hidden 64 --intermediate 128 --new-tokens 8 --repeats 1 --switches 200 --latency-sizes 2x64 4x64)
    SERVING=(--ratio-only --layers 2 --hidden 64 --intermediate 128 --ratio-shapes)
    SCALE=(--quick --steps 4)
    PROJECTIONS=(--widths 64 --tenants 2 --rows 1,2 --repeats 3)
    POOL=(--shapes 32x64 --pool-sizes 8,20 --repeats 2)
else
    OVERHEAD=()
    SERVING=(--ratio-only)
    SCALE=()
    PROJECTIONS=()
    POOL=()
fi
step "tests marked device (MULTIMOE_TEST_DEVICE=$DEVICE)" 150 tests.log \
    env MULTIMOE_TEST_DEVICE="$DEVICE" python -m pytest -p no:cacheprovider -m device tests
step "model overhead ($DEVICE, bfloat16)" 120 model_overhead.txt \
    python benchmarks/model_overhead.py --device "$DEVICE" --dtype bfloat16 "${OVERHEAD[@]}"
step "serving: mixed-tenant batch ($DEVICE, bfloat16)" 120 serving.txt \
    python -m multimoe.serving.bench --device "$DEVICE" --dtype bfloat16 "${SERVING[@]}"
# The batched projections and the pool calls share one file: the device tool brings back 8.
step "mixed-batch kernels: batched projections, pool calls ($DEVICE, bfloat16)" 90 kernels.txt bash -c \
    "python benchmarks/batched_projections.py --device $DEVICE --dtype bfloat16 ${PROJECTIONS[*]} &&
     python benchmarks/pool_calls.py --device $DEVICE --dtype bfloat16 ${POOL[*]}"
step "paper-scale check ($DEVICE)" 240 paper_scale.txt \
    python benchmarks/paper_scale.py --device "$DEVICE" --out "$OUT" "${SCALE[@]}"

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" | tee -a "$OUT/summary.md"
    exit 1
fi
echo "all parts passed" | tee -a "$OUT/summary.md"
