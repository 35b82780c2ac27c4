"""Every chat format: one definition drives the ids, the loss mask and the exported chat template."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model_training.data.chat_formats import CHAT_FORMATS, EOS, get_chat_format, render_template
from model_training.data.formatting import (
    IGNORE_INDEX,
    format_conversation,
    format_prompt,
    prepare_tokenizer,
    to_chat_messages,
)
from model_training.data.oasst import Message, load_oasst_export

DATA = Path(__file__).resolve().parents[2] / "data"
PLAIN_FORMATS = [name for name, fmt in CHAT_FORMATS.items() if not fmt.segmented]


def export_threads() -> list[list[Message]]:
    """Every thread of every language in the bundled export, through the project's loader."""
    threads, _ = load_oasst_export(DATA / "oasst_sample.jsonl.gz", lang="en,de,es,fr", val_split=0.0)
    return threads


def padded(path: list[Message]) -> list[Message]:
    """Texts with whitespace at their edges, where a format's markers and the texts could merge. The
    export's texts are already stripped; real ones are not always."""
    edges = [(" ", "\n"), ("\n\n", "  "), ("\t", " \n "), ("  ", "")]
    return [replace(m, text=a + m.text + b) for m, (a, b) in zip(path, edges * len(path))]


@pytest.fixture(scope="module", params=list(CHAT_FORMATS))
def fmt_tok(request):
    name = request.param
    return name, prepare_tokenizer(AutoTokenizer.from_pretrained(DATA / "tokenizer"), name)


def test_only_the_openassistant_format_adds_tokens() -> None:
    base = len(AutoTokenizer.from_pretrained(DATA / "tokenizer"))
    for name in CHAT_FORMATS:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(DATA / "tokenizer"), name)
        assert len(tokenizer) - base == len(CHAT_FORMATS[name].special_tokens)
        assert tokenizer.chat_template == render_template(CHAT_FORMATS[name])
    assert PLAIN_FORMATS == ["human_bot", "falcon_instruct", "falcon_chat"]


def test_template_renders_the_formatters_ids_on_the_export(fmt_tok) -> None:
    name, tok = fmt_tok
    threads = export_threads()
    assert len(threads) > 300 and max(map(len, threads)) >= 4
    assert {thread[0].lang for thread in threads} == {"en", "de", "es", "fr"}
    for thread in threads:
        for messages, system in ((thread, None), (padded(thread), "\n You are a helpful assistant. ")):
            sample = format_conversation(messages, tok, max_length=None, system=system, chat_format=name)
            rendered = tok.apply_chat_template(to_chat_messages(messages, system), return_dict=False)
            assert list(sample.input_ids) == rendered, (name, messages)


def test_generation_prompt_matches_format_prompt(fmt_tok) -> None:
    name, tok = fmt_tok
    # Each thread's prefixes that end with a prompter turn.
    prompts = [thread[: i + 1] for thread in export_threads() for i in range(0, len(thread), 2)]
    assert any(len(prompt) >= 3 for prompt in prompts)
    for prompt in prompts:
        for messages in (prompt, padded(prompt)):
            ids = format_prompt(messages, tok, chat_format=name)
            chat = to_chat_messages(messages)
            assert ids == tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
            # The prompt ends with the assistant marker: what the model continues from.
            assert tok.decode(ids).endswith(get_chat_format(name).assistant[0])
            if name == "openassistant":
                assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_loss_is_on_each_reply_and_its_eos_only(fmt_tok) -> None:
    name, tok = fmt_tok
    fmt = get_chat_format(name)
    for thread in export_threads()[:120]:
        sample = format_conversation(thread, tok, max_length=None, system="Be brief.", chat_format=name)
        supervised = [t for t in sample.labels if t != IGNORE_INDEX]
        replies = [m.text for m in thread if m.role == "assistant"]
        expected = "".join(fmt.reply_prefix + text + tok.eos_token for text in replies)
        assert tok.decode(supervised) == expected, (name, thread)
        # Labels are the inputs where supervised (aligned, not shifted), and every reply's eos is learned.
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(sample.input_ids, sample.labels))
        assert supervised.count(tok.eos_token_id) == len(replies)


def test_plain_formats_read_as_their_models_expect() -> None:
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(DATA / "tokenizer"), "human_bot")
    chat = [Message("prompter", "Hi", "m1"), Message("assistant", "Hello!", "m2")]
    sample = format_conversation(chat, tok, None, chat_format="human_bot")
    assert tok.decode(sample.input_ids) == f"<human>: Hi\n<bot>: Hello!{tok.eos_token}"
    expected = {
        "falcon_instruct": f"System text\nUser: Hi\nAssistant: Hello!{tok.eos_token}",
        "falcon_chat": f"System: System text\nUser: Hi\nFalcon: Hello!{tok.eos_token}",
    }
    for name, text in expected.items():
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(DATA / "tokenizer"), name)
        assert tok.decode(format_conversation(chat, tok, None, "System text", chat_format=name).input_ids) == text


def test_segmented_is_derived_from_the_markers() -> None:
    assert CHAT_FORMATS["openassistant"].segmented
    assert not replace(CHAT_FORMATS["openassistant"], user=("User: ", EOS)).segmented
    assert not CHAT_FORMATS["human_bot"].segmented


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown chat format 'chatml'; known: openassistant, human_bot"):
        prepare_tokenizer(AutoTokenizer.from_pretrained(DATA / "tokenizer"), "chatml")


def test_the_configured_format_reaches_the_training_samples() -> None:
    from model_training.config import load_config, parse_override
    from model_training.data.prepare import prepare_data
    from model_training.models.builder import load_tokenizer

    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [parse_override("chat_format=falcon_instruct")])
    tokenizer = load_tokenizer(cfg)
    assert "<|prompter|>" not in tokenizer.get_vocab()
    data = prepare_data(cfg, tokenizer)
    texts = [tokenizer.decode(s.input_ids) for split in data.train for s in split.samples]
    assert texts and all(t.startswith("User: ") and "\nAssistant: " in t for t in texts)
