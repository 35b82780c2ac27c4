"""The project's stages of training, one row each in `STAGES`: what a stage's command runs, and what every layer does
differently for it.

Every difference between stages is read from the stage's row, never from a comparison with its name: the command
line (cli.py: the command, its help, its recipe, `--prepare_only` and `--show_dataset_stats`), the config's checks
(config/: `check`), the model (models/builder.py: `reward_head`), the data (data/preferences.py: `pairs`) and the
loop (training/trainer.py: `spec`, `references`, the model fingerprint; run_folder.py: `run_files`). Adding a stage
is one module and one row; docs/architecture.md, "Add a stage", has the steps.

A row names its behaviours as 'module:function', imported when first called (`Stage.call`), as a config names GRPO's
reward functions: the table sits below every layer that reads it, so it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_training.layout import ROLLOUT_SAMPLES
from model_training.references import resolve_function


@dataclass(frozen=True)
class Stage:
    """One stage of training: its command, its behaviours and how the shared layers treat it."""

    name: str
    """The config's `stage` value."""
    command: str
    """The script that trains it."""
    description: str
    """What it trains, in its command's --help."""
    recipe: str
    """`recipe(cfg, export) -> run folder`: the whole run, from the process group to the last checkpoint
    (training/run.py); `export` is export/'s exporter, for a run that starts from a checkpoint (training/start.py)."""
    prepare: str
    """`prepare(cfg, tokenizer)`: its datasets in token stores, as `--prepare_only` keeps them for the training job
    (a `PreparedData` or `PreparedPreferences`; None when it has nothing to keep)."""
    stats: str
    """`stats(cfg, tokenizer) -> str`: the table `--show_dataset_stats` prints."""
    unit: str = "samples"
    """What one training example of its data is, in `--prepare_only`'s lines."""
    check: str | None = None
    """`check(cfg, command)`: the config checks of this stage alone (ConfigError), run among the common ones."""
    spec: str | None = None
    """`spec(cfg, tokenizer, engine) -> SampleSpec`: how trainer.py's loop turns its samples into batches and losses;
    None for a recipe with a loop of its own."""
    reward_head: bool = False
    """The model scores sequences (models/reward_head.py) instead of predicting tokens."""
    pairs: bool = False
    """Its preference data keeps each group as pairs of the best reply against each other (DPO), not whole ranked
    groups (the reward model's ranking loss)."""
    references: bool = False
    """Its loss needs the starting model's log-probabilities of every sample: computed once before the first step and
    saved with every checkpoint (DPO)."""
    fingerprint: tuple[str, ...] = ()
    """Config sections a resume must find unchanged besides the model (another objective is another run)."""
    named_in_fingerprint: bool = True
    """The model fingerprint names the stage (SFT's does not, so that its earlier checkpoints still resume)."""
    run_files: tuple[str, ...] = ()
    """Files it writes into the run folder besides every run's (a user's file at such a name is refused first)."""

    def call(self, behaviour: str, *args: Any) -> Any:
        """The behaviour this row names in field `behaviour` (recipe, prepare, stats, check, spec), called."""
        return resolve_function(getattr(self, behaviour), f"stage {self.name}: {behaviour}")(*args)


STAGES: dict[str, Stage] = {
    "sft": Stage(
        "sft", "trainer_sft.py", "Supervised fine-tuning",
        recipe="model_training.training.trainer:train",
        prepare="model_training.data.prepare:prepare_data",
        stats="model_training.cli:sample_stats",
        spec="model_training.training.batches:batch_spec",
        named_in_fingerprint=False,
    ),
    "rm": Stage(
        "rm", "trainer_rm.py", "Reward model training (a scalar head, ranking loss)",
        recipe="model_training.training.trainer:train",
        prepare="model_training.data.preferences:prepare_preferences",
        stats="model_training.cli:preference_stats",
        unit="groups",
        check="model_training.config.checks:check_reward_model",
        spec="model_training.training.preference_loss:preference_spec",
        reward_head=True,
    ),
    "dpo": Stage(
        "dpo", "trainer_dpo.py", "Direct preference optimization",
        recipe="model_training.training.trainer:train",
        prepare="model_training.data.preferences:prepare_preferences",
        stats="model_training.cli:preference_stats",
        unit="groups",
        check="model_training.config.checks:check_dpo",
        spec="model_training.training.preference_loss:preference_spec",
        pairs=True,
        references=True,
        fingerprint=("dpo",),
    ),
    "rl": Stage(
        "rl", "trainer_rl.py",
        "PPO against a reward model (a policy, a value model, a frozen reference and reward model)",
        recipe="model_training.training.ppo.recipe:train_rl",
        prepare="model_training.data.prompts:prepare_prompt_data",
        stats="model_training.cli:prompt_stats",
        check="model_training.config.checks:check_rl",
        run_files=(ROLLOUT_SAMPLES,),
    ),
}  # fmt: skip
"""Stage name -> its row, in the order error messages list the names."""
