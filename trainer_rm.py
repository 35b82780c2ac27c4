"""Reward model training on DeepSpeed: a scalar head on the model, OpenAssistant's ranking loss.

    deepspeed trainer_rm.py --configs defaults-rm falcon-7b-rm oasst-rm
    # CPU: DS_ACCELERATOR=cpu, from the quick start's SFT run (runs/tiny-falcon) into runs/tiny-rm
    deepspeed --num_gpus 2 trainer_rm.py --configs defaults-rm tiny-falcon preference-sample tiny-rm

Sections, overrides and flags are trainer_sft.py's (model_training/config/schema.py documents every key).
"""

import sys

from model_training.cli import exit_process, main_train

if __name__ == "__main__":
    exit_process(main_train(sys.argv[1:], stage="rm"))
