"""Supervised fine-tuning on DeepSpeed.

    deepspeed trainer_sft.py --configs defaults falcon-7b oasst-top1
    deepspeed --num_gpus 2 trainer_sft.py --configs defaults tiny-falcon oasst-sample   # CPU: DS_ACCELERATOR=cpu

Sections come from configs/config.yaml; `key=value` overrides follow. `--show_config` prints the merged
config, `--show_dataset_stats` the datasets; both exit without training.
"""

import sys

from model_training.cli import exit_process, main_train

if __name__ == "__main__":
    exit_process(main_train(sys.argv[1:]))
