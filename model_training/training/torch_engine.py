"""The engine of a run without DeepSpeed (`deepspeed=false`, `--no-deepspeed`): plain PyTorch, one process or
DistributedDataParallel (DDP) under torchrun, the deepspeed launcher or srun.

`build_torch_engine` is what the trainer calls instead of `deepspeed.initialize`. `TorchEngine` has exactly the
part of DeepSpeed's engine interface that the trainer and its checkpoints use, with DeepSpeed's meaning:

    the loop          __call__ (the forward), module, device, train(), eval(), config,
                      backward(loss, scale_wrt_gas), step(), is_gradient_accumulation_boundary(), get_lr(),
                      get_global_grad_norm()
    the trainer       optimizer (its param_groups), basic_optimizer, lr_scheduler
    checkpoint.py     save_checkpoint(save_dir, tag, save_latest, exclude_frozen_parameters),
                      load_checkpoint(load_dir, tag, load_module_strict, load_optimizer_states,
                      load_lr_scheduler_states), checkpoint_engine.save(state_dict, path), _copy_recovery_script,
                      zero_optimization_stage()

(`fp16_enabled()` is not among them: the loop asks it only of DeepSpeed, `step.skips_nonfinite_updates`.)

What it does, the way DeepSpeed's ZeRO-1/2 do it wherever there is a choice:

* Optimizer: PyTorch's AdamW (fused on CUDA) over the trained parameters in one group, with the config's learning
  rate, betas, eps and weight decay, as DeepSpeed's `torch_adam`; the schedule is `build_scheduler`'s LambdaLR,
  stepped once per applied update.
* Accumulation: `gradient_accumulation_steps` micro-batches per update, their gradients summed (the loop scales
  each loss itself). Under DDP the gradients are averaged over the ranks, as DeepSpeed averages them, in the
  backward of the update's last micro-batch only; the others run with DDP's synchronization off (what
  `DistributedDataParallel.no_sync` sets), which `__call__` decides because DDP prepares it in the forward.
* Clipping: the global gradient norm to `max_grad_norm` (0: no clipping), by `torch.nn.utils.clip_grad_norm_`.
* A non-finite gradient norm skips the update, as ZeRO-1/2 skip it: no optimizer or scheduler step, the gradients
  dropped. Every rank holds the same averaged gradients, so every rank skips alike, and the loop needs no guard
  of its own (`step.skips_nonfinite_updates`). Reading the norm waits for the device once per update, as
  DeepSpeed's overflow check does.
* Precision: the weights are the fp32 master weights. The model, built in the training dtype as for DeepSpeed
  (so a 4-bit base is quantized from the same weights, and the masters start from the values DeepSpeed's start
  from), is cast to fp32 here, quantized weights left as they are. fp32 trains in fp32; bf16 runs every forward under
  `torch.autocast(bfloat16)`: matrix products in bf16, reductions, gradients and the optimizer in fp32, which is
  PyTorch's own mixed precision and needs no loss scaling (bf16 has fp32's range); packed attention casts its
  inputs to bf16 itself, for varlen_attn, which autocast does not know. fp16 would need a loss scaler beside
  DeepSpeed's and is refused by config validation instead. Generation after training runs on the fp32 weights.
* Checkpoints: the state is the same on every rank, so rank 0 writes it into the tag folder DeepSpeed's files
  would go to, as the files `layout.TORCH_MODEL_STATES` and `layout.TORCH_OPTIM_STATES` (see layout.py); every
  rank reads both on resume. Writes go through `checkpoint_engine.save`, which checkpoint.py contains.
* The DeepSpeed JSON (`deepspeed_config`) is not read beyond what config validation refuses: ZeRO-1/2 would
  only partition state that DDP replicates, and bucket sizes and the like have nothing to act on.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model_training.checkpoints.read import verify_checkpoint
from model_training.config import TrainConfig
from model_training.layout import TORCH_MODEL_STATES, TORCH_OPTIM_STATES
from model_training.models.builder import training_device
from model_training.training.schedule import build_scheduler

logger = logging.getLogger(__name__)


class FileWriter:
    """How the engine writes a state file; checkpoint.py wraps `save` to contain a failed write."""

    def save(self, state_dict: dict[str, Any], path: str) -> None:
        Path(path).parent.mkdir(exist_ok=True)
        torch.save(state_dict, path)


class TorchEngine:
    """A model with its AdamW and schedule, trained as DeepSpeed's engine would train it (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
        accumulation_steps: int,
        max_grad_norm: float,
        autocast_dtype: torch.dtype | None,
        ddp: DistributedDataParallel | None,
    ) -> None:
        self.module = model
        self.device = training_device()
        self.optimizer = self.basic_optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.checkpoint_engine = FileWriter()
        self.config = {"zero_optimization": {"stage": 0}}
        """DeepSpeed's config as far as the trainer reads it: nothing is partitioned."""
        self._micro_steps = 0
        self._accumulation_steps = accumulation_steps
        self._max_grad_norm = max_grad_norm
        self._autocast_dtype = autocast_dtype
        self._ddp = ddp
        self._trained = [p for group in optimizer.param_groups for p in group["params"]]
        self._grad_norm: torch.Tensor | None = None

    # --- training ---------------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward (through DDP on several ranks), under autocast in bf16 runs."""
        if self._ddp is not None:
            # DDP reduces gradients in the backward of a forward that ran with this set: the update's last one.
            self._ddp.require_backward_grad_sync = self.is_gradient_accumulation_boundary()
        with torch.autocast(self.device.type, self._autocast_dtype, enabled=self._autocast_dtype is not None):
            return (self._ddp or self.module)(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        """Add the gradients of `loss`; `scale_wrt_gas` divides it by the accumulation steps first (DeepSpeed's
        default, which the trainer turns off: it normalizes each loss by the whole step's tokens)."""
        (loss / self._accumulation_steps if scale_wrt_gas else loss).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the micro-batch now running is the last of its update."""
        return (self._micro_steps + 1) % self._accumulation_steps == 0

    def step(self) -> None:
        """End a micro-batch; after the update's last one, clip and apply the update, or skip it when the gradient
        norm is not finite."""
        boundary = self.is_gradient_accumulation_boundary()
        self._micro_steps += 1
        if not boundary:
            return
        if self._max_grad_norm > 0:
            self._grad_norm = nn.utils.clip_grad_norm_(self._trained, self._max_grad_norm)
        else:
            self._grad_norm = nn.utils.get_total_norm([p.grad for p in self._trained if p.grad is not None])
        if torch.isfinite(self._grad_norm):
            self.optimizer.step()
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        """The gradient norm of the last update, before clipping (None before the first)."""
        return None if self._grad_norm is None else self._grad_norm.item()

    # --- checkpoints ------------------------------------------------------------------------------------------

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(
        self, save_dir: str, tag: str, save_latest: bool = False, exclude_frozen_parameters: bool = False
    ) -> None:
        """Rank 0 writes the model and the optimizer and scheduler into `save_dir/tag`. `save_latest` is
        accepted for DeepSpeed's signature and never acted on: checkpoint.py keeps its own pointer."""
        if dist.get_rank() != 0:
            return
        module = self.module.state_dict()
        if exclude_frozen_parameters:
            frozen = {name for name, p in self.module.named_parameters() if not p.requires_grad}
            module = {name: tensor for name, tensor in module.items() if name not in frozen}
        folder = Path(save_dir) / tag
        self.checkpoint_engine.save({"module": module}, str(folder / TORCH_MODEL_STATES))
        optimizer = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()}
        self.checkpoint_engine.save(optimizer, str(folder / TORCH_OPTIM_STATES))

    def _copy_recovery_script(self, save_path: str) -> None:
        """Nothing to copy: DeepSpeed puts its zero_to_fp32.py beside its shards; these files are plain weights."""

    def load_checkpoint(
        self,
        load_dir: str,
        tag: str,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
    ) -> tuple[str, dict[str, Any]]:
        """Load what `save_checkpoint` wrote (on every rank); returns the folder and DeepSpeed's empty client state."""
        folder = Path(load_dir) / tag
        state = torch.load(folder / TORCH_MODEL_STATES, map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["module"], strict=load_module_strict)
        state = torch.load(folder / TORCH_OPTIM_STATES, map_location="cpu", weights_only=True)
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])  # moves the moments to the weights' device
        if load_lr_scheduler_states:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return str(folder), {}


_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)
"""DDP's option against a buffer broadcast at every forward: torch 2.13 renamed `broadcast_buffers` (a FutureWarning
on every rank since) to `forward_sync_buffers`; torch 2.11 knows only the old name."""


def build_torch_engine(model: nn.Module, cfg: TrainConfig, world_size: int, total_steps: int) -> TorchEngine:
    """The engine that trains `model` (built in cfg.dtype by models/builder.py) without DeepSpeed."""
    device = training_device()
    model.to(device).float()  # the fp32 master weights; 4-bit weights are not floating point and stay
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trained, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay, fused=device.type == "cuda",
    )
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.lr_scheduler_type, cfg.lr_decay_steps,
                                cfg.min_lr_ratio)
    ddp = None
    if world_size > 1:
        # Buffers (rotary tables) are computed alike on every rank and never trained: no broadcast per forward.
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      **_NO_BUFFER_SYNC)
    logger.info("no DeepSpeed: plain PyTorch on %s, %s, %s; %s is not read (nothing is partitioned)",
                device, f"DDP over {world_size} ranks" if ddp else "one process",
                "bf16 autocast over fp32 weights" if cfg.dtype == "bf16" else "fp32", cfg.deepspeed_config)
    autocast = torch.bfloat16 if cfg.dtype == "bf16" else None
    return TorchEngine(model, optimizer, scheduler, cfg.gradient_accumulation_steps, cfg.max_grad_norm, autocast, ddp)


def holds_torch_engine_state(ckpt_dir: Path) -> bool:
    """Whether a committed checkpoint holds this engine's state (a run without DeepSpeed) rather than DeepSpeed's."""
    return (ckpt_dir / verify_checkpoint(ckpt_dir)["deepspeed_tag"] / TORCH_MODEL_STATES).is_file()
