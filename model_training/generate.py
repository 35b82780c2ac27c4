"""Answer questions with an exported model folder, through transformers' own pipeline and chat template.

    python -m model_training.generate EXPORTED_DIR "What is the capital of France?" ["another question" ...]

Nothing of this project is needed to run an export: this is the code a user of the model would write. It is a
command, not a library module (no module of the package imports it): the quick starts' last step, and the
end-to-end tests' check that an export answers.
"""

from __future__ import annotations

import argparse

import torch
import transformers


def answer(model_dir: str, questions: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers, one per question, each a fresh single-turn conversation."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    pipe = transformers.pipeline("text-generation", model=model_dir, dtype=dtype)
    answers = []
    for question in questions:
        out = pipe([{"role": "user", "content": question}], max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(out[0]["generated_text"][-1]["content"])
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("questions", nargs="+")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()
    for question, reply in zip(args.questions, answer(args.model_dir, args.questions, args.max_new_tokens)):
        print(f"Q: {question}\nA: {reply}\n")


if __name__ == "__main__":
    main()
