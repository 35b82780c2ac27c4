"""`trainer_sft.py` with faults injected from the environment, for tests of what a real run survives.

FAULT_RANK (default 1) is the rank that misbehaves (a process started alone is rank 0):
- FAULT_KILL_AFTER_SAVE_STEP=k: SIGKILL that rank right after the checkpoint of step k is committed.
- FAULT_NAN_AT_STEPS=a,b: that rank's training loss is NaN in optimizer steps a, b (1-based; one micro-batch
  per step is assumed).
"""

import os
import signal
import sys

import torch

import model_training.training.trainer as trainer
from model_training.cli import exit_process, main_train

FAULT_RANK = os.environ.get("FAULT_RANK", "1")
KILL_AFTER = os.environ.get("FAULT_KILL_AFTER_SAVE_STEP")
NAN_STEPS = {int(s) for s in os.environ.get("FAULT_NAN_AT_STEPS", "").split(",") if s}
is_fault_rank = os.environ.get("RANK", "0") == FAULT_RANK  # a process alone, without a launcher, is rank 0

if KILL_AFTER and is_fault_rank:
    real_save = trainer.save_checkpoint

    def save_then_die(engine, output_dir, step, *args, **kwargs):
        folder = real_save(engine, output_dir, step, *args, **kwargs)
        if step == int(KILL_AFTER):
            os.kill(os.getpid(), signal.SIGKILL)
        return folder

    trainer.save_checkpoint = save_then_die

if NAN_STEPS and is_fault_rank:
    # The trainer's one loss entry point, whichever loss (full logits or chunked) the run uses.
    real_sums = trainer._token_sums
    training_calls = 0

    def poisoned_sums(*args, **kwargs):
        global training_calls
        loss_sum, correct = real_sums(*args, **kwargs)
        if torch.is_grad_enabled():  # evaluation runs under no_grad and is left alone
            training_calls += 1
            if training_calls in NAN_STEPS:
                loss_sum = loss_sum * float("nan")
        return loss_sum, correct

    trainer._token_sums = poisoned_sums

exit_process(main_train(sys.argv[1:]))
