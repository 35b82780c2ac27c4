import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest
from jinja2 import TemplateError
from transformers import AutoTokenizer

from model_training.data.formatting import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    FormattedSample,
    chat_template,
    format_conversation,
    format_prompt,
    prepare_tokenizer,
    to_chat_messages,
)

DATA = Path(__file__).resolve().parents[2] / "data"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


def load_tokenizer():
    return AutoTokenizer.from_pretrained(DATA / "tokenizer")


@pytest.fixture(scope="module")
def tok():
    # Shared by the tests that only read it; tests that change a tokenizer load their own.
    return prepare_tokenizer(load_tokenizer())


def turns(*pairs: tuple[str, str]) -> list[Turn]:
    return [Turn(role, text) for role, text in pairs]


def test_special_tokens_get_the_same_ids_in_order_on_every_load():
    first, second = load_tokenizer(), load_tokenizer()
    base = len(first)
    ids = [prepare_tokenizer(t).convert_tokens_to_ids(list(SPECIAL_TOKENS)) for t in (first, second)]
    assert ids[0] == ids[1] == [base, base + 1, base + 2]
    assert first.extra_special_tokens == list(SPECIAL_TOKENS)


def test_prepare_tokenizer_is_idempotent():
    tokenizer = prepare_tokenizer(load_tokenizer())
    before = (len(tokenizer), tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), tokenizer.pad_token_id)
    prepare_tokenizer(tokenizer)
    after = (len(tokenizer), tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), tokenizer.pad_token_id)
    assert after == before
    assert tokenizer.extra_special_tokens == list(SPECIAL_TOKENS)
    assert tokenizer.chat_template == chat_template()


def test_the_models_own_extra_special_tokens_are_kept():
    tokenizer = load_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": [">>TITLE<<"]})
    assert prepare_tokenizer(tokenizer).extra_special_tokens == [">>TITLE<<", *SPECIAL_TOKENS]


def test_prepared_tokenizer_survives_save_and_reload(tmp_path):
    tokenizer = prepare_tokenizer(load_tokenizer())
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == tokenizer.convert_tokens_to_ids(
        list(SPECIAL_TOKENS)
    )
    assert (reloaded.pad_token, reloaded.chat_template) == (EOS, chat_template())
    assert len(prepare_tokenizer(reloaded)) == len(tokenizer)


def test_pad_is_eos_for_a_falcon_like_tokenizer(tok):
    assert tok.eos_token == tok.pad_token == EOS
    assert tok.pad_token_id == tok.eos_token_id


def test_an_existing_pad_token_is_kept():
    tokenizer = load_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert prepare_tokenizer(tokenizer).pad_token == "<pad>"


def test_a_tokenizer_without_eos_is_rejected():
    tokenizer = load_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        prepare_tokenizer(tokenizer)


def test_formatting_needs_a_prepared_tokenizer():
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        format_conversation(turns(("prompter", "Hi"), ("assistant", "Hello")), load_tokenizer(), None)


def test_exact_ids_and_labels_of_a_two_turn_conversation(tok):
    prompter, assistant, system = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    eos = tok.eos_token_id

    def text(s):
        return tok.encode(s, add_special_tokens=False)

    sys_ids, q1, a1, q2, a2 = (
        text(s) for s in ("Be brief.", "What is 2+2?", "4.", "And 3+3?", "6, since 3+3 is six.")
    )
    messages = turns(("prompter", "What is 2+2?"), ("assistant", "4."))
    messages += turns(("prompter", "And 3+3?"), ("assistant", "6, since 3+3 is six."))
    sample = format_conversation(messages, tok, max_length=None, system="Be brief.")

    ignored = [IGNORE_INDEX]
    # fmt: off
    expected_ids = (
        system, *sys_ids, eos,
        prompter, *q1, eos,
        assistant, *a1, eos,
        prompter, *q2, eos,
        assistant, *a2, eos,
    )
    expected_labels = (
        *ignored, *ignored * len(sys_ids), *ignored,
        *ignored, *ignored * len(q1), *ignored,
        *ignored, *a1, eos,
        *ignored, *ignored * len(q2), *ignored,
        *ignored, *a2, eos,
    )
    # fmt: on
    assert sample == FormattedSample(expected_ids, expected_labels, truncated=False)
    assert sample.num_supervised == len(a1) + len(a2) + 2


def test_every_assistant_eos_carries_loss_although_pad_is_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id
    messages = turns(("prompter", "Hi"), ("assistant", "Hello!"), ("prompter", "Bye"), ("assistant", "Bye!"))
    sample = format_conversation(messages, tok, max_length=None, system="You are kind.")
    eos_positions = [i for i, t in enumerate(sample.input_ids) if t == tok.eos_token_id]
    assert len(eos_positions) == 5  # system, two prompter turns, two assistant turns
    after_assistant = {i for i in eos_positions if _turn_role(sample.input_ids, i, tok) == "<|assistant|>"}
    assert len(after_assistant) == 2
    for i in eos_positions:
        assert sample.labels[i] == (tok.eos_token_id if i in after_assistant else IGNORE_INDEX)


def _turn_role(input_ids, position, tok):
    """The role token that opens the turn holding `position`."""
    role_ids = set(tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    while input_ids[position] not in role_ids:
        position -= 1
    return tok.convert_ids_to_tokens(input_ids[position])


@pytest.mark.parametrize(
    "text",
    ["", "  two spaces  ", "\n\nnewlines\n\n", "tab\tand \r\n", "日本語の文。", "emoji 🙂👍", "a" * 300],
)
def test_chat_template_matches_on_unusual_texts(tok, text):
    messages = turns(("prompter", text), ("assistant", text))
    sample = format_conversation(messages, tok, max_length=None, system=text)
    assert list(sample.input_ids) == tok.apply_chat_template(
        to_chat_messages(messages, text), return_dict=False
    )


@pytest.mark.parametrize(
    ("prompt", "reply"), [("Say <|assistant|> ok", f"A quoted {EOS} is not the end."), ("x<|system|>y", EOS)]
)
def test_control_token_strings_in_a_text_stay_plain_text(tok, prompt, reply):
    # The one documented case where the plain template differs: it tokenizes the rendered string as a
    # whole and so turns these strings into control tokens. sanitize_control_tokens=True does not.
    messages = turns(("prompter", prompt), ("assistant", reply))
    sample = format_conversation(messages, tok, max_length=None)
    role_and_eos_ids = {*tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)), tok.eos_token_id}
    assert [t for t in sample.input_ids if t in role_and_eos_ids] == tok.convert_tokens_to_ids(
        ["<|prompter|>", EOS, "<|assistant|>", EOS]
    )
    chat = to_chat_messages(messages)
    assert list(sample.input_ids) != tok.apply_chat_template(chat, return_dict=False)
    # A statement about transformers, checked where it holds: older releases have no such option (and ignore it).
    if "sanitize_control_tokens" in inspect.signature(tok.apply_chat_template).parameters:
        assert list(sample.input_ids) == tok.apply_chat_template(
            chat, return_dict=False, sanitize_control_tokens=True
        )


@pytest.mark.parametrize(
    "chat",
    [
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        [{"role": "tool", "content": "a"}],
    ],
)
def test_chat_template_rejects_bad_roles(tok, chat):
    with pytest.raises(TemplateError):
        tok.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize(
    "roles",
    [
        [],
        ["assistant"],
        ["prompter"],
        ["assistant", "prompter"],
        ["prompter", "prompter", "assistant"],
        ["prompter", "assistant", "assistant"],
        ["user", "assistant"],
    ],
)
def test_invalid_alternation_raises(tok, roles):
    with pytest.raises(ValueError):
        format_conversation([Turn(role, "x") for role in roles], tok, max_length=None)


def test_format_prompt_needs_a_prompter_turn_last(tok):
    with pytest.raises(ValueError, match="prompter"):
        format_prompt(turns(("prompter", "Hi"), ("assistant", "Hello")), tok)


MULTI_TURN = turns(
    ("prompter", "What is the capital of France?"),
    ("assistant", "The capital of France is Paris."),
    ("prompter", "And of Germany?"),
    ("assistant", "Berlin."),
)


def test_truncation_keeps_the_beginning_and_is_deterministic(tok):
    full = format_conversation(MULTI_TURN, tok, max_length=None)
    first_reply = full.input_ids.index(tok.convert_tokens_to_ids("<|assistant|>")) + 1
    cut = first_reply + 3  # inside the first reply
    sample = format_conversation(MULTI_TURN, tok, max_length=cut)
    assert sample == format_conversation(MULTI_TURN, tok, max_length=cut)
    assert sample.truncated
    assert sample.input_ids == full.input_ids[:cut]
    assert sample.labels == full.labels[:cut]
    assert sample.num_supervised == 3  # the reply's tokens that were kept still carry loss


def test_truncation_drops_unsupervised_tokens_after_the_last_supervised_one(tok):
    full = format_conversation(MULTI_TURN, tok, max_length=None)
    first_reply_end = full.labels.index(tok.eos_token_id) + 1
    sample = format_conversation(MULTI_TURN, tok, max_length=first_reply_end + 4)  # inside the 2nd prompt
    assert sample.truncated
    assert sample.input_ids == full.input_ids[:first_reply_end]
    assert sample.labels[-1] == tok.eos_token_id


def test_no_truncation_at_exactly_max_length(tok):
    full = format_conversation(MULTI_TURN, tok, max_length=None)
    assert format_conversation(MULTI_TURN, tok, max_length=len(full.input_ids)) == full
    assert not full.truncated


def test_a_cut_that_leaves_no_supervised_token_gives_none(tok):
    full = format_conversation(MULTI_TURN, tok, max_length=None)
    through_assistant_token = full.input_ids.index(tok.convert_tokens_to_ids("<|assistant|>")) + 1
    assert format_conversation(MULTI_TURN, tok, max_length=through_assistant_token) is None
    assert format_conversation(MULTI_TURN, tok, max_length=through_assistant_token + 1).num_supervised == 1


def test_max_length_must_be_positive(tok):
    with pytest.raises(ValueError, match="max_length"):
        format_conversation(MULTI_TURN, tok, max_length=0)
