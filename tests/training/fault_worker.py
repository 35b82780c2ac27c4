"""`trainer_sft.py` (or the command of FAULT_STAGE: rm, dpo, rl) with faults injected from the environment, for tests of
what a real run survives.

FAULT_RANK (default 1) is the rank that misbehaves (a process started alone is rank 0):
- FAULT_KILL_AFTER_SAVE_STEP=k: SIGKILL that rank right after the checkpoint of step k is committed.
- FAULT_NAN_AT_STEPS=a,b: that rank's training loss is NaN in optimizer steps a, b (1-based; one micro-batch
  per step is assumed).
- FAULT_SLOW_SAVE=s: every save of rank 0 (whatever FAULT_RANK says) sleeps s seconds once the engine state is in the
  staging folder, so that a signal or a grace period lands in the middle of a save.
- FAULT_SLOW_PREPARATION=s: that rank's data preparation (the process it forks for it) says so on stdout, then sleeps s
  seconds before it starts, so that the other ranks are ahead of it, or a signal lands in it.

The faults go in through the trainer's public seams, which it looks up at each call: `Saver.save`, the one call
through which the loop saves (and `Saver._write_extra`, rank 0's part of it), `loss.token_sums`, the one loss of
training and evaluation alike, and `build.in_child`, the one fork of a data preparation.
"""

import os
import signal
import sys
import time

import torch

from model_training.cli import exit_process, main_train
from model_training.data import build
from model_training.training import loss
from model_training.training.saver import Saver

FAULT_RANK = os.environ.get("FAULT_RANK", "1")
KILL_AFTER = os.environ.get("FAULT_KILL_AFTER_SAVE_STEP")
NAN_STEPS = {int(s) for s in os.environ.get("FAULT_NAN_AT_STEPS", "").split(",") if s}
SLOW_SAVE = float(os.environ.get("FAULT_SLOW_SAVE", "0"))
SLOW_PREPARATION = float(os.environ.get("FAULT_SLOW_PREPARATION", "0"))
is_fault_rank = os.environ.get("RANK", "0") == FAULT_RANK  # a process alone, without a launcher, is rank 0

if KILL_AFTER and is_fault_rank:
    real_save = Saver.save

    def save_then_die(self, engine, step, *args, **kwargs):
        folder = real_save(self, engine, step, *args, **kwargs)
        if step == int(KILL_AFTER):
            os.kill(os.getpid(), signal.SIGKILL)
        return folder

    Saver.save = save_then_die

if NAN_STEPS and is_fault_rank:
    real_sums = loss.token_sums
    training_calls = 0

    def poisoned_sums(*args, **kwargs):
        global training_calls
        loss_sum, correct = real_sums(*args, **kwargs)
        if torch.is_grad_enabled():  # evaluation runs under no_grad and is left alone
            training_calls += 1
            if training_calls in NAN_STEPS:
                loss_sum = loss_sum * float("nan")
        return loss_sum, correct

    loss.token_sums = poisoned_sums

if SLOW_SAVE:
    real_write_extra = Saver._write_extra

    def slow_write_extra(self, *args, **kwargs):
        time.sleep(SLOW_SAVE)
        return real_write_extra(self, *args, **kwargs)

    Saver._write_extra = slow_write_extra

if SLOW_PREPARATION and is_fault_rank:
    real_in_child = build.in_child

    def slow_in_child(work):
        def slow_work():
            print(f"fault: the data preparation (pid {os.getpid()}) sleeps {SLOW_PREPARATION:.0f} s", flush=True)
            time.sleep(SLOW_PREPARATION)
            work()

        real_in_child(slow_work)

    build.in_child = slow_in_child

exit_process(main_train(sys.argv[1:], os.environ.get("FAULT_STAGE", "sft")))
