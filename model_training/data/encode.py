"""A chunk of records as token arrays: what one worker of a data preparation computes (model_training/data/build.py).

Every text of the chunk is tokenized in one batch call (`formatting.encode_texts`, which leaves the GIL to other
threads), and each record's tokens are laid end to end, in record order:

    ids          int32   the tokens of every record: a conversation formatted whole in the chat format, a text
                         document's text and its closing eos (cut into pieces only when samples are chosen)
    mask         uint8   1 where the token carries loss (every token of a text; with `label_masking` off, of all)

and one entry per record:

    tokens       int64   its number of tokens (0 for a record the source's filter refused)
    supervised   int64   how many of them carry loss
    turns        int32   its messages (1 for a text document)
    text         bool    a text document rather than a conversation
    refused      bool    refused by the source's filter (another language): counted, never trained on
    keys         uint8   (records, 16): its dedupe digest (zeros without dedupe)

A chunk of the preference stages' comparisons (`encode_comparisons`) lays out each reply as the whole conversation it
ends, labels on that reply alone (data/preferences.py), best reply first, with per record its `tokens` and its number
of `sequences`, and per sequence its `sequence_tokens`.

The ids and labels are `formatting.format_conversation`'s and `format_text`'s, token for token: both go through the
same builder (`format_conversations`, `text_ids`).
"""

from __future__ import annotations

import hashlib

import numpy as np
from transformers import PreTrainedTokenizerBase

from model_training.data.formatting import IGNORE_INDEX, format_conversations, text_ids
from model_training.data.records import Comparison, Conversation, Message, Record, TextDocument

DEDUPE_KEY_BYTES = 16


def dedupe_key(record: Record) -> bytes:
    """A 16-byte digest of what makes two records duplicates (the same system, roles and texts; or the same text)."""
    if isinstance(record, TextDocument):
        key: tuple = ("text", record.text.strip())
    else:
        key = (record.system, tuple((m.role, m.text.strip()) for m in record.messages))
    return hashlib.blake2b(repr(key).encode(), digest_size=DEDUPE_KEY_BYTES).digest()


def encode_records(
    records: list[Record],
    refused: list[bool],
    tokenizer: PreTrainedTokenizerBase,
    chat_format: str,
    label_masking: bool,
    dedupe: bool,
) -> dict[str, np.ndarray]:
    """The arrays of the module docstring for `records` (those `refused` get no tokens)."""
    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    # A slice at a time, each record's tokens turned into arrays at once: the Python ints of a whole chunk are never
    # alive together, so the heap a preparation leaves behind stays small (fragments of it are never given back).
    for at in range(0, len(records), SLICE):
        for record_ids, record_mask in _encode_slice(records[at : at + SLICE], refused[at : at + SLICE], tokenizer,
                                                     chat_format, label_masking):
            ids.append(record_ids)
            mask.append(record_mask)
    keys = [dedupe_key(r) if dedupe and not no else bytes(DEDUPE_KEY_BYTES) for r, no in zip(records, refused)]
    return {
        "ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
        "mask": np.concatenate(mask) if mask else np.zeros(0, np.uint8),
        "tokens": np.array([len(x) for x in ids], dtype=np.int64),
        "supervised": np.array([int(m.sum()) for m in mask], dtype=np.int64),
        "turns": np.array([1 if isinstance(r, TextDocument) else len(r.messages) for r in records], dtype=np.int32),
        "text": np.array([isinstance(r, TextDocument) for r in records], dtype=bool),
        "refused": np.array(refused, dtype=bool),
        "keys": np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(records), DEDUPE_KEY_BYTES),
    }


SLICE = 64
"""Records tokenized by one batch call."""


def _encode_slice(
    records: list[Record], refused: list[bool], tokenizer: PreTrainedTokenizerBase, chat_format: str,
    label_masking: bool,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) arrays of each record, empty for a refused one."""
    kept = [record for record, no in zip(records, refused) if not no]
    conversations = iter(format_conversations(
        [(r.messages, r.system) for r in kept if isinstance(r, Conversation)], tokenizer, chat_format))
    texts = iter(text_ids([r.text for r in kept if isinstance(r, TextDocument)], tokenizer))
    encoded = []
    for record, no in zip(records, refused):
        if no:
            encoded.append((np.zeros(0, np.int32), np.zeros(0, np.uint8)))
        elif isinstance(record, TextDocument):
            record_ids = np.array(next(texts), dtype=np.int32)
            encoded.append((record_ids, np.ones(len(record_ids), np.uint8)))
        else:
            record_ids, labels = (np.array(x, dtype=np.int32) for x in next(conversations))
            supervised = np.ones(len(labels), bool) if not label_masking else labels != IGNORE_INDEX
            encoded.append((record_ids, supervised.astype(np.uint8)))
    return encoded


def encode_comparisons(comparisons: list[Comparison], tokenizer: PreTrainedTokenizerBase,
                       chat_format: str) -> dict[str, np.ndarray]:
    """The arrays of the module docstring for a chunk of comparisons."""
    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    for at in range(0, len(comparisons), SLICE):
        conversations = [c for comparison in comparisons[at : at + SLICE] for c in reply_conversations(comparison)]
        for sequence_ids, labels in format_conversations(conversations, tokenizer, chat_format, last_reply_only=True):
            ids.append(np.array(sequence_ids, dtype=np.int32))
            mask.append((np.array(labels) != IGNORE_INDEX).astype(np.uint8))
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    counts = np.array([len(c.replies) for c in comparisons], dtype=np.int64)
    firsts = np.cumsum(counts) - counts
    return {
        "ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
        "mask": np.concatenate(mask) if mask else np.zeros(0, np.uint8),
        "tokens": np.array([lengths[f : f + n].sum() for f, n in zip(firsts, counts)], dtype=np.int64),
        "sequences": counts,
        "sequence_tokens": lengths,
    }


def reply_conversations(comparison: Comparison) -> list[tuple[list[Message], str | None]]:
    """Each ranked reply as the whole conversation it ends, (messages, system), best first."""
    return [([*comparison.prefix, Message(role="assistant", text=reply, message_id=f"reply:{number}")],
             comparison.system) for number, reply in enumerate(comparison.replies)]
