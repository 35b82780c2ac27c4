"""Write arithmetic_sample.jsonl: prompts whose answers a reward function can check, for GRPO's tests and demo.

Each line is {"prompt": "What is A + B?", "answer": A + B} for A and B from 0 to 4 (25 prompts, answers 0 to 8):
few enough that a tiny policy can learn them all, with an answer that `rewards:exact_answer` checks. Run as
`python data/make_arithmetic_sample.py`; the output is byte-for-byte the same on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent


def main() -> None:
    rows = [{"prompt": f"What is {a} + {b}?", "answer": a + b} for a in range(5) for b in range(5)]
    (DATA / "arithmetic_sample.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
