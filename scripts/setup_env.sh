# Sourced by quickstart.sh, test.sh and test_versions.sh: a virtual environment with the project installed at
# the exact versions of the lock, scripts/constraints.txt (README, "Dependencies").
#   VENV  the environment's folder (default .venv)
#   LOCK  a pip constraints file (default the lock); test_versions.sh passes other resolutions of setup.cfg
# torch comes first and from the lock: its CPU build 2.13.0 lies on disk on these machines, so it installs in
# seconds (a bare `torch` would pull a CUDA build of several GB). The lock also pins pip, and setuptools for
# the builds of this package and of DeepSpeed (a source package): --build-constraint reaches build isolation.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=${LOCK:-scripts/constraints.txt}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
pip_pin=$(grep -i '^pip==' "$LOCK" || true)
python -m pip install -q --upgrade "${pip_pin:-pip}"
python -m pip install -q -c "$LOCK" --build-constraint "$LOCK" torch
python -m pip install -q -c "$LOCK" --build-constraint "$LOCK" -e ".[test]"
# No GPU: DeepSpeed runs its ranks on the CPU.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
