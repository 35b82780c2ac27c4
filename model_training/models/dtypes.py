"""The config's dtype names as torch dtypes (`dtype`, `quantization.compute_dtype`)."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
