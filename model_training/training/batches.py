"""What the loop reads: the run's samples and the plan that orders them, each optimizer step's share of them cut
to length, and batches of samples on the device, alike for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model_training.config import ConfigError, TrainConfig, zero_stage
from model_training.data.collate import collate, to_device
from model_training.data.formatting import FormattedSample
from model_training.data.registry import TokenizedSplit
from model_training.data.windows import LengthRule
from model_training.models.lora import is_lora_model
from model_training.training.sampler import StepPlan

PAD_TO_MULTIPLE_OF = 8


@dataclass(frozen=True)
class RunData:
    """The training samples in one pool, the plan that orders them, how a sample is cut to the length limit, and
    the validation sets with their own rule."""

    samples: list[FormattedSample]
    plan: StepPlan
    train_rule: LengthRule
    val: list[TokenizedSplit]
    val_rule: LengthRule


@dataclass(frozen=True)
class MicroBatch:
    samples: list[FormattedSample]
    counted: bool
    """False for a stand-in: a short last step can leave a rank an empty micro-batch, which still runs (ZeRO's
    forward and backward are collective) on one sample whose loss must weigh nothing."""


@dataclass(frozen=True)
class StepSamples:
    """One optimizer step: this rank's micro-batches, and the counts of the whole step on all ranks."""

    micro_batches: list[MicroBatch]
    supervised: int
    """Supervised tokens of the step on all ranks, at least 1: the loss's divisor."""
    tokens: int
    """Tokens of the step on all ranks."""


class StepReader:
    """The samples of each optimizer step, in the plan's order, cut by the training rule of their epoch."""

    def __init__(self, data: RunData) -> None:
        self._data = data
        self._order: list[int] = []
        self._order_epoch = -1

    def read(self, step: int) -> StepSamples:
        """Optimizer step `step` (0-based, counted over all epochs)."""
        data, plan = self._data, self._data.plan
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = plan.epoch_order(epoch), epoch
        # Every rank knows every sample and how it is cut this epoch, so the step's token counts need no
        # communication.
        cut = {i: data.train_rule.apply(data.samples[i], epoch, i)
               for i in plan.global_step_samples(self._order, step_in_epoch)}
        micro_batches = [
            MicroBatch([cut[i] for i in indices], True) if indices
            else MicroBatch([data.train_rule.apply(data.samples[0], epoch, 0)], False)
            for indices in plan.micro_batches(self._order, step_in_epoch)
        ]
        # A step whose windows hold no supervised token at all has nothing to learn; 1 keeps the division finite.
        supervised = max(1, sum(s.num_supervised for s in cut.values()))
        return StepSamples(micro_batches, supervised, sum(len(s.input_ids) for s in cut.values()))


@dataclass(frozen=True)
class BatchSpec:
    """How samples reach the engine, alike in training and evaluation."""

    packing: bool
    """One padding-free row per batch, or right-padded rows."""
    pad_id: int
    chunked: bool
    """The loss from the last hidden states chunk by chunk (`uses_chunked_loss`), or from full logits."""

    def device_batch(self, samples: list[FormattedSample], device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
        """`collate`'s batch of `samples`: the model's keyword inputs on `device`, and the labels on the host.

        The labels stay on the host, where the loss finds the supervised positions (and counts them) without
        waiting for the device; the inputs are queued behind the work in flight, so building the next batch never
        waits for the device either (and the loop's `data_time` is host time).
        """
        batch = collate(samples, self.packing, self.pad_id, PAD_TO_MULTIPLE_OF)
        labels = batch.pop("labels")
        inputs = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return inputs, labels


def uses_chunked_loss(cfg: TrainConfig, engine: Any) -> bool:
    """Whether the loss comes from the last hidden states chunk by chunk (`chunked_loss`) or from full logits.

    Full logits under ZeRO-3, whose partitioned output head is whole only inside the model's own forward, and
    for LoRA, where peft's trained token rows change what the head computes. The chunked loss applies the head's
    weight alone, so a head with a bias (no model this trainer ships a section for) is refused.
    """
    if not cfg.chunked_loss or zero_stage(engine.config) == 3 or is_lora_model(engine.module):
        return False
    if getattr(engine.module.get_output_embeddings(), "bias", None) is not None:
        raise ConfigError("chunked_loss=true needs an output head without a bias; set chunked_loss=false")
    return True
