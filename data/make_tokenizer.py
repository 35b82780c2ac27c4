"""Train data/tokenizer/, a small stand-in for Falcon's tokenizer, on the texts of data/oasst_sample.jsonl.gz.

It has the shape that matters to the trainer: byte-level BPE with no added prefix space, `<|endoftext|>` as
its only special token and as BOS/EOS, no pad token, and none of the chat tokens (`<|prompter|>`,
`<|assistant|>`, `<|system|>`), which the trainer adds itself exactly as it does for real Falcon.

Run as `python data/make_tokenizer.py` after data/make_oasst_sample.py; the output is the same on every run.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

DATA_DIR = Path(__file__).resolve().parent
SAMPLE = DATA_DIR / "oasst_sample.jsonl.gz"
OUTPUT = DATA_DIR / "tokenizer"
VOCAB_SIZE = 3000
EOS = "<|endoftext|>"


def sample_texts(path: Path) -> Iterator[str]:
    """Every message text of every tree, all languages, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            pending = [json.loads(line)["prompt"]]
            while pending:
                node = pending.pop()
                yield node["text"]
                pending.extend(reversed(node.get("replies") or []))


def train(texts: Iterator[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # Like Falcon: GPT-2 style byte-level splitting, but no space is prepended to the first word.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        # All 256 byte symbols, so any text (other scripts, emoji) stays encodable after training on a sample.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main() -> None:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train(sample_texts(SAMPLE)),
        bos_token=EOS,
        eos_token=EOS,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(OUTPUT)
    print(f"wrote {OUTPUT} (vocabulary {len(tokenizer)})")


if __name__ == "__main__":
    main()
