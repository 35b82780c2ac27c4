"""A console that shows progress, phases and real problems: the few library messages a user can do nothing
about are dropped, each by its exact text, so that a new warning of the same library still shows. Also how a
message says a count of ranks or a size (`ranks`, `size_text`)."""

from __future__ import annotations

import logging
import warnings

# bitsandbytes looks for an optional fused CPU kernel when it is imported on a CPU with AVX512-BF16, and logs a
# warning when the `kernels` package is absent. We never call that kernel (models/lora.py turns it off: it
# computes in bf16 whatever the run's dtype), and runs with no 4-bit layer import bitsandbytes through peft.
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward"

# DeepSpeed's ZeRO gathers call this torch function on every rank at every step; the fix is DeepSpeed's to make.
_ALL_GATHER_DEPRECATION = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
# peft reads this transformers property whenever it wraps a model (every LoRA run); the fix is peft's to make.
_PEFT_CHECKPOINTING_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


def ranks(count: int) -> str:
    """"1 rank", "2 ranks": a count of ranks as a message says it."""
    return f"{count} rank" if count == 1 else f"{count} ranks"


def size_text(size: int) -> str:
    """`size` bytes as a line says them: exactly, and in GB."""
    return f"{size} bytes ({size / 1e9:.2f} GB)"


def _not_the_bnb_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_KERNEL_MESSAGE)


def quiet_library_noise() -> None:
    """Drop the known messages above; call it before bitsandbytes, peft or DeepSpeed is imported."""
    logging.getLogger(_BNB_LOGGER).addFilter(_not_the_bnb_kernel_warning)
    for message in (_ALL_GATHER_DEPRECATION, _PEFT_CHECKPOINTING_DEPRECATION):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
