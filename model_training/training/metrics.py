"""Metrics out of a run: `metrics.jsonl` in the run folder and, when enabled, Weights & Biases.

Only rank 0 logs. wandb is a guest: every call into it is guarded, so an unreachable service, a missing
login or a wandb bug costs a warning, never the run. Secrets never reach it (see `public_config`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from model_training.config import TrainConfig
from model_training.layout import CURVES, METRICS, record_run_file
from model_training.training.plot import plot_run

logger = logging.getLogger(__name__)

_SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey")


def public_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a dict, with any value whose key names a secret replaced."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) else scrub(v) for k, v in node.items()
            }
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(dataclasses.asdict(cfg))


class MetricsLogger:
    def __init__(self, cfg: TrainConfig, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / METRICS
        self.wandb_run = None
        if enabled:
            drop_torn_last_line(self.path)
        if enabled and cfg.log_wandb:
            self.wandb_run = _start_wandb(cfg)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            except Exception as err:  # noqa: BLE001 - wandb must never stop training
                logger.warning("wandb.log failed (%s); metrics stay in %s", err, self.path)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (generated samples, say) to wandb; the caller keeps its own copy in the run folder."""
        if not self.enabled or self.wandb_run is None:
            return
        try:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)
        except Exception as err:  # noqa: BLE001 - wandb must never stop training
            logger.warning("wandb table %s failed (%s)", name, err)

    def plot_curves(self, step: int) -> None:
        """training_curves.png of the run folder (see plot.py), and to wandb as an image at `step`. The run has
        finished when this is called: a plot that fails costs a warning, never the run."""
        if not self.enabled:
            return
        try:
            path = plot_run(self.path.parent, record_run_file(self.path.parent, CURVES))
        except Exception as err:  # noqa: BLE001 - matplotlib missing or broken, a full disk: the run stays good
            logger.warning("could not plot %s: %s", self.path, err)
            return
        logger.info("training curves in %s", path)
        if self.wandb_run is not None:
            try:
                import wandb

                self.wandb_run.log({"training_curves": wandb.Image(str(path))}, step=step)
            except Exception as err:  # noqa: BLE001 - wandb must never stop training
                logger.warning("wandb image %s failed (%s)", path, err)

    def close(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:  # noqa: BLE001
                logger.warning("wandb.finish failed: %s", err)


def drop_torn_last_line(path: Path) -> None:
    """Cut a last line without its newline (a run killed while writing it) off `path`, saying so: the next record
    would be glued onto it, and both be lost to every reader."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0 or (f.seek(size - 1), f.read(1))[1] == b"\n":
                return
            f.seek(max(size - (1 << 20), 0))  # a metrics line is far shorter than 1 MiB
            tail = f.read()
            keep = size - len(tail) + tail.rfind(b"\n") + 1
            f.truncate(keep)
    except FileNotFoundError:
        return
    logger.warning("%s ended in a line cut short (%d bytes without a newline, a run killed while writing it): "
                   "dropped it before appending", path, size - keep)


def _start_wandb(cfg: TrainConfig) -> Any:
    """An online run if the service answers within `wandb_init_timeout`, else an offline one, else None."""
    try:
        import wandb
    except ImportError as err:
        logger.warning("wandb is not importable (%s); logging to metrics.jsonl only", err)
        return None
    log_dir = Path(cfg.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("WANDB_MODE", "online")
    for attempt in (mode, "offline"):
        try:
            return wandb.init(
                entity=cfg.wandb_entity,
                project=cfg.wandb_project,
                dir=str(log_dir),
                config=public_config(cfg),
                mode=attempt,
                settings=wandb.Settings(init_timeout=cfg.wandb_init_timeout, silent=True),
            )
        except Exception as err:  # noqa: BLE001 - wandb must never stop training
            logger.warning("wandb could not start in %s mode: %s", attempt, str(err).splitlines()[0])
            if attempt == "offline":
                break
            # Unreachable or not logged in: keep the metrics in a local run that `wandb sync` can upload.
            logger.warning("falling back to offline wandb logging in %s", log_dir)
    return None
