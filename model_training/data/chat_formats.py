"""The chat formats a model can be trained in: one definition each, read by the formatter and the template.

A conversation is rendered turn by turn as ``prefix + text + suffix``; an assistant turn also has a
``reply_prefix`` between its prefix and its text. What carries loss is an assistant turn's reply_prefix, text
and suffix: the prefix is the generation prompt (``add_generation_prompt`` ends with it), and the suffix ends
with the tokenizer's eos, so the model learns to stop. ``EOS`` in a prefix or suffix stands for that token.

openassistant (default)
    ``<|prompter|>{text}<eos><|assistant|>{text}<eos>``: role tokens added to the vocabulary (the OpenAssistant
    SFT models, Falcon-7B/40B-sft).
human_bot
    ``<human>: {text}\\n<bot>: {text}<eos>``: plain text, no new tokens (Falcon-7b-chat-oasst1, the QLoRA run).
falcon_instruct
    ``User: {text}\\nAssistant: {text}<eos>``: Falcon-7B/40B-instruct's plain-text roles.
falcon_chat
    ``System: {text}\\nUser: {text}\\nFalcon: {text}<eos>``: Falcon-180B-chat's names for the same layout.

A format whose every prefix and suffix is a special token (or empty) is *segmented*: each text is tokenized
alone, and a text that quotes a control token keeps it as plain text. A plain-text format is tokenized as
one rendered string, exactly as ``apply_chat_template`` does, and the loss mask comes from character offsets;
there a quoted ``<|endoftext|>`` becomes the control token, as in any plain-text chat format.
"""

from __future__ import annotations

from dataclasses import dataclass

EOS = "{eos}"
"""Stands for the tokenizer's eos token in a format's prefixes and suffixes."""


@dataclass(frozen=True)
class ChatFormat:
    """How each role's turn is written; see the module docstring."""

    name: str
    system: tuple[str, str]
    """(prefix, suffix) around a system text."""
    user: tuple[str, str]
    """(prefix, suffix) around a user (prompter) text."""
    assistant: tuple[str, str]
    """(prefix, suffix) around an assistant reply; the suffix carries loss."""
    reply_prefix: str = ""
    """Written (and supervised) between the assistant prefix and the reply, e.g. the space after ``<bot>:``."""
    special_tokens: tuple[str, ...] = ()
    """Tokens this format adds to the vocabulary, in this order (so their ids are the same in every run)."""

    @property
    def segmented(self) -> bool:
        """Every boundary between texts is a special token: each text can be tokenized alone."""
        markers = (*self.system, *self.user, *self.assistant)
        return not self.reply_prefix and all(m in ("", EOS, *self.special_tokens) for m in markers)


CHAT_FORMATS: dict[str, ChatFormat] = {
    "openassistant": ChatFormat(
        name="openassistant",
        system=("<|system|>", EOS),
        user=("<|prompter|>", EOS),
        assistant=("<|assistant|>", EOS),
        special_tokens=("<|prompter|>", "<|assistant|>", "<|system|>"),
    ),
    "human_bot": ChatFormat(
        name="human_bot",
        system=("", "\n"),
        user=("<human>: ", "\n"),
        assistant=("<bot>:", EOS),
        reply_prefix=" ",
    ),
    "falcon_instruct": ChatFormat(
        name="falcon_instruct",
        system=("", "\n"),
        user=("User: ", "\n"),
        assistant=("Assistant:", EOS),
        reply_prefix=" ",
    ),
    "falcon_chat": ChatFormat(
        name="falcon_chat",
        system=("System: ", "\n"),
        user=("User: ", "\n"),
        assistant=("Falcon:", EOS),
        reply_prefix=" ",
    ),
}
"""Every value `chat_format` accepts."""

DEFAULT_CHAT_FORMAT = "openassistant"

_TEMPLATE_BODY = """\
{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception('Only the first message may be a system message.') -}}
        {%- endif -%}
        {{- system_prefix + message['content'] + system_suffix -}}
    {%- elif message['role'] == ('user' if (loop.index0 - offset) % 2 == 0 else 'assistant') -%}
        {%- if message['role'] == 'user' -%}
            {{- user_prefix + message['content'] + user_suffix -}}
        {%- else -%}
            {{- assistant_prefix + reply_prefix + message['content'] + assistant_suffix -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('Roles must alternate user/assistant, starting with user.') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- assistant_prefix -}}
{%- endif -%}"""


def get_chat_format(name: str) -> ChatFormat:
    """The format called ``name``; ValueError naming the known ones otherwise."""
    try:
        return CHAT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown chat format {name!r}; known: {', '.join(CHAT_FORMATS)}") from None


def render_template(fmt: ChatFormat) -> str:
    """The Jinja chat template (for ``tokenizer.chat_template``) that writes conversations in ``fmt``.

    Roles are Hugging Face's: an optional first "system", then "user" and "assistant" alternating, starting
    with "user". ``EOS`` becomes the template's ``eos_token`` variable, which transformers fills from the
    tokenizer, so the template holds no token of its own.
    """
    values = {
        "system_prefix": fmt.system[0], "system_suffix": fmt.system[1],
        "user_prefix": fmt.user[0], "user_suffix": fmt.user[1],
        "assistant_prefix": fmt.assistant[0], "assistant_suffix": fmt.assistant[1],
        "reply_prefix": fmt.reply_prefix,
    }
    # repr() writes a quoted string literal that Jinja reads the same way ("\n" included).
    header = "".join(
        f"{{%- set {name} = {'eos_token' if value == EOS else repr(value)} -%}}\n" for name, value in values.items()
    )
    return header + _TEMPLATE_BODY
