"""Sample many images from a SiT or DiT checkpoint into an ADM-evaluator ``.npz``, resumably.

    python -m repa_fast.generate --ckpt CKPT [--vae SD_VAE] ...            one process
    torchrun --nproc_per_node N -m repa_fast.generate --ckpt CKPT ...      N processes
    deepspeed --module repa_fast.generate --ckpt CKPT ...                  same, DeepSpeed launcher
    python -m repa_fast.generate --ckpt CKPT --grid --class-labels 1,2,3 --seeds 0,1 --out g.png

The official ``generate.py``'s flags and defaults, plus ``--weights``, ``--vae PATH``,
``--mixed-precision``, ``--compile``/``--compile-mode``, ``--attn-backend`` and the grid flags.
DiT checkpoints (facebookresearch/DiT's, or ours) sample as its ``sample_ddp.py``:
``--model DiT-XL/2 --num-sampling-steps 250 --cfg-scale 1.5`` (``--sampler ddim`` for DDIM).
MMDiT (text-to-image) checkpoints sample as the official ``generate_t2i.py``, with captions
from ``--captions FILE`` / ``--prompt`` (encoded by ``--text-encoder``) or the stored features
of a prepared set (``--data-dir``, e.g. MS-COCO validation); the ``.npz`` then also holds
``captions``, which ``repa_fast.evaluate --clip-model`` scores.
Sample ``i`` is drawn from its own random stream (``repa_fast.generation.seeding``), so the
samples do not depend on the number of processes, and a restarted run regenerates only the
batches with missing PNGs, writes only those PNGs and ends with the same ``.npz``. Bad inputs
exit with code 2, refusals of the machine (disk full, permissions) with 1 (repa_fast.errors).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

if __name__ == "__main__" and not __package__:  # run as a file: deepspeed repa_fast/generate.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "repa_fast"

from .ops.attention import CHOICES as ATTN_BACKENDS
from .distributed import Distributed
from .cli_help import HelpFormatter
from .errors import run_cli
from .generation.errors import UsageError
from .generation.dit_sampling import (DIT_DEFAULT_STEPS, DIT_SAMPLERS, DiTOutput,
                                      DiTSamplerConfig, sample_dit_latents)
from .generation.loading import ModelSpec, load_checkpoint
from .generation.output import (check_settings, existing_indices, make_grid, png_path,
                                save_png_atomic, wait_all, write_npz_from_pngs)
from .generation.sample_batch import COMPILE_MODES, SamplerConfig, Velocity, sample_latents, to_uint8
from .generation.seeding import initial_draws
from .generation.t2i_sampling import TextVelocity, initial_noise, sample_t2i_latents

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}
PNG_WRITERS = 4          # threads encoding PNGs while the next batch samples
BATCHES_IN_FLIGHT = 2    # batches of PNGs queued before the sampler waits for the writers


# --------------------------------------------------------------------------- command line

def _int_list(flag: str):
    def parse(text: str) -> list:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return values
    parse.__name__ = flag
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repa_fast.generate",
                                description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    bool_flag = dict(action=argparse.BooleanOptionalAction, default=None)
    g = p.add_argument_group("checkpoint and model (default: from the checkpoint)")
    g.add_argument("--ckpt", required=True, help="official REPA / repa_fast checkpoint, or a "
                   "bare state dict")
    g.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights of a training checkpoint")
    g.add_argument("--model", help="SiT or DiT size and patch size, e.g. SiT-XL/2, DiT-XL/2 "
                   "(default: from the checkpoint)")
    g.add_argument("--num-classes", type=int,
                   help="number of class labels of the model (default: from the checkpoint)")
    g.add_argument("--encoder-depth", type=int,
                   help="block after which the projectors read the hidden states (default: "
                   "from the checkpoint)")
    g.add_argument("--projector-embed-dims", type=_int_list("--projector-embed-dims"),
                   help="checked against the projector weights, e.g. 768 (default: from the "
                   "checkpoint)")
    g.add_argument("--qk-norm", help="normalise queries and keys before attention (default: "
                   "from the checkpoint)", **bool_flag)
    g.add_argument("--fused-attn", help="attention through the --attn-backend kernel; "
                   "--no-fused-attn: explicit softmax (default: from the checkpoint)",
                   **bool_flag)
    g.add_argument("--resolution", "--image-size", type=int, help="image size in pixels "
                   "(256, 512, ...); --image-size is DiT's name (default: from the checkpoint)")
    g.add_argument("--vae", help="local SD-VAE folder or file, for latent-space checkpoints "
                   "(default: from the checkpoint, the training run's --vae when that path "
                   "exists here)")
    g.add_argument("--attn-backend", choices=ATTN_BACKENDS, default=None,
                   help="attention kernel; auto: the fastest that runs here (default: "
                   "$REPA_FAST_ATTN_BACKEND, else auto)")
    g.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted for compatibility: the legacy 'decoder_blocks' layout is "
                   "detected and converted by itself")
    g = p.add_argument_group("sampling (official names and defaults)")
    g.add_argument("--mode", choices=["sde", "ode"], default="ode",
                   help="Euler-Maruyama SDE or Euler/Heun ODE sampler")
    g.add_argument("--num-steps", type=int, default=50, help="sampler steps")
    g.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="Heun's correction (ODE only)")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="1.0: no guidance")
    g.add_argument("--guidance-low", type=float, default=0.0,
                   help="CFG only for guidance-low <= t <= guidance-high")
    g.add_argument("--guidance-high", type=float, default=1.0, help="e.g. 0.7 (paper)")
    g.add_argument("--path-type", choices=["linear", "cosine"], default=None,
                   help="default: the checkpoint's, else linear")
    g.add_argument("--global-seed", type=int, default=0, help="seeds every sample's stream")
    g.add_argument("--per-proc-batch-size", type=int, default=32, help="samples per batch")
    g.add_argument("--num-fid-samples", type=int, default=50_000, help="samples in the .npz")
    g.add_argument("--sample-dir", default="samples",
                   help="PNGs go to <sample-dir>/<run name>/, the .npz beside them")
    g.add_argument("--prefix", default="",
                   help="put before the run name, '<prefix>-<run name>' (generate_t2i.py's)")
    g = p.add_argument_group("DiT sampling (facebookresearch/DiT's sample_ddp.py; DiT "
                             "checkpoints only, which refuse the SiT sampler flags above)")
    g.add_argument("--num-sampling-steps", type=int, default=None,
                   help=f"respaced diffusion steps, create_diffusion('N') (default: "
                   f"{DIT_DEFAULT_STEPS})")
    g.add_argument("--sampler", choices=DIT_SAMPLERS, default=None,
                   help="ddpm: ancestral steps (p_sample), as the original; ddim: DDIM with "
                   "eta 0, create_diffusion('ddimN') (default: ddpm)")
    g = p.add_argument_group("speed")
    g.add_argument("--mixed-precision", choices=list(PRECISIONS), default=None,
                   help="model call in bf16 autocast or fp32 (default: bf16 on GPU, fp32 on CPU "
                   "and for DiT, as its original)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls for fp32 work on GPU, as official")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model call (default: on with CUDA, off on the CPU)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="reduce-overhead / max-autotune also capture CUDA graphs")
    g = p.add_argument_group("text-to-image (MMDiT checkpoints; default: the training data set)")
    g.add_argument("--captions", help="captions file: one per line, or an MS-COCO captions "
                   "JSON (each image's first caption); sample i takes caption i mod n "
                   "(default: none)")
    g.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a caption on the command line (repeat for more; grid rows; default: "
                   "none)")
    g.add_argument("--text-encoder", help="encodes --captions/--prompt: a local CLIP text model "
                   "folder, or demo (default: the training data set's, when found here)")
    g.add_argument("--data-dir", help="a prepared text-to-image set whose stored caption "
                   "features are used (the official generate_t2i.py's MS-COCO validation "
                   "features): sample i is its sample i mod N, caption i div N (default: the "
                   "training data set, unless --captions or --prompt)")
    g = p.add_argument_group("quick-look grid")
    g.add_argument("--grid", action="store_true", help="write one grid PNG instead: rows = "
                   "--class-labels (text-to-image: the captions), columns = --seeds")
    g.add_argument("--class-labels", type=_int_list("--class-labels"),
                   help="comma-separated rows, e.g. 207,360,387 (default: the first 8 classes)")
    g.add_argument("--seeds", type=_int_list("--seeds"),
                   help="comma-separated columns: the noise of sample 0 of a run with that "
                   "--global-seed (default: 0,1,2,3)")
    g.add_argument("--out", help="grid PNG path (default: <sample-dir>/<run name>-grid.png)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; env vars win
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise UsageError naming the flag for values that cannot work (before any loading)."""
    def need(ok: bool, flag: str, expected: str, given) -> None:
        if not ok:
            raise UsageError(f"{flag} must be {expected}; got {given}")

    need(args.num_fid_samples >= 1, "--num-fid-samples", ">= 1", args.num_fid_samples)
    need(args.per_proc_batch_size >= 1, "--per-proc-batch-size", ">= 1",
         args.per_proc_batch_size)
    need(args.num_steps >= 1, "--num-steps", ">= 1", args.num_steps)
    need(args.num_sampling_steps is None or args.num_sampling_steps >= 1,
         "--num-sampling-steps", ">= 1", args.num_sampling_steps)
    need(args.cfg_scale >= 1.0, "--cfg-scale", ">= 1.0 (1.0: no guidance), as official",
         args.cfg_scale)
    for flag, value in (("--guidance-low", args.guidance_low),
                        ("--guidance-high", args.guidance_high)):
        need(0.0 <= value <= 1.0, flag, "in [0, 1] (a time of the sampler)", value)
    need(args.guidance_low <= args.guidance_high, "--guidance-low",
         f"<= --guidance-high ({args.guidance_high})", args.guidance_low)
    for flag, value in (("--num-classes", args.num_classes),
                        ("--encoder-depth", args.encoder_depth),
                        ("--resolution", args.resolution)):
        need(value is None or value >= 1, flag, ">= 1", value)
    if not args.grid:
        for flag in ("class_labels", "seeds", "out"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is for --grid; pass --grid too")
    if args.grid and args.seeds is not None and any(s < 0 for s in args.seeds):
        raise UsageError(f"--seeds must be >= 0; got {args.seeds}")
    if not os.path.isfile(args.ckpt):
        raise UsageError(f"--ckpt: checkpoint file not found: {args.ckpt!r}")


# the SiT sampler's flags (dest, flag): a DiT checkpoint refuses them when changed
SIT_SAMPLER_FLAGS = (("mode", "--mode"), ("num_steps", "--num-steps"), ("heun", "--heun"),
                     ("guidance_low", "--guidance-low"), ("guidance_high", "--guidance-high"),
                     ("path_type", "--path-type"))
DIT_SAMPLER_FLAGS = (("num_sampling_steps", "--num-sampling-steps"), ("sampler", "--sampler"))


T2I_FLAGS = (("captions", "--captions"), ("prompt", "--prompt"),
             ("text_encoder", "--text-encoder"), ("data_dir", "--data-dir"))


def check_sampler_flags(args: argparse.Namespace, spec: ModelSpec) -> None:
    """UsageError for sampler flags of the other model family (known once the checkpoint is)."""
    if not spec.is_t2i:
        given = [flag for dest, flag in T2I_FLAGS if getattr(args, dest) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: text-to-image flags, but {args.ckpt} holds "
                             f"a class-conditional {spec.model}: use --class-labels (grids)")
    else:
        given = [flag for dest, flag in DIT_SAMPLER_FLAGS if getattr(args, dest) is not None]
        if args.class_labels is not None:
            given.append("--class-labels")
        if given:
            raise UsageError(f"{', '.join(given)}: not for {args.ckpt}, a text-to-image "
                             f"{spec.model}: captions come from --captions, --prompt or "
                             f"--data-dir; it samples with --mode, --num-steps, --heun, "
                             f"--guidance-low/high")
        if args.captions is not None and args.prompt is not None:
            raise UsageError("--captions and --prompt: give one of them")
        if args.data_dir is not None and (args.captions is not None or args.prompt):
            raise UsageError("--data-dir uses the set's own captions: leave out --captions and "
                             "--prompt (or --data-dir)")
        return
    if spec.is_dit:
        defaults = build_parser()
        given = [flag for dest, flag in SIT_SAMPLER_FLAGS
                 if getattr(args, dest) != defaults.get_default(dest)]
        if given:
            raise UsageError(f"{', '.join(given)}: SiT sampler flags, but {args.ckpt} holds a "
                             f"DiT ({spec.model}), which samples its Gaussian diffusion: use "
                             f"--num-sampling-steps N and --sampler ddpm|ddim")
    else:
        given = [flag for dest, flag in DIT_SAMPLER_FLAGS if getattr(args, dest) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: DiT sampler flags, but {args.ckpt} holds a "
                             f"SiT ({spec.model}): use --mode, --num-steps, --heun, "
                             f"--guidance-low/high")


def model_flags(args: argparse.Namespace) -> dict:
    """The model flags as given (None: not given)."""
    return dict(model=args.model, num_classes=args.num_classes, encoder_depth=args.encoder_depth,
                projector_embed_dims=args.projector_embed_dims, qk_norm=args.qk_norm,
                fused_attn=args.fused_attn, resolution=args.resolution, path_type=args.path_type,
                attn_backend=args.attn_backend)


# --------------------------------------------------------------------------- set-up

def load_decoder(spec: ModelSpec, vae_path: Optional[str], device: torch.device):
    """``(vae or None, latents_scale)``: nothing for pixel space, else the local SD-VAE."""
    if spec.pixel_space:
        return None, 1.0
    from .vae import SD_SCALE, SD_VAE_URLS, load_vae
    if not vae_path:
        raise UsageError(f"--vae: this checkpoint samples SD-VAE latents ({spec.in_channels}×"
                         f"{spec.input_size}×{spec.input_size} for {spec.resolution}px images); "
                         f"pass --vae PATH, a local SD-VAE folder or file ({SD_VAE_URLS})")
    if vae_path in ("ema", "mse") and not os.path.exists(vae_path):
        raise UsageError(f"--vae {vae_path}: the official flag names stabilityai/sd-vae-ft-"
                         f"{vae_path} on the Hugging Face hub; here --vae takes a local copy: "
                         f"{SD_VAE_URLS}")
    try:
        vae = load_vae(vae_path, device=device)
    except (FileNotFoundError, ValueError, ImportError, OSError) as error:
        raise UsageError(f"--vae {vae_path}: {error}") from error
    channels = int(vae.config.latent_channels)
    if channels != spec.in_channels:
        raise UsageError(f"--vae {vae_path}: its latents have {channels} channels, the "
                         f"{'DiT' if spec.is_dit else 'SiT'} reads {spec.in_channels}")
    return vae, float(getattr(vae.config, "scaling_factor", None) or SD_SCALE)


def vae_label(vae_path: str) -> str:
    """``ema``/``mse`` for the SD-VAE folders the official ``--vae ema|mse`` names
    (``.../sd-vae-ft-ema``), else the file or folder name."""
    name = os.path.splitext(os.path.basename(os.path.normpath(vae_path)))[0]
    return name[len("sd-vae-ft-"):] if name in ("sd-vae-ft-ema", "sd-vae-ft-mse") else name


def run_name(args: argparse.Namespace, spec: ModelSpec) -> str:
    """The official folder name, ``{model}-{ckpt}-size-{resolution}-vae-{ema|mse}-cfg-{cfg}-
    seed-{seed}-{mode}`` (``vae-pixel`` for pixel-space models), followed by what the official
    name leaves out where it differs from the official default: ``-steps-N`` (default 50), the
    guidance interval, Heun and ``--weights model``; ``--prefix P`` puts ``P-`` before it.
    Runs whose names collide anyway (e.g. the same step of two experiments) are told apart by
    ``settings.json``, which refuses to mix."""
    name = _run_name(args, spec)
    return f"{args.prefix}-{name}" if args.prefix else name


def _run_name(args: argparse.Namespace, spec: ModelSpec) -> str:
    ckpt = os.path.basename(args.ckpt)
    ckpt = ckpt[:-len(".pt")] if ckpt.endswith(".pt") else ckpt
    vae = "pixel" if spec.pixel_space else vae_label(args.vae)
    if spec.is_dit:
        return dit_run_name(args, spec, ckpt, vae)
    name = (f"{spec.model.replace('/', '-')}-{ckpt}-size-{spec.resolution}-vae-{vae}-"
            f"cfg-{args.cfg_scale}-seed-{args.global_seed}-{args.mode}")
    if spec.is_t2i:  # which captions (the official name says coco)
        source = args.captions or args.data_dir or ("prompts" if args.prompt else "train-data")
        name += "-captions-" + os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    if args.num_steps != 50:
        name += f"-steps-{args.num_steps}"
    if (args.guidance_low, args.guidance_high) != (0.0, 1.0):
        name += f"-interval-{args.guidance_low}-{args.guidance_high}"
    if args.heun and args.mode == "ode":
        name += "-heun"
    if args.weights != "ema":
        name += f"-{args.weights}"
    return name


def dit_run_name(args: argparse.Namespace, spec: ModelSpec, ckpt: str, vae: str) -> str:
    """DiT's ``sample_ddp.py`` folder name, ``{model}-{ckpt}-size-{image size}-vae-{vae}-cfg-
    {cfg}-seed-{seed}``, followed by what it leaves out where it differs from its defaults:
    ``-steps-N`` (default 250), ``-ddim`` and ``-model`` (``--weights model``)."""
    name = (f"{spec.model.replace('/', '-')}-{ckpt}-size-{spec.resolution}-vae-{vae}-"
            f"cfg-{args.cfg_scale}-seed-{args.global_seed}")
    steps = args.num_sampling_steps or DIT_DEFAULT_STEPS
    if steps != DIT_DEFAULT_STEPS:
        name += f"-steps-{steps}"
    if args.sampler == "ddim":
        name += "-ddim"
    if args.weights != "ema":
        name += f"-{args.weights}"
    return name


def run_settings(args: argparse.Namespace, spec: ModelSpec, sampler, precision: str,
                 conditions=None) -> dict:
    """Everything that changes the samples (beyond rounding): a resumed run must match it.
    Batch size, process count, compilation and attention backend only change rounding."""
    settings = dict(ckpt=os.path.abspath(args.ckpt), weights=args.weights, spec=spec.to_dict(),
                    vae=os.path.abspath(args.vae) if args.vae and not spec.pixel_space else None,
                    sampler=sampler.to_dict(), global_seed=args.global_seed,
                    mixed_precision=precision, seeding="per-sample streams, repa_fast v1")
    if conditions is not None:
        settings["captions"] = conditions.identity()
    return settings


# --------------------------------------------------------------------------- generation

def pending_batches(folder: str, num: int, batch: int) -> list:
    """``[(b, missing), ...]``: the batches ``b`` (indices ``b·batch .. b·batch + batch - 1``)
    with samples ``< num`` whose PNGs are missing, and those indices. Batches are fixed by the
    batch size, so a regenerated batch holds the same samples as the first attempt (the same
    rounding in batched kernels); only its missing PNGs are written."""
    done = existing_indices(folder)
    plan = []
    for b in range(math.ceil(num / batch)):
        missing = [i for i in range(b * batch, min((b + 1) * batch, num)) if i not in done]
        if missing:
            plan.append((b, missing))
    return plan


def sample_images(draw, vae, latents_scale: float, device: torch.device, latents: torch.Tensor,
                  labels: torch.Tensor, generators: list):
    """One batch of uint8 images [B, H, W, 3] from its initial draws; ``draw(latents, labels,
    generators)`` is the model's sampler (:func:`make_draw`)."""
    samples = draw(latents.to(device), labels.to(device), generators)
    return to_uint8(samples, vae, latents_scale)


def batch_draws(indices, args, spec: ModelSpec, conditions=None):
    """``(latents, labels or caption contexts, generators)`` of these sample indices."""
    shape = (spec.in_channels, spec.input_size, spec.input_size)
    if conditions is None:
        return initial_draws(indices, args.global_seed, spec.num_classes, shape)
    latents, generators = initial_noise(indices, args.global_seed, shape)
    return latents, conditions.contexts(indices), generators


def generate_samples(args, procs: Distributed, draw, spec: ModelSpec, description: str, vae,
                     latents_scale: float, settings: dict, conditions=None) -> str:
    """Write the missing PNGs of this rank's batches, then (rank 0) the ``.npz``; returns its
    path."""
    folder = os.path.join(args.sample_dir, run_name(args, spec))
    num, batch = args.num_fid_samples, args.per_proc_batch_size
    plan = None
    if procs.main:
        plan = check_settings(folder, settings) or pending_batches(folder, num, batch)
    plan = procs.broadcast(plan)  # one scan, before anyone writes: every rank sees the same plan
    if isinstance(plan, str):
        raise UsageError(plan)
    mine = plan[procs.rank::procs.world_size]
    todo = sum(len(missing) for _, missing in plan)
    if procs.main:
        print(f"repa_fast.generate: {spec.model} {'pixel space' if spec.pixel_space else 'latents'}"
              f" {spec.resolution}px, {description}, cfg {args.cfg_scale}; "
              f"{num - todo} of {num} samples exist, {todo} to make on {procs.world_size} "
              f"process(es); PNGs in {folder}", flush=True)
    from tqdm import tqdm
    bar = tqdm(total=todo, unit="img", disable=not procs.main, dynamic_ncols=True,
               desc="sampling", smoothing=0.1)
    in_flight: deque = deque()
    with ThreadPoolExecutor(PNG_WRITERS) as writers:
        for b, missing in mine:
            # the whole batch, padded past num: the same batch composition in every run
            latents, labels, generators = batch_draws(range(b * batch, (b + 1) * batch), args,
                                                      spec, conditions)
            images = sample_images(draw, vae, latents_scale, procs.device, latents, labels,
                                   generators)
            kept = [(i, images[i - b * batch]) for i in missing]
            in_flight.append([writers.submit(save_png_atomic, image, png_path(folder, i))
                              for i, image in kept])
            if len(in_flight) > BATCHES_IN_FLIGHT:
                wait_all(in_flight.popleft())
            # rank 0 counts every rank's progress as its own (they run in step)
            bar.update(min(len(kept) * procs.world_size, bar.total - bar.n))
        while in_flight:
            wait_all(in_flight.popleft())
    bar.close()
    procs.barrier()  # every PNG is on disk
    npz = folder + ".npz"
    if procs.main:
        start = time.perf_counter()
        extra = None if conditions is None else \
            {"captions": np.array([conditions.caption(i) for i in range(num)])}
        shape = write_npz_from_pngs(folder, num, npz, extra=extra)
        print(f"saved {npz} [arr_0: uint8 {list(shape)}] in {time.perf_counter() - start:.1f}s",
              flush=True)
    procs.barrier()
    return npz


def generate_grid(args, draw, spec: ModelSpec, vae, latents_scale: float,
                  device: torch.device, conditions=None) -> str:
    """One PNG: row r is class ``--class-labels[r]`` (text-to-image: caption r), column c the
    noise of sample 0 of a ``--global-seed --seeds[c]`` run (the same noise down a column)."""
    seeds = args.seeds if args.seeds is not None else [0, 1, 2, 3]
    shape = (spec.in_channels, spec.input_size, spec.input_size)
    if conditions is not None:  # rows: the first 8 captions (their contexts stand for labels)
        labels = list(range(min(8, len(conditions.captions))
                            if hasattr(conditions, "captions") else 8))
        row_conds = conditions.contexts(labels)
        print("rows: " + "; ".join(f"{r + 1}. {conditions.caption(r)}" for r in labels),
              flush=True)
        # (latents, no label, generators): the layout of initial_draws' columns below
        columns = [(latents, None, generators)
                   for latents, generators in (initial_noise([0], seed, shape) for seed in seeds)]
    else:
        labels = args.class_labels if args.class_labels is not None else \
            list(range(min(8, spec.num_classes)))
        bad = [label for label in labels if not 0 <= label < spec.num_classes]
        if bad:
            raise UsageError(f"--class-labels must be in [0, {spec.num_classes - 1}] (the "
                             f"checkpoint's classes); got {bad}")
        columns = [initial_draws([0], seed, spec.num_classes, shape) for seed in seeds]
    cells = [(label, column) for label in labels for column in columns]
    images = []
    for start in range(0, len(cells), args.per_proc_batch_size):
        chunk = cells[start:start + args.per_proc_batch_size]
        # each cell copies its column's generator: equal noise down the column
        generators = [torch.Generator().set_state(col[2][0].get_state()) for _, col in chunk]
        cell_labels = (torch.stack([row_conds[label] for label, _ in chunk])
                       if conditions is not None else torch.tensor([label for label, _ in chunk]))
        latents = torch.cat([col[0] for _, col in chunk])
        images.append(sample_images(draw, vae, latents_scale, device, latents, cell_labels,
                                    generators))
    grid = make_grid(np.concatenate(images), len(labels), len(seeds))
    out = args.out or os.path.join(args.sample_dir, run_name(args, spec) + "-grid.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_png_atomic(grid, out)
    rows = "captions" if conditions is not None else "classes"
    print(f"saved {out} [{len(labels)} {rows} × {len(seeds)} seeds, {grid.shape[1]}×"
          f"{grid.shape[0]} px]", flush=True)
    return out


def make_draw(args: argparse.Namespace, spec: ModelSpec, model: torch.nn.Module,
              precision: str, device: torch.device, conditions=None):
    """``(draw, sampler config, description)``: the sampler of the checkpoint's family —
    ``draw(latents, labels, generators)`` gives one batch's samples."""
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    if spec.is_t2i:
        sampler = SamplerConfig(mode=args.mode, num_steps=args.num_steps, heun=args.heun,
                                cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                                guidance_high=args.guidance_high, path_type=spec.path_type)
        velocity = TextVelocity(model.to(device), autocast_dtype=PRECISIONS[precision],
                                compile=compile_, compile_mode=args.compile_mode)
        empty = conditions.empty.to(device)

        def draw(latents, contexts, generators):
            return sample_t2i_latents(velocity, latents, contexts.to(device), empty, generators,
                                      sampler)
        return draw, sampler, f"{args.mode} {args.num_steps} steps"
    if spec.is_dit:
        sampler = DiTSamplerConfig(sampler=args.sampler or "ddpm",
                                   num_sampling_steps=args.num_sampling_steps or DIT_DEFAULT_STEPS,
                                   cfg_scale=args.cfg_scale, learn_sigma=spec.learn_sigma)
        diffusion = sampler.diffusion()
        call = DiTOutput(model.to(device), cfg_scale=args.cfg_scale,
                         autocast_dtype=PRECISIONS[precision], compile=compile_,
                         compile_mode=args.compile_mode)

        def draw(latents, labels, generators):
            return sample_dit_latents(call, diffusion, latents, labels, generators, sampler)
        return draw, sampler, f"{sampler.sampler} {sampler.num_sampling_steps} steps"
    sampler = SamplerConfig(mode=args.mode, num_steps=args.num_steps, heun=args.heun,
                            cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                            guidance_high=args.guidance_high, path_type=spec.path_type)
    velocity = Velocity(model.to(device), autocast_dtype=PRECISIONS[precision],
                        compile=compile_, compile_mode=args.compile_mode)

    def draw(latents, labels, generators):
        return sample_latents(velocity, latents, labels, generators, sampler)
    return draw, sampler, f"{args.mode} {args.num_steps} steps"


def run(args: argparse.Namespace, procs: Distributed) -> str:
    """Load, check and sample; returns the path written (``.npz`` or grid PNG)."""
    if args.grid and procs.world_size > 1:
        raise UsageError(f"--grid runs in one process; got WORLD_SIZE={procs.world_size}")
    device = procs.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model, spec, saved_args = load_checkpoint(args.ckpt, args.weights, model_flags(args))
    check_sampler_flags(args, spec)
    # DiT's sample_ddp.py runs in fp32 (TF32 matmuls): its default here too
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" and not spec.is_dit
                                         else "fp32")
    recorded_vae = saved_args.get("vae") if isinstance(saved_args, dict) else None
    if not args.vae and not spec.pixel_space and isinstance(recorded_vae, str) and \
            recorded_vae and os.path.exists(recorded_vae):
        args.vae = recorded_vae
        if procs.rank == 0:
            print(f"--vae not given: decoding with the training run's VAE {recorded_vae} (from "
                  f"the checkpoint's args)", flush=True)
    conditions = caption_source(args, spec, saved_args, device) if spec.is_t2i else None
    if args.cfg_scale > 1.0 and not spec.has_null_class and not spec.is_t2i:
        raise UsageError(f"--cfg-scale {args.cfg_scale} needs the CFG null class, but this "
                         f"checkpoint's label table has none (trained with cfg_prob 0): use "
                         f"--cfg-scale 1.0")
    vae, latents_scale = load_decoder(spec, args.vae, device)
    draw, sampler, description = make_draw(args, spec, model, precision, device, conditions)
    # Samples draw only from their own streams; seeding the global RNG as well keeps anything
    # else that might draw from it (nothing does today) reproducible.
    torch.manual_seed(args.global_seed)
    if args.grid:
        return generate_grid(args, draw, spec, vae, latents_scale, device, conditions)
    settings = run_settings(args, spec, sampler, precision, conditions)
    return generate_samples(args, procs, draw, spec, description, vae, latents_scale, settings,
                            conditions)


def training_data_dir(saved_args: dict) -> Optional[str]:
    """The training run's data set, from its checkpoint's args (``demo-t2i``: the built-in
    set the run wrote under its output folder), when it exists here."""
    data_dir = saved_args.get("data_dir") if isinstance(saved_args, dict) else None
    if data_dir == "demo-t2i":
        data_dir = os.path.join(str(saved_args.get("output_dir", ".")), "demo-t2i-data")
    return data_dir if isinstance(data_dir, str) and os.path.isdir(data_dir) else None


def caption_source(args: argparse.Namespace, spec: ModelSpec, saved_args: dict,
                   device: torch.device):
    """The captions of a text-to-image run (:mod:`repa_fast.generation.captions`)."""
    from .generation.captions import (DataSetCaptions, EncodedCaptions, read_caption_file,
                                      text_encoder_for)
    if args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            raise UsageError(f"--data-dir {args.data_dir!r} does not exist")
        return DataSetCaptions(args.data_dir, spec.context_dim)
    trained_on = training_data_dir(saved_args)
    if args.captions is None and not args.prompt:
        if trained_on is None:
            raise UsageError("captions needed: pass --captions FILE or --prompt TEXT (with "
                             "--text-encoder), or --data-dir of a prepared text-to-image set; "
                             "the checkpoint's training data set is not found here")
        return DataSetCaptions(trained_on, spec.context_dim)
    recorded, empty = None, None
    if trained_on is not None:  # the encoder and empty caption the model was trained with
        from .data import empty_context, read_index
        recorded = read_index(trained_on).get("text_encoder")
        empty = empty_context(trained_on)
    encoder = text_encoder_for(args.text_encoder, recorded, device, spec.context_dim)
    if args.text_encoder is not None:
        empty = None  # another encoder: its own empty caption
    captions = list(args.prompt) if args.prompt else read_caption_file(args.captions)
    source = "prompts" if args.prompt else os.path.abspath(args.captions)
    return EncodedCaptions(captions, encoder, source, empty)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits with 2 on malformed flags
    return run_cli(lambda: _generate(args))


def _generate(args) -> int:
    procs = None
    try:
        check_args(args)
        # rank 0 packs the .npz while the others wait at the last barrier: allow for it
        procs = Distributed(timeout=datetime.timedelta(hours=2))
        with torch.no_grad():
            run(args, procs)
    finally:
        if procs is not None:
            procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
