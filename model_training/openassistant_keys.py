"""Keys of the OpenAssistant trainer's config sections (its 2023 `configs/*.yaml`) that our schema lacks.

Users bring their sections from the OpenAssistant trainer. Its keys that this trainer implements are fields of
`TrainConfig` under the same name (`val_max_length`, `eval_size`, `freeze_layer`, `label_masking`,
`random_offset_probability`, `sort_by_length`, `use_system_prefix`, ...). Two are read in their own form:
`quantization: true|false` (8-bit Adam there, a mapping for the 4-bit base here) and `peft_model`. Every other
key is accepted with one warning that names it and says why it has no effect here; none is ever dropped
silently, and a key neither list knows stays an error.
"""

from __future__ import annotations

from typing import Any

NO_EFFECT: dict[str, str] = {
    "use_flash_attention": "the attention kernel is chosen by the device (a variable-length flash kernel for packed "
    "rows on GPUs, SDPA otherwise)",
    "per_digit_tokens": "the tokenizer is used as it is (splitting digits is a property of the tokenizer)",
    "fuse_gelu": "Falcon's GELU runs as PyTorch's kernel; torch_compile=true fuses the work around it",
    "eval_accumulation_steps": "evaluation sums losses and counts on the device, so nothing accumulates on the host",
    "use_custom_sampler": "the per-dataset seeded sampler is always on (see each dataset's fraction, size, share)",
    "verbose": "--show_dataset_stats prints the dataset statistics",
    "seq2seqmodel": "this trainer trains decoder-only causal language models",
    "samples_mixing": "packing lays the samples of every micro-batch end to end already (packing=true)",
    "mix_length_threshold": "packing lays the samples of every micro-batch end to end already (packing=true)",
    "mix_probability": "packing lays the samples of every micro-batch end to end already (packing=true)",
    "poly_eps": "the loss is the cross-entropy (loss_fn CrossEntropyLoss); PolyLoss is not implemented",
    "superhot": "rope scaling is a property of the model: set it in the model's config (rope_scaling)",
    "superhot_config": "rope scaling is a property of the model: set it in the model's config (rope_scaling)",
    "rope_scaling": "rope scaling is a property of the model: set it in the model's config, or in model_config",
    "use_system_tag": "OpenAssistant's system-property tags (from its dataset labels) are not built here",
    "system_property_dropout": "OpenAssistant's system-property tags (from its dataset labels) are not built here",
    "system_add_length": "OpenAssistant's system-property tags (from its dataset labels) are not built here",
    "is_reward_model": "the command sets what is trained: trainer_rm.py trains reward models",
    "pooling": "trainer_rm.py reads each reward at the last token that is not padding (transformers' pooling)",
    "score_l2_reg": "trainer_rm.py's loss is the ranking loss alone, without a penalty on the scores",
    "peft_type": "the adapter kind is set by peft.type (lora)",
    "int8_training": "8-bit training is not supported; a 4-bit base for LoRA is quantization.load_in_4bit",
}
"""OpenAssistant key -> why it has no effect in this trainer."""

IMPLEMENTED_LOSS = "CrossEntropyLoss"


def translate(section: dict[str, Any], where: str, warnings: dict[str, str]) -> dict[str, Any]:
    """`section` with OpenAssistant's keys read or removed; adds a warning per key (by key, so once) to
    `warnings`. `where` says where the section came from, for the messages."""
    out = dict(section)
    for key in [k for k in out if k in NO_EFFECT]:
        out.pop(key)
        warnings.setdefault(key, f"key '{key}' ({where}) is an OpenAssistant trainer key with no effect here: "
                                 f"{NO_EFFECT[key]}")
    if "loss_fn" in out:
        loss = out.pop("loss_fn")
        if loss != IMPLEMENTED_LOSS:
            warnings.setdefault("loss_fn", f"key 'loss_fn' ({where}) is {loss!r}, which has no effect here: the loss "
                                           f"is always the cross-entropy over supervised tokens ({IMPLEMENTED_LOSS})")
    if isinstance(out.get("quantization"), bool):
        if out.pop("quantization"):
            warnings.setdefault("quantization", f"key 'quantization: true' ({where}) is OpenAssistant's 8-bit Adam, "
                                                "which has no effect here; a 4-bit base is quantization.load_in_4bit")
    if "peft_model" in out:
        if out.pop("peft_model"):
            out["peft"] = {**(out.get("peft") or {}), "type": "lora"}
    return out
