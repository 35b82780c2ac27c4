"""Cross-entropy over supervised tokens, as sums, so the caller can normalize by the whole step's count."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model_training.data.collate import to_device
from model_training.data.formatting import IGNORE_INDEX


def token_sums(
    engine: Any, inputs: dict[str, Any], labels: torch.Tensor, chunked: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, correct next-token predictions) over the supervised tokens of a batch that
    runs through `engine`'s forward, the loss taken from the logits or, with `chunked`, from the hidden states.

    The training step and the evaluation both call it as `loss.token_sums`, looked up at each call: replacing
    this module attribute is the seam through which fault tests change the loss (tests/training/fault_worker.py).
    """
    if not chunked:
        return supervised_token_sums(engine(**inputs).logits, labels)
    # Still the engine's forward, so DeepSpeed's hooks run; an empty `logits_to_keep` projects no position, and
    # the hidden states after the final norm, the head's input, come back instead of (tokens, vocabulary) logits.
    no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    outputs = engine(**inputs, output_hidden_states=True, logits_to_keep=no_position)
    head = engine.module.get_output_embeddings().weight
    return chunked_supervised_token_sums(outputs.hidden_states[-1], head, labels)


def supervised_token_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of correct next-token predictions) over supervised positions.

    `labels` are aligned with the inputs; position t predicts labels[t + 1]. The loss is computed in fp32
    whatever the logits' dtype: bf16 log-softmax over a 65k vocabulary loses most of its precision.
    A sum, not a mean: the caller divides by the supervised tokens of the whole optimizer step, so that
    every token weighs the same however the step is split into micro-batches and ranks.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = to_device(labels[:, 1:], shift_logits.device)
    flat_logits = shift_logits.reshape(-1, shift_logits.size(-1))
    flat_labels = shift_labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    # IGNORE_INDEX never equals an argmax; a boolean index instead would wait for the device (data-dependent size).
    correct = (flat_logits.argmax(dim=-1) == flat_labels).sum()
    return loss_sum, correct


def count_supervised(labels: torch.Tensor) -> int:
    """Supervised targets in a batch: labels past the first position that carry loss."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


DEFAULT_LOSS_CHUNK = 1024
"""Tokens per chunk of `chunked_supervised_token_sums`: with a 65k vocabulary, 254 MiB of fp32 logits a chunk."""


def chunked_supervised_token_sums(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_LOSS_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`supervised_token_sums(hidden_states @ lm_head_weight.T, labels)` without the logits of every token.

    `hidden_states` (batch, T, H) are the model's last hidden states, `lm_head_weight` (V, H) its output
    projection. Only supervised positions are projected, `chunk_size` of them at a time, in forward and in
    backward, so the largest temporary is one chunk's (chunk_size, V) logits instead of (batch, T, V). The
    logits are reduced in fp32 like `supervised_token_sums`, or in the inputs' dtype where it is wider (fp64).

    The supervised positions are found where `labels` are: on the host when the caller keeps them there (the
    trainer does), so that the chunks' sizes are known without waiting for the device.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, length, width = hidden_states.shape
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    # Position t of row b predicts labels[b, t + 1]: the rows of the flattened (batch * T, H) hidden states.
    rows = supervised.nonzero()
    rows = rows[:, 0] * length + rows[:, 1]
    return _ChunkedLinearCrossEntropy.apply(
        hidden_states.reshape(batch * length, width),
        lm_head_weight,
        to_device(rows, hidden_states.device),
        to_device(targets[supervised], hidden_states.device),
        chunk_size,
    )


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of (hidden[rows] @ weight.T) against targets, chunk by chunk both ways.

    The backward recomputes each chunk's logits rather than the forward stashing gradients. Both need the
    (V, H) weight gradient and the hidden-state gradient at once when the backward starts, so their peaks
    match when the backward follows at once; but a stash would hold those two from the end of the forward
    on (the moment all activations are alive), and would be computed for nothing in a forward that no
    backward follows. Between forward and backward this keeps nothing but the hidden states, which the
    output projection keeps anyway. The price: one more (chunk, H) x (H, V) product per chunk.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum = hidden.new_zeros((), dtype=reduction_dtype(hidden))
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, len(rows), chunk):
            logits = _chunk_logits(hidden, weight, rows[start : start + chunk])
            target = targets[start : start + chunk]
            correct += (logits.argmax(dim=-1) == target).sum()
            # cross-entropy = logsumexp(logits) - logits[target]; the logsumexp comes last, it overwrites logits.
            loss_sum -= logits.gather(1, target[:, None]).sum()
            loss_sum += _logsumexp_(logits).sum()
        ctx.save_for_backward(hidden, weight, rows, targets)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor, _: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        hidden, weight, rows, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulated in the weight's dtype, a chunk at a time: an fp32 accumulator for a bf16 (V, H) weight
        # would cost twice the gradient itself. The unchunked path rounds the logits' gradient to bf16 too.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for start in range(0, len(rows), ctx.chunk):
            chunk_rows, chunk_targets = rows[start : start + ctx.chunk], targets[start : start + ctx.chunk]
            # d(logsumexp - logits[target]) / d logits = softmax - one_hot(target), built in place.
            grad_logits = _softmax_(_chunk_logits(hidden, weight, chunk_rows))
            grad_logits[torch.arange(len(chunk_rows), device=grad_logits.device), chunk_targets] -= 1
            grad_logits = grad_logits.mul_(grad_loss).to(weight.dtype)
            if need_hidden:
                grad_hidden.index_add_(0, chunk_rows, grad_logits @ weight)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, hidden[chunk_rows])
        return grad_hidden, grad_weight, None, None, None


def reduction_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, the input's own dtype when it is wider."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits of the given hidden-state rows, (rows, V), in the reduction dtype."""
    return (hidden[rows] @ weight.T).to(reduction_dtype(hidden))


# In place, unlike torch.logsumexp and torch.softmax: one (chunk, V) buffer a chunk, not two or three.
def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp of `logits`, which it overwrites with exp(logits - row max)."""
    peak = logits.amax(dim=-1, keepdim=True)
    return logits.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of `logits`, computed in their place."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))
