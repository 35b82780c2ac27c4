"""The config layer: shipped sections, merge order, overrides, validation and its messages."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from model_training.config import (
    DEFAULT_CONFIG_FILE,
    PROJECT_ROOT,
    ConfigError,
    TrainConfig,
    closest_name,
    is_hub_id,
    load_config,
    parse_override,
    read_config_folder,
    read_sections,
    resolve_input_path,
    to_yaml,
)
from model_training.data.sources.oasst_export import OasstExportConfig
from model_training.training.schedule import lr_multiplier

MODEL_SECTIONS = [
    "falcon-7b", "falcon-40b", "tiny-falcon", "falcon-7b-qlora", "pythia-12b", "llama-7b", "llama-30b", "mistral-7b",
    "tiny-llama", "tiny-neox",
]
DATA_SECTIONS = ["oasst-top1", "oasst-sample", "oasst-hh-dolly", "falcon-40b-instruct-mix", "oasst-top-paths"]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("model", MODEL_SECTIONS)
@pytest.mark.parametrize("data", DATA_SECTIONS)
def test_every_shipped_section_merges_and_validates(model: str, data: str) -> None:
    cfg = load_config(["defaults", model, data])
    assert isinstance(cfg, TrainConfig)
    assert cfg.dataset_specs, "a data section must configure at least one dataset"
    assert resolve_input_path(cfg.deepspeed_config).is_file()


PREFERENCE_RUNS = {
    "rm": [["defaults-rm", "falcon-7b-rm", "oasst-rm"], ["defaults-rm", "tiny-falcon", "preference-sample"]],
    "dpo": [["defaults-dpo", "falcon-7b-dpo", "oasst-rm"], ["defaults-dpo", "tiny-falcon", "preference-sample"]],
}
PREFERENCE_SECTIONS = {name for runs in PREFERENCE_RUNS.values() for run in runs for name in run} - set(MODEL_SECTIONS)


@pytest.mark.parametrize(("stage", "sections"), [(s, run) for s, runs in PREFERENCE_RUNS.items() for run in runs])
def test_every_preference_section_merges_and_validates_for_its_command(stage: str, sections: list[str]) -> None:
    cfg = load_config(sections, stage=stage)
    assert cfg.stage == stage and cfg.dataset_specs
    assert resolve_input_path(cfg.deepspeed_config).is_file()


def test_a_section_of_another_stage_is_refused_and_a_config_without_one_takes_the_commands() -> None:
    with pytest.raises(ConfigError, match="key 'stage' is 'rm': this config trains with trainer_rm.py, not "
                                          "trainer_sft.py"):
        load_config(["defaults-rm", "tiny-falcon", "oasst-sample"])
    assert load_config(["defaults", "tiny-falcon", "preference-sample"], stage="dpo").stage == "dpo"
    assert load_config(["defaults", "tiny-falcon", "oasst-sample"]).stage == "sft"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([("dpo.beta", 0.0)], "key 'dpo.beta' must be positive, got 0.0"),
        ([("dpo.loss_type", "hinge")], "key 'dpo.loss_type' is 'hinge'; expected one of sigmoid, ipo"),
        ([("dpo.label_smoothing", 0.5)], r"key 'dpo.label_smoothing' must be in \[0, 0.5\), got 0.5"),
        ([("peft.type", "lora")], "trainer_dpo.py trains every weight; set peft.type=null"),
        ([("generate_val_samples", 2)], "key 'generate_val_samples' is set, but trainer_dpo.py has no validation"),
        ([("residual_dropout", 0.1)], "key 'residual_dropout' is 0.1, but DPO's reference log-probabilities are"),
        ([("use_system_prefix", True), ("system_prefix", "Be brief.")],
         "key 'use_system_prefix' is true, but trainer_dpo.py reads each comparison's own system message"),
    ],
)
def test_dpo_options_are_checked(overrides: list[tuple[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["defaults-dpo", "tiny-falcon", "preference-sample"], overrides, stage="dpo")


ALFRED_CARD = {
    "dtype": "bf16", "learning_rate": 1.85e-6, "warmup_steps": 10, "lr_scheduler_type": "cosine", "lr_decay_steps": 100,
    "max_steps": 200, "ppo.num_rollouts": 1024, "ppo.policy_epochs": 1, "ppo.value_epochs": 1,
    "ppo.ppo_steps_per_epoch": 1, "ppo.value_steps_per_epoch": 8, "ppo.kl_coef": 0.01, "ppo.gamma": 1.0,
    "ppo.lam": 0.95, "ppo.clip_policy": 0.2, "ppo.clip_value": 0.2, "ppo.whiten_advantages": True,
    "ppo.whiten_rewards": False, "ppo.score_on_eod": True, "ppo.max_new_tokens": 1024, "ppo.min_new_tokens": 0,
    "ppo.top_p": 1.0, "ppo.temperature": 1.0,
}  # fmt: skip
"""The trainer configuration the RLHF-tuned Falcon-40B's model card publishes."""


def test_the_alfred_section_holds_every_value_of_the_published_recipe() -> None:
    cfg = load_config(["defaults", "alfred-40b-ppo", "oasst-top1"], stage="rl")
    assert cfg.stage == "rl" and cfg.deepspeed and zero_stage_of(cfg) == 3
    for key, value in ALFRED_CARD.items():
        found = cfg
        for part in key.split("."):
            found = getattr(found, part)
        assert found == value, key
    # The card's end of the decay, 1.85e-7, where the schedule holds it after its 100 steps.
    end = cfg.learning_rate * lr_multiplier(cfg.max_steps - 1, cfg.warmup_steps, cfg.max_steps, cfg.lr_scheduler_type,
                                            cfg.lr_decay_steps, cfg.min_lr_ratio)
    assert end == pytest.approx(1.85e-7, rel=1e-9)


def zero_stage_of(cfg: TrainConfig) -> int:
    return json.loads(resolve_input_path(cfg.deepspeed_config).read_text())["zero_optimization"]["stage"]


def run_folder(path: Path) -> Path:
    """A folder the config takes for a training run (its `latest` pointer), as tiny-ppo's model folders are."""
    path.mkdir(parents=True)
    (path / "latest").write_text("checkpoint-000001\n")
    return path


def test_tiny_ppo_validates_once_its_runs_exist_and_names_them_when_they_do_not(tmp_path: Path) -> None:
    sections = ["defaults", "tiny-falcon", "oasst-sample", "tiny-ppo"]
    runs = [("model_name", str(run_folder(tmp_path / "sft"))), ("ppo.reward_model", str(run_folder(tmp_path / "rm")))]
    with pytest.raises(ConfigError, match=r"key 'ppo.reward_model' is the local path '\S+/missing', but the folder"):
        load_config(sections, [*runs, ("ppo.reward_model", str(tmp_path / "missing"))], stage="rl")
    cfg = load_config(sections, runs, stage="rl")
    assert cfg.model_config is None and cfg.ppo.num_rollouts % cfg.per_device_train_batch_size == 0


TINY_CHAIN = {"tiny-rm": ("rm", ["defaults-rm", "tiny-falcon", "preference-sample", "tiny-rm"]),
              "tiny-dpo": ("dpo", ["defaults-dpo", "tiny-falcon", "preference-sample", "tiny-dpo"])}
"""The reward model and DPO from the quick start's SFT run, as scripts/rlhf_quickstart.sh and the README run them."""


@pytest.mark.parametrize("section", list(TINY_CHAIN))
def test_the_tiny_stages_start_from_the_sft_run_and_name_it_when_it_is_missing(section: str, tmp_path: Path) -> None:
    stage, sections = TINY_CHAIN[section]
    with pytest.raises(ConfigError, match=r"key 'model_name' is the local path '\S+/missing', but the folder"):
        load_config(sections, [("model_name", str(tmp_path / "missing"))], stage=stage)
    cfg = load_config(sections, [("model_name", str(run_folder(tmp_path / "sft")))], stage=stage)
    assert cfg.stage == stage and cfg.model_config is None and cfg.tokenizer_name is None
    assert read_sections(DEFAULT_CONFIG_FILE)[section]["model_name"] == "./runs/tiny-falcon"


def test_every_tiny_section_writes_a_run_folder_of_its_own() -> None:
    """The quick start's run is what the reward model, DPO and PPO start from: none of them may write over it or be
    refused because of it (each command names the tiny model's section before its own)."""
    sections = read_sections(DEFAULT_CONFIG_FILE)
    tiny = [name for name in sections if name.startswith("tiny-")]
    folders = [sections[name]["output_dir"] for name in tiny]
    assert len(tiny) == 7 and len(set(folders)) == len(folders), dict(zip(tiny, folders))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([("ppo.top_p", 0.0)], r"key 'ppo.top_p' must be in \(0, 1\], got 0.0"),
        ([("ppo.lam", 1.5)], r"key 'ppo.lam' must be in \[0, 1\], got 1.5"),
        ([("ppo.min_new_tokens", 40)], r"key 'ppo.min_new_tokens' must be in \[0, 32\], got 40"),
        ([("ppo.clip_policy", 0.0)], "key 'ppo.clip_policy' must be positive, got 0.0"),
        ([("ppo.value_steps_per_epoch", 0)], "key 'ppo.value_steps_per_epoch' must be at least 1, got 0"),
        ([("deepspeed", False)], "trainer_rl.py trains the policy and the value model on DeepSpeed"),
        ([("residual_dropout", 0.1)], "key 'residual_dropout' is 0.1, but PPO's ratio"),
        ([("generate_samples", ["Hi"])], "trainer_rl.py logs its own samples"),
        ([("model_name", None), ("model_config", {"model_type": "falcon"}), ("tokenizer_name", "data/tokenizer")],
         "key 'model_config' is set, but PPO starts from a trained policy"),
        ([("ppo.reward_model", "data/tokenizer")], "key 'ppo.reward_model': the folder .* has no config.json"),
    ],
)
def test_ppo_options_are_checked(overrides: list[tuple[str, object]], message: str, tmp_path: Path) -> None:
    runs = [("model_name", str(run_folder(tmp_path / "sft"))), ("ppo.reward_model", str(run_folder(tmp_path / "rm")))]
    with pytest.raises(ConfigError, match=message):
        load_config(["defaults", "tiny-falcon", "oasst-sample", "tiny-ppo"], runs + overrides, stage="rl")


GRPO = ["defaults-grpo", "tiny-falcon", "tiny-grpo"]


def test_the_grpo_sections_validate_once_the_policy_exists(tmp_path: Path) -> None:
    cfg = load_config(GRPO, [("model_name", str(run_folder(tmp_path / "sft")))], stage="rl")
    assert cfg.rl_algorithm == "grpo" and cfg.ppo.reward_model is None
    assert cfg.ppo.num_rollouts % cfg.grpo.group_size == 0 and cfg.grpo.reward_functions
    assert resolve_input_path(cfg.ppo.prompt_file).is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([("rl_algorithm", "reinforce")], "key 'rl_algorithm' is 'reinforce'; expected one of ppo, grpo$"),
        ([("grpo.loss_normalization", "mean")],
         "key 'grpo.loss_normalization' is 'mean'; expected one of sequence, token, constant$"),
        ([("grpo.group_size", 1)], "key 'grpo.group_size' must be at least 2, got 1"),
        ([("grpo.clip_low", 1.0)], r"key 'grpo.clip_low' must be in \[0, 1\), got 1.0"),
        ([("grpo.clip_high", -0.1)], r"key 'grpo.clip_high' must be at least 0, got -0.1"),
        ([("grpo.kl_coef", float("nan"))], r"key 'grpo.kl_coef' must be at least 0, got nan"),
        ([("grpo.reward_functions", [])], "GRPO needs rewards: set 'grpo.reward_functions'"),
    ],
)
def test_grpo_options_are_checked(overrides: list[tuple[str, object]], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(GRPO, [("model_name", str(run_folder(tmp_path / "sft"))), *overrides], stage="rl")


def test_every_section_in_the_file_is_tested() -> None:
    assert set(read_sections(DEFAULT_CONFIG_FILE)) == {"defaults", *MODEL_SECTIONS, *DATA_SECTIONS,
                                                       *PREFERENCE_SECTIONS, *TINY_CHAIN, "alfred-40b-ppo", "tiny-ppo",
                                                       *GRPO[::2]}
    # And no other file in configs/ adds sections (every *.yaml there is read).
    assert set(read_config_folder()) == set(read_sections(DEFAULT_CONFIG_FILE))


def test_every_yaml_in_the_folder_contributes_and_a_section_twice_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("first:\n  learning_rate: 1e-4\n")
    (tmp_path / "b.yaml").write_text("second:\n  learning_rate: 2e-4\n")
    (tmp_path / "notes.txt").write_text("first: not read\n")
    found = read_config_folder(tmp_path)
    assert {name: origin.name for name, (_, origin) in found.items()} == {"first": "a.yaml", "second": "b.yaml"}
    (tmp_path / "c.yaml").write_text("first:\n  learning_rate: 3e-4\n")
    with pytest.raises(ConfigError, match=r"config section 'first' is defined twice: in \S+/a\.yaml and in "
                                          r"\S+/c\.yaml; rename one of them"):
        read_config_folder(tmp_path)


OPENASSISTANT_SECTION = """
s:
  model_config: {model_type: falcon, hidden_size: 64, num_hidden_layers: 2}
  tokenizer_name: data/tokenizer
  use_flash_attention: false
  per_digit_tokens: false
  quantization: false
  loss_fn: CrossEntropyLoss
  eval_accumulation_steps:
  num_train_epochs: 0.2
  freeze_layer:
  val_max_length:
  random_offset_probability: 0.8
  peft_model: false
"""


def test_openassistant_keys_are_read_or_accepted_with_one_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path, OPENASSISTANT_SECTION)
    cfg = load_config(["s"], [parse_override("use_flash_attention=true")], config_file=path)
    assert cfg.num_train_epochs == 0.2 and cfg.random_offset_probability == 0.8 and cfg.peft.type is None
    assert cfg.quantization.load_in_4bit is False  # the boolean is OpenAssistant's 8-bit Adam, off
    warned = [r.getMessage() for r in caplog.records if "OpenAssistant trainer key" in r.getMessage()]
    assert sorted(m.split("'")[1] for m in warned) == ["eval_accumulation_steps", "per_digit_tokens",
                                                       "use_flash_attention"]
    assert any("use_flash_attention' (in section 's' of" in m and "chosen by the device" in m for m in warned)


def test_openassistant_keys_with_an_effect_here_are_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path, OPENASSISTANT_SECTION.replace("quantization: false", "quantization: true")
                        .replace("peft_model: false", "peft_model: true").replace("CrossEntropyLoss", "Poly"))
    cfg = load_config(["s"], config_file=path)
    assert cfg.peft.type == "lora"
    assert "key 'quantization: true' (in section 's' of" in caplog.text and "8-bit Adam" in caplog.text
    assert "key 'loss_fn' (in section 's' of" in caplog.text and "is 'Poly', which has no effect" in caplog.text
    with pytest.raises(ConfigError, match="unknown key 'use_flash_attentionn'"):
        load_config(["s"], [parse_override("use_flash_attentionn=true")], config_file=path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_train_epochs=0", r"key 'num_train_epochs' must be positive, got 0"),
        ("random_offset_probability=1.5", r"key 'random_offset_probability' must be in \[0, 1\], got 1.5"),
        ("val_max_length=0", r"key 'val_max_length' must be at least 2 or null, got 0"),
        ("max_length=1", r"key 'max_length' must be at least 2, got 1"),
        ("eval_size=0", r"key 'eval_size' must be positive or null, got 0"),
        ("use_system_prefix=true", r"key 'use_system_prefix' is true but 'system_prefix' is empty"),
    ],
)
def test_openassistant_options_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["defaults", "tiny-falcon", "oasst-sample"], [parse_override(override)])
    with pytest.raises(ConfigError, match=r"key 'freeze_layer' freezes layers of a full fine-tuning"):
        load_config(["defaults", "tiny-falcon", "oasst-sample"],
                    [parse_override("freeze_layer=1"), parse_override("peft.type=lora")])


def test_defaults_are_openassistants() -> None:
    cfg = load_config(["defaults", "falcon-7b", "oasst-top1"])
    assert (cfg.rng_seed, cfg.adam_epsilon, cfg.max_grad_norm) == (0xA1221F97, 1e-12, 2.0)
    assert (cfg.lr_scheduler_type, cfg.random_offset_probability) == ("warmup_decay", 0.8)


def test_falcon_7b_has_the_published_hyperparameters() -> None:
    cfg = load_config(["defaults", "falcon-7b", "oasst-top1"])
    expected = {
        "model_name": "tiiuae/falcon-7b",
        "dtype": "bf16",
        "learning_rate": 1e-5,
        "weight_decay": 0.0,
        "max_length": 2048,
        "warmup_steps": 20,
        "gradient_checkpointing": True,
        "gradient_accumulation_steps": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "num_train_epochs": 8,
        "save_strategy": "steps",
        "eval_steps": 80,
        "save_steps": 80,
        "save_total_limit": 4,
        "residual_dropout": 0.2,
        "residual_dropout_lima": True,
        "deepspeed_config": "configs/zero_config.json",
        "log_dir": "falcon_log_7b",
        "output_dir": "falcon",
    }
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert isinstance(cfg.learning_rate, float)


def test_falcon_7b_qlora_has_the_published_hyperparameters() -> None:
    cfg = load_config(["defaults", "falcon-7b-qlora", "oasst-top-paths"])
    assert (cfg.model_name, cfg.dtype, cfg.chat_format) == ("tiiuae/falcon-7b", "bf16", "human_bot")
    assert (cfg.peft.type, cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout) == ("lora", 64, 16.0, 0.1)
    assert cfg.peft.target_modules == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    q = cfg.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bf16")
    assert (cfg.learning_rate, cfg.max_steps, cfg.lr_scheduler_type, cfg.max_grad_norm) == (2e-4, 200, "constant", 0.3)
    assert "zero_config" in cfg.deepspeed_config  # ZeRO-2: a 4-bit base is refused under ZeRO-3
    [(name, options)] = cfg.dataset_specs
    assert (name, options.top_k, options.input_file_path) == ("oasst1", 1, "OpenAssistant/oasst1")


def test_peft_type_lora_on_the_command_line_turns_lora_on() -> None:
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [parse_override("peft.type=lora")])
    assert (cfg.peft.type, cfg.peft.target_modules, cfg.quantization.load_in_4bit) == ("lora", None, False)


def test_oasst_top1_dataset() -> None:
    cfg = load_config(["defaults", "falcon-7b", "oasst-top1"])
    assert cfg.dataset_specs == [
        (
            "oasst_export",
            OasstExportConfig(
                lang="bg,ca,cs,da,de,en,es,fr,hr,hu,it,nl,pl,pt,ro,ru,sl,sr,sv,uk",
                input_file_path="2023-06-02_oasst_all_labels.jsonl.gz",
                val_split=0.05,
                top_k=1,
            ),
        )
    ]


def test_falcon_40b_uses_zero3() -> None:
    cfg = load_config(["defaults", "falcon-40b", "oasst-top1"])
    assert cfg.model_name == "tiiuae/falcon-40b"
    assert cfg.dtype == "bf16"
    assert cfg.deepspeed_config == "configs/zero3_config.json"


def test_later_sections_win_nested_mappings_merge_lists_replace(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        base:
          model_config: {model_type: falcon, hidden_size: 64, num_hidden_layers: 2}
          tokenizer_name: data/tokenizer
          learning_rate: 1.0e-3
          datasets: [{oasst_export: {lang: en}}, {oasst_export: {lang: de}}]
        more:
          model_config: {hidden_size: 32}
          learning_rate: 2e-4
          datasets: [{oasst_export: {lang: fr}}]
        """,
    )
    cfg = load_config(["base", "more"], config_file=path)
    assert cfg.learning_rate == 2e-4
    assert cfg.model_config == {"model_type": "falcon", "hidden_size": 32, "num_hidden_layers": 2}
    assert [options.lang for _, options in cfg.dataset_specs] == ["fr"]


def test_overrides_come_last_with_dotted_keys() -> None:
    overrides = [parse_override("learning_rate=1e-4"), parse_override("model_config.hidden_size=32")]
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], overrides)
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.model_config["hidden_size"] == 32
    assert cfg.model_config["num_hidden_layers"] == 2  # the rest of the mapping is kept


def test_datasets_extra_appends() -> None:
    overrides = [parse_override("datasets_extra=[{oasst_export: {lang: de, val_split: 0.5}}]")]
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], overrides)
    assert [(name, options.lang) for name, options in cfg.dataset_specs] == [
        ("oasst_export", "en"),
        ("oasst_export", "de"),
    ]


def test_exponent_floats_without_a_dot_are_floats(tmp_path: Path) -> None:
    path = write_config(tmp_path, "s:\n  model_name: m\n  learning_rate: 1e-5\n  adam_epsilon: 3E-8\n")
    cfg = load_config(["s"], config_file=path)
    assert (cfg.learning_rate, cfg.adam_epsilon) == (1e-5, 3e-8)
    assert parse_override("learning_rate=1e-5") == ("learning_rate", 1e-5)


def test_none_default_keys_keep_their_type() -> None:
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [parse_override("max_steps=5")])
    assert cfg.max_steps == 5 and isinstance(cfg.max_steps, int)
    with pytest.raises(ConfigError, match=r"bad value for key 'max_steps' on the command line"):
        load_config(["defaults", "tiny-falcon", "oasst-sample"], [parse_override("max_steps=five")])


def test_unknown_section_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(["defaults", "falcon-7bb"])
    assert str(err.value) == "unknown config section 'falcon-7bb' in configs/*.yaml; did you mean 'falcon-7b'?"


def test_unknown_key_in_a_section_names_section_file_and_suggestion(tmp_path: Path) -> None:
    path = write_config(tmp_path, "falcon-7b:\n  learning_rat: 1e-5\n")
    with pytest.raises(ConfigError) as err:
        load_config(["falcon-7b"], config_file=path)
    assert str(err.value) == (
        f"unknown key 'learning_rat' in section 'falcon-7b' of {path}; did you mean 'learning_rate'?"
    )


def test_wrong_type_in_a_section_names_key_and_section(tmp_path: Path) -> None:
    path = write_config(tmp_path, "s:\n  model_name: m\n  per_device_train_batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"bad value for key 'per_device_train_batch_size' in section 's' of "):
        load_config(["s"], config_file=path)


def test_unknown_key_on_the_command_line() -> None:
    message = r"unknown key 'warmup_step' on the command line; did you mean 'warmup_steps'"
    with pytest.raises(ConfigError, match=message):
        load_config(["defaults", "tiny-falcon"], [parse_override("warmup_step=3")])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dtype=bf15", r"key 'dtype' is 'bf15'; expected one of bf16, fp16, fp32"),
        ("lr_scheduler_type=step", r"key 'lr_scheduler_type' is 'step'"),
        ("save_strategy=sometimes", r"key 'save_strategy' is 'sometimes'"),
        ("per_device_train_batch_size=0", r"'per_device_train_batch_size' must be at least 1"),
        ("max_steps=0", r"'max_steps' must be at least 1 or null"),
        ("min_lr_ratio=1.5", r"key 'min_lr_ratio' is 1.5; expected a fraction of the peak from 0 to 1"),
        ("save_total_limit=0", r"'save_total_limit' must be at least 1 or null"),
        ("residual_dropout=1.5", r"'residual_dropout' must be in \[0, 1\)"),
        ("model_name=tiiuae/falcon-7b", r"set exactly one of 'model_name'"),
        ("tokenizer_name=null", r"a model built from 'model_config' needs 'tokenizer_name'"),
        ("chat_format=chatml", r"key 'chat_format' is 'chatml'; expected one of openassistant, human_bot, falcon_inst"),
        ("peft.type=adapter", r"key 'peft.type' is 'adapter'; expected one of null, lora"),
        ("peft.r=0", r"key 'peft.r' must be at least 1"),
        ("peft.dropout=1", r"'peft.dropout' must be in \[0, 1\)"),
        ("peft.target_modules=[]", r"'peft.target_modules' is an empty list"),
        ("quantization.load_in_4bit=true", r"4-bit weights cannot be trained directly; set peft.type=lora"),
        ("quantization.quant_type=int4", r"key 'quantization.quant_type' is 'int4'; expected one of nf4, fp4"),
        ("generate_val_samples=-1", r"'generate_val_samples' must be at least 0"),
        ("stop_grace_period=0", r"key 'stop_grace_period' must be positive, got 0"),
        ("learning_rate=-1e-5", r"key 'learning_rate' must be at least 0, got -1e-05"),
        ("learning_rate=.inf", r"key 'learning_rate' must be at least 0, got inf"),
        ("adam_beta1=-0.1", r"key 'adam_beta1' must be in \[0, 1\), got -0.1"),
        ("adam_epsilon=0", r"key 'adam_epsilon' must be positive, got 0.0"),
        ("weight_decay=-0.01", r"key 'weight_decay' must be at least 0, got -0.01"),
        ("max_grad_norm=.nan", r"key 'max_grad_norm' must be at least 0, got nan"),
        ("num_train_epochs=.nan", r"key 'num_train_epochs' must be positive, got nan"),
        ("ppo.gamma=.nan", r"key 'ppo.gamma' must be in \[0, 1\], got nan"),
        ("ppo.value_learning_rate=-1e-6", r"key 'ppo.value_learning_rate' must be positive or null, got -1e-06"),
        ("peft.alhpa=8", r"unknown key 'peft.alhpa' on the command line; did you mean 'alpha'\?"),
    ],
)
def test_values_the_types_cannot_check(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["defaults", "tiny-falcon", "oasst-sample"], [parse_override(override)])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (("dtype", "fp16"), r"key 'dtype' is fp16, which needs DeepSpeed's loss scaling; with deepspeed=false train in "
                            r"bf16 \(autocast over fp32 weights\) or fp32"),
        (("deepspeed_config", "configs/zero3_config.json"),
         r"deepspeed=false keeps the whole model and optimizer on every rank, but 'deepspeed_config' "
         r"\(configs/zero3_config.json\) asks for ZeRO-3, which partitions the model over the ranks; drop "
         r"deepspeed=false"),
        (("deepspeed_config", "{offload}"), r"asks for an offloaded optimizer \(offload_optimizer\)"),
    ],
)
def test_without_deepspeed_what_only_deepspeed_does_is_refused(
    setting: tuple[str, str], message: str, tmp_path: Path
) -> None:
    offload = tmp_path / "offload.json"
    offload.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    key, value = setting[0], setting[1].replace("{offload}", str(offload))
    sections = ["defaults", "tiny-falcon", "oasst-sample"]
    assert load_config(sections, [(key, value)]).deepspeed  # DeepSpeed does it
    with pytest.raises(ConfigError, match=message):
        load_config(sections, [("deepspeed", False), (key, value)])


def test_without_deepspeed_a_zero2_json_and_bf16_are_fine() -> None:
    cfg = load_config(["defaults", "falcon-7b", "oasst-top1"], [("deepspeed", False)])  # bf16, ZeRO-2's JSON
    assert (cfg.deepspeed, cfg.dtype, cfg.deepspeed_config) == (False, "bf16", "configs/zero_config.json")


def test_model_config_needs_a_model_type() -> None:
    with pytest.raises(ConfigError, match=r"'model_config' needs a 'model_type'"):
        load_config(["defaults", "oasst-sample"], [parse_override("model_config={hidden_size: 8}")])


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ("[{oasst_exprt: {}}]",
         r"unknown dataset 'oasst_exprt' in datasets\[0\]; known: oasst_export, oasst1, .*did you mean 'oasst_export'"),
        ("[{oasst_export: {langs: en}}]", r"unknown key 'langs' of dataset 'oasst_export' in datasets\[0\]"),
        ("[{oasst_export: {val_split: half}}]", r"bad value for key 'val_split' of dataset 'oasst_export'"),
        ("[[1, 2]]", r"datasets\[0\] must be a dataset name or"),
    ],
)
def test_dataset_entries_are_validated(datasets: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["defaults", "tiny-falcon"], [parse_override(f"datasets={datasets}")])


def test_dataset_mistake_in_a_section_names_the_section(tmp_path: Path) -> None:
    path = write_config(tmp_path, "s:\n  model_name: m\n  datasets: [{oasst_export: {top_kk: 1}}]\n")
    with pytest.raises(ConfigError, match=r"unknown key 'top_kk' of dataset 'oasst_export' in datasets\[0\] in "
                       r"section 's' of .*; did you mean 'top_k'"):
        load_config(["s"], config_file=path)


def test_dataset_lists_are_parsed_once_and_a_mistake_names_the_section_that_set_the_list(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        base: {model_name: m, datasets: [{oasst_export: {lang: de}}]}
        more: {datasets: [{oasst_export: {top_kk: 1}}]}
        extra: {datasets_extra: [{dolly15k: {val_split: 2}}]}
        """)  # fmt: skip
    with pytest.raises(ConfigError, match=r"'top_kk' of dataset 'oasst_export' in datasets\[0\] in section 'more'"):
        load_config(["base", "more"], config_file=path)
    with pytest.raises(ConfigError, match=r"'val_split' of dataset 'dolly15k' in datasets_extra\[0\] in section "
                       r"'extra' of \S+ must be in \[0, 1\), got 2"):
        load_config(["base", "extra"], config_file=path)
    cfg = load_config(["base"], config_file=path)
    assert cfg.dataset_specs is cfg.dataset_specs and cfg.dataset_specs[0].options.lang == "de"  # parsed once


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(["s"], config_file=write_config(tmp_path, "s: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(["s"], config_file=tmp_path / "nope.yaml")


def test_show_config_yaml_round_trips() -> None:
    cfg = load_config(["defaults", "falcon-7b", "oasst-top1"])
    merged = yaml.safe_load(to_yaml(cfg))
    assert merged["learning_rate"] == 1e-5
    assert merged["datasets"][0]["oasst_export"]["top_k"] == 1
    assert list(merged) == list(TrainConfig.__dataclass_fields__)


def test_relative_inputs_resolve_against_the_project_root() -> None:
    assert resolve_input_path("configs/zero_config.json") == PROJECT_ROOT / "configs" / "zero_config.json"
    assert resolve_input_path("/abs/file.json") == Path("/abs/file.json")


def test_yes_no_on_off_stay_strings() -> None:
    # YAML 1.1 would read `no` as false, and `save_strategy: no` would fail as a non-string.
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [parse_override("save_strategy=no")])
    assert cfg.save_strategy == "no"
    assert parse_override("log_wandb=true") == ("log_wandb", True)


@pytest.mark.parametrize(
    ("name", "hub"),
    [
        ("tiiuae/falcon-7b", True),
        ("gpt2", True),
        ("data/tokenizr", False),  # data/ is a folder of the project: a typo, not the hub user "data"
        ("data", False),
        ("/models/falcon", False),
        ("./falcon", False),
        ("~/falcon", False),
        ("falcon/", False),
        ("runs/falcon/export", False),
    ],
)
def test_model_and_tokenizer_names_that_look_like_paths_are_folders(name: str, hub: bool) -> None:
    assert is_hub_id(name, PROJECT_ROOT) is hub


def test_an_override_that_is_not_yaml_is_a_string_unless_it_opens_like_yaml() -> None:
    assert parse_override("wandb_entity=@team") == ("wandb_entity", "@team")
    with pytest.raises(ConfigError, match=r"'generate_samples=\[.Hi' is not valid YAML: .* at column 22 of the"):
        parse_override('generate_samples=["Hi')


def test_closest_name_lists_up_to_n_names() -> None:
    assert closest_name("falconx", ["falcon", "falcon_h1", "llama"], n=3) == "; did you mean 'falcon' or 'falcon_h1'?"
    assert closest_name("xyz", ["falcon"]) == ""


def test_a_training_checkpoint_is_a_model_to_start_from_but_not_a_lora_base(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-000008").mkdir()  # a run folder: exported when the run starts (training/start.py)
    overrides = [("model_name", str(tmp_path)), ("model_config", None), ("tokenizer_name", None)]
    assert load_config(["defaults-dpo", "tiny-falcon", "preference-sample"], overrides, stage="dpo").model_name
    with pytest.raises(ConfigError, match="is the training checkpoint .*, which LoRA cannot take as its base; export"):
        load_config(["defaults", "tiny-falcon", "oasst-sample"], [*overrides, ("peft.type", "lora")])
    (tmp_path / "checkpoint-000008").rmdir()
    with pytest.raises(ConfigError, match="has no config.json; expected a model folder saved by save_pretrained, or"):
        load_config(["defaults", "tiny-falcon", "oasst-sample"], overrides)
