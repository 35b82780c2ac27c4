"""The reward model's forward in training: a score for every token, so one packed row scores all its sequences.

transformers' `*ForSequenceClassification` pools inside its forward: it returns the score of each row's last token
that is not the pad token, and Falcon's does not even pass `position_ids` to its decoder, so a packed row would
attend across samples. In training the class of the model is swapped for a subclass (`enable_token_scores`) whose
forward runs the same decoder and the same `score` head, with `position_ids` passed through, and returns the
(batch, tokens) scores; the loss picks each sequence's own position (training/preference_loss.py). The parameters, their
names and the saved config are the model's own, so an export is a plain `*ForSequenceClassification` folder.

Which position is a sequence's reward: the last token whose id is not the pad id, the rule of transformers' pooling,
so the exported model scores a conversation exactly where training scored it. With Falcon's pad = eos, that is the
last token of the reply, just before its closing eos.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

_SUBCLASSES: dict[type, type] = {}


def enable_token_scores(model: nn.Module) -> nn.Module:
    """Make `model` (a transformers `*ForSequenceClassification` with a `score` head) return a score per token from
    its forward; idempotent. Call before anything records the forward's signature (packed attention's hooks)."""
    cls = type(model)
    if cls in _SUBCLASSES.values():
        return model
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"forward": _token_scores, "__module__": cls.__module__})
    model.__class__ = _SUBCLASSES[cls]
    return model


def _token_scores(
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Scores (batch, tokens) of the `score` head on the decoder's last hidden states."""
    decoder = getattr(self, self.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)[0]
    return self.score(hidden).squeeze(-1)


def reward_position(input_ids: Sequence[int], pad_id: int | None) -> int:
    """The index of the token whose score is the sequence's reward (module docstring): the last one that is not
    `pad_id`, as transformers' sequence classification pools."""
    for index in range(len(input_ids) - 1, -1, -1):
        if input_ids[index] != pad_id:
            return index
    raise ValueError("a sequence of pad tokens only has no reward position")


def is_reward_model(config: Any) -> bool:
    """Whether a saved transformers config describes a reward model: a sequence classifier (`architectures`)."""
    return any(name.endswith("ForSequenceClassification") for name in getattr(config, "architectures", None) or ())


def auto_model_class(config: Any) -> type:
    """The transformers Auto class that builds the model a saved config describes: the sequence classifier of a
    reward model, else the causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if is_reward_model(config) else AutoModelForCausalLM
