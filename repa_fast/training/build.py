"""Building a run from its config, in the order that keeps runs reproducible: every check that
can fail before anything is built or written; the data; the models from ``--seed`` (identical
on every rank); the resumed state; the engine; the run folder; then each rank's random state
and the Triton tiles. What the loop needs comes back as one :class:`Run`."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..distributed import Distributed
from ..errors import UsageError
from .checkpoint_files import set_aside_after
from .config import TrainConfig, is_dit, is_t2i, save_config
from .data import RunData, prepare_data
from .ema import EMA
from .encoders import build_encoders, check_encoder_resolution, encoder_weight_files
from .engine import Engine
from .metrics import MetricsLog, Reporter, truncate_after
from .resume import load_weights, resume_state, seed_rank
from .run_dir import check_run_dir, clear_run_dir
from .samples import SampleGrids
from .step import compiled, make_optimizer, plain_engine, resolve_compile
from .tiles import warm_kernels


@dataclass
class Run:
    """A built run at its starting ``step``: ``forward`` is the engine's wrapped module as the
    loss calls it (compiled or not), ``resumed`` the checkpoint it continues (None: fresh)."""
    run_dir: str
    ckpt_dir: str
    data: RunData
    model: torch.nn.Module
    ema: EMA
    engine: Engine
    forward: Callable
    encoders: list
    step: int
    resumed: Optional[str]
    skipped_steps: int
    log: MetricsLog
    reporter: Reporter
    grids: SampleGrids


def check_deepspeed(config: TrainConfig) -> None:
    """``--ds_config`` needs DeepSpeed installed (the ``deepspeed`` extra)."""
    import importlib.util
    if config.ds_config and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(f"--ds_config {config.ds_config}: DeepSpeed is not installed; "
                         f"pip install 'repa_fast[deepspeed]', or leave out --ds_config to "
                         f"train without it (DDP under torchrun)")


def build_model(config: TrainConfig, in_channels: int, input_size: int, z_dims: list,
                context_dim: Optional[int] = None):
    """The ``--model`` SiT, DiT or MMDiT (``in_channels`` from the data; DiT's learned σ
    doubles its output channels; the MMDiT's ``context_dim`` is the data set's caption-feature
    width)."""
    from ..models import DiT_models, MMDiT_models, SiT_models
    if is_t2i(config):
        if context_dim is None:
            raise ValueError(f"--model {config.model} (text-to-image) needs the caption-feature "
                             f"width of its data set (context_dim)")
        # the official train_t2i.py builds MMDiT(input_size, z_dims, encoder_depth): its other
        # options stay at their defaults; --qk-norm turns on the LayerNorm variant
        return MMDiT_models[config.model](
            input_size=input_size, in_channels=in_channels, z_dims=z_dims,
            encoder_depth=config.encoder_depth, projector_dim=config.projector_dim,
            qk_norm="ln" if config.qk_norm else None, context_dim=context_dim,
            fused_attn=config.fused_attn, attn_backend=config.attn_backend,
            grad_checkpointing=config.grad_checkpointing, validate_inputs=False)
    if is_dit(config):  # DiT has a null class whenever class_dropout_prob > 0
        build, family = DiT_models[config.model], {}
    else:
        build, family = SiT_models[config.model], dict(use_cfg=config.cfg_prob > 0)
    return build(
        input_size=input_size, in_channels=in_channels, num_classes=config.num_classes,
        class_dropout_prob=config.cfg_prob, z_dims=z_dims, **family,
        encoder_depth=config.encoder_depth, projector_dim=config.projector_dim,
        qk_norm=config.qk_norm, fused_attn=config.fused_attn, attn_backend=config.attn_backend,
        grad_checkpointing=config.grad_checkpointing,
        # the loop checks labels on the host before they reach the GPU; the model's own check
        # would read them back from the GPU every step
        validate_inputs=False)


def build_engine(config: TrainConfig, model: torch.nn.Module, dist: Distributed) -> Engine:
    """DeepSpeed ZeRO with ``--ds_config``, else the plain path (DDP over several ranks)."""
    if not config.ds_config:
        return plain_engine(config, model, dist.device, dist.world_size)
    from .zero import ZeroEngine, load_ds_config
    return ZeroEngine(model, make_optimizer(config, model.parameters()),
                      load_ds_config(config.ds_config, config, dist.world_size, dist.device),
                      dist.device)


def start_run_dir(config: TrainConfig, run_dir: str, ckpt_dir: str, step: int,
                  resumed: Optional[str]) -> None:
    """Rank 0's first writes into the run folder, once every check has passed: the previous
    run cleared (``--overwrite``), checkpoints past ``step`` set aside, config.json, and the
    metrics past ``step`` (an abandoned run's) cut off."""
    if config.overwrite:
        found = clear_run_dir(run_dir)
        if found:
            print(f"--overwrite: deleted the previous run's {', '.join(found)} (and its "
                  f"samples and dashboards) in {run_dir}", flush=True)
    moved = set_aside_after(ckpt_dir, step) if resumed else []
    if moved:
        warnings.warn(f"--resume: continuing from step {step}; the checkpoints after it "
                      f"(an abandoned continuation, or damaged) were moved out of reach "
                      f"of --resume auto and --keep-last: {', '.join(moved)}")
    os.makedirs(ckpt_dir, exist_ok=True)
    save_config(config, os.path.join(run_dir, "config.json"))
    truncate_after(os.path.join(run_dir, "metrics.jsonl"), step)


def build_run(config: TrainConfig, dist: Distributed) -> Run:
    """Check ``config`` (the one place it is checked) and build everything the loop uses."""
    config.check(dist.world_size)
    device = dist.device
    run_dir = os.path.join(config.output_dir, config.exp_name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    check_run_dir(run_dir, config.resume, config.overwrite)
    check_encoder_resolution(config)
    check_deepspeed(config)
    if config.enc_type != "demo":
        encoder_weight_files(config)  # a missing file stops here, before data and models
    elif config.enc_weights == "trained":
        if dist.main:  # trained once, by one process; the others then read the cache
            from .demo_encoder import trained_state
            trained_state(config.resolution)
        dist.barrier()
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = prepare_data(config, dist)

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    enc_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with warnings.catch_warnings():
        if config.enc_type == "demo":
            warnings.simplefilter("ignore")
        encoders = build_encoders(config, device, enc_dtype)
    in_channels, input_size, _ = data.x_shape
    model = build_model(config, in_channels, input_size, [e.embed_dim for e in encoders],
                        data.context_shape[1] if data.text_to_image else None)
    model = model.to(device).train()
    ema = EMA(model, config.ema_decay)
    resumed, state = resume_state(config.resume, ckpt_dir, dist)
    load_weights(config, model, ema, resumed, state)
    engine = build_engine(config, model, dist)
    if state is not None:
        engine.load(state, os.path.join(ckpt_dir, "deepspeed"), resumed)
    config.compile = resolve_compile(config, device)  # recorded resolved in config.json
    forward, encoders = compiled(engine.wrapped, encoders, config.compile)
    vae = None
    if data.vae_path and dist.main:  # rank 0 alone writes sample grids
        from ..vae import load_vae
        vae = load_vae(data.vae_path, device=device)

    step = 0
    if state is not None:
        data.loader.load_state_dict(state["loader"])
        step = int(state["steps"])
    if dist.main and config.resume is not None:
        print(f"--resume {config.resume}: resuming from {resumed} at step {step}"
              if state is not None else
              f"--resume {config.resume}: no checkpoint in {ckpt_dir}: starting at step 0",
              flush=True)
    if dist.main:
        start_run_dir(config, run_dir, ckpt_dir, step, resumed)
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl") if dist.main else None)
    reporter = Reporter(config.report_to, run_dir, enabled=dist.main, config=config.to_dict(),
                        project=config.wandb_project, entity=config.wandb_entity)
    grids = SampleGrids(config, run_dir, ema, vae, data.latents_scale, data.x_shape, device,
                        reporter, data)
    seed_rank(config, dist, resumed, state)
    skipped = int(state.get("skipped_steps", 0)) if state is not None else 0
    micro_batch = config.batch_size // (dist.world_size * config.gradient_accumulation_steps)
    warm_kernels(config, model, encoders, device, micro_batch, dist,
                 state.get("kernel_tiles") if state is not None else None)
    return Run(run_dir, ckpt_dir, data, model, ema, engine, forward, encoders, step, resumed,
               skipped, log, reporter, grids)
