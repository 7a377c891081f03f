"""What trains the weights: the model, its optimizer and the gradient update, behind one interface
for the plain path (one process, or DDP under ``torchrun``) and DeepSpeed ZeRO
(:class:`repa_fast.training.zero.ZeroEngine`), so that neither the step nor the loop asks which.

The plain update, skipped on the device when the step is not finite (no host read)::

    g         = ∇(scale · loss) / scale                 (scale 1 unless --mixed-precision fp16)
    ‖g‖       = clip_grad_norm_(g, max_grad_norm)       (the norm before clipping)
    found_inf = not (isfinite(loss) and isfinite(‖g‖)), the max over ranks
    AdamW step and EMA update, both no-ops where found_inf = 1
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn

from .ema import EMA
from .optim import skippable_step


class Engine(Protocol):
    """The calls the step and the checkpointer make."""

    module: nn.Module      # the bare SiT: its weights are the checkpoint's and the EMA's source
    wrapped: Callable      # what the loss calls: the module, its DDP or DeepSpeed wrapper

    def backward_and_step(self, loss: torch.Tensor, ema: EMA
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward, clip, optimizer step, EMA update; returns (pre-clip gradient norm,
        found_inf), device tensors (found_inf 1.0: the step was skipped)."""

    def full_state_dict(self) -> dict:
        """All weights, on every rank."""

    def save(self, directory: str, step: int) -> dict:
        """Save the optimizer state (a collective: every rank calls it); returns the entries
        the checkpoint file holds for it (none where ``directory`` holds it)."""

    def load(self, state: dict, directory: str, source: str) -> None:
        """Restore the optimizer state of checkpoint ``state`` (read from ``source``), whose
        :meth:`save` wrote into ``directory``."""


class PlainEngine:
    """The model in this process (DDP across processes), its optimizer and the fp16 loss
    scaler (disabled unless ``fp16``)."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 device: torch.device, max_grad_norm: float, world_size: int = 1,
                 fp16: bool = False):
        self.module, self.optimizer, self.max_grad_norm = model, optimizer, max_grad_norm
        self.wrapped = model
        if world_size > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self._distributed = (world_size > 1 and torch.distributed.is_available()
                             and torch.distributed.is_initialized())

    def backward_and_step(self, loss: torch.Tensor, ema: EMA
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        optimizer, scaler = self.optimizer, self.scaler
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        # a non-finite loss or gradient norm skips the step on the device: the fused AdamW
        # kernel and the EMA read found_inf, nothing waits for the host
        found_inf = (~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))).float()
        if self._distributed:  # every rank skips together
            torch.distributed.all_reduce(found_inf, torch.distributed.ReduceOp.MAX)
        skippable_step(optimizer, found_inf)
        ema.update(self.module, found_inf=found_inf)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, found_inf

    def full_state_dict(self) -> dict:
        return self.module.state_dict()

    def save(self, directory: str, step: int) -> dict:
        return dict(opt=self.optimizer.state_dict())  # in the checkpoint file itself

    def load(self, state: dict, directory: str, source: str) -> None:
        if "opt" not in state:
            raise ValueError(f"--resume: {source} was written by a DeepSpeed run (its "
                             f"optimizer state is in {directory}); resume it with --ds_config")
        self.optimizer.load_state_dict(state["opt"])
