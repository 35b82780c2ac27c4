"""What the loop reads: the run's samples and the plan that orders them, each optimizer step's share of them cut
to length, and batches of samples on the device, alike for training and evaluation.

A sample is a `FormattedSample` (SFT) or a `PreferenceGroup` (the reward model, DPO: data/preferences.py); the
reader needs of it only `loss_units` (what the step's loss is divided by) and `num_tokens`. Each stage's spec
(`BatchSpec` here, `PreferenceSpec` in preference_loss.py) turns samples into the model's inputs and the loss's sums."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from model_training.config import ConfigError, TrainConfig, zero_stage
from model_training.data.collate import collate, to_device
from model_training.data.formatting import FormattedSample
from model_training.data.windows import LengthRule, WholeSamples
from model_training.models.lora import is_lora_model
from model_training.training import loss
from model_training.training.step_plan import StepPlan

PAD_TO_MULTIPLE_OF = 8


@dataclass(frozen=True)
class RunData:
    """The training samples in one pool, the plan that orders them, how a sample is cut to the length limit, and
    the validation sets with their own rule."""

    samples: list[Any]
    """FormattedSample (SFT) or PreferenceGroup (rm, dpo)."""
    plan: StepPlan
    train_rule: LengthRule | WholeSamples
    val: list[Any]
    """TokenizedSplit (SFT) or PreferenceSplit (rm, dpo): each with `name` and `samples`."""
    val_rule: LengthRule | WholeSamples


@dataclass(frozen=True)
class MicroBatch:
    samples: list[Any]
    counted: bool
    """False for a stand-in: a short last step can leave a rank an empty micro-batch, which still runs (ZeRO's
    forward and backward are collective) on one sample whose loss must weigh nothing."""


@dataclass(frozen=True)
class StepSamples:
    """One optimizer step: this rank's micro-batches, and the counts of the whole step on all ranks."""

    micro_batches: list[MicroBatch]
    loss_units: int
    """The loss's divisor, at least 1: the step's supervised tokens (SFT) or ranked pairs (rm, dpo), all ranks."""
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
        epoch = plan.locate(step).epoch
        if epoch != self._order_epoch:
            self._order, self._order_epoch = plan.epoch_order(epoch), epoch
        # Every rank knows every sample and how it is cut this epoch, so the step's token counts need no
        # communication.
        cut = {i: data.train_rule.apply(data.samples[i], epoch, i) for i in plan.step_samples(self._order, step)}
        micro_batches = [
            MicroBatch([cut[i] for i in indices], True) if indices
            else MicroBatch([data.train_rule.apply(data.samples[0], epoch, 0)], False)
            for indices in plan.micro_batches(self._order, step)
        ]
        # A step whose windows hold no supervised token at all has nothing to learn; 1 keeps the division finite.
        loss_units = max(1, sum(s.loss_units for s in cut.values()))
        return StepSamples(micro_batches, loss_units, sum(s.num_tokens for s in cut.values()))


class SampleSpec(Protocol):
    """What the step and the evaluation ask of a stage's samples (`BatchSpec`; preference_loss.`PreferenceSpec`)."""

    metrics: tuple[str, ...]

    def device_batch(self, samples: list[Any], device: torch.device) -> tuple[dict[str, Any], Any]:
        """The model's keyword inputs on `device`, and what the loss needs of the batch (kept on the host)."""

    def sums(self, engine: Any, inputs: dict[str, Any], targets: Any) -> torch.Tensor:
        """The sums of `metrics` over the batch, loss first."""

    def units(self, targets: Any) -> int:
        """The batch's loss units (supervised tokens, pairs): what `sums` are divided by."""


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
        return inputs_on(batch, device), labels

    metrics = ("loss", "accuracy")
    """What `sums` adds up, in order; divided by the loss units they are the training and evaluation metrics."""

    def sums(self, engine: Any, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """(summed token losses, correct next-token predictions) of the batch, on the device, through
        `loss.token_sums` (the fault tests' seam)."""
        return torch.stack(loss.token_sums(engine, inputs, labels, self.chunked))

    def units(self, labels: torch.Tensor) -> int:
        """The batch's supervised tokens: what its sums are divided by."""
        return loss.count_supervised(labels)


def inputs_on(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch's tensors on `device` (queued behind the work in flight), its other values as they are."""
    return {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_spec(cfg: TrainConfig, tokenizer: Any, engine: Any) -> BatchSpec:
    """SFT's spec (stages.py): conversations in padded or packed rows, the loss over the assistants' tokens."""
    return BatchSpec(cfg.packing, tokenizer.pad_token_id, uses_chunked_loss(cfg, engine))


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
