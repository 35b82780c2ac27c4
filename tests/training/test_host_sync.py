"""A training micro-step on the GPU never waits for the device: the host only queues work.

The forward of a packed row, the loss (chunked from the hidden states, or from full logits) and the backward
run under `torch.cuda.set_sync_debug_mode("error")`, which raises at any operation that makes the host wait
(`.item()`, a boolean index, `nonzero`, a blocking copy). DeepSpeed's own step is not part of it: its overflow
check and gradient norm read values, once per optimizer step.
"""

from __future__ import annotations

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM

from model_training.data.collate import collate, to_device
from model_training.data.formatting import IGNORE_INDEX, FormattedSample
from model_training.models.packed_attention import enable_packed_attention
from model_training.training.loss import chunked_supervised_token_sums, supervised_token_sums

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def samples(lengths: tuple[int, ...] = (120, 340, 57, 200)) -> list[FormattedSample]:
    generator = torch.Generator().manual_seed(0)
    made = []
    for length in lengths:
        ids = torch.randint(0, 512, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX if t < length // 3 else token for t, token in enumerate(ids)]
        made.append(FormattedSample(tuple(ids), tuple(labels), truncated=False))
    return made


@pytest.mark.parametrize("chunked", [True, False])
def test_a_packed_micro_step_never_syncs_the_host(chunked: bool) -> None:
    device = torch.device("cuda")
    config = FalconConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                          multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False,
                          alibi=False, use_cache=False)
    model = FalconForCausalLM(config).to(device, torch.bfloat16)
    enable_packed_attention(model)
    batch = collate(samples(), packing=True, pad_token_id=0)
    labels = batch.pop("labels")  # on the host, as the trainer keeps them

    def micro_step() -> torch.Tensor:
        inputs = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if chunked:
            hidden = model(**inputs, output_hidden_states=True,
                           logits_to_keep=torch.empty(0, dtype=torch.long, device=device)).hidden_states[-1]
            loss, _ = chunked_supervised_token_sums(hidden, model.get_output_embeddings().weight, labels)
        else:
            loss, _ = supervised_token_sums(model(**inputs).logits, labels)
        loss.backward()
        return loss

    micro_step()  # the lazy initializations (library handles, kernels) of a first step may wait; later ones not
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = micro_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
