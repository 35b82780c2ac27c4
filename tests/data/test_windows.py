"""The cut to the length limit: OpenAssistant's long-sample rule (a random window or the first tokens), drawn
from (seed, epoch, sample) so a resume cuts alike, and the system prefix outside the cut."""

from __future__ import annotations

import pytest

from model_training.data.formatting import IGNORE_INDEX, FormattedSample
from model_training.data.windows import EVALUATION, LengthRule


def sample(length: int, supervised_from: int = 0) -> FormattedSample:
    ids = tuple(range(100, 100 + length))
    labels = tuple(t if i >= supervised_from else IGNORE_INDEX for i, t in enumerate(ids))
    return FormattedSample(ids, labels, truncated=False)


def test_a_sample_within_the_limit_is_left_as_it_is() -> None:
    short = sample(10)
    assert LengthRule(10, random_offset_probability=1.0).apply(short, 0, 0) is short


def test_without_random_offsets_a_long_sample_keeps_its_first_tokens() -> None:
    cut = LengthRule(8).apply(sample(20), epoch=3, index=5)
    assert cut.input_ids == tuple(range(100, 108)) and cut.labels == cut.input_ids and cut.truncated


def test_a_random_window_is_a_contiguous_piece_whose_first_label_is_dropped() -> None:
    rule = LengthRule(8, random_offset_probability=1.0, seed=7)
    long = sample(50)
    offsets = set()
    for epoch in range(40):
        cut = rule.apply(long, epoch, index=2)
        offset = cut.input_ids[0] - 100
        offsets.add(offset)
        assert cut.input_ids == long.input_ids[offset : offset + 8]
        # The window's first token would be predicted from one outside it.
        assert cut.labels == ((IGNORE_INDEX,) if offset else (100,)) + long.labels[offset + 1 : offset + 8]
    assert len(offsets) > 10 and min(offsets) >= 0 and max(offsets) <= 42


def test_the_cut_is_a_function_of_seed_epoch_and_sample() -> None:
    rule = LengthRule(8, random_offset_probability=1.0, seed=7)
    long = sample(50)
    assert rule.apply(long, 4, 9) == rule.apply(long, 4, 9)  # a resume cuts as the run it continues
    assert len({rule.apply(long, epoch, 9).input_ids for epoch in range(10)}) > 1  # a new draw every epoch
    assert len({LengthRule(8, 1.0, seed).apply(long, 4, 9).input_ids for seed in range(10)}) > 1
    assert rule.apply(long, EVALUATION, 3) == rule.apply(long, EVALUATION, 3)  # validation: the same every time


@pytest.mark.parametrize("probability", [0.0, 0.8, 1.0])
def test_random_windows_are_taken_with_the_probability_asked(probability: float) -> None:
    rule = LengthRule(8, random_offset_probability=probability, seed=1)
    long = sample(200)
    random_windows = sum(rule.apply(long, 0, index).input_ids[0] != 100 for index in range(2000))
    # A random window starts at 0 one time in 193 too: the share of windows elsewhere is close to p.
    assert abs(random_windows / 2000 - probability * 192 / 193) < 0.03


def test_the_system_prefix_goes_before_the_cut_without_loss() -> None:
    prefix = FormattedSample((1, 2, 3), (IGNORE_INDEX,) * 3, truncated=False)
    rule = LengthRule(10, random_offset_probability=0.0, prefix=prefix)
    cut = rule.apply(sample(20), 0, 0)
    assert cut.input_ids == (1, 2, 3, *range(100, 107)) and cut.labels[:3] == (IGNORE_INDEX,) * 3
    assert rule.apply(sample(4), 0, 0).input_ids == (1, 2, 3, 100, 101, 102, 103)
    with pytest.raises(ValueError, match="leaves no room for the conversation in 3 tokens"):
        LengthRule(3, prefix=prefix)
