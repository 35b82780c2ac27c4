"""One optimizer step: its micro-batches forward and backward with the loss normalized by the supervised tokens of
the whole step on all ranks, the guard against a non-finite update the engine would apply, and the step's loss kept
on the device until the loop reads it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from model_training.config import zero_stage
from model_training.training.batches import SampleSpec, StepSamples
from model_training.training.torch_engine import TorchEngine


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses); the message says why."""


def skips_nonfinite_updates(engine: Any) -> bool:
    """Whether the engine itself skips an update whose gradients are not finite.

    DeepSpeed's ZeRO-1/2 skip a step whose gradient norm is not finite (fp32, and bf16 with check_grad_overflow),
    and fp16's loss scaler skips it at any stage; ZeRO-0 and ZeRO-3 in bf16/fp32 do not. The plain PyTorch
    engine skips it as ZeRO-1/2 do.
    """
    return isinstance(engine, TorchEngine) or engine.fp16_enabled() or zero_stage(engine.config) in (1, 2)


class StepRunner:
    """The step function of the loop: `runner(samples, step)` runs one optimizer step on `engine`."""

    def __init__(self, engine: Any, spec: SampleSpec, world_size: int, dtype: str) -> None:
        self.engine = engine
        self.spec = spec
        self.world_size = world_size
        self.dtype = dtype  # named in the error of a refused update
        self.guard_updates = not skips_nonfinite_updates(engine)

    def __call__(self, samples: StepSamples, step: int) -> tuple[torch.Tensor, float]:
        """Run the micro-batches of optimizer step `step` (0-based) through forward, backward and the engine's step.

        Returns this rank's sums of the spec's metrics (the loss first), a float64 device tensor left unread, and
        the host seconds spent building batches.
        """
        engine, data_time = self.engine, 0.0

        def micro_sums() -> Iterator[torch.Tensor]:
            nonlocal data_time
            for micro_batch in samples.micro_batches:
                data_start = time.perf_counter()
                inputs, targets = self.spec.device_batch(micro_batch.samples, engine.device)
                data_time += time.perf_counter() - data_start
                sums = self.spec.sums(engine, inputs, targets)
                # A micro-batch that only keeps the ranks in step adds nothing (NaN * 0 would stay NaN).
                yield sums if micro_batch.counted else torch.where(torch.tensor(False), sums, 0.0)

        refuse = partial(self._refuse_nonfinite_update, step=step) if self.guard_updates else None
        sums = optimizer_step(engine, micro_sums(), self.world_size, samples.loss_units, refuse)
        if sums is None:  # a step without micro-batches on this rank
            sums = torch.zeros(len(self.spec.metrics), dtype=torch.float64, device=engine.device)
        return sums, data_time

    def _refuse_nonfinite_update(self, loss_sum: torch.Tensor, step: int) -> None:
        """Stop before an update that DeepSpeed would apply despite a non-finite loss on some rank (a host sync
        on every step, paid only where DeepSpeed does not skip such updates itself)."""
        if nonfinite_on_any_rank(loss_sum):
            raise TrainingError(
                f"non-finite loss at optimizer step {step + 1}; ZeRO stage {zero_stage(self.engine.config)} in "
                f"{self.dtype} cannot skip the update, so training stops before it is applied; resume from the last "
                "checkpoint"
            )


def optimizer_step(
    engine: Any,
    micro_sums: Iterable[torch.Tensor],
    world_size: int,
    loss_units: float | torch.Tensor,
    refuse_nonfinite: Callable[[torch.Tensor], None] | None,
) -> torch.Tensor | None:
    """One optimizer step of `engine` over its micro-batches: each one's sums (computed as they are drawn from
    `micro_sums`, the loss's numerator first) go backward as that micro-batch's share of the step's mean, and the
    engine steps after each. Returns this rank's float64 sums, unread (None without micro-batches).

    `loss_units`: what the step's loss is a mean over (supervised tokens, pairs, continuation tokens), counted on all
    ranks before the first backward. `refuse_nonfinite(the loss sum so far)`, at the accumulation boundary, may stop
    the step before the engine applies its update.
    """
    total = None
    for sums in micro_sums:
        total = sums.detach().double() + (0 if total is None else total)
        # DeepSpeed (and DDP without it) averages gradients over ranks; x world_size turns that into a sum, so the
        # gradient is that of (sum of losses of the whole step) / (its loss units).
        engine.backward(sums[0] * (world_size / loss_units), scale_wrt_gas=False)
        if refuse_nonfinite is not None and engine.is_gradient_accumulation_boundary():
            refuse_nonfinite(total[0])
        engine.step()
    return total


def nonfinite_on_any_rank(loss_sum: torch.Tensor) -> bool:
    """Whether `loss_sum` is not finite on some rank (an all-reduce and a host sync): every rank gets the same answer,
    so all stop together before an update."""
    flag = (~torch.isfinite(loss_sum)).float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class PendingLosses:
    """The losses (and the spec's other training metrics) of the steps not read yet, kept on the device.

    Reading a loss waits for the device (and all-reduces it); at every step that would leave the GPU idle
    between steps. The steps since the last read are read together, with one all-reduce, where a value is
    needed: logging, evaluation, checkpoints and the last step.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[int, torch.Tensor, int]] = []

    def add(self, step: int, sums: torch.Tensor, loss_units: int) -> None:
        """Step `step`'s metric sums on this rank (a device tensor, the loss first), and its loss units (all
        ranks)."""
        self._steps.append((step, sums, loss_units))

    def read(self) -> list[tuple[int, list[float]]]:
        """(step, metrics) of every pending step, oldest first: each metric's mean over the loss units of the whole
        step, the loss first."""
        if not self._steps:
            return []
        sums = torch.stack([step_sums.reshape(-1) for _, step_sums, _ in self._steps])
        dist.all_reduce(sums)
        means = [(step, [total / units for total in totals])
                 for (step, _, units), totals in zip(self._steps, sums.tolist())]
        self._steps.clear()
        return means
