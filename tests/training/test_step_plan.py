"""The step plan: a seeded per-epoch mixture, disjoint across global ranks, independent of how a step is split, and
started mid-epoch where a resume with another global batch continues."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest

from model_training.config import ConfigError
from model_training.training.step_plan import SORT_RUN, DataPosition, SourceDraw, StepPlace, StepPlan, plan_sources


def options(**kw: object) -> SimpleNamespace:
    return SimpleNamespace(**{"size": None, "fraction": None, "share": None, "replace": False, **kw})


def plans(world: int, micro: int, accumulation: int, sources: tuple[SourceDraw, ...], seed: int = 3) -> list[StepPlan]:
    return [StepPlan(sources, world, rank, micro, accumulation, seed) for rank in range(world)]


ALL_50 = (SourceDraw(offset=0, length=50, per_epoch=50),)


def read_in_epoch(ranks: list[StepPlan], epoch: int) -> list[list[int]]:
    """What every rank reads in one epoch (empty micro-batches read nothing)."""
    order = ranks[0].epoch_order(epoch)
    steps = range(epoch * ranks[0].steps_per_epoch, (epoch + 1) * ranks[0].steps_per_epoch)
    return [[i for step in steps for mb in p.micro_batches(order, step) for i in mb] for p in ranks]


def test_order_is_a_seeded_permutation_that_changes_each_epoch() -> None:
    plan = plans(1, 2, 1, ALL_50)[0]
    assert plan.epoch_order(0) == plan.epoch_order(0)
    assert sorted(plan.epoch_order(0)) == list(range(50))
    assert plan.epoch_order(0) != plan.epoch_order(1)
    assert plan.epoch_order(0) != StepPlan(ALL_50, 1, 0, 2, 1, seed=4).epoch_order(0)


def test_the_samples_of_a_step_do_not_depend_on_the_split() -> None:
    one = plans(world=1, micro=4, accumulation=4, sources=ALL_50)[0]
    two = plans(world=2, micro=4, accumulation=2, sources=ALL_50)
    order = one.epoch_order(0)
    for step in range(one.steps_per_epoch):
        split = sorted(i for p in two for micro in p.micro_batches(order, step) for i in micro)
        assert split == sorted(i for micro in one.micro_batches(order, step) for i in micro)


def test_two_nodes_of_two_ranks_read_every_drawn_sample_exactly_once_per_epoch() -> None:
    """Global ranks 0..3 (2 nodes x 2 local ranks): no sample duplicated or dropped, short last step included."""
    sources = (SourceDraw(0, 37, 37), SourceDraw(37, 20, 10))
    ranks = plans(world=4, micro=3, accumulation=2, sources=sources)
    assert ranks[0].samples_per_epoch == 47 and ranks[0].steps_per_epoch == 2  # 24 + a short step of 23
    for epoch in range(3):
        read = read_in_epoch(ranks, epoch)
        everything = [i for rank in read for i in rank]
        assert len(everything) == len(set(everything)) == 47
        assert Counter(everything) == Counter(ranks[0].epoch_order(epoch))
    # Each rank has the same number of micro-batches in every step, even when some are empty.
    order = ranks[0].epoch_order(0)
    assert {len(p.micro_batches(order, 1)) for p in ranks} == {2}


def test_each_source_is_drawn_in_its_ratio_and_redrawn_each_epoch() -> None:
    sources = plan_sources(["chat", "text"], [300, 40], [options(), options(share=0.05)])
    assert [s.per_epoch for s in sources] == [300, 16]  # round(0.05 * 300 / 0.95)
    plan = plans(1, 4, 1, sources)[0]
    for epoch in range(2):
        order = plan.epoch_order(epoch)
        assert sum(i >= 300 for i in order) == 16 and sum(i < 300 for i in order) == 300
    text_draws = [{i for i in plan.epoch_order(e) if i >= 300} for e in range(2)]
    assert text_draws[0] != text_draws[1]


def test_size_fraction_and_replace() -> None:
    sources = plan_sources(["a", "b", "c"], [10, 10, 4], [options(size=3), options(fraction=0.25),
                                                         options(size=9, replace=True)])
    assert [(s.offset, s.per_epoch) for s in sources] == [(0, 3), (10, 2), (20, 9)]
    order = plans(1, 1, 1, sources)[0].epoch_order(0)
    assert Counter(20 <= i < 24 for i in order)[True] == 9
    assert len({i for i in order if i < 10}) == 3  # without replacement: distinct


def test_a_mixture_that_cannot_be_met_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"dataset 'b' is asked for 12 samples per epoch but has 10 .*replace"):
        plan_sources(["a", "b"], [5, 10], [options(), options(size=12)])
    with pytest.raises(ConfigError, match="must add up to less than 1"):
        plan_sources(["a", "b"], [5, 10], [options(), options(share=1.0)])
    with pytest.raises(ConfigError, match="need other datasets"):
        plan_sources(["a"], [5], [options(share=0.5)])


def test_sort_by_length_orders_each_epoch_in_shuffled_runs_of_200() -> None:
    """OpenAssistant's sampler with sort_by_length: the draw sorted by length, each run of 200 shuffled."""
    lengths = tuple((i * 7919) % 1000 for i in range(1000))
    draw = (SourceDraw(offset=0, length=1000, per_epoch=1000),)
    plan = StepPlan(draw, 1, 0, 4, 1, seed=3, lengths=lengths)
    order = plan.epoch_order(0)
    assert sorted(order) == list(range(1000))
    runs = [[lengths[i] for i in order[start : start + SORT_RUN]] for start in range(0, 1000, SORT_RUN)]
    assert all(max(run) <= min(following) for run, following in zip(runs, runs[1:]))
    assert any(run != sorted(run) for run in runs)  # shuffled within each run
    assert order == plan.epoch_order(0) and order != plan.epoch_order(1)


def test_a_plan_started_mid_epoch_reads_the_rest_of_the_epoch_then_whole_ones() -> None:
    """3 steps of 8 samples read 24 of an epoch's 50; the plan of another global batch (5), started there, reads the
    other 26 (the last step short), then every later epoch whole: no sample read twice or skipped."""
    first = plans(world=2, micro=4, accumulation=1, sources=ALL_50)[0]
    position = first.position(3)
    assert position == DataPosition(step=3, epoch=0, offset=24)
    ranks = [replace(p, start=position) for p in plans(world=1, micro=5, accumulation=1, sources=ALL_50)]
    order = first.epoch_order(0)
    read = [i for step in range(3) for i in first.step_samples(order, step)]
    read += [i for step in range(3, 9) for mb in ranks[0].micro_batches(order, step) for i in mb]
    assert sorted(read) == list(range(50)) and len(read) == 50
    assert ranks[0].locate(8) == StepPlace(epoch=0, first=49, count=1)
    assert ranks[0].locate(9) == StepPlace(epoch=1, first=0, count=5)
    assert ranks[0].position(19) == DataPosition(step=19, epoch=2, offset=0)


def test_a_plan_started_where_the_same_plan_was_reads_what_it_would_have() -> None:
    plan = plans(world=2, micro=3, accumulation=2, sources=(SourceDraw(0, 37, 37),))[1]
    resumed = replace(plan, start=plan.position(5))
    for step in range(5, 20):
        assert resumed.locate(step) == plan.locate(step)
    with pytest.raises(ValueError, match="step 4 comes before the plan's start at step 5"):
        resumed.locate(4)
