"""A stage added as docs/architecture.md, "Add a stage", says, for tests/test_stages.py: SFT with PaLM's z-loss, a
penalty of Z_COEF * log(Z)^2 on every supervised position that keeps the softmax's normalizer Z near 1.

This module and the row `STAGE` are all it takes; the trainer's processes import it as `tests.training.toy_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model_training.config import TrainConfig
from model_training.data.collate import to_device
from model_training.data.formatting import IGNORE_INDEX
from model_training.stages import Stage
from model_training.training.batches import BatchSpec
from model_training.training.loss import supervised_token_sums

Z_COEF = 1e-4


@dataclass(frozen=True)
class ZLossSpec(BatchSpec):
    """SFT's batches; the loss is the cross-entropy plus the z-loss, and the z-loss is a metric of its own."""

    metrics = ("loss", "accuracy", "z_loss")

    def sums(self, engine: Any, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        logits = engine(**inputs).logits
        loss_sum, correct = supervised_token_sums(logits, labels)
        supervised = to_device(labels[:, 1:] != IGNORE_INDEX, logits.device)
        z_sum = (torch.logsumexp(logits[:, :-1].float(), dim=-1).square() * supervised).sum()
        return torch.stack([loss_sum + Z_COEF * z_sum, correct.to(loss_sum.dtype), z_sum])


def z_loss_spec(cfg: TrainConfig, tokenizer: Any, engine: Any) -> ZLossSpec:
    return ZLossSpec(cfg.packing, tokenizer.pad_token_id, chunked=False)


STAGE = Stage(
    "zsft", "trainer_sft.py", "Supervised fine-tuning with z-loss",
    recipe="model_training.training.trainer:train",
    prepare="model_training.data.prepare:prepare_data",
    stats="model_training.cli:sample_stats",
    spec="tests.training.toy_stage:z_loss_spec",
)  # fmt: skip
