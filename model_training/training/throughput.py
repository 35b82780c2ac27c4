"""Throughput over the steps since the last log line: real tokens per second and host time spent on data."""

from __future__ import annotations

import time
from collections.abc import Callable


class ThroughputMeter:
    """A window of optimizer steps: their tokens, their host seconds building batches, and its wall time.

    The window starts when the meter is made and again at each `read_and_reset`.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._tokens = 0
        self._steps = 0
        self._data_time = 0.0
        self._start = clock()

    def add(self, tokens: int, data_time: float) -> None:
        """One optimizer step of the window: its tokens (all ranks) and the seconds spent building its batches."""
        self._tokens += tokens
        self._steps += 1
        self._data_time += data_time

    def read_and_reset(self) -> dict[str, float]:
        """`tokens_per_s` over the window's wall time and `data_time`, the mean seconds per step; then a new window."""
        elapsed = self._clock() - self._start
        reading = {
            "tokens_per_s": self._tokens / elapsed if elapsed > 0 else 0.0,
            "data_time": self._data_time / self._steps if self._steps else 0.0,
        }
        self._tokens, self._steps, self._data_time, self._start = 0, 0, 0.0, self._clock()
        return reading
