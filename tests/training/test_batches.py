"""What the loop reads at each step: the step's samples cut to length, its counts, and device batches."""

from __future__ import annotations

import torch

from model_training.data.formatting import IGNORE_INDEX, FormattedSample
from model_training.data.windows import LengthRule
from model_training.training.batches import BatchSpec, RunData, StepReader
from model_training.training.step_plan import SourceDraw, StepPlan


def sample(length: int, supervised: int) -> FormattedSample:
    """`length` tokens whose last `supervised` carry loss."""
    ids = tuple(range(1, length + 1))
    return FormattedSample(ids, tuple(IGNORE_INDEX if t < length - supervised else i for t, i in enumerate(ids)),
                           truncated=False)


POOL = [sample(4 + i, 2) for i in range(5)]


def run_data(rank: int, max_length: int = 64) -> RunData:
    plan = StepPlan((SourceDraw(offset=0, length=5, per_epoch=5),), world_size=2, rank=rank, micro_batch_size=1,
                    accumulation_steps=2, seed=3)
    return RunData(POOL, plan, LengthRule(max_length), [], LengthRule(max_length))


def test_a_step_counts_the_tokens_of_every_rank_and_reads_this_ranks_micro_batches() -> None:
    ranks = [StepReader(run_data(rank)).read(0) for rank in range(2)]
    order = run_data(0).plan.epoch_order(0)
    first_four = [POOL[i] for i in order[:4]]
    for step in ranks:
        assert step.tokens == sum(len(s.input_ids) for s in first_four)
        assert step.loss_units == 8
        assert all(micro.counted and len(micro.samples) == 1 for micro in step.micro_batches)
    read = [micro.samples[0] for step in ranks for micro in step.micro_batches]
    assert sorted(s.input_ids for s in read) == sorted(s.input_ids for s in first_four)


def test_a_short_last_step_runs_a_stand_in_that_does_not_count() -> None:
    """5 samples, 4 a step: step 1 reads one sample; the other rank's micro-batches run a stand-in sample."""
    steps = [StepReader(run_data(rank)).read(1) for rank in range(2)]
    micro_batches = [micro for step in steps for micro in step.micro_batches]
    assert sum(micro.counted for micro in micro_batches) == 1
    assert all(len(micro.samples) == 1 for micro in micro_batches)
    (last,) = [micro.samples[0] for micro in micro_batches if micro.counted]
    assert steps[0].tokens == steps[1].tokens == len(last.input_ids) and steps[0].loss_units == 2


def test_samples_are_cut_by_the_rule_and_the_next_epoch_reads_a_new_order() -> None:
    reader = StepReader(run_data(0, max_length=5))
    cut = [micro.samples[0] for micro in reader.read(0).micro_batches]
    assert all(len(s.input_ids) <= 5 for s in cut)
    plan = run_data(0).plan
    assert plan.epoch_order(1) != plan.epoch_order(0)
    next_epoch = reader.read(plan.steps_per_epoch)
    expected = [POOL[i].input_ids[:5] for i in plan.micro_batches(plan.epoch_order(1), 0)[0]]
    assert [s.input_ids for s in next_epoch.micro_batches[0].samples] == expected


def test_device_batch_keeps_the_labels_on_the_host() -> None:
    inputs, labels = BatchSpec(packing=False, pad_id=0, chunked=False).device_batch(POOL[:2], torch.device("cpu"))
    assert inputs["input_ids"].shape == labels.shape == (2, 8)  # padded to a multiple of 8
    assert labels.device.type == "cpu"
    packed, _ = BatchSpec(packing=True, pad_id=0, chunked=False).device_batch(POOL[:2], torch.device("cpu"))
    assert packed["input_ids"].shape == (1, 9) and "attention_mask" not in packed
