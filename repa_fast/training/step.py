"""One REPA training step, as ``repa_fast.train`` runs it and the training benchmark times it::

    x     = sample_posterior(moments, ε)                    latents from stored VAE moments
    zs    = [encoder(images) for each encoder]              frozen, no grad
    loss  = velocity MSE + proj_coeff · proj_loss           SILoss, fused alignment op
            (DiT: diffusion hybrid loss + proj_coeff · proj_loss, training.dit_loss.DiTLoss)
    clip grad norm, AdamW step, EMA update                  skipped on the device when not finite

With ``--gradient-accumulation-steps A`` the rank's batch is run as A micro-batches (forward
and backward each, gradients weighted 1/A, DDP reducing only in the last) before one update;
the random draws stay those of the whole global batch, so the result is the big batch's.

No host synchronisation (plain and DDP paths): the random draws are made on the device from
(seed, step), the non-finite skip is a device flag read by the fused AdamW kernel and the EMA,
and the step returns device tensors that the loop sums and reads only when it logs.
Under DeepSpeed one host read remains per step (see
:meth:`repa_fast.training.zero.ZeroEngine.backward_and_step`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from ..transport import SILoss
from ..transport.timesteps import sample_time
from .. import vae as vae_module
from .config import TrainConfig, is_dit
from .dit_loss import DIFFUSION_STEPS, DiTLoss
from .ema import EMA
from .engine import Engine, PlainEngine
from .optim import build_optimizer


class Draws(NamedTuple):
    """A rank's random numbers for one step: times [B, 1, 1, 1] (DiT: int64 timesteps [B]),
    noise and posterior noise [B, C, H, W], label-dropout flags [B] (bool)."""
    time: torch.Tensor
    noise: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor


def step_draws(config: TrainConfig, step: int, local_batch: int, shape: tuple, rank: int,
               world_size: int, device: torch.device | str = "cpu") -> Draws:
    """Times, noise, posterior noise and label-dropout flags of this rank's samples at
    ``step``, drawn on ``device`` for the whole global batch from a generator seeded with
    (seed, step), then sliced: sample i of the global batch gets the same numbers whatever the
    number of processes (rank r holds samples r, r + W, r + 2W, ... as the loader's order gives
    them), and a resumed run draws exactly what the uninterrupted one did.

    Seeding a device generator and drawing on the device reads nothing back on the host. The
    numbers depend on the device kind: the CPU's generator differs from CUDA's, and CUDA's
    Philox offsets follow the launch grid, which follows the card's SM count, so a run resumed
    on another GPU model draws other numbers (the checkpoint records the device: ``--resume``
    warns then)."""
    g = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + step)
    total = local_batch * world_size
    if is_dit(config):  # as DiT's train.py: torch.randint(0, T, (N,)), here on the device
        time_ = torch.randint(0, DIFFUSION_STEPS, (total,), generator=g, device=device)
    else:
        time_ = sample_time(total, config.weighting, config.path_type, generator=g)
    noise = torch.randn((total, *shape), generator=g, device=device)
    eps = torch.randn((total, *shape), generator=g, device=device)
    drop = torch.rand(total, generator=g, device=device) < config.cfg_prob
    mine = slice(rank, total, world_size)  # a strided view: no index tensor
    return Draws(time_[mine], noise[mine], eps[mine], drop[mine])


class StepOutput(NamedTuple):
    """Device tensors of one step: mean velocity loss, mean projection loss, gradient norm
    (before clipping; 0 where DeepSpeed skipped) and ``found_inf`` (1.0 = skipped)."""
    loss: torch.Tensor
    proj_loss: torch.Tensor
    grad_norm: torch.Tensor
    found_inf: torch.Tensor


def draw_device_name(device: torch.device) -> str:
    """What the random draws depend on: the GPU model, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def autocast_dtype(config: TrainConfig) -> Optional[torch.dtype]:
    """The autocast dtype of ``--mixed-precision`` (None: autocast off, fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)


def autocast(config: TrainConfig, device: torch.device):
    dtype = autocast_dtype(config)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def make_optimizer(config: TrainConfig, params) -> Optional[torch.optim.Optimizer]:
    """``--optimizer`` with the ``--learning-rate`` / ``--adam-*`` flags."""
    return build_optimizer(config.optimizer, params, lr=config.learning_rate,
                           betas=(config.adam_beta1, config.adam_beta2),
                           eps=config.adam_epsilon, weight_decay=config.adam_weight_decay)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the GPU's queue: pinned memory is
    copied asynchronously (pageable memory is pinned first; the loaders hand out pinned
    batches on CUDA so that this is a plain asynchronous copy)."""
    if tensor.device == device or device.type != "cuda":
        return tensor.to(device)
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass
class TrainStep:
    """Everything one step uses. ``engine`` trains the weights
    (:class:`repa_fast.training.engine.Engine`: the plain or DDP path, or DeepSpeed);
    ``forward`` is what the loss calls (the engine's wrapped module, compiled or not)."""
    config: TrainConfig
    device: torch.device
    engine: Engine
    forward: Callable
    encoders: list
    loss_fn: SILoss  # or DiTLoss
    ema: EMA
    x_shape: tuple
    latents_scale: float = 1.0
    rank: int = 0
    world_size: int = 1
    empty_context: Optional[torch.Tensor] = None  # text-to-image: the empty caption's [L, D]

    @classmethod
    def build(cls, config: TrainConfig, model: nn.Module, encoders: list,
              device: torch.device, x_shape: tuple, latents_scale: float = 1.0,
              compile: Optional[bool] = None,
              empty_context: Optional[torch.Tensor] = None) -> "TrainStep":
        """A single-process step with a fresh optimizer and EMA (benchmarks, tests);
        ``compile`` defaults to the config's resolved setting; ``empty_context`` is needed for
        a text-to-image model."""
        engine = plain_engine(config, model, device)
        ema = EMA(model, config.ema_decay)
        ema.update(model, decay=0.0)
        use_compile = resolve_compile(config, device) if compile is None else compile
        forward, encoders = compiled(engine.wrapped, encoders, use_compile)
        return cls(config, device, engine, forward, encoders, make_loss(config), ema, x_shape,
                   latents_scale, empty_context=empty_context)

    def __call__(self, step: int, images: torch.Tensor, moments: torch.Tensor,
                 cond: torch.Tensor) -> StepOutput:
        """Train on one batch (this rank's part of the global batch of ``step``); ``cond``:
        the class labels [B], or for a text-to-image model the caption contexts [B, L, D]."""
        config, device, engine = self.config, self.device, self.engine
        images = to_device(images, device)
        cond = to_device(cond, device)
        draws = step_draws(config, step, cond.shape[0], self.x_shape, self.rank,
                           self.world_size, device)
        with torch.no_grad():
            x = vae_module.sample_posterior(to_device(moments, device), self.latents_scale,
                                            noise=draws.eps)
        micros = config.gradient_accumulation_steps
        size = cond.shape[0] // micros
        sums = torch.zeros(3, device=device)  # loss, proj_loss, total over the micro-steps
        for m in range(micros):
            # micro-batch m: the rank's samples m·size .. (m+1)·size - 1, with their own draws
            part = slice(m * size, (m + 1) * size)
            with engine.micro_step(last=m == micros - 1):
                with torch.no_grad(), autocast(config, device):
                    zs = [encoder(images[part]) for encoder in self.encoders]
                model_kwargs = self.condition(cond[part], draws.drop[part])
                with autocast(config, device):
                    loss, proj_loss = self.loss_fn(self.forward, x[part], model_kwargs, zs=zs,
                                                   time=draws.time[part],
                                                   noise=draws.noise[part])
                    loss_mean, proj_mean = loss.mean(), proj_loss.mean()
                    total = loss_mean + config.proj_coeff * proj_mean
                engine.backward(total)
            sums += torch.stack([loss_mean.detach(), proj_mean.detach(), total.detach()]
                                ).float()
        means = sums / micros  # the global batch's means (equal micro-batches)
        grad_norm, found_inf = engine.step(means[2], self.ema)
        return StepOutput(means[0], means[1], grad_norm.detach(), found_inf)

    def condition(self, cond: torch.Tensor, drop: torch.Tensor) -> dict:
        """The model's conditioning keywords with the CFG dropout of ``drop`` (bool [B]):
        labels go in as ``y`` with ``force_drop_ids`` (the model swaps in its null class, as
        the official LabelEmbedder); a text-to-image model's contexts have the dropped rows
        replaced by the empty caption's context (the official CFGDataset, here on the device
        from the step's draws)."""
        if self.empty_context is None:
            kwargs = dict(y=cond)
            if self.config.cfg_prob > 0:
                kwargs["force_drop_ids"] = drop.to(torch.int64)
            return kwargs
        if self.config.cfg_prob > 0:
            empty = self.empty_context.to(cond.device, cond.dtype)
            cond = torch.where(drop.view(-1, 1, 1), empty, cond)
        return dict(context=cond)


def plain_engine(config: TrainConfig, model: nn.Module, device: torch.device,
                 world_size: int = 1) -> PlainEngine:
    """The plain (one process or DDP) engine with ``--optimizer`` over ``model``'s weights."""
    return PlainEngine(model, make_optimizer(config, model.parameters()), device,
                       config.max_grad_norm, world_size, fp16=config.mixed_precision == "fp16",
                       accumulation_steps=config.gradient_accumulation_steps)


def make_loss(config: TrainConfig):
    """SiT's velocity loss, or DiT's diffusion loss for a DiT ``--model``."""
    if is_dit(config):
        return DiTLoss(fused=config.fused_loss)
    return SILoss(prediction=config.prediction, path_type=config.path_type,
                  weighting=config.weighting, fused=config.fused_loss)


def resolve_compile(config: TrainConfig, device: torch.device) -> bool:
    """``--compile`` as given, else on for CUDA and off elsewhere (the CPU compiles with a C++
    toolchain for tens of seconds and gains little). Under DeepSpeed it stays opt-in: the
    compiled object would be the ``DeepSpeedEngine``, whose ZeRO-3 parameter hooks
    ``torch.compile`` does not trace reliably."""
    if config.compile is not None:
        return config.compile
    return device.type == "cuda" and not config.ds_config


def compiled(forward: Callable, encoders: list, enabled: bool) -> tuple[Callable, list]:
    """``torch.compile`` of the (wrapped) model and of the frozen encoders' forward
    (inference graphs, no backward) when ``enabled``."""
    if not enabled:
        return forward, encoders
    return torch.compile(forward), [torch.compile(encoder) for encoder in encoders]
