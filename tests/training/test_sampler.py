"""The step plan: deterministic, disjoint across ranks, independent of how a step is split."""

from __future__ import annotations

from model_training.training.sampler import StepPlan


def plans(world: int, micro: int, accumulation: int, n: int = 50, seed: int = 3) -> list[StepPlan]:
    return [StepPlan(n, world, rank, micro, accumulation, seed) for rank in range(world)]


def test_order_is_a_seeded_permutation_that_changes_each_epoch() -> None:
    plan = plans(1, 2, 1)[0]
    assert plan.epoch_order(0) == plan.epoch_order(0)
    assert sorted(plan.epoch_order(0)) == list(range(50))
    assert plan.epoch_order(0) != plan.epoch_order(1)
    assert plan.epoch_order(0) != StepPlan(50, 1, 0, 2, 1, seed=4).epoch_order(0)


def test_ranks_read_disjoint_slices_that_cover_the_step() -> None:
    ranks = plans(world=2, micro=3, accumulation=2)
    order = ranks[0].epoch_order(0)
    assert ranks[0].steps_per_epoch == 50 // 12
    for step in range(ranks[0].steps_per_epoch):
        mine = [[i for micro in p.micro_batches(order, step) for i in micro] for p in ranks]
        assert all(len(m) == 6 for m in mine)
        assert set(mine[0]).isdisjoint(mine[1])
        assert sorted(mine[0] + mine[1]) == sorted(ranks[0].global_step_samples(order, step))


def test_the_samples_of_a_step_do_not_depend_on_the_split() -> None:
    one = plans(world=1, micro=4, accumulation=4)[0]
    two = plans(world=2, micro=4, accumulation=2)
    order = one.epoch_order(0)
    assert one.epoch_order(0) == two[1].epoch_order(0)
    for step in range(one.steps_per_epoch):
        split = sorted(i for p in two for micro in p.micro_batches(order, step) for i in micro)
        assert split == sorted(i for micro in one.micro_batches(order, step) for i in micro)


def test_an_epoch_drops_only_the_last_partial_step() -> None:
    plan = plans(world=2, micro=2, accumulation=1, n=10)[0]
    assert plan.steps_per_epoch == 2
    assert len({i for s in range(2) for i in plan.global_step_samples(plan.epoch_order(0), s)}) == 8
