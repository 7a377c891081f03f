"""The training configuration: one dataclass, the official flag names and defaults.

Every field is a command-line flag (``exp_name`` -> ``--exp-name``; booleans also take
``--no-...``). ``--preset NAME`` fills in a set of values first; flags given explicitly win.
The resolved config is written to ``<output-dir>/<exp-name>/config.json``.

Each field carries its help text, choices and help group in ``field(metadata=...)``: the same
source feeds ``python -m repa_fast.train --help`` and the README's flag table
(:func:`flags_markdown`; ``python -m repa_fast.training.config --update-readme`` rewrites it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from ..atomic_write import write_json_atomic

MIXED_PRECISION = ("no", "fp16", "bf16")

# help groups, in --help and README order: key -> title
GROUPS = {"run": "run", "model": "model", "repa": "REPA", "optim": "optimisation",
          "data": "data", "deepspeed": "DeepSpeed", "log": "checkpoints and logging"}
# the official spellings of flags we spell with dashes, the DeepSpeed launcher's own, and
# facebookresearch/DiT's train.py names where ours differ (its --vae, a name rather than a
# path, and --epochs have no alias: this loop counts steps)
ALIASES = {"output_dir": ["--output_dir", "--results-dir"], "exp_name": ["--exp_name"],
           "ds_config": ["--ds_config"], "seed": ["--global-seed"],
           "data_dir": ["--data-path"], "resolution": ["--image-size"],
           "batch_size": ["--global-batch-size"], "checkpointing_steps": ["--ckpt-every"]}

README_BEGIN = "<!-- train-flags:begin -->"
README_END = "<!-- train-flags:end -->"
REGENERATE = "python -m repa_fast.training.config --update-readme"


# Choices come from the modules that enforce them, read on first use: importing the models
# takes seconds, and config.py is imported by code that needs none of them.
def _models():
    from ..models import DiT_models, MMDiT_models, SiT_models
    return tuple(SiT_models) + tuple(DiT_models) + tuple(MMDiT_models)


def is_dit(config) -> bool:
    """Whether ``--model`` names a DiT (trained on DiT's Gaussian diffusion, not a SiT path)."""
    return config.model.startswith("DiT-")


def is_t2i(config) -> bool:
    """Whether ``--model`` names an MMDiT: text-to-image, conditioned on caption features (the
    official ``train_t2i.py``), on a captioned data set."""
    return config.model.startswith("MMDiT-")


def _encoders():
    from ..encoders.registry import ENCODER_NAMES
    return ENCODER_NAMES + ("demo",)  # demo: the tiny ViT of --preset demo (demo_encoder.py)


def _attn_backends():
    from ..ops.attention import CHOICES
    return CHOICES


def _path_types():
    from ..transport import PATH_TYPES
    return PATH_TYPES


def _weightings():
    from ..transport import WEIGHTINGS
    return WEIGHTINGS


def _reporters():
    from .metrics import REPORTERS
    return ("auto",) + REPORTERS


def _optimizers():
    from .optim import OPTIMIZERS
    return OPTIMIZERS


def _data_backends():
    from ..data.loaders import BACKENDS
    return BACKENDS


def _bad_sample_policies():
    from ..data.loaders import ON_BAD_SAMPLE
    return ON_BAD_SAMPLE


def _presets():
    return tuple(PRESETS)


def _option(group: str):
    """A field maker for one help group: ``help`` says what the flag does, ``shown`` is the
    default as --help shows it when the value alone would not say (None, auto values),
    ``official`` marks the flags of the official REPA ``train.py`` (listed first)."""
    def option(default, help: str, *, choices=None, shown: Optional[str] = None,
               official: bool = False, metavar: Optional[str] = None):
        return field(default=default, metadata=dict(group=group, help=help, choices=choices,
                                                    shown=shown, official=official,
                                                    metavar=metavar))
    return option


_run, _model, _repa, _optim = _option("run"), _option("model"), _option("repa"), _option("optim")
_data, _ds, _log = _option("data"), _option("deepspeed"), _option("log")


@dataclass
class TrainConfig:
    # run
    output_dir: str = _run("exps", "folder of the runs: each writes to <output-dir>/<exp-name>/",
                           official=True, metavar="DIR")
    exp_name: str = _run("repa", "run name: its folder under --output-dir, and the wandb run "
                         "name (official: required)", official=True, metavar="NAME")
    seed: int = _run(0, "seed of the initial weights, the data order and every random draw",
                     official=True)
    preset: Optional[str] = _run(None, "fill in a set of values first; flags given explicitly "
                                 "win. demo: a tiny SiT on built-in data, about 4 minutes on "
                                 "2 CPU cores; demo-t2i: a tiny text-to-image MMDiT on "
                                 "built-in captioned shapes", choices=_presets, shown="none",
                                 metavar="NAME")
    resume: Optional[str] = _run(None, "continue a run: auto (the newest good checkpoint in the "
                                 "run folder, else start fresh), a step number, or a checkpoint "
                                 "file", shown="none: start fresh", metavar="auto|STEP|PATH")
    overwrite: bool = _run(False, "start over in a run folder that holds a run: deletes its "
                           "checkpoints, log, samples and dashboards")
    # model
    model: str = _model("SiT-XL/2", "size and patch size; a DiT-* name trains DiT on its "
                        "Gaussian diffusion instead (1000 steps, linear betas, learned sigma, "
                        "hybrid loss + proj-coeff · proj_loss; sample grids: 50 DDPM steps)",
                        choices=_models, official=True, metavar="NAME")
    num_classes: int = _model(1000, "number of class labels; the data set's labels must be "
                              "below it", official=True)
    encoder_depth: int = _model(8, "align the hidden states after this many blocks with the "
                                "encoder features", official=True)
    fused_attn: bool = _model(True, "attention through the --attn-backend kernel; "
                              "--no-fused-attn: explicit softmax (math), the official switch",
                              official=True)
    qk_norm: bool = _model(False, "normalise queries and keys before attention",
                           official=True)
    attn_backend: str = _model("auto", "attention kernel; auto takes the fastest that supports "
                               "the call (python -m repa_fast.info lists which run here and "
                               "why not the others)", choices=_attn_backends, metavar="NAME")
    compile: Optional[bool] = _model(None, "torch.compile the model and the encoders",
                                     shown="auto: on with CUDA (off under DeepSpeed), off on "
                                     "the CPU")
    grad_checkpointing: bool = _model(False, "recompute block activations in the backward: "
                                      "less memory, one more forward of the blocks")
    # REPA
    enc_type: str = _repa("dinov2-vit-b", "frozen vision encoder whose features the projector "
                          "aligns to; several: comma-separated", choices=_encoders,
                          official=True, metavar="NAME[,NAME]")
    proj_coeff: float = _repa(0.5, "weight of the alignment loss: loss = velocity MSE (DiT: "
                              "its diffusion loss) + proj-coeff · proj_loss", official=True)
    path_type: str = _repa("linear", "interpolant between data and noise (SiT only: a DiT run "
                           "refuses any other value)", choices=_path_types, official=True,
                           metavar="NAME")
    prediction: str = _repa("v", "model target: the velocity (the only one REPA trains)",
                            choices=("v",), official=True, metavar="NAME")
    weighting: str = _repa("uniform", "distribution of the training times (SiT only: a DiT "
                           "run draws its timesteps uniformly and refuses any other value)",
                           choices=_weightings, official=True, metavar="NAME")
    cfg_prob: float = _repa(0.1, "probability of dropping the class label (trains the "
                            "unconditional model for classifier-free guidance); in [0, 1)",
                            official=True)
    enc_weights: str = _repa("ckpts", "encoder weights: a folder holding the official file "
                             "names (e.g. dinov2_vitb14_pretrain.pth), one file per encoder "
                             "(comma-separated), or random (untrained; tests); for --enc-type "
                             "demo: trained (its tiny ViT, trained on first use and cached), "
                             "random, or such a file", metavar="PATH")
    projector_dim: int = _repa(2048, "hidden width of the 3-layer MLP projector (the official "
                               "model's default)")
    fused_loss: bool = _repa(True, "the model computes projector, pooling and cosine loss with "
                             "the fused alignment op; --no-fused-loss: the official path (the "
                             "model returns the projections)")
    # optimisation
    batch_size: int = _optim(256, "global batch size, over all processes (divisible by their "
                             "number)", official=True)
    gradient_accumulation_steps: int = _optim(
        1, "micro-steps per step: each process runs batch-size / (processes × this) samples "
        "at a time and the optimizer steps once per global batch (same result as one big "
        "batch, less memory)", official=True)
    learning_rate: float = _optim(1e-4, "AdamW learning rate (constant)", official=True)
    adam_beta1: float = _optim(0.9, "AdamW beta1", official=True)
    adam_beta2: float = _optim(0.999, "AdamW beta2", official=True)
    adam_weight_decay: float = _optim(0.0, "AdamW weight decay", official=True)
    adam_epsilon: float = _optim(1e-8, "AdamW epsilon", official=True)
    max_grad_norm: float = _optim(1.0, "clip the global gradient norm to this (inf: measure "
                                  "it, never clip)", official=True)
    max_train_steps: int = _optim(400000, "train until this step", official=True)
    mixed_precision: str = _optim("bf16", "autocast dtype of the model (no: fp32); bf16 needs "
                                  "no loss scaling (official default: fp16)",
                                  choices=MIXED_PRECISION, official=True, metavar="NAME")
    allow_tf32: bool = _optim(False, "TF32 matmuls and convolutions on GPUs that have them",
                              official=True)
    optimizer: str = _optim("adamw", "adamw: torch AdamW(fused=True); apex-fused-adam: NVIDIA "
                            "apex FusedAdam (built from source); deepspeed: DeepSpeed's own, "
                            "from --ds_config", choices=_optimizers, metavar="NAME")
    ema_decay: float = _optim(0.9999, "decay of the EMA weights that sample grids and "
                              "checkpoints' ema use (the official value)")
    max_nonfinite_steps: int = _optim(10, "steps with a non-finite loss or gradient are "
                                      "skipped; this many in a row stop the run (exit 3)")
    # data
    data_dir: str = _data("data/imagenet256", "data set written by python -m "
                          "repa_fast.data.prepare; demo: the built-in shapes (official "
                          "default: ../data/imagenet256)", official=True, metavar="DIR")
    resolution: int = _data(256, "image size in pixels; must match the data set",
                            official=True)
    num_workers: Optional[int] = _data(None, "loader processes per training process (DALI: "
                                       "CPU threads and reader processes); 0: load in the "
                                       "training process", official=True,
                                       shown="auto: min(4, CPUs per process - 1), recorded in "
                                       "config.json (official: 4)")
    data_backend: str = _data("auto", "dali: NVIDIA DALI (GPU JPEG decoding); torch: "
                              "DataLoader with Pillow; auto: dali when installed",
                              choices=_data_backends, metavar="NAME")
    on_bad_sample: str = _data("error", "a damaged sample: error stops naming its shard and "
                               "key; skip replaces it by the next good one, warns and counts "
                               "it", choices=_bad_sample_policies, metavar="NAME")
    verify_shards: bool = _data(True, "hash each shard against index.json when first read "
                                "(--no-verify-shards: sizes only)")
    # DeepSpeed (launched with `deepspeed repa_fast/train.py --ds_config ...`)
    ds_config: Optional[str] = _ds(None, "DeepSpeed JSON config (configs/ds/zero{1,2,3}.json) "
                                   "for a ZeRO run; its auto values are filled from the flags",
                                   shown="none: no DeepSpeed", metavar="PATH")
    # checkpoints, logging, sampling
    checkpointing_steps: int = _log(50000, "save a checkpoint every this many steps (and at "
                                    "the end)", official=True)
    sampling_steps: int = _log(10000, "write an EMA sample grid to <run>/samples/ every this "
                               "many steps (and at the end)", official=True)
    report_to: str = _log("auto", "dashboard for the logged scalars and sample grids; auto: "
                          "tensorboard when installed, else none; metrics.jsonl is always "
                          "written (official default: wandb)", choices=_reporters,
                          official=True, metavar="NAME")
    keep_last: Optional[int] = _log(None, "keep only the newest N checkpoints", shown="all")
    save_safetensors: bool = _log(False, "also write NNNNNNN-{model,ema}.safetensors beside "
                                  "each checkpoint")
    log_every: int = _log(100, "log loss, gradient norm and speed every this many steps (the "
                          "only steps that read the device)")
    log_alignment_every: Optional[int] = _log(
        None, "every this many steps, log the CKNNA (k = 10) of block --encoder-depth's "
        "mean-pooled hidden states against the encoder's features, on 64 fixed samples at "
        "t = 0 and 0.5 (SiT and DiT; metrics.jsonl and the dashboards)", shown="off",
        metavar="N")
    wandb_project: str = _log("REPA", "wandb project (the official one)", metavar="NAME")
    wandb_entity: Optional[str] = _log(None, "wandb entity (user or team)",
                                       shown="wandb's default", metavar="NAME")
    vae: Optional[str] = _log(None, "SD-VAE folder or file that decodes the sample grids of "
                              "latent-space runs", shown="none", metavar="PATH")

    def check(self, world_size: int = 1) -> None:
        """Raise ValueError naming the flag for values that cannot work, then fill in the
        machine-dependent defaults (:meth:`resolve`), so config.json records what ran."""
        for f in fields(self):
            choices = choices_of(f)
            value = getattr(self, f.name)
            if f.name == "report_to" and value not in choices:
                raise ValueError(f"--report-to must be one of {', '.join(choices[1:])} or auto "
                                 f"(tensorboard when installed, else none); got {value!r}")
            if f.name == "enc_type":
                bad = [n for n in str(value).split(",") if n.strip() not in choices]
                if bad:
                    raise ValueError(f"--enc-type must be one or more (comma-separated) of "
                                     f"{', '.join(choices)}; got {bad[0]!r}")
            elif choices is not None and value is not None and value not in choices:
                raise ValueError(f"{_flag(f.name)} must be one of {', '.join(choices)}; got "
                                 f"{value!r}")
        if self.log_alignment_every is not None:
            if self.log_alignment_every < 1:
                raise ValueError(f"--log-alignment-every must be >= 1; got "
                                 f"{self.log_alignment_every}")
            if is_t2i(self):
                raise ValueError(f"--log-alignment-every: not available for the text-to-image "
                                 f"--model {self.model} yet (SiT and DiT only); leave it out")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient-accumulation-steps must be >= 1; got "
                             f"{self.gradient_accumulation_steps}")
        if self.batch_size % world_size:
            raise ValueError(f"--batch-size {self.batch_size} (global) must be divisible by the "
                             f"number of processes ({world_size})")
        if self.batch_size % (world_size * self.gradient_accumulation_steps):
            raise ValueError(f"--batch-size {self.batch_size} (global) must be divisible by the "
                             f"number of processes × --gradient-accumulation-steps "
                             f"({world_size} × {self.gradient_accumulation_steps})")
        for name in ("batch_size", "max_train_steps", "checkpointing_steps", "sampling_steps",
                     "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got "
                                 f"{getattr(self, name)}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"--keep-last must be >= 1; got {self.keep_last}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0; got {self.num_workers}")
        if self.optimizer == "deepspeed" and not self.ds_config:
            raise ValueError("--optimizer deepspeed builds DeepSpeed's optimizer from the "
                             "--ds_config file; pass --ds_config (or use --optimizer adamw)")
        if self.overwrite and self.resume is not None:
            raise ValueError(f"--overwrite deletes the run that --resume {self.resume} would "
                             f"continue; give one of them")
        if is_dit(self):
            for name in ("path_type", "weighting"):
                default = next(f.default for f in fields(self) if f.name == name)
                if getattr(self, name) != default:
                    raise ValueError(f"{_flag(name)} {getattr(self, name)}: SiT only; --model "
                                     f"{self.model} trains on DiT's Gaussian diffusion (1000 "
                                     f"steps, uniform timesteps): leave out {_flag(name)}")
        if not 0 <= self.cfg_prob < 1:
            raise ValueError(f"--cfg-prob must be in [0, 1); got {self.cfg_prob}")
        if not self.max_grad_norm > 0:  # 0 would zero every gradient, < 0 flip it; also NaN
            raise ValueError(f"--max-grad-norm must be > 0 (inf: no clipping, as DiT's "
                             f"train.py); got {self.max_grad_norm}")
        self.resolve()

    def resolve(self) -> None:
        """Replace the defaults that depend on the machine by their values (idempotent):
        ``num_workers`` None and ``report_to`` auto."""
        if self.num_workers is None:
            self.num_workers = default_num_workers()
        if self.report_to == "auto":
            self.report_to = "tensorboard" if tensorboard_available() else "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_num_workers() -> int:
    """min(4, CPUs per process - 1), at least 0: the official 4 where the machine has room,
    and no more loader processes than cores (torch warns past that), one core left to the
    training process. Processes per node from torchrun (LOCAL_WORLD_SIZE) or the deepspeed
    launcher (LOCAL_SIZE)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    return max(0, min(4, (cpus or 1) // max(1, int(local)) - 1))


def tensorboard_available() -> bool:
    """Whether ``--report-to tensorboard`` would log (the Reporter's own import)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


# Values a preset sets before the command line is read.
PRESETS = {
    # A CPU-sized run on the built-in shapes data set (repa_fast.data.demo), pixel space,
    # 16 px so that a tiny SiT at patch 2 (an 8x8 token grid, as cheap as patch 4 at 32 px)
    # draws recognisable shapes within minutes; its encoder is the demo's tiny ViT trained
    # to classify the shapes (demo_encoder.py). A high learning rate: 1e-3 was slower.
    "demo": dict(exp_name="demo", data_dir="demo", model="SiT-T/2", num_classes=12,
                 encoder_depth=2, projector_dim=256, resolution=16, enc_type="demo",
                 enc_weights="trained", batch_size=32, learning_rate=3e-3, mixed_precision="no",
                 max_train_steps=1000, checkpointing_steps=500, sampling_steps=500,
                 log_every=1, num_workers=1, ema_decay=0.99, data_backend="torch"),
    # The same on the built-in captioned shapes (repa_fast.data.demo_t2i: "a red disc on the
    # left", ...), a tiny MMDiT conditioned on the features of a tiny seeded text encoder.
    "demo-t2i": dict(exp_name="demo-t2i", data_dir="demo-t2i", model="MMDiT-d4/4",
                     encoder_depth=2, projector_dim=256, resolution=32, enc_type="demo",
                     enc_weights="trained", batch_size=32, learning_rate=1e-3,
                     mixed_precision="no", max_train_steps=400, checkpointing_steps=200,
                     sampling_steps=400, log_every=1, num_workers=1, ema_decay=0.99,
                     data_backend="torch"),
}


# ----------------------------------------------------------------------------- help text

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_names(f: dataclasses.Field) -> list:
    """The command-line spellings of a field, the main one first."""
    return [_flag(f.name)] + ALIASES.get(f.name, [])


def is_bool(f: dataclasses.Field) -> bool:
    return f.type in ("bool", "Optional[bool]")  # annotations are strings (postponed)


def choices_of(f: dataclasses.Field) -> Optional[tuple]:
    choices = f.metadata.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices else None


def default_text(f: dataclasses.Field) -> str:
    """The default as --help and the README show it."""
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    if is_bool(f):
        return "on" if f.default else "off"
    return str(f.default)


def help_text(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    choices = choices_of(f)
    if choices:
        text += f"; choices: {', '.join(choices)}"
    return f"{text} (default: {default_text(f)})"


def fields_by_group() -> dict:
    """group key -> its fields, in dataclass order (the official flags first)."""
    grouped = {key: [] for key in GROUPS}
    for f in fields(TrainConfig):
        grouped[f.metadata["group"]].append(f)
    return grouped


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps at spaces only, so that names like SiT-XL/2 or --no-compile stay whole; texts
    with line breaks of their own (the examples) are kept as written."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return "\n".join(indent + line for line in self._split_lines(text, width - len(indent)))


EPILOG = """\
examples:
  python -m repa_fast.train --preset demo      a tiny run on built-in data, on the CPU
  python -m repa_fast.train --preset demo-t2i  the same, text-to-image (captioned shapes)
  torchrun --nproc_per_node 8 -m repa_fast.train --model SiT-XL/2 --enc-type dinov2-vit-b \\
      --data-dir data/imagenet256 --exp-name sit-xl-repa
  deepspeed repa_fast/train.py --ds_config configs/ds/zero2.json ...

Booleans also take --no-NAME. The resolved config (auto values filled in) is written to
<output-dir>/<exp-name>/config.json. Exit codes: 0 done, 2 a flag or input that cannot work,
1 the machine refused (disk, permissions), 3 too many non-finite steps, 130/143 stopped by
SIGINT/SIGTERM after saving."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m repa_fast.train``, one option per TrainConfig field.
    Every option defaults to None (unset), so that explicit flags can win over --preset;
    values are checked by :meth:`TrainConfig.check`, whose messages name the flag."""
    parser = argparse.ArgumentParser(
        prog="python -m repa_fast.train", formatter_class=_HelpFormatter, epilog=EPILOG,
        usage="%(prog)s [-h] [--preset NAME] [--FLAG VALUE ...]",
        description="Train a SiT diffusion transformer with REPA: the official recipe, flag "
                    "names and defaults (official REPA flags come first in each group).")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; RANK env wins
    for key, group_fields in fields_by_group().items():
        official = [_flag(f.name) for f in group_fields if f.metadata["official"]]
        group = parser.add_argument_group(
            GROUPS[key], f"official REPA flags: {', '.join(official)}" if official else None)
        for f in group_fields:
            help = help_text(f).replace("%", "%%")  # argparse %-formats help strings
            if is_bool(f):
                group.add_argument(*flag_names(f), dest=f.name, default=None, help=help,
                                   action=argparse.BooleanOptionalAction)
            else:
                kind = {"int": int, "Optional[int]": int, "float": float}.get(f.type, str)
                metavar = f.metadata["metavar"] or {int: "N", float: "X"}.get(kind, "VALUE")
                group.add_argument(*flag_names(f), dest=f.name, type=kind, default=None,
                                   metavar=metavar, help=help)
    return parser


def parse_args(argv=None) -> TrainConfig:
    """Command line -> TrainConfig (preset first, explicit flags over it)."""
    args = vars(build_parser().parse_args(argv))
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


# ----------------------------------------------------------------------------- README table

def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """Help text as Markdown: flags as code, and no <placeholder> taken for an HTML tag."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"(?<![\w`-])(--[a-z0-9][\w-]*)", r"`\1`", text)


def flags_markdown() -> str:
    """The README's table of the training flags (what goes between its train-flags markers)."""
    lines = [f"Generated from `TrainConfig` by `{REGENERATE}`; **bold**: the official REPA "
             f"flags (same name; same default unless the description says otherwise).", "",
             "| group | flag | default | description |", "|---|---|---|---|"]
    for key, group_fields in fields_by_group().items():
        for f in group_fields:
            names = flag_names(f) + ([f"--no-{f.name.replace('_', '-')}"] if is_bool(f) else [])
            flag = " ".join(f"`{n}`" for n in names)
            if f.metadata["official"]:
                flag = f"**{flag}**"
            plain = f.metadata.get("shown") or is_bool(f)  # prose, not a value to type
            default = _prose(default_text(f)) if plain else f"`{f.default}`"
            text = _prose(f.metadata["help"])
            choices = choices_of(f)
            if choices:
                text += "; choices: " + ", ".join(f"`{c}`" for c in choices)
            lines.append(f"| {GROUPS[key]} | {_cell(flag)} | {_cell(default)} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def readme_table(readme_text: str) -> str:
    """What a README holds between the train-flags markers (without the newline after the
    begin marker)."""
    begin = readme_text.index(README_BEGIN) + len(README_BEGIN) + 1
    return readme_text[begin:readme_text.index(README_END)]


def update_readme(path: str) -> bool:
    """Rewrite the flag table in the README at ``path``; returns whether it changed."""
    text = Path(path).read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} markers")
    old = readme_table(text)
    new_text = text.replace(README_BEGIN + "\n" + old, README_BEGIN + "\n" + flags_markdown(), 1)
    if new_text != text:
        Path(path).write_text(new_text, encoding="utf-8")
    return new_text != text


def main(argv=None) -> int:
    default_readme = Path(__file__).resolve().parents[2] / "README.md"
    parser = argparse.ArgumentParser(
        prog="python -m repa_fast.training.config",
        description="The training flags as a Markdown table, from TrainConfig.")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table (default: on when --update-readme is not given)")
    parser.add_argument("--update-readme", nargs="?", const=str(default_readme), metavar="PATH",
                        help=f"rewrite the table between the {README_BEGIN} and {README_END} "
                             f"markers of PATH (default PATH: {default_readme})".replace("%", "%%"))
    args = parser.parse_args(argv)
    if args.update_readme:
        changed = update_readme(args.update_readme)
        print(f"{args.update_readme}: {'updated' if changed else 'already up to date'}")
    if args.markdown or not args.update_readme:
        sys.stdout.write(flags_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
