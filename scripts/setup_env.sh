# Sourced by quickstart.sh and test.sh: a virtual environment in .venv with the project installed.
# torch 2.13.0 first: it is the CPU build that pip finds on these machines; setup.cfg's range then installs
# nothing more (a bare `torch` requirement would pull a CUDA build of several GB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
# No GPU: DeepSpeed runs its ranks on the CPU.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
