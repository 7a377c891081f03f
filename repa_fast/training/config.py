"""The training configuration: one dataclass, the official flag names and defaults.

Every field is a command-line flag (``exp_name`` -> ``--exp-name``; booleans also take
``--no-...``). ``--preset NAME`` fills in a set of values first; flags given explicitly win.
The resolved config is written to ``<output-dir>/<exp-name>/config.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import Optional

from ..atomic_write import write_json_atomic

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    # run
    output_dir: str = "exps"
    exp_name: str = "repa"
    data_dir: str = "data/imagenet256"
    seed: int = 0
    resume: Optional[str] = None          # auto | STEP | PATH
    overwrite: bool = False               # start over in a folder that holds a run (deletes it)
    preset: Optional[str] = None
    # model (official names and defaults)
    model: str = "SiT-XL/2"
    num_classes: int = 1000
    encoder_depth: int = 8
    fused_attn: bool = True
    qk_norm: bool = False
    projector_dim: int = 2048
    resolution: int = 256
    attn_backend: str = "auto"
    compile: Optional[bool] = None        # None: on for CUDA, off on the CPU (--no-compile)
    grad_checkpointing: bool = False
    # REPA
    enc_type: str = "dinov2-vit-b"
    enc_weights: str = "ckpts"            # a folder with the official file names, or files, or "random"
    proj_coeff: float = 0.5
    fused_loss: bool = True
    path_type: str = "linear"
    prediction: str = "v"
    weighting: str = "uniform"
    cfg_prob: float = 0.1
    # optimisation
    batch_size: int = 256                 # global, over all processes
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    optimizer: str = "adamw"              # adamw (torch fused) | apex-fused-adam | deepspeed
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    mixed_precision: str = "bf16"         # official default fp16; bf16 needs no loss scaling
    allow_tf32: bool = False
    max_train_steps: int = 400000
    max_nonfinite_steps: int = 10         # consecutive skipped steps before the run stops
    # data
    num_workers: int = 4
    data_backend: str = "auto"            # auto | dali | torch
    on_bad_sample: str = "error"          # error | skip (replace by the next good sample, count)
    verify_shards: bool = True            # hash each shard once when first read (else size only)
    # DeepSpeed (launched with `deepspeed repa_fast/train.py --ds_config ...`)
    ds_config: Optional[str] = None
    # checkpoints, logging, sampling
    checkpointing_steps: int = 50000
    keep_last: Optional[int] = None
    save_safetensors: bool = False        # also NNNNNNN-{model,ema}.safetensors
    sampling_steps: int = 10000
    log_every: int = 100
    report_to: str = "tensorboard"        # tensorboard | wandb | none (metrics.jsonl always)
    wandb_project: str = "REPA"           # the official tracker project name
    wandb_entity: Optional[str] = None
    vae: Optional[str] = None             # SD-VAE folder/file, to decode sample grids

    def check(self, world_size: int = 1) -> None:
        """Raise ValueError naming the flag for values that cannot work."""
        from ..models import SiT_models
        if self.model not in SiT_models:
            raise ValueError(f"--model must be one of {', '.join(SiT_models)}; got {self.model!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}; "
                             f"got {self.mixed_precision!r}")
        if self.batch_size % world_size:
            raise ValueError(f"--batch-size {self.batch_size} (global) must be divisible by the "
                             f"number of processes ({world_size})")
        for name in ("batch_size", "max_train_steps", "checkpointing_steps", "sampling_steps",
                     "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got "
                                 f"{getattr(self, name)}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"--keep-last must be >= 1; got {self.keep_last}")
        from .metrics import REPORTERS
        if self.report_to not in REPORTERS:
            raise ValueError(f"--report-to must be one of {', '.join(REPORTERS)}; got "
                             f"{self.report_to!r}")
        from .optim import OPTIMIZERS
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got "
                             f"{self.optimizer!r}")
        if self.optimizer == "deepspeed" and not self.ds_config:
            raise ValueError("--optimizer deepspeed builds DeepSpeed's optimizer from the "
                             "--ds_config file; pass --ds_config (or use --optimizer adamw)")
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"--on-bad-sample must be one of error, skip; got "
                             f"{self.on_bad_sample!r}")
        if self.overwrite and self.resume is not None:
            raise ValueError(f"--overwrite deletes the run that --resume {self.resume} would "
                             f"continue; give one of them")
        if not 0 <= self.cfg_prob < 1:
            raise ValueError(f"--cfg-prob must be in [0, 1); got {self.cfg_prob}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Values a preset sets before the command line is read.
PRESETS = {
    # A CPU-sized run on the built-in shapes data set (repa_fast.data.demo), pixel space,
    # a tiny SiT and a tiny random-weight encoder: the loss falls within minutes.
    "demo": dict(exp_name="demo", data_dir="demo", model="SiT-T/4", num_classes=12,
                 encoder_depth=2, projector_dim=256, resolution=32, enc_type="demo",
                 enc_weights="random", batch_size=32, learning_rate=1e-3, mixed_precision="no",
                 max_train_steps=400, checkpointing_steps=200, sampling_steps=400, log_every=1,
                 num_workers=1, ema_decay=0.99, data_backend="torch"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv=None) -> TrainConfig:
    """Command line -> TrainConfig (preset first, explicit flags over it)."""
    parser = argparse.ArgumentParser(prog="repa_fast.train", description=__doc__.split("\n")[0])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; RANK env wins
    for f in fields(TrainConfig):  # annotations are strings (postponed evaluation)
        if f.type in ("bool", "Optional[bool]"):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                default=None)
        else:
            kind = {"int": int, "Optional[int]": int, "float": float}.get(f.type, str)
            names = [_flag(f.name)] + (["--ds_config"] if f.name == "ds_config" else [])
            parser.add_argument(*names, dest=f.name, type=kind, default=None)
    args = vars(parser.parse_args(argv))
    args.pop("local_rank")
    values = {}
    preset = args.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        values.update(PRESETS[preset])
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)


def save_config(config: TrainConfig, path: str) -> None:
    write_json_atomic(path, config.to_dict())
