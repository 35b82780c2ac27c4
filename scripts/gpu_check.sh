#!/usr/bin/env bash
# The whole GPU check in one call on the GPU machine (no network there): install the wheels carried in .wheels/,
# run the GPU tests, run the throughput benchmark (bench/throughput.py), and leave the results in $OUT.
#
#   bash scripts/gpu_check.sh --download   # here, with PyPI: fetch the wheels into .wheels/ (git-ignored)
#   bash scripts/gpu_check.sh              # there: device run with carry [".wheels"], timeout_s 600
#
# The GPU machine has Python 3.12 with its own torch, transformers, peft and accelerate: every wheel installs
# with --no-deps, so none of those is replaced. What it lacks is carried (see PACKAGES); wandb (imported only
# when log_wandb is on) and liger-kernel (not used) are not.
# It prints each phase as it starts and every bench row's startup phases as they happen, so a call that runs out
# of time shows where the time went; every figure is left under $OUT.
# Knobs: ROWS (bench rows, default all of bench/throughput.py's), SKIP_TESTS=1, DEADLINE (seconds the whole call
# may take, default 470, 8 minutes with the machine's start; rows that do not fit are reported as skipped, run
# them in a second call: ROWS=rm,dpo,ppo,7b-zero3-offload,7b-qlora SKIP_TESTS=1 bash scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels
# What the GPU machine lacks, at the versions of the lock (scripts/constraints.txt) that CI tests with.
PACKAGES=(
    hjson pydantic pydantic-core annotated-types typing-inspection  # deepspeed
    omegaconf                                                     # config merging
    datasets dill multiprocess                                    # the non-OASST data loaders
    bitsandbytes                                                  # QLoRA's 4-bit base
)

pinned() {  # name==version from the lock, for each name (pip writes pydantic_core where we write pydantic-core)
    local name line
    for name in "$@"; do
        line=$(grep -i -E "^${name//-/[-_]}==" scripts/constraints.txt) || {
            echo "$name is not pinned in scripts/constraints.txt" >&2
            return 1
        }
        echo "$line"
    done
}

download() {
    local python=python3 wanted deepspeed
    wanted=$(pinned "${PACKAGES[@]}")
    deepspeed=$(pinned deepspeed)
    [ -x .venv/bin/python ] && python=.venv/bin/python
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" $wanted
    # DeepSpeed publishes only a source package: build a pure-Python wheel (its CUDA ops JIT-build there).
    "$python" -m pip wheel -q --no-deps "$deepspeed" -w "$WHEELS"
    ls -l "$WHEELS"
    du -ch "$WHEELS"/*.whl | tail -1
}

if [ "${1:-}" = "--download" ]; then
    download
    exit 0
fi

START=$SECONDS
DEADLINE=${DEADLINE:-470}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
[ -d "$WHEELS" ] || { echo "no $WHEELS/: run 'bash scripts/gpu_check.sh --download' here and carry it"; exit 2; }
phase() { echo "== gpu check $((SECONDS - START)) s: $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

phase "installing the carried wheels"

python3 -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
python3 -c "import deepspeed, omegaconf, datasets, bitsandbytes, torch, transformers
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| deepspeed', deepspeed.__version__, '| bitsandbytes', bitsandbytes.__version__)"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
echo "installed in $((SECONDS - START)) s"

status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    phase "pytest -m gpu"
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" \
        || status=1
fi

phase "bench/throughput.py"
WORKDIR=/tmp/throughput-bench
rows=()
[ -n "${ROWS:-}" ] && rows=(--rows "$ROWS")
python3 bench/throughput.py --out "$OUT/throughput.md" --workdir "$WORKDIR" "${rows[@]}" \
    --budget $((DEADLINE - (SECONDS - START) - 15)) || status=1
# The end of every row's log, in one file (the device returns at most 8 files).
for log in "$WORKDIR"/*.log; do
    [ -e "$log" ] && { echo "===== $log"; tail -n 40 "$log"; }
done >"$OUT/row_logs.txt"
echo "gpu check finished in $((SECONDS - START)) s with status $status"
exit $status
