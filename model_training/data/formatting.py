"""Conversations as token ids and loss labels, in a chat format of `chat_formats.py`, and its chat template.

In the default (OpenAssistant) format one sample is laid out as

    [<|system|>{system}<eos>] <|prompter|>{text}<eos> <|assistant|>{text}<eos> <|prompter|>{text}<eos> ...

with nothing between the segments, where <eos> is the tokenizer's eos token (`<|endoftext|>` for Falcon).
The loss is on each assistant reply's text and on its closing <eos>, so the model learns to stop; role
tokens, prompter text and system text get IGNORE_INDEX. The plain-text formats (`<human>:`/`<bot>:`,
`User:`/`Assistant:`) put the loss on the same parts: the reply (with the space before it) and its <eos>.

Labels are written while the ids are built, never found by searching the ids or comparing them with the
pad id: Falcon's pad token *is* its eos, and a mask built from `input_ids == pad_id` would hide every
closing eos.

The format's definition is the single source of truth: `chat_template()` renders the same ids through
`tokenizer.apply_chat_template`.
- A segmented format (OpenAssistant) is built segment by segment (role token, text tokenized alone, eos).
  Both paths agree because every boundary is a special token: the tokenizer splits its input on special
  tokens before the byte-level pre-tokenizer runs, so each text is tokenized alone in both, as long as the
  special tokens strip no whitespace (`prepare_tokenizer` adds them with lstrip/rstrip off). One exception,
  on purpose: a text that contains a control token's string (say a reply that quotes `<|endoftext|>`) is
  encoded here as plain text, so a quoted eos neither ends a reply with loss nor lets a prompter forge a
  turn; the template, tokenizing the whole rendered string, turns it into the control token instead;
  `apply_chat_template(..., sanitize_control_tokens=True)` encodes it as text like the formatter does, so
  use that flag when serving untrusted input.
- A plain-text format is rendered to one string and tokenized whole, as the template does, so the ids agree
  by construction; a token is supervised when its first character lies in a supervised span of the string.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerBase

from model_training.data.chat_formats import (
    CHAT_FORMATS,
    DEFAULT_CHAT_FORMAT,
    EOS,
    ChatFormat,
    get_chat_format,
    render_template,
)

# The OpenAssistant format's role tokens, added in this order, so the ids they get are the same in every run
# and on every rank (a set would not keep an order). With a base vocabulary of V tokens and none of these in
# it, the ids are V, V+1, V+2.
SPECIAL_TOKENS: tuple[str, ...] = CHAT_FORMATS[DEFAULT_CHAT_FORMAT].special_tokens
IGNORE_INDEX = -100


class MessageLike(Protocol):
    """What the formatter reads from a message (the loader's Message class has both)."""

    @property
    def role(self) -> str: ...  # "prompter" | "assistant"

    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class FormattedSample:
    """One conversation as token ids and labels aligned with them (IGNORE_INDEX where there is no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.labels)} labels")

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def loss_units(self) -> int:
        """What the loss of a step is divided by, per sample: its supervised tokens (training/batches.py)."""
        return self.num_supervised

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def update_digest(self, digest: Any) -> None:
        """Feed the ids and labels to a hashlib `digest`: what fingerprints of samples are made of."""
        digest.update(np.asarray(self.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(self.labels, dtype=np.int64).tobytes())


def chat_template(chat_format: str = DEFAULT_CHAT_FORMAT) -> str:
    """The Jinja chat template (for `tokenizer.chat_template`) that renders what `format_conversation` builds."""
    return render_template(get_chat_format(chat_format))


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, chat_format: str = DEFAULT_CHAT_FORMAT
) -> PreTrainedTokenizerBase:
    """Add the format's special tokens, set pad = eos when there is no pad token, install the chat template.

    Idempotent: tokens already present keep their ids. The model's embeddings must then be resized to
    `len(tokenizer)` (plain-text formats add no token). Raises ValueError when the tokenizer has no eos token
    (it closes every reply).
    """
    fmt = get_chat_format(chat_format)
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; the format closes every reply with it")
    if fmt.special_tokens:
        # No lstrip/rstrip: a stripping token would eat the whitespace next to it inside the rendered chat
        # (a text's leading spaces, say), and the template's ids would no longer match the formatter's.
        tokens = [
            AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for token in fmt.special_tokens
        ]
        # replace=False keeps the model's own extra special tokens flagged as special and skips ours when
        # they are there already (a reloaded checkpoint tokenizer).
        tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        # Falcon has no pad token. Padding is masked out by the attention mask and labels, which never
        # look at token ids, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = render_template(fmt)
    return tokenizer


def format_conversation(
    messages: Sequence[MessageLike],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    system: str | None = None,
    chat_format: str = DEFAULT_CHAT_FORMAT,
    last_reply_only: bool = False,
) -> FormattedSample | None:
    """Token ids and labels of a conversation that alternates prompter/assistant and ends with assistant; with
    `last_reply_only`, only the last reply (and its closing eos) carries labels, as the preference stages read it.

    Truncation rule (deterministic): keep the first `max_length` tokens; then drop the tokens after the
    last supervised one, since with causal attention they cannot change the loss. An assistant reply cut
    short keeps its loss on the tokens kept. When no supervised token is left, return None: the caller
    counts the sample as dropped. Raises ValueError on bad roles or alternation.
    """
    _check_roles(messages, last_role="assistant")
    input_ids, labels = _build(messages, tokenizer, system, get_chat_format(chat_format), generation_prompt=False,
                               last_reply_only=last_reply_only)
    return truncate(FormattedSample(tuple(input_ids), tuple(labels), truncated=False), max_length)


def format_system_prefix(
    text: str, tokenizer: PreTrainedTokenizerBase, chat_format: str = DEFAULT_CHAT_FORMAT
) -> FormattedSample:
    """The format's system turn holding `text`, without loss: what `use_system_prefix` puts before a sample."""
    input_ids, labels = _build([], tokenizer, text, get_chat_format(chat_format), generation_prompt=False)
    return FormattedSample(tuple(input_ids), tuple(labels), truncated=False)


def supervise_every_token(sample: FormattedSample) -> FormattedSample:
    """`sample` with loss on every token (label_masking off): the prompts and role markers too."""
    return FormattedSample(sample.input_ids, sample.input_ids, sample.truncated)


def truncate(sample: FormattedSample, max_length: int | None) -> FormattedSample | None:
    """`sample` cut by the rule of `format_conversation`; None when no supervised token is left."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if max_length is None or len(sample.input_ids) <= max_length:
        return sample
    labels = sample.labels[:max_length]
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not supervised:
        return None
    end = supervised[-1] + 1
    return FormattedSample(sample.input_ids[:end], labels[:end], truncated=True)


def format_text(text: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[FormattedSample]:
    """Plain pretraining text, fully supervised: the text's tokens and an eos, cut into pieces of
    `max_length` tokens (each piece a sample; the first token of a piece has no prediction to learn)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 for text, got {max_length}")
    ids = text_ids([text], tokenizer)[0]
    pieces = [tuple(ids[i : i + max_length]) for i in range(0, len(ids), max_length)]
    return [FormattedSample(p, p, truncated=False) for p in pieces if len(p) > 1]


def text_ids(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each plain text's ids and a closing eos, before `format_text` cuts them into pieces."""
    return [ids + [tokenizer.eos_token_id] for ids in encode_texts(tokenizer, texts, True)]


def format_prompt(
    messages: Sequence[MessageLike],
    tokenizer: PreTrainedTokenizerBase,
    system: str | None = None,
    chat_format: str = DEFAULT_CHAT_FORMAT,
) -> list[int]:
    """The ids to generate from: the conversation so far (ending with a prompter turn), then the assistant
    prefix. Equal to `tokenizer.apply_chat_template(..., add_generation_prompt=True)` on the same conversation.
    """
    _check_roles(messages, last_role="prompter")
    input_ids, _ = _build(messages, tokenizer, system, get_chat_format(chat_format), generation_prompt=True)
    return input_ids


def to_chat_messages(messages: Sequence[MessageLike], system: str | None = None) -> list[dict[str, str]]:
    """The conversation in Hugging Face's chat form, for `apply_chat_template` ("prompter" becomes "user")."""
    chat = [] if system is None else [{"role": "system", "content": system}]
    chat += [{"role": "user" if m.role == "prompter" else m.role, "content": m.text} for m in messages]
    return chat


def _check_roles(messages: Sequence[MessageLike], last_role: str) -> None:
    if not messages:
        raise ValueError("empty conversation")
    for i, message in enumerate(messages):
        expected = "prompter" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise ValueError(
                f"message {i} has role {message.role!r}; expected {expected!r} (roles alternate)"
            )
    if messages[-1].role != last_role:
        raise ValueError(f"the conversation must end with a {last_role} message")


_Piece = tuple[str, bool, bool]
"""(text, is a text rather than a prefix or suffix, carries loss)."""


def _pieces(
    messages: Sequence[MessageLike], system: str | None, fmt: ChatFormat, generation_prompt: bool,
    last_reply_only: bool = False,
) -> list[_Piece]:
    """The conversation as pieces, in order, empty ones left out."""
    pieces: list[_Piece] = []
    if system is not None:
        pieces += [(fmt.system[0], False, False), (system, True, False), (fmt.system[1], False, False)]
    for number, m in enumerate(messages, start=1):
        if m.role == "prompter":
            pieces += [(fmt.user[0], False, False), (m.text, True, False), (fmt.user[1], False, False)]
        else:
            loss = not last_reply_only or number == len(messages)
            pieces += [
                (fmt.assistant[0], False, False),
                (fmt.reply_prefix + m.text, True, loss),
                (fmt.assistant[1], False, loss),
            ]
    if generation_prompt:
        pieces.append((fmt.assistant[0], False, False))
    return [p for p in pieces if p[0]]


def _build(
    messages: Sequence[MessageLike],
    tokenizer: PreTrainedTokenizerBase,
    system: str | None,
    fmt: ChatFormat,
    generation_prompt: bool,
    last_reply_only: bool = False,
) -> tuple[list[int], list[int]]:
    pieces = _pieces(messages, system, fmt, generation_prompt, last_reply_only)
    return _build_many([pieces], tokenizer, fmt)[0]


def format_conversations(
    conversations: Sequence[tuple[Sequence[MessageLike], str | None]],
    tokenizer: PreTrainedTokenizerBase,
    chat_format: str = DEFAULT_CHAT_FORMAT,
    last_reply_only: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each (messages, system) as `format_conversation` builds it without a length limit, with every
    text of them tokenized in one batch call: what data preparation formats a chunk of records with."""
    fmt = get_chat_format(chat_format)
    for messages, _ in conversations:
        _check_roles(messages, last_role="assistant")
    pieces = [_pieces(m, system, fmt, generation_prompt=False, last_reply_only=last_reply_only)
              for m, system in conversations]
    return _build_many(pieces, tokenizer, fmt)


def _build_many(
    conversations: list[list[_Piece]], tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat
) -> list[tuple[list[int], list[int]]]:
    """Each conversation's pieces as (ids, labels), their texts tokenized together."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    if fmt.segmented:
        # split_special_tokens: a control token's string inside a text stays plain text (module docstring).
        texts = encode_texts(tokenizer, [p[0] for pieces in conversations for p in pieces if p[1]], True)
        encoded = iter(texts)
        # Each marker's id looked up once per call, not once per conversation.
        markers = {marker: [tokenizer.eos_token_id if marker == EOS else _special_id(tokenizer, marker)]
                   for pieces in conversations for marker, is_text, _ in pieces if not is_text}
        return [_build_segmented(pieces, encoded, markers) for pieces in conversations]
    rendered = [_render(pieces, tokenizer) for pieces in conversations]
    encodings = encode_texts(tokenizer, [text for text, _ in rendered], False, with_offsets=True)
    return [_labels_by_offsets(ids, offsets, spans) for (ids, offsets), (_, spans) in zip(encodings, rendered)]


def _build_segmented(
    pieces: list[_Piece], encoded: Iterator[list[int]], markers: dict[str, list[int]]
) -> tuple[list[int], list[int]]:
    """Each text tokenized alone (the next of `encoded`); markers are single tokens (a special token or eos: the id
    `markers` holds for it)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for piece, is_text, supervised in pieces:
        ids = next(encoded) if is_text else markers[piece]
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _render(pieces: list[_Piece], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[tuple[int, int]]]:
    """The rendered string (what the template writes) and the character spans that carry loss."""
    text, spans = "", []
    for piece, _, supervised in pieces:
        piece = tokenizer.eos_token if piece == EOS else piece
        if supervised:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def _labels_by_offsets(
    input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """The rendered string's ids with their labels: a token is supervised when its first character is in a span."""
    labels = [token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
              for token, (start, _) in zip(input_ids, offsets)]
    return input_ids, labels


_local = threading.local()


def _backend_copy(tokenizer: PreTrainedTokenizerBase, backend: Tokenizer, split_special_tokens: bool) -> Tokenizer:
    """This thread's copy of `tokenizer`'s backend for `split_special_tokens`; a tokenizer that gained tokens since
    (`prepare_tokenizer`) gets a new one."""
    if not hasattr(_local, "copies"):
        _local.copies = weakref.WeakKeyDictionary()
    made = _local.copies.setdefault(tokenizer, {})
    version = (len(tokenizer), split_special_tokens)
    if version not in made:
        copy = Tokenizer.from_str(backend.to_str())
        copy.encode_special_tokens = split_special_tokens
        made[version] = copy
    return made[version]


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], split_special_tokens: bool, with_offsets: bool = False
) -> list[Any]:
    """Each text's ids without added special tokens (with `with_offsets`, (ids, character offsets)), in one batch call
    of the fast tokenizer's backend, which tokenizes without holding the GIL: threads that call this tokenize side by
    side (data/build.py). Equal to `tokenizer(text, add_special_tokens=False, split_special_tokens=...)` per text.

    `split_special_tokens` is a setting of the whole backend, so each thread encodes with a copy of its own made for
    that setting, never flipping it under another thread. A tokenizer without a backend encodes text by text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        encoded = [tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens,
                             return_offsets_mapping=with_offsets) for text in texts]
        if with_offsets:
            return [(list(e["input_ids"]), list(e["offset_mapping"])) for e in encoded]
        return [list(e["input_ids"]) for e in encoded]
    copy = _backend_copy(tokenizer, backend, split_special_tokens)
    if with_offsets:
        return [(e.ids, e.offsets) for e in copy.encode_batch(texts, add_special_tokens=False)]
    return [e.ids for e in copy.encode_batch_fast(texts, add_special_tokens=False)]


def _special_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"{token} is not in the tokenizer; call prepare_tokenizer first")
    return token_id
