"""Direct preference optimization on DeepSpeed: the policy from an SFT export, its starting weights the reference.

    deepspeed trainer_dpo.py --configs defaults-dpo falcon-7b-dpo oasst-rm
    # CPU: DS_ACCELERATOR=cpu, from the quick start's SFT run (runs/tiny-falcon) into runs/tiny-dpo
    deepspeed --num_gpus 2 trainer_dpo.py --configs defaults-dpo tiny-falcon preference-sample tiny-dpo

Sections, overrides and flags are trainer_sft.py's (model_training/config/schema.py documents every key).
"""

import sys

from model_training.cli import exit_process, main_train

if __name__ == "__main__":
    exit_process(main_train(sys.argv[1:], stage="dpo"))
