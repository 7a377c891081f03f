"""What trains the weights: the model, its optimizer and the gradient update, behind one interface
for the plain path (one process, or DDP under ``torchrun``) and DeepSpeed ZeRO
(:class:`repa_fast.training.zero.ZeroEngine`), so that neither the step nor the loop asks which.

A step is ``--gradient-accumulation-steps`` A micro-steps: each runs its forward inside
:meth:`micro_step` (DDP reduces gradients only in the last one) and calls :meth:`backward` with
its mean loss; then :meth:`step` updates once. The plain update, skipped on the device when
the step is not finite (no host read)::

    g         = Σ_micro ∇(scale · loss_m / A) / scale   (scale 1 unless --mixed-precision fp16)
    ‖g‖       = clip_grad_norm_(g, max_grad_norm)       (the norm before clipping)
    found_inf = not (isfinite(loss) and isfinite(‖g‖)), the max over ranks
    AdamW step and EMA update, both no-ops where found_inf = 1
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn

from .ema import EMA
from .optim import skippable_step


class Engine(Protocol):
    """The calls the step and the checkpointer make."""

    module: nn.Module      # the bare SiT: its weights are the checkpoint's and the EMA's source
    wrapped: Callable      # what the loss calls: the module, its DDP or DeepSpeed wrapper

    def micro_step(self, last: bool):
        """Context of one micro-step's forward and backward: gradients are reduced across
        processes only in the ``last`` one."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-step's mean loss (weighted 1/A)."""

    def step(self, loss: torch.Tensor, ema: EMA) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, optimizer step, EMA update after the micro-steps; ``loss`` is the step's mean
        loss (its finiteness decides the skip). Returns (pre-clip gradient norm, found_inf),
        device tensors (found_inf 1.0: the step was skipped)."""

    def backward_and_step(self, loss: torch.Tensor, ema: EMA
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`backward` then :meth:`step`: a step of one micro-step."""

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
                 fp16: bool = False, accumulation_steps: int = 1):
        self.module, self.optimizer, self.max_grad_norm = model, optimizer, max_grad_norm
        self.accumulation_steps = accumulation_steps
        self.wrapped = model
        if world_size > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self._distributed = (world_size > 1 and torch.distributed.is_available()
                             and torch.distributed.is_initialized())

    def micro_step(self, last: bool):
        if last or self.wrapped is self.module:
            return contextlib.nullcontext()
        return self.wrapped.no_sync()  # DDP: keep this micro-step's gradients local

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accumulation_steps if self.accumulation_steps > 1 else loss
        self.scaler.scale(loss).backward()

    def backward_and_step(self, loss: torch.Tensor, ema: EMA
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        self.backward(loss)
        return self.step(loss, ema)

    def step(self, loss: torch.Tensor, ema: EMA) -> tuple[torch.Tensor, torch.Tensor]:
        optimizer, scaler = self.optimizer, self.scaler
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
