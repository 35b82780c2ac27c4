"""The preference stages' batches and losses: the reward model's ranking loss and DPO, on the SFT loop.

A micro-batch is a list of `PreferenceGroup`s (data/preferences.py); all their sequences go through the model at
once, packed into one padding-free row (each attends only to itself) or as padded rows. From the model's output:
- reward model (stage rm): each sequence's reward is the per-token score (models/reward_head.py) at its reward
  position; a group of K replies, best first, gives K(K-1)/2 ordered pairs, each with the loss
  -log sigmoid(r_better - r_worse), OpenAssistant's ranking loss;
- DPO (stage dpo): each sequence's log-probability is the sum of its reply's token log-probabilities; a pair
  (chosen, rejected) with the frozen reference's log-probabilities has the margin
  h = (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)) and the loss -log sigmoid(beta h) (with label
  smoothing e: (1 - e) of that plus e of -log sigmoid(-beta h)), or IPO's (h - 1 / (2 beta))^2 on per-token mean
  log-probabilities.
Losses are sums over pairs: the step divides them by the pairs of the whole step on all ranks, as SFT divides by
supervised tokens, so every pair weighs the same however the step is split.

The reference of DPO is the policy's own starting weights. Its log-probabilities are computed once, before the first
step, by the engine itself in evaluation mode (`compute_references`): no second model is held in memory during
training, on any ZeRO stage, for the price of one forward pass over the data. They are kept in every checkpoint
(`REFERENCE_FILE`), so a resume reads them back rather than computing them from weights that have moved on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model_training.config import ConfigError, DpoConfig, TrainConfig
from model_training.data.collate import collate
from model_training.data.formatting import IGNORE_INDEX
from model_training.data.preferences import PreferenceGroup
from model_training.models.reward_head import reward_position
from model_training.stages import STAGES
from model_training.training.batches import PAD_TO_MULTIPLE_OF, RunData, inputs_on
from model_training.training.distributed import DistInfo
from model_training.training.evaluation import rank_batches
from model_training.training.loss import reduction_dtype

REFERENCE_FILE = "reference_logps.pt"
"""In each DPO checkpoint: the reference log-probabilities of every training and validation pair."""

RM_METRICS = ("loss", "accuracy", "margin")
DPO_METRICS = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected")


@dataclass(frozen=True)
class PairTargets:
    """What the loss needs of a batch, on the host: where each sequence sits and which pairs to compare."""

    better: torch.Tensor
    """Index (into the batch's sequences) of the better reply of each pair."""
    worse: torch.Tensor
    """Index of the worse reply of each pair."""
    positions: torch.Tensor | None = None
    """Flat (row * width + column) position of each sequence's reward token (rm)."""
    labels: torch.Tensor | None = None
    """The batch's labels (dpo: the reply tokens whose log-probabilities are summed)."""
    sequence_ids: torch.Tensor | None = None
    """The sequence each position of the batch belongs to, flat, -1 on padding (dpo)."""
    reference: torch.Tensor | None = None
    """(pairs, 2) reference log-probabilities of (better, worse), float64 (dpo, once computed)."""


def preference_spec(cfg: TrainConfig, tokenizer: Any, engine: Any) -> PreferenceSpec:
    """The reward model's and DPO's spec (stages.py): which loss follows from the stage's model head."""
    return PreferenceSpec(STAGES[cfg.stage].reward_head, cfg.packing, tokenizer.pad_token_id, cfg.dpo)


@dataclass(frozen=True)
class PreferenceSpec:
    """How preference groups reach the engine and what their loss is (module docstring); the loop's spec for the
    rm and dpo stages, as `BatchSpec` is for SFT."""

    reward_model: bool
    """The reward model's ranking loss on its scores; else DPO's loss on the policy's log-probabilities."""
    packing: bool
    pad_id: int
    dpo: DpoConfig

    @property
    def metrics(self) -> tuple[str, ...]:
        return RM_METRICS if self.reward_model else DPO_METRICS

    def device_batch(self, groups: list[PreferenceGroup], device: torch.device) -> tuple[dict[str, Any], PairTargets]:
        sequences = [s for group in groups for s in group.sequences]
        batch = collate(sequences, self.packing, self.pad_id, PAD_TO_MULTIPLE_OF)
        labels = batch.pop("labels")
        rows, width = labels.shape
        lengths = [len(s.input_ids) for s in sequences]
        if self.packing:  # end to end in one row
            starts = list(itertools.accumulate(lengths[:-1], initial=0))
        else:  # a row each
            starts = [row * width for row in range(rows)]
        better, worse, first = [], [], 0
        for group in groups:  # every ordered pair of each group, best first
            k = len(group.sequences)
            better += [first + i for i in range(k) for _ in range(i + 1, k)]
            worse += [first + j for i in range(k) for j in range(i + 1, k)]
            first += k
        pairs = {"better": torch.tensor(better), "worse": torch.tensor(worse)}
        if self.reward_model:
            positions = [start + reward_position(s.input_ids, self.pad_id) for start, s in zip(starts, sequences)]
            return inputs_on(batch, device), PairTargets(**pairs, positions=torch.tensor(positions))
        ids = torch.full((rows * width,), -1, dtype=torch.long)
        for index, (start, length) in enumerate(zip(starts, lengths)):
            ids[start : start + length] = index
        references = [g.reference for g in groups]
        reference = None if None in references else torch.tensor(references, dtype=torch.float64)
        return inputs_on(batch, device), PairTargets(**pairs, labels=labels, sequence_ids=ids, reference=reference)

    def sums(self, engine: Any, inputs: dict[str, Any], targets: PairTargets) -> torch.Tensor:
        """The sums over the batch's pairs of `metrics`, loss first, on the device."""
        if self.reward_model:
            scores = engine(**inputs)
            rewards = scores.reshape(-1)[targets.positions.to(engine.device)].to(reduction_dtype(scores))
            return ranking_sums(rewards, targets.better, targets.worse)
        logps, counts = sequence_logps(engine(**inputs).logits, targets)
        chosen, rejected = logps[targets.better], logps[targets.worse]
        ref = targets.reference.to(chosen.device)
        return dpo_sums(chosen, rejected, ref[:, 0], ref[:, 1], counts[targets.better], counts[targets.worse],
                        self.dpo)

    def units(self, targets: PairTargets) -> int:
        return len(targets.better)


def ranking_sums(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """(sum of -log sigmoid(r_better - r_worse), pairs ranked right, sum of margins r_better - r_worse)."""
    margin = rewards[better.to(rewards.device)] - rewards[worse.to(rewards.device)]
    return torch.stack([F.softplus(-margin).sum(), (margin > 0).sum().to(margin.dtype), margin.sum()])


def sequence_logps(logits: torch.Tensor, targets: PairTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the labelled tokens' log-probabilities, their count) of each sequence of the batch, in fp32 (or the
    logits' dtype where it is wider).

    Position t predicts labels[t + 1], which belongs to t's own sequence: a packed row's first label of each sample
    is IGNORE_INDEX (data/packing.py), so no prediction crosses a boundary."""
    vocabulary = logits.shape[-1]
    shift_logits = logits[:, :-1, :].to(reduction_dtype(logits)).reshape(-1, vocabulary)
    shift_labels = targets.labels[:, 1:].reshape(-1)
    token_logps = -F.cross_entropy(shift_logits, shift_labels.to(logits.device), ignore_index=IGNORE_INDEX,
                                   reduction="none")
    ids = targets.sequence_ids.reshape(targets.labels.shape)[:, :-1].reshape(-1)
    supervised = shift_labels != IGNORE_INDEX
    count = int(ids.max()) + 1
    # Ignored positions add a log-probability of 0 (cross_entropy's ignore_index) to some sequence, or to padding,
    # which scatters into an extra slot that is dropped.
    slot = torch.where(ids >= 0, ids, count).to(logits.device)
    sums = torch.zeros(count + 1, dtype=token_logps.dtype, device=logits.device).index_add_(0, slot, token_logps)
    counts = torch.zeros(count + 1, dtype=torch.long).index_add_(0, torch.where(ids >= 0, ids, count),
                                                                 supervised.long())
    return sums[:count], counts[:count].to(logits.device)


def dpo_sums(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    options: DpoConfig,
) -> torch.Tensor:
    """Sums over pairs of (loss, chosen rewarded higher, margin, reward of chosen, of rejected, log-probability of
    chosen, of rejected); rewards are beta * (log pi - log pi_ref) of the summed log-probabilities (module
    docstring), IPO's loss reads per-token means."""
    ref_chosen, ref_rejected = ref_chosen.to(chosen.dtype), ref_rejected.to(chosen.dtype)
    reward_chosen = options.beta * (chosen - ref_chosen)
    reward_rejected = options.beta * (rejected - ref_rejected)
    if options.loss_type == "ipo":
        h = (chosen - ref_chosen) / chosen_tokens - (rejected - ref_rejected) / rejected_tokens
        losses = (h - 1 / (2 * options.beta)) ** 2
    else:
        scaled = reward_chosen - reward_rejected
        e = options.label_smoothing
        losses = (1 - e) * F.softplus(-scaled) + e * F.softplus(scaled)
    margin = reward_chosen - reward_rejected
    return torch.stack([losses.sum(), (margin > 0).sum().to(margin.dtype), margin.sum(), reward_chosen.sum(),
                        reward_rejected.sum(), chosen.detach().sum(), rejected.detach().sum()])


class Referenced(Sequence[PreferenceGroup]):
    """Groups with DPO's reference log-probabilities (`values`: one (better, worse) row per group), each attached when
    its group is read: the groups stay where they lie (a token store), the references take 16 bytes a pair."""

    def __init__(self, groups: Sequence[PreferenceGroup], values: np.ndarray) -> None:
        if len(values) != len(groups):
            raise ValueError(f"{len(values)} reference rows for {len(groups)} groups")
        self.groups = groups
        self.values = values

    def __len__(self) -> int:
        return len(self.groups)

    @overload
    def __getitem__(self, index: int) -> PreferenceGroup: ...

    @overload
    def __getitem__(self, index: slice) -> Referenced: ...

    def __getitem__(self, index: int | slice) -> PreferenceGroup | Referenced:
        if isinstance(index, slice):
            return Referenced(self.groups[index], self.values[index])
        return dataclasses.replace(self.groups[index], reference=tuple(self.values[index].tolist()))


@torch.no_grad()
def compute_references(
    engine: Any, spec: PreferenceSpec, groups: Sequence[PreferenceGroup], batch_size: int, rank: int, world_size: int
) -> Referenced:
    """`groups` with their reference log-probabilities: the engine's in evaluation mode, each rank computing its
    share (every rank runs as many forwards, as ZeRO-3 needs), all ranks then holding all of them."""
    engine.eval()
    values = torch.zeros(len(groups), 2, dtype=torch.float64, device=engine.device)
    for indices in rank_batches(len(groups), batch_size, rank, world_size):
        inputs, targets = spec.device_batch([groups[i] for i in indices] or [groups[0]], engine.device)
        logps, _ = sequence_logps(engine(**inputs).logits, targets)
        if indices:
            values[indices] = logps.double().reshape(len(indices), 2)
    dist.all_reduce(values)
    engine.train()
    return Referenced(groups, values.cpu().numpy())


def save_references(folder: Path, train: Referenced, val: list[Referenced]) -> None:
    """The reference log-probabilities of `train` and each of `val` into `folder`, with the digest of the sequences
    they belong to."""
    rows = lambda referenced: [tuple(row) for row in referenced.values.tolist()]  # noqa: E731
    torch.save({"train": rows(train), "val": [rows(split) for split in val],
                "digest": _digest(train.groups, [split.groups for split in val])}, folder / REFERENCE_FILE)


def load_references(
    folder: Path, train: Sequence[PreferenceGroup], val: list[Sequence[PreferenceGroup]]
) -> tuple[Referenced, list[Referenced]]:
    """`train` and `val` with the reference log-probabilities a checkpoint kept; ValueError when the file cannot be
    read or belongs to other sequences (another cut, another validation length)."""
    path = folder / REFERENCE_FILE
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch.load raises for a damaged file (pickle, zip, EOF)
        raise ValueError(f"{path} cannot be read ({type(err).__name__})") from None
    if saved.get("digest") != _digest(train, val):
        raise ValueError(f"{path} holds the references of other sequences than this run's")

    def attach(groups: Sequence[PreferenceGroup], rows: list) -> Referenced:
        return Referenced(groups, np.array(rows, dtype=np.float64).reshape(-1, 2))

    return attach(train, saved["train"]), [attach(g, r) for g, r in zip(val, saved["val"], strict=True)]


def _digest(train: Sequence[PreferenceGroup], val: list[Sequence[PreferenceGroup]]) -> str:
    digest = hashlib.sha256()
    for groups in [train, *val]:
        for group in groups:
            for sequence in group.sequences:
                sequence.update_digest(digest)
        digest.update(b"/")
    return digest.hexdigest()


def with_references(
    engine: Any,
    spec: PreferenceSpec,
    data: RunData,
    batch_size: int,
    eval_size: int | None,
    info: DistInfo,
    resume_from: Path | None,
) -> RunData:
    """`data` with DPO's reference log-probabilities: computed by the engine at its starting weights, or, on a
    resume, read from the checkpoint (ConfigError when they do not fit its data). Validation keeps the first
    `eval_size` pairs of each set, all that evaluation reads."""
    val = [split.samples[:eval_size] for split in data.val]
    if resume_from is None:
        train = compute_references(engine, spec, data.samples, batch_size, info.rank, info.world_size)
        val = [compute_references(engine, spec, groups, batch_size, info.rank, info.world_size) if len(groups)
               else Referenced(groups, np.zeros((0, 2))) for groups in val]
    else:
        try:
            train, val = load_references(resume_from, data.samples, val)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot resume from {resume_from}: no usable reference log-probabilities: "
                              f"{err}") from None
    return dataclasses.replace(data, samples=train,
                               val=[dataclasses.replace(split, samples=v) for split, v in zip(data.val, val)])
