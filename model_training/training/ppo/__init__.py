"""trainer_rl.py's wing: PPO and GRPO on the loop's shared pieces (run.py, step.py, saver.py, resume.py).

recipe.py   `train_rl`: the models, the loop, one PPO or GRPO step
rollouts.py the continuations sampled from the policy, and what each model reads of them
losses.py   PPO's arithmetic: per-token rewards, GAE, whitening, the clipped policy and value losses
grpo.py     GRPO's arithmetic: group-relative advantages, k3, the clipped surrogate and its normalizations
The prompts come from the data layer (data/prompts.py), GRPO's reward functions from training/rewards.py.
"""
