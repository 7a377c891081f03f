"""The optimizer (``--optimizer``) and an optimizer step that a non-finite step skips without a
host synchronisation.

- ``adamw`` (default): ``torch.optim.AdamW(fused=True)``, one fused kernel for all tensors on
  CUDA and on the CPU. Its step takes a ``found_inf`` tensor (the protocol ``GradScaler`` uses):
  where it is 1 the kernel leaves weights, moments and the step count untouched, so skipping a
  bad step needs no ``.item()``.
- ``apex-fused-adam``: NVIDIA apex's ``FusedAdam`` (AdamW mode). apex is not on the package
  registry (the ``apex`` there is an unrelated 2013 project); it has to be built from source.
  Its step has no ``found_inf`` input, so the skip decision reads one flag on the host.
- ``deepspeed``: DeepSpeed builds the optimizer from the ``optimizer`` section of
  ``--ds_config`` (its ``FusedAdam`` on GPUs, ``DeepSpeedCPUAdam`` with optimizer offload),
  filled from the ``--learning-rate``/``--adam-*`` flags when absent
  (``repa_fast.training.zero.deepspeed_optimizer_section``). Needs ``--ds_config``.

AdamW (decoupled weight decay, Loshchilov & Hutter)::

    m ← β1·m + (1−β1)·g        v ← β2·v + (1−β2)·g²
    θ ← θ − lr·( m̂ / (√v̂ + ε) + λ·θ )      m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ)
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

OPTIMIZERS = ("adamw", "apex-fused-adam", "deepspeed")

APEX_MISSING = (
    "--optimizer apex-fused-adam needs NVIDIA apex, which is not importable here. It is not on "
    "the package registry (`pip install apex` installs an unrelated project): build it from "
    "source with `git clone https://github.com/NVIDIA/apex && cd apex && pip install -v "
    "--no-build-isolation --config-settings '--build-option=--cpp_ext' --config-settings "
    "'--build-option=--cuda_ext' .`, or use --optimizer adamw (torch's fused AdamW, the default)")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float,
                    betas: tuple[float, float], eps: float, weight_decay: float
                    ) -> Optional[torch.optim.Optimizer]:
    """The optimizer object for ``--optimizer name``; None for ``deepspeed`` (the engine
    builds it from the config)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=True)
    if name == "apex-fused-adam":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ValueError(APEX_MISSING) from None
        return FusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         adam_w_mode=True)
    if name == "deepspeed":
        return None
    raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` tensor (fused torch Adam/AdamW/SGD)."""
    return (isinstance(optimizer, torch.optim.Optimizer)
            and type(optimizer).__module__.startswith("torch.optim")
            and all(group.get("fused") for group in optimizer.param_groups))


def skippable_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf`` (a float 0/1 tensor on the parameters'
    device) is 1. Gradients must already be unscaled."""
    if takes_found_inf(optimizer):
        # the GradScaler protocol: the fused kernel reads these attributes and skips in-kernel
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(found_inf):  # other optimizers: a host decision (one sync per step)
        optimizer.step()

