"""Only the known library messages are dropped from the console, each by its text."""

from __future__ import annotations

import logging
import warnings

import pytest

from model_training.console import quiet_library_noise, ranks


def test_the_bitsandbytes_kernel_warning_goes_and_its_other_warnings_stay(caplog: pytest.LogCaptureFixture) -> None:
    quiet_library_noise()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logger.warning("some other bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes problem"]


def test_the_deprecations_of_others_calls_go_and_other_future_warnings_stay() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Use ...", FutureWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=1)
        warnings.warn("`torch.distributed.broadcast` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`torch.distributed.broadcast` is deprecated"]


def test_a_count_of_ranks_reads_as_english() -> None:
    assert (ranks(1), ranks(2)) == ("1 rank", "2 ranks")
