"""Reward functions for GRPO's end-to-end tests, imported by the trainer's ranks as `tests.training.grpo_rewards`."""


def constant(**_: object) -> float:
    """The same reward for every continuation: every group is flat, so the policy gets no signal."""
    return 1.0


def fails_on_four(completion: str, **_: object) -> float:
    """A buggy reward: it raises on a continuation that says 4."""
    if completion.strip() == "4":
        raise KeyError("no rule for 4")
    return 0.0
