#!/usr/bin/env bash
# Install, then run the linter and the whole test suite (multi-rank DeepSpeed runs on the CPU included).
source "$(dirname "$0")/setup_env.sh"
ruff check .
python -m pytest -q "$@"
