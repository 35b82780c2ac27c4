"""The table of model families: every name in it is a module of transformers' own models, and it names all of
each decoder layer's attention and MLP linear layers."""

from __future__ import annotations

import pytest
from helpers import MODELS, tiny_model
from torch import nn

from model_training.models.builder import decoder_layers
from model_training.models.families import FAMILIES, model_family


def test_every_supported_model_type_has_a_tiny_model_in_the_tests() -> None:
    assert {options["model_type"] for options in MODELS.values()} == set(FAMILIES)


@pytest.mark.parametrize("name", MODELS)
def test_the_table_names_each_layers_attention_mlp_and_all_their_linear_layers(name: str) -> None:
    model = tiny_model(name)
    family = model_family(model, "the test")
    layers = getattr(model.base_model, family.layers)
    assert list(layers) == decoder_layers(model)  # the decoder layers themselves, bottom first
    for layer in layers:
        attention, mlp = getattr(layer, family.attention), getattr(layer, family.mlp)
        assert type(attention).__name__.endswith("Attention") and type(mlp).__name__.endswith("MLP")
        linears = {path.rpartition(".")[2] for path, m in layer.named_modules() if isinstance(m, nn.Linear)}
        assert linears == set(family.linears), "every linear layer of the decoder layer, and only those"
        assert all(isinstance(getattr(attention, n), nn.Linear) for n in family.attention_linears)
        assert all(isinstance(getattr(mlp, n), nn.Linear) for n in family.mlp_linears)

