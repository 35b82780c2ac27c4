"""The throughput window of the metrics lines: tokens per second and data time per step."""

from __future__ import annotations

import pytest

from model_training.training.throughput import ThroughputMeter


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_window_gives_tokens_per_second_and_mean_data_time_then_starts_again() -> None:
    clock = Clock()
    meter = ThroughputMeter(clock)
    meter.add(tokens=300, data_time=0.5)
    meter.add(tokens=500, data_time=0.25)
    clock.now += 4.0
    assert meter.read_and_reset() == {"tokens_per_s": 200.0, "data_time": pytest.approx(0.375)}
    # The next window starts at the read: the 4 seconds before it are not counted again.
    meter.add(tokens=90, data_time=0.1)
    clock.now += 3.0
    assert meter.read_and_reset() == {"tokens_per_s": 30.0, "data_time": pytest.approx(0.1)}


def test_an_empty_window_reads_zeros() -> None:
    clock = Clock()
    meter = ThroughputMeter(clock)
    assert meter.read_and_reset() == {"tokens_per_s": 0.0, "data_time": 0.0}
    meter.add(tokens=10, data_time=0.0)
    assert meter.read_and_reset() == {"tokens_per_s": 0.0, "data_time": 0.0}  # no time passed: no rate
