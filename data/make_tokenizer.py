"""Train the bundled stand-ins for real tokenizers on the texts of data/oasst_sample.jsonl.gz.

data/tokenizer/ stands in for Falcon's (and GPT-NeoX's) tokenizer, in the shape that matters to the trainer:
byte-level BPE with no added prefix space, `<|endoftext|>` as its only special token and as BOS/EOS, no pad
token, and none of the chat tokens (`<|prompter|>`, `<|assistant|>`, `<|system|>`), which the trainer adds
itself exactly as it does for real Falcon.

data/tokenizer-llama/ stands in for Llama's: transformers' `LlamaTokenizer` (SentencePiece-style BPE on `▁`
words with byte fallback, `<unk>` 0, `<s>` 1 (BOS, added by the tokenizer's own encoding), `</s>` 2 (EOS),
the 256 byte tokens `<0x00>`..`<0xFF>` next, as in Llama's vocabulary) and, like Llama's, no pad token.

Run as `python data/make_tokenizer.py` after data/make_oasst_sample.py; the output is the same on every run.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

DATA_DIR = Path(__file__).resolve().parent
SAMPLE = DATA_DIR / "oasst_sample.jsonl.gz"
OUTPUT = DATA_DIR / "tokenizer"
LLAMA_OUTPUT = DATA_DIR / "tokenizer-llama"
VOCAB_SIZE = 3000
EOS = "<|endoftext|>"
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]


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


def train_llama(texts: Iterator[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a Llama-style BPE: words split on spaces, each marked by a leading `▁`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # `▁` for every space and before the first word, as LlamaTokenizer writes its input; split into words here,
    # so that merges stay within a word and every token that starts one starts with `▁`, as SentencePiece's do.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # The byte tokens next after the specials, so that they get Llama's ids 3..258; then what the sample teaches.
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=LLAMA_SPECIALS + byte_tokens,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


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
    vocab, merges = train_llama(sample_texts(SAMPLE))
    llama = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=2048)
    llama.save_pretrained(LLAMA_OUTPUT)
    print(f"wrote {LLAMA_OUTPUT} (vocabulary {len(llama)})")


if __name__ == "__main__":
    main()
