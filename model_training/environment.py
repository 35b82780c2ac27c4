"""The environment a training process needs, set by the process itself where the user has not: what
scripts/setup_env.sh exports, so that a command typed in any shell (with the virtual environment active) runs as
the quick start did. Each default is safe: it only applies where the alternative cannot work or slows the run down.

- TOKENIZERS_PARALLELISM=false: the tokenizers' threads would be forked with the data workers (and warn).
- WANDB_MODE=offline when there is no wandb login (no WANDB_API_KEY, no api.wandb.ai in ~/.netrc): online mode
  would wait for a login that cannot come; `wandb sync` uploads an offline run later.
- DS_ACCELERATOR=cpu when torch sees no CUDA device: DeepSpeed runs its ranks on the CPU.
- TORCH_EXTENSIONS_DIR inside this environment (sys.prefix): the ops DeepSpeed compiles (the CPU communication op)
  are kept per environment; in the shared ~/.cache/torch_extensions another environment's build makes each one
  rebuild (21-61 s at every start).

The hub is left online: a model named on the hub must keep loading for users with a network.
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _cuda_available() -> bool:
    import torch  # here: --show_config and the refusals of a bad command line answer without torch

    return torch.cuda.is_available()


def apply_training_defaults() -> list[str]:
    """Set each default above that the user has not set; call before DeepSpeed is imported. Returns "NAME=value" of
    each one set."""
    chosen = {"TOKENIZERS_PARALLELISM": "false"}
    if not _wandb_logged_in():
        chosen["WANDB_MODE"] = "offline"
    if not _cuda_available():
        chosen["DS_ACCELERATOR"] = "cpu"
    if os.access(sys.prefix, os.W_OK):
        chosen["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    applied = [f"{name}={value}" for name, value in chosen.items() if name not in os.environ]
    for name, value in chosen.items():
        os.environ.setdefault(name, value)
    return applied
