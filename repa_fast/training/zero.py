"""DeepSpeed ZeRO for the training loop: config checking, the engine, ZeRO-3 weight gathering.

``--ds_config configs/ds/zero2.json`` (any stage 0-3). ``"auto"`` values are filled from the
flags: ``train_batch_size`` = ``--batch-size``, ``train_micro_batch_size_per_gpu`` = its share
per process, ``gradient_clipping`` = ``--max-grad-norm``, ``bf16.enabled`` = ``--mixed-precision
bf16``; explicit values must agree with the flags. With ZeRO-3 every rank holds only a shard of
each weight, so the EMA update and the saved state gather them first
(``GatheredParameters``): correct, at the cost of one all-gather of the weights per step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import torch

from .config import TrainConfig


def fill_auto(section: dict, wanted: dict, path: str, prefix: str = "", note: str = "") -> None:
    """Set each ``wanted`` key that ``section`` leaves out or sets to ``"auto"``; an explicit
    value must equal the flags' (ValueError naming the key, the two values and ``path``)."""
    for key, value in wanted.items():
        given = section.get(key, "auto")
        if given == "auto":
            section[key] = value
        elif given != value:
            raise ValueError(f"--ds_config {path}: {prefix}{key} is {given}, but the flags give "
                             f"{value}{note}; set it to \"auto\"")


def deepspeed_optimizer_section(ds: dict, name: str, *, lr: float, betas: tuple[float, float],
                                eps: float, weight_decay: float, path: str) -> None:
    """Check / fill ``ds['optimizer']`` for ``--optimizer name`` (in place): only
    ``--optimizer deepspeed`` uses it, as AdamW (or Adam) with the flags' hyper-parameters."""
    if name != "deepspeed":
        if "optimizer" in ds:
            raise ValueError(f"--ds_config {path} has an \"optimizer\" section, but --optimizer "
                             f"is {name}: pass --optimizer deepspeed to use it, or remove it")
        return
    section = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if section.get("type", "AdamW").lower() not in ("adamw", "adam"):
        raise ValueError(f"--ds_config {path}: optimizer.type must be AdamW or Adam (the REPA "
                         f"recipe); got {section.get('type')!r}")
    section.setdefault("type", "AdamW")
    fill_auto(section.setdefault("params", {}),
              dict(lr=lr, betas=list(betas), eps=eps, weight_decay=weight_decay), path,
              prefix="optimizer.params.")


def load_ds_config(path: str, config: TrainConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config at ``path`` with ``auto`` values filled and checked against flags."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--ds_config {path!r} does not exist (stage 1-3 examples: "
                                f"configs/ds/zero1.json, zero2.json, zero3.json)")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"--ds_config {path!r} is not valid JSON: {error}") from None
    if not isinstance(ds, dict):
        raise ValueError(f"--ds_config {path!r} must hold a JSON object; got {type(ds).__name__}")
    accumulation = config.gradient_accumulation_steps
    fill_auto(ds, dict(train_batch_size=config.batch_size,
                       train_micro_batch_size_per_gpu=config.batch_size // (world_size
                                                                            * accumulation),
                       gradient_accumulation_steps=accumulation,
                       # DeepSpeed's "no clipping" is 0
                       gradient_clipping=(config.max_grad_norm
                                          if math.isfinite(config.max_grad_norm) else 0.0)),
              path, note=" (--batch-size is global, --gradient-accumulation-steps splits it "
                         "into micro-batches)")
    stage = ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"--ds_config {path}: zero_optimization.stage must be 0-3; got {stage}")
    for name, dtype in (("bf16", "bf16"), ("fp16", "fp16")):
        section = ds.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = config.mixed_precision == dtype
        elif section["enabled"] != (config.mixed_precision == dtype):
            raise ValueError(f"--ds_config {path}: {name}.enabled is {section['enabled']} but "
                             f"--mixed-precision is {config.mixed_precision}")
    deepspeed_optimizer_section(ds, config.optimizer, lr=config.learning_rate,
                                betas=(config.adam_beta1, config.adam_beta2),
                                eps=config.adam_epsilon, weight_decay=config.adam_weight_decay,
                                path=path)
    if ds["fp16"]["enabled"] and device.type == "cpu":
        raise ValueError("--mixed-precision fp16 with DeepSpeed needs a GPU (DeepSpeed refuses "
                         "fp16 on the CPU); use bf16 or no")
    return ds


class ZeroEngine:
    """The DeepSpeed engine around the SiT, with the calls of
    :class:`repa_fast.training.engine.Engine`. ``optimizer`` None: DeepSpeed builds its own
    from ``ds_config['optimizer']`` (``--optimizer deepspeed``)."""

    def __init__(self, model, optimizer, ds_config: dict, device: torch.device):
        import deepspeed
        if ds_config["zero_optimization"]["stage"] == 3:
            # the fused alignment op reads all three projector layers' weights in one call,
            # without calling the layers: ZeRO-3 must gather them when the projector is called
            from ..models.projector import REPAProjector
            deepspeed.utils.set_z3_leaf_modules(model, [REPAProjector])
        extra = {} if optimizer is not None else dict(
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, **extra)
        self.stage = ds_config["zero_optimization"]["stage"]
        self.device = device
        self.accumulation_steps = int(ds_config.get("gradient_accumulation_steps", 1))
        self._skipped = False

    @property
    def module(self):
        return self.engine.module

    @property
    def wrapped(self):
        return self.engine

    def gathered(self):
        """Context in which every rank sees full weights (ZeRO-3), else nothing to do."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def micro_step(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward (it weights the loss 1/A itself) and its ``step()``, which
        updates only at the accumulation boundary.

        ``engine.step()`` has no skip input for bf16/fp32 (fp16 has its loss scaler): the loss
        is read on the host before the backward, the one host synchronisation per micro-step
        left on this path. A non-finite loss skips a step of one micro-step; with several, the
        micro-steps already accumulated cannot be taken back, so the run stops (exit 3, the
        last checkpoint intact) rather than apply part of a batch."""
        if not bool(torch.isfinite(loss)):
            if self.accumulation_steps > 1:
                raise FloatingPointError(
                    "a micro-step's loss is not finite; under DeepSpeed with "
                    "--gradient-accumulation-steps > 1 the step cannot be skipped (its other "
                    "micro-steps are already accumulated): stopping, the last checkpoint is "
                    "intact; resume with a lower --learning-rate or without accumulation")
            self._skipped = True
            return
        self.engine.backward(loss)
        self.engine.step()

    def step(self, loss: torch.Tensor, ema) -> tuple[torch.Tensor, torch.Tensor]:
        """After the micro-steps: the pre-clip gradient norm and the EMA update; returns
        (norm, found_inf), 0 and 1.0 for a skipped step."""
        if self._skipped:
            self._skipped = False
            return torch.zeros((), device=self.device), torch.ones((), device=self.device)
        grad_norm = self._grad_norm().to(self.device)
        with self.gathered():
            ema.update(self.module)
        return grad_norm, torch.zeros((), device=self.device)

    def backward_and_step(self, loss: torch.Tensor, ema) -> tuple[torch.Tensor, torch.Tensor]:
        self.backward(loss)
        return self.step(loss, ema)

    def _grad_norm(self) -> torch.Tensor:
        """DeepSpeed's pre-clip gradient norm, kept on the device when it gives a tensor."""
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            return norm.detach().float()
        return torch.tensor(float("nan") if norm is None else norm)

    def full_state_dict(self) -> dict:
        """All weights on every rank (gathered under ZeRO-3), on the CPU, in fp32."""
        with self.gathered():
            return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    def save(self, directory: str, step: int) -> dict:
        """Optimizer and weight partitions (a collective: every rank calls it); nothing of
        them goes into the checkpoint file."""
        self.engine.save_checkpoint(directory, tag=f"{step:07d}")
        return {}

    def load(self, state: dict, directory: str, source: str) -> None:
        step = int(state["steps"])
        path, _ = self.engine.load_checkpoint(directory, tag=f"{step:07d}")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {step:07d} in {directory} to "
                                    f"resume the optimizer from")
