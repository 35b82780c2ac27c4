"""The old path of `prepare_data` (now model_training/data/prepare.py), kept because the README's Python API listed it
here and notebooks import it from here."""

from model_training.data.prepare import prepare_data

__all__ = ["prepare_data"]
