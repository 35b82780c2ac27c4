"""Tokenizer and model construction: pretrained weights or a config with random weights, ZeRO-3 aware."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations import HfDeepSpeedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from model_training.config import (
    PROJECT_ROOT,
    ConfigError,
    TrainConfig,
    first_line,
    resolve_input_path,
    zero_stage,
)
from model_training.data.chat_formats import get_chat_format
from model_training.data.formatting import prepare_tokenizer
from model_training.folders import remove_folder, replace_folder
from model_training.hub import is_hub_id
from model_training.layout import BASE_MODEL_DIR, record_run_file
from model_training.models.dtypes import TORCH_DTYPES
from model_training.models.families import shape_mistake
from model_training.models.lora import apply_lora, quantize_linear_layers
from model_training.models.packed_attention import enable_packed_attention
from model_training.models.residual_dropout import apply_residual_dropout
from model_training.models.reward_head import enable_token_scores
from model_training.stages import STAGES

logger = logging.getLogger(__name__)

EMBEDDING_MULTIPLE = 16
"""Embedding rows are padded to a multiple of this: tensor cores and sharding like round sizes."""

# transformers follows ZeRO-3 (zero.Init on load, gathered resize) only while an HfDeepSpeedConfig object is
# alive; it keeps a weak reference, so this module keeps the strong one for the life of the process.
_hf_deepspeed_config: HfDeepSpeedConfig | None = None


def base_model_reference(cfg: TrainConfig, run_dir: Path) -> str:
    """Where the frozen base of a LoRA run is read from again (export, merge): the hub id or local folder of
    `model_name`, or the copy of a random-weight base in the run folder (see `build_model`)."""
    if cfg.model_name is not None:
        return _hub_or_local(cfg.model_name)
    return str((run_dir / BASE_MODEL_DIR).resolve())


def _hub_or_local(name: str) -> str:
    """A hub id as it is, a local folder resolved against the project root (the rule: model_training/config/)."""
    return name if is_hub_id(name, PROJECT_ROOT) else str(resolve_input_path(name))


def load_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The tokenizer with the chat tokens added in their fixed order and pad/eos set for the model family."""
    key = "tokenizer_name" if cfg.tokenizer_name is not None else "model_name"  # validate() ensures one is set
    name = getattr(cfg, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            _hub_or_local(name), cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:  # a hub id out of reach, or a folder with broken tokenizer files
        raise ConfigError(f"key '{key}': cannot load the tokenizer {name!r}: {first_line(err)}") from None
    return prepare_tokenizer(tokenizer, cfg.chat_format)


def build_model(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    ds_config: dict[str, Any],
    save_base_to: Path | None = None,
    reward_head: bool | None = None,
) -> torch.nn.Module:
    """The causal LM (with `reward_head`, by default the stage's, stages.py: the sequence classifier with one score,
    its forward returning a score per token, models/reward_head.py), its embeddings resized for the added tokens,
    residual dropout, checkpointing and packed attention applied; then, as configured, its linear layers quantized to
    4 bits and LoRA adapters added.

    Must run after torch.distributed is initialized and before the engine is built (`deepspeed.initialize`):
    under ZeRO-3 the weights are partitioned as they are created, so a 40B model never exists whole on one rank.
    `ds_config` is {} for a run without DeepSpeed: nothing is partitioned.
    `save_base_to`: write the base (before quantization and adapters) there as a Hugging Face folder, for a
    LoRA run whose base exists nowhere else (random weights from `model_config`).
    """
    global _hf_deepspeed_config
    zero = zero_stage(ds_config)
    _check_fits_zero(cfg, zero)
    # Alive, transformers partitions every model it builds under zero.Init: only while this one is built under ZeRO-3
    # (PPO builds its frozen models whole beside partitioned ones).
    _hf_deepspeed_config = HfDeepSpeedConfig(ds_config) if zero == 3 else None
    device = training_device()
    # The same seed on every rank: random weights must be identical across data-parallel replicas. torch's
    # generators (every device's) are all that initialization draws from; transformers.set_seed would also
    # import its trainer utilities, and peft with them: seconds of startup.
    torch.manual_seed(cfg.rng_seed)
    reward_head = STAGES[cfg.stage].reward_head if reward_head is None else reward_head
    model = _create_model(cfg, tokenizer, zero, device, reward_head)
    # Named in the saved config, so that an export builds the same class (a model from `model_config` names none).
    model.config.architectures = [type(model).__name__]
    if reward_head:
        enable_token_scores(model)
    new_rows = _fit_to_tokenizer(model, tokenizer)
    if cfg.freeze_layer is not None:
        _freeze_layers(model, cfg.freeze_layer, len(new_rows))
    _apply_training_options(cfg, model)
    if save_base_to is not None:
        _save_base(model, save_base_to)
    if cfg.quantization.load_in_4bit:
        count = quantize_linear_layers(model, cfg.quantization, device)
        logger.info("base quantized to 4 bits (%s): %d linear layers", cfg.quantization.quant_type, count)
    if cfg.peft.type == "lora":
        # Trained with the adapters: the chat format's own tokens (new, or tuned for this format), and every row
        # the resize added, padding included, since the output head scores those rows too. The adapter then
        # holds them all, and a base resized anywhere else (randomly) computes what was trained.
        format_tokens = tokenizer.convert_tokens_to_ids(list(get_chat_format(cfg.chat_format).special_tokens))
        model = apply_lora(model, cfg.peft, sorted({*format_tokens, *new_rows}))
    if cfg.torch_compile:
        count = compile_decoder_layers(model)
        logger.info("torch.compile: %d decoder layers (compiled at their first forward)", count)
    return model


def model_config(cfg: TrainConfig, **extra: Any) -> PretrainedConfig:
    """The transformers config `cfg.model_config` describes (with `extra` options); ConfigError, naming the key, when
    transformers refuses it or its shape does not fit its family's rules (models/families.py). Checked before any
    rank starts (cli.py), and used to build the model."""
    options = dict(cfg.model_config or {})
    model_type = options.pop("model_type")
    for key, value in options.items():
        # transformers divides by them, and says "division by zero" at best
        if key in _COUNTS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"key 'model_config.{key}' is {value!r}; expected a positive whole number")
    try:
        config = AutoConfig.for_model(model_type, **options, **extra)
    except (ValueError, TypeError, StrictDataclassError) as err:
        # transformers' validators: "Validation error for field 'x'", then the reason on the last line.
        field = re.search(r"field '(\w+)'", str(err))
        key = f"model_config.{field.group(1)}" if field else "model_config"
        reason = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(f"key '{key}' does not make a {model_type} model: {reason}") from None
    mistake = shape_mistake(config, options)
    if mistake is not None:
        raise ConfigError(f"key 'model_config': {mistake}")
    return config


_COUNTS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "num_kv_heads", "n_head",
           "n_layer", "intermediate_size", "head_dim")
"""Sizes and counts of a model config, each a positive whole number in every family."""


def _create_model(
    cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, zero: int, device: torch.device, reward_head: bool
) -> PreTrainedModel:
    """The causal LM (sequence classifier for the reward model) with random weights from `model_config`, or loaded
    from `model_name`: a hub model, a local folder, or one of our exports (a reward model's head then starts random)."""
    dtype = TORCH_DTYPES[cfg.dtype]
    auto_class, head = (AutoModelForSequenceClassification, {"num_labels": 1}) if reward_head else (
        AutoModelForCausalLM, {})
    if cfg.model_config is not None:
        config = model_config(cfg, **head)
        config.vocab_size = _padded(len(tokenizer))  # sized for the tokenizer: no resize afterwards
        # Initialized where it trains: on a GPU in a second, where the CPU takes most of a minute for 2B
        # parameters. Under ZeRO-3, zero.Init (through the HfDeepSpeedConfig) partitions it onto the GPUs.
        with contextlib.nullcontext() if zero == 3 else device:
            return auto_class.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    # Straight onto the GPU, except under ZeRO-3 (partitioned as it loads) and for a 4-bit base, which is
    # quantized onto the GPU a layer at a time and so never has to fit there in 16 bits.
    onto_device = zero != 3 and not cfg.quantization.load_in_4bit and device.type == "cuda"
    # transformers' LOAD REPORT table, printed by every rank, says it in a dozen lines; _report_load says it in one.
    with _quiet_load_report():
        model, loading = auto_class.from_pretrained(
            _hub_or_local(cfg.model_name),
            **head,
            dtype=dtype,
            cache_dir=cfg.cache_dir,
            trust_remote_code=cfg.trust_remote_code,
            device_map={"": device} if onto_device else None,
            output_loading_info=True,
        )
    _report_load(cfg.model_name, loading)
    if cfg.quantization.load_in_4bit and device.type == "cuda":
        # The resize's mean and covariance of the old rows, computed on the GPU, not the CPU.
        model.get_input_embeddings().to(device)
        model.get_output_embeddings().to(device)
    return model


def _not_the_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_load_report() -> Any:
    # A filter, not a level: transformers 5 checks its tensor-parallel plan (and warns of every layer it does not
    # shard) whenever this logger's level is WARNING or above.
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_not_the_load_report)
    try:
        yield
    finally:
        report.removeFilter(_not_the_load_report)


def _report_load(model_name: str, loading: dict[str, Any]) -> None:
    """One line of what `from_pretrained` did not load: a reward model's new head is expected (rank 0 says it); any
    other missing, unexpected or mismatched weight is a warning."""
    missing = [k for k in loading.get("missing_keys", ()) if not k.startswith("score.")]
    head = [k for k in loading.get("missing_keys", ()) if k.startswith("score.")]
    if head:
        logger.info("reward head %s starts random: %s has none", ", ".join(sorted(head)), model_name)
    unexpected, mismatched = loading.get("unexpected_keys", ()), loading.get("mismatched_keys", ())
    if missing or unexpected or mismatched:
        logger.warning("%s: %d weights missing (start random: %s), %d unexpected (ignored: %s), %d of another shape",
                       model_name, len(missing), ", ".join(sorted(missing)[:5]), len(unexpected),
                       ", ".join(sorted(unexpected)[:5]), len(mismatched))


def _fit_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> range:
    """Resize the embeddings for the added tokens and take the tokenizer's pad and eos; the new rows."""
    rows_before = model.get_input_embeddings().num_embeddings
    if rows_before != _padded(len(tokenizer)):
        # Gathered under ZeRO-3 by transformers itself; new rows start near the mean of the old ones.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE)
    # A reward model generates nothing: it may have no generation config.
    for config in filter(None, (model.config, getattr(model, "generation_config", None))):
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    return range(rows_before, model.get_input_embeddings().num_embeddings)


def _apply_training_options(cfg: TrainConfig, model: PreTrainedModel) -> None:
    """Residual dropout, activation checkpointing and packed attention, as configured."""
    if cfg.residual_dropout > 0:
        probabilities = apply_residual_dropout(model, cfg.residual_dropout, cfg.residual_dropout_lima)
        logger.info("residual dropout per layer: %s", [round(p, 4) for p in probabilities])
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
        if cfg.gradient_checkpointing_layers is not None:
            layers = decoder_layers(model)
            for layer in layers[cfg.gradient_checkpointing_layers :]:
                layer.gradient_checkpointing = False
            kept = min(len(layers), cfg.gradient_checkpointing_layers)
            logger.info("activation checkpointing on %d of %d layers", kept, len(layers))
    if cfg.packing:
        # Before LoRA wraps the model: the packing hooks go on the causal LM and its decoder themselves.
        try:
            enable_packed_attention(model)
        except ValueError as err:
            raise ConfigError(
                f"packing=true does not fit this model: {err}; set packing=false to train it on padded batches"
            ) from None


def compile_decoder_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder layer in place with torch.compile; return how many.

    A layer at a time rather than the whole model: the layers are alike, so one compilation serves them all,
    and the model's own Python (hooks, packing, the loss) stays eager. Inside a layer the elementwise work
    around the matrix products (norms, rotary positions, activations, residual adds) fuses into few kernels.
    """
    layers = decoder_layers(model)
    for layer in layers:
        # Dynamic from the start: a packed row's length changes every step, so static sizes would only cost a
        # first compilation that the second step throws away.
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers, in order (transformers builds each as a GradientCheckpointingLayer)."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _freeze_layers(model: torch.nn.Module, count: int, new_rows: int) -> None:
    """OpenAssistant's freeze_layer: the input embeddings (with an output head tied to them) and the first
    `count` decoder layers stop training."""
    if new_rows:
        raise ConfigError(
            f"freeze_layer freezes the input embeddings, but the {new_rows} rows the resize added for this "
            "tokenizer (the chat format's tokens, the padding to a multiple of 16) would then never train; start "
            "from a model whose vocabulary has them (an earlier SFT export), or set freeze_layer=null"
        )
    frozen = [*model.get_input_embeddings().parameters()]
    for layer in decoder_layers(model)[:count]:
        frozen += layer.parameters()
    for parameter in frozen:
        parameter.requires_grad_(False)
    logger.info("freeze_layer: the embeddings and the first %d decoder layers are frozen (%d parameters)",
                count, sum(p.numel() for p in frozen))


def enable_checkpointing(model: PreTrainedModel, use_reentrant: bool = False) -> None:
    """Recompute each decoder layer's activations in backward. Non-reentrant checkpointing (the default) also
    works when no input of a block requires grad (a frozen base). The method's current name where this
    transformers has it: the older one warns on every run."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def training_device() -> torch.device:
    """This rank's GPU (init_distributed selected it) or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _save_base(model: torch.nn.Module, folder: Path) -> None:
    """Write the base into `folder` through a temporary sibling, so `folder` is whole or absent."""
    partial, aside = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".replaced")
    remove_folder(partial)
    model.save_pretrained(partial)
    replace_folder(partial, record_run_file(folder.parent, folder.name), aside=aside)  # the run's, for an overwrite
    logger.info("LoRA base model (random weights) saved to %s for export", folder)


def _check_fits_zero(cfg: TrainConfig, zero: int) -> None:
    """LoRA and a 4-bit base run on ZeRO-0/1/2: ZeRO-3 would partition weights that bitsandbytes packs and
    peft wraps, and LoRA's few trained weights gain nothing from it. torch.compile does not trace ZeRO-3."""
    if zero == 3 and cfg.quantization.load_in_4bit:
        raise ConfigError(
            f"a 4-bit base (quantization.load_in_4bit) cannot be partitioned by ZeRO-3 ({cfg.deepspeed_config}); "
            "use configs/zero_config.json (ZeRO-2): the 4-bit base fits on each GPU"
        )
    if zero == 3 and cfg.torch_compile:
        raise ConfigError(
            f"torch_compile=true does not work with ZeRO-3 ({cfg.deepspeed_config}), whose parameters are gathered "
            "by hooks torch.compile cannot trace; set torch_compile=false or use ZeRO-2"
        )
    if zero == 3 and cfg.peft.type is not None:
        raise ConfigError(
            f"LoRA runs on ZeRO-2, not ZeRO-3 ({cfg.deepspeed_config}): use configs/zero_config.json, and a 4-bit "
            "base (quantization.load_in_4bit=true) when the 16-bit base does not fit on one GPU"
        )


def _padded(n: int) -> int:
    return -(-n // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE
