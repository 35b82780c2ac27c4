"""When the loop saves a checkpoint, and what goes into it beside the engine state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_training.config import TrainConfig, to_yaml
from model_training.layout import ADAPTER_DIR, MODEL_CONFIG_DIR, RUN_CONFIG, TOKENIZER_DIR
from model_training.models.builder import base_model_reference
from model_training.models.lora import ADAPTER_NAME, is_lora_model
from model_training.training.checkpoint import save_checkpoint


class Saver:
    """The run's save policy (`save_strategy`, `save_steps`, the last step) and its checkpoints in `output_dir`.

    `Saver.save` is the one call through which the loop saves: fault tests wrap it to act right after a commit
    (tests/training/fault_worker.py).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        tokenizer: Any,
        total_steps: int,
        steps_per_epoch: int,
        write_more: Callable[[Path], None] | None = None,
        more_engines: dict[str, Any] | None = None,
    ) -> None:
        """`write_more(folder)`: what else a stage keeps in each checkpoint (DPO: the reference log-probabilities).
        `more_engines`: engines saved beside the main one, each in the subfolder its key names (PPO's value model)."""
        self.write_more = write_more
        self.more_engines = more_engines
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch

    @property
    def enabled(self) -> bool:
        """Whether the run saves checkpoints at all (a stop on a signal saves one when it does)."""
        return self.cfg.save_strategy != "no"

    def due(self, step: int) -> bool:
        """Whether a checkpoint is saved after optimizer step `step` (1-based): every `save_steps` steps, or at
        the end of each epoch, and always after the last step; never with `save_strategy` no."""
        if not self.enabled:
            return False
        if step == self.total_steps:
            return True
        if self.cfg.save_strategy == "epoch":
            return step % self.steps_per_epoch == 0
        return step % self.cfg.save_steps == 0

    def save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> Path:
        """Save `engine` after step `step` with `trainer_state`; returns the committed folder. Call on every rank.

        A LoRA run keeps only its trained weights: the base is not ours to keep.
        """
        return save_checkpoint(
            engine,
            Path(self.cfg.output_dir),
            step,
            trainer_state,
            self.cfg.save_total_limit,
            write_extra=lambda folder: self._write_extra(engine.module, folder),
            trained_only=is_lora_model(engine.module),
            more_engines=self.more_engines,
        )

    def _write_extra(self, model: Any, folder: Path) -> None:
        """What export and inspection need beside the engine state: the merged config, the tokenizer with its
        chat template, the model's transformers config (vocabulary size after the resize included) and, for a
        LoRA run, the adapter's peft config with the base it applies to."""
        cfg = self.cfg
        (folder / RUN_CONFIG).write_text(to_yaml(cfg))
        self.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
        model.config.save_pretrained(folder / MODEL_CONFIG_DIR)
        if getattr(model, "generation_config", None) is not None:  # a reward model generates nothing
            model.generation_config.save_pretrained(folder / MODEL_CONFIG_DIR)
        if self.write_more is not None:
            self.write_more(folder)
        if is_lora_model(model):
            adapter = model.peft_config[ADAPTER_NAME]
            adapter.base_model_name_or_path = base_model_reference(cfg, Path(cfg.output_dir))
            adapter.save_pretrained(folder / ADAPTER_DIR)
