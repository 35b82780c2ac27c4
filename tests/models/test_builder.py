"""Tokenizer and model construction: chat tokens, pad/eos, embeddings padded to 16, pretrained folders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model_training.config import ConfigError, load_config, parse_override
from model_training.data.collate import collate
from model_training.data.formatting import IGNORE_INDEX, SPECIAL_TOKENS, format_conversation
from model_training.models.builder import build_model, decoder_layers, load_tokenizer, model_config
from model_training.models.families import UnsupportedArchitectureError

TINY = ["defaults", "tiny-falcon", "oasst-sample"]
ZERO2 = {"zero_optimization": {"stage": 2}}
DATA = Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


def config(*overrides: str):
    return load_config(TINY, [parse_override(o) for o in overrides])


def test_tokenizer_gets_the_chat_tokens_in_order_and_falcon_pad() -> None:
    tokenizer = load_tokenizer(config())
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == [2023, 2024, 2025]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert load_tokenizer(config()).convert_tokens_to_ids(list(SPECIAL_TOKENS)) == ids


@pytest.mark.parametrize("chat_format", ["openassistant", "human_bot"])
def test_a_llama_tokenizer_pads_with_its_eos_and_every_reply_keeps_its_eos_label(chat_format: str) -> None:
    """Llama's tokenizer has no pad token; the pad chosen is its eos `</s>`, the token that closes every reply.
    The labels come from the formatter, so a batch padded with that id still supervises each reply's eos, where a
    loss mask taken from `input_ids == pad_id` would have dropped every one of them."""
    assert AutoTokenizer.from_pretrained(DATA / "tokenizer-llama").pad_token is None  # as Llama's own
    cfg = load_config(["defaults", "tiny-llama", "oasst-sample"], [parse_override(f"chat_format={chat_format}")])
    tokenizer = load_tokenizer(cfg)
    eos = tokenizer.eos_token_id
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.pad_token_id) == ("</s>", "</s>", eos)
    turns = [Turn("prompter", "Hi"), Turn("assistant", "Hello there."), Turn("prompter", "And?"),
             Turn("assistant", "Bye.")]
    short = format_conversation(turns[:2], tokenizer, None, chat_format=chat_format)
    long = format_conversation(turns, tokenizer, None, chat_format=chat_format)
    batch = collate([short, long], packing=False, pad_token_id=tokenizer.pad_token_id)
    labels, input_ids = batch["labels"], batch["input_ids"]
    assert (input_ids[0, len(short.input_ids):] == eos).all()  # the short row is padded with the eos id
    # One supervised eos per reply: 1 in the short row, 2 in the long one; none on the padding.
    assert [int((row == eos).sum()) for row in labels] == [1, 2]
    assert labels[0, len(short.input_ids):].eq(IGNORE_INDEX).all()
    # Each of them sits on an input id equal to the pad id: a mask from `input_ids == pad_id` drops them all.
    assert (input_ids[labels == eos] == tokenizer.pad_token_id).all()


def test_random_model_has_padded_embeddings_and_the_tokenizer_ids() -> None:
    cfg = config()
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer, ZERO2)
    assert model.get_input_embeddings().weight.shape[0] == 2032  # 2026 tokens, padded to a multiple of 16
    assert model.config.vocab_size == 2032
    assert (model.config.pad_token_id, model.config.eos_token_id) == (0, 0)
    assert model.generation_config.eos_token_id == 0
    assert model.config.use_cache is False
    assert build_model(cfg, tokenizer, ZERO2).state_dict().keys() == model.state_dict().keys()
    same = build_model(cfg, tokenizer, ZERO2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values())), \
        "the same seed must give the same weights on every rank"


def test_pretrained_folder_is_loaded_and_its_embeddings_resized(tmp_path: Path) -> None:
    cfg = config()
    tokenizer = load_tokenizer(cfg)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("falcon", **{
        k: v for k, v in cfg.model_config.items() if k != "model_type"}, vocab_size=2023))
    base.save_pretrained(tmp_path / "base")
    pretrained = config("model_config=null", f"model_name={tmp_path / 'base'}", "dtype=fp32")
    model = build_model(pretrained, tokenizer, ZERO2)
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == 2032
    assert torch.equal(rows[:2023], base.get_input_embeddings().weight)


@pytest.mark.parametrize("residual_dropout", [0.0, 0.2])
def test_checkpointing_and_dropout_are_wired(residual_dropout: float) -> None:
    cfg = config("gradient_checkpointing=true", f"residual_dropout={residual_dropout}", "residual_dropout_lima=true")
    model = build_model(cfg, load_tokenizer(cfg), ZERO2).train()
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    ids = torch.randint(0, 2000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = (model(input_ids=ids).logits for _ in range(2))
        # Dropout draws anew on every training forward, so two forwards differ exactly when it is on ...
        assert torch.equal(first, second) == (residual_dropout == 0.0)
        # ... and evaluation is deterministic whatever the rate.
        model.eval()
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_residual_dropout_on_an_unsupported_architecture_is_an_error() -> None:
    cfg = config("model_config={model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2}", "residual_dropout=0.1")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        build_model(cfg, load_tokenizer(cfg), ZERO2)


def test_selective_checkpointing_recomputes_only_the_first_layers() -> None:
    overrides = ("model_config.num_hidden_layers=3", "gradient_checkpointing=true")
    grads = {}
    for layers in (None, 0, 2):
        cfg = config(*overrides, f"gradient_checkpointing_layers={'null' if layers is None else layers}")
        model = build_model(cfg, load_tokenizer(cfg), ZERO2).train()
        flags = [block.gradient_checkpointing for block in model.transformer.h]
        assert flags == [True] * 3 if layers is None else [i < layers for i in range(3)]
        ids = torch.arange(40).reshape(2, 20)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[layers] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # Recomputing is exact: the same gradients whichever layers are checkpointed.
    assert torch.equal(grads[None], grads[0]) and torch.equal(grads[None], grads[2])


def test_freeze_layer_freezes_the_embeddings_and_the_first_layers() -> None:
    """OpenAssistant's freeze_layer: the embeddings (with the head tied to them) and layers 0..N-1 stop training."""
    cfg = config("freeze_layer=1", "model_config.num_hidden_layers=3")
    model = build_model(cfg, load_tokenizer(cfg), ZERO2)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "transformer.word_embeddings.weight" in frozen and model.lm_head.weight.requires_grad is False
    assert {name.split(".")[2] for name in frozen if name.startswith("transformer.h.")} == {"0"}
    assert all(p.requires_grad for name, p in model.named_parameters() if name.startswith("transformer.h.1."))


def test_freeze_layer_is_refused_when_new_embedding_rows_would_never_train(tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=2023))
    base.save_pretrained(tmp_path / "base")
    cfg = config("model_config=null", f"model_name={tmp_path / 'base'}", "dtype=fp32", "freeze_layer=1")
    with pytest.raises(ConfigError, match=r"freeze_layer freezes the input embeddings, but the 9 rows the resize "
                                          r"added .* would then never train"):
        build_model(cfg, load_tokenizer(cfg), ZERO2)


class Records(logging.Handler):
    """The records a logger's handlers get."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_reward_model_from_a_chat_model_says_its_new_head_once_without_the_load_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers logs a LOAD REPORT table (score.weight MISSING) on every rank; ours is one INFO line (rank 0's:
    the other ranks log warnings only)."""
    cfg = config()
    tokenizer = load_tokenizer(cfg)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("falcon", **{
        k: v for k, v in cfg.model_config.items() if k != "model_type"}, vocab_size=2023))
    base.save_pretrained(tmp_path / "chat")
    rm = load_config(["defaults-rm", "tiny-falcon", "preference-sample"],
                     [parse_override("model_config=null"), parse_override(f"model_name={tmp_path / 'chat'}")],
                     stage="rm")
    transformers_said = Records()  # transformers' own handler hangs on its library logger, which does not propagate
    logging.getLogger("transformers").addHandler(transformers_said)
    try:
        with caplog.at_level("INFO", logger="model_training.models.builder"):
            build_model(rm, tokenizer, ZERO2)
    finally:
        logging.getLogger("transformers").removeHandler(transformers_said)
    assert not [m for m in transformers_said.messages if "LOAD REPORT" in m or "were not sharded" in m]
    assert [r.getMessage() for r in caplog.records if "reward head" in r.getMessage()] == [
        f"reward head score.weight starts random: {tmp_path / 'chat'} has none"]
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "weights missing" in r.getMessage()]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model_config.num_attention_heads=0", r"key 'model_config.num_attention_heads' is 0; expected a positive"),
        ("model_config.hidden_size=66", r"key 'model_config': 'hidden_size' \(66\) is not a multiple of"),
        ("model_config.alibi=maybe", r"key 'model_config.alibi' does not make a falcon model: TypeError: Field"),
        ("model_config={model_type: llama, hidden_size: 66, num_attention_heads: 4}",
         r"key 'model_config' does not make a llama model: ValueError: The hidden size \(66\) is not a multiple"),
    ],
)
def test_a_model_config_transformers_would_refuse_is_one_line_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        model_config(config(override))
