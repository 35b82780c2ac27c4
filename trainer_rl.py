"""PPO on DeepSpeed: a policy from an SFT run, a value model from a reward model, both trained on rollouts the frozen
reward model scores, with a KL penalty against the frozen starting policy (the RLHF Falcon-40B recipe).

    deepspeed trainer_rl.py --configs defaults alfred-40b-ppo oasst-top1 model_name=SFT_RUN ppo.reward_model=RM_RUN
    # CPU: DS_ACCELERATOR=cpu, after the README's tiny SFT (runs/tiny-falcon) and reward model (runs/tiny-rm) runs
    deepspeed --num_gpus 2 trainer_rl.py --configs defaults tiny-falcon oasst-sample tiny-ppo

Sections, overrides and flags are trainer_sft.py's (model_training/config/schema.py documents every key, `ppo.*` here).
"""

import sys

from model_training.cli import exit_process, main_train

if __name__ == "__main__":
    exit_process(main_train(sys.argv[1:], stage="rl"))
