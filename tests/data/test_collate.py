from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from model_training.data.collate import collate, pad_batch
from model_training.data.formatting import (
    IGNORE_INDEX,
    FormattedSample,
    format_conversation,
    prepare_tokenizer,
)

TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tokenizer"
PAD = 0

SHORT = FormattedSample(input_ids=(5, 6, 0), labels=(IGNORE_INDEX, 6, 0), truncated=False)
LONG = FormattedSample(
    input_ids=(7, 8, 9, 10, 0), labels=(IGNORE_INDEX, IGNORE_INDEX, 9, 10, 0), truncated=True
)


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


def test_rows_are_right_padded_to_the_longest_sample():
    batch = pad_batch([SHORT, LONG], pad_token_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 0, PAD, PAD], [7, 8, 9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 0, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 0],
    ]


@pytest.mark.parametrize(("multiple", "length"), [(None, 5), (1, 5), (4, 8), (5, 5), (16, 16)])
def test_pad_to_multiple_of(multiple, length):
    batch = pad_batch([SHORT, LONG], pad_token_id=3, pad_to_multiple_of=multiple)
    assert batch["input_ids"].shape == (2, length)
    assert (batch["input_ids"][1, 5:] == 3).all()
    assert batch["attention_mask"].sum().item() == 8
    assert (batch["labels"][:, 5:] == IGNORE_INDEX).all()


def test_padding_with_the_eos_id_keeps_the_loss_on_real_eos_tokens():
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(TOKENIZER))
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    conversations = [
        [Turn("prompter", "Hi"), Turn("assistant", "Hello!")],
        [Turn("prompter", "What is the capital of France?"), Turn("assistant", "Paris.")],
    ]
    samples = [format_conversation(c, tokenizer, max_length=None) for c in conversations]
    batch = pad_batch(samples, pad_token_id=tokenizer.pad_token_id)
    short_length = len(samples[0].input_ids)
    assert batch["input_ids"][0, short_length - 1] == eos == batch["input_ids"][0, short_length]  # real, pad
    assert batch["labels"][0, short_length - 1] == eos
    assert batch["attention_mask"][0].tolist() == [1] * short_length + [0] * (
        batch["input_ids"].shape[1] - short_length
    )
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        assert batch["input_ids"][row, :n].tolist() == list(sample.input_ids)
        assert batch["labels"][row, :n].tolist() == list(sample.labels)


def test_an_empty_batch_or_a_bad_multiple_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        pad_batch([], pad_token_id=PAD)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        pad_batch([SHORT], pad_token_id=PAD, pad_to_multiple_of=0)


def test_collate_packs_one_row_or_pads_rows_with_the_model_arguments_named():
    packed = collate([SHORT, LONG], packing=True, pad_token_id=PAD, pad_to_multiple_of=4)
    assert set(packed) == {"input_ids", "labels", "position_ids", "cu_seq_lens", "max_length"}
    assert packed["input_ids"].tolist() == [[5, 6, 0, 7, 8, 9, 10, 0]]  # no padding, whatever the multiple
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 0, IGNORE_INDEX, IGNORE_INDEX, 9, 10, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert packed["cu_seq_lens"].tolist() == [0, 3, 8] and packed["max_length"] == 5
    padded = collate([SHORT, LONG], packing=False, pad_token_id=PAD, pad_to_multiple_of=4)
    assert set(padded) == {"input_ids", "attention_mask", "labels"}
    assert padded["input_ids"].shape == (2, 8)
