"""The table of model families: every name in it is a module of transformers' own models, and it names all of
each decoder layer's attention and MLP linear layers."""

from __future__ import annotations

import pytest
from helpers import MODELS, tiny_model
from torch import nn
from transformers import AutoConfig

from model_training.models.builder import decoder_layers
from model_training.models.families import FAMILIES, model_family, shape_mistake


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



@pytest.mark.parametrize("name", MODELS)
def test_a_shape_the_family_cannot_build_is_named_before_the_model_is_built(name: str) -> None:
    options = dict(MODELS[name])
    family = FAMILIES[options["model_type"]]
    fits = AutoConfig.for_model(options.pop("model_type"), hidden_size=64, num_attention_heads=4, **options)
    assert shape_mistake(fits, options) is None
    if family.kv_heads is not None:
        assert getattr(fits, family.kv_heads) in (2, 4)  # the attribute the table names is the family's own
        setattr(fits, family.kv_heads, 3)
        assert f"'{family.kv_heads}' (3) does not divide 'num_attention_heads' (4)" in shape_mistake(fits, options)
    fits.hidden_size = 66
    assert shape_mistake(fits, options).startswith("'hidden_size' (66) is not a multiple of 'num_attention_heads' (4)")
