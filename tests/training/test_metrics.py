"""metrics.jsonl and wandb: offline works, an unreachable service never stops training, secrets stay out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_training.config import load_config, parse_override
from model_training.training.metrics import MetricsLogger, public_config

TINY = ["defaults", "tiny-falcon", "oasst-sample"]
FAKE_KEY = "f" * 40


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(TINY, [parse_override(o) for o in (f"log_dir={tmp_path / 'logs'}", *overrides)])


def test_public_config_hides_secrets(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "model_config.hub_token=hf_abc", "model_config.api_key=xyz")
    public = public_config(cfg)
    assert public["model_config"]["hub_token"] == "***" and public["model_config"]["api_key"] == "***"
    assert public["model_config"]["hidden_size"] == 64
    assert "hf_abc" not in json.dumps(public)


def test_only_the_main_rank_writes_metrics(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    MetricsLogger(cfg, tmp_path, enabled=False).log({"step": 1, "loss": 2.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    logger = MetricsLogger(cfg, tmp_path, enabled=True)
    logger.log({"step": 1, "loss": 2.0})
    logger.log({"step": 2, "loss": 1.5, "eval/x/loss": 1.0})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval/x/loss": 1.0}]


def test_wandb_offline_logs_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tiny_config(tmp_path, "log_wandb=true"), tmp_path, enabled=True)
    assert logger.wandb_run is not None
    logger.log({"step": 1, "loss": 2.0})
    logger.close()
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_samples_table_reaches_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tiny_config(tmp_path, "log_wandb=true"), tmp_path, enabled=True)
    logger.log_table("samples", ["source", "prompt", "answer"], [["query", "Hi?", "Hello, friend."]], step=3)
    logger.close()
    [run_file] = (tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb stores a table as a json artifact beside the run; its rows appear in the run's files.
    tables = list(run_file.parent.glob("files/media/table/samples_*.table.json"))
    assert tables and json.loads(tables[0].read_text())["data"] == [["query", "Hi?", "Hello, friend."]]


def test_unreachable_wandb_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    logger = MetricsLogger(tiny_config(tmp_path, "log_wandb=true", "wandb_init_timeout=3"), tmp_path, enabled=True)
    logger.log({"step": 1, "loss": 2.0})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), f"API key written to {path}"
