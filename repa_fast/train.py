"""REPA training: ``python -m repa_fast.train`` (one process), ``torchrun ... -m repa_fast.train``
(DDP), or ``deepspeed repa_fast/train.py --ds_config configs/ds/zero2.json ...`` (ZeRO 1-3).

One flat loop around :class:`repa_fast.training.step.TrainStep`, the official recipe step for
step::

    x      = sample_posterior(moments)                      (latents from stored VAE moments)
    zs     = [encoder(images) for each encoder]             (frozen, no grad)
    loss   = velocity MSE + proj_coeff · proj_loss          (SILoss; fused alignment op)
    clip grad norm, AdamW step, EMA update

No host synchronisation between the log and checkpoint steps (plain and DDP paths): random
draws are made on the device, losses and gradient norms are summed on the device and read
every ``--log-every`` steps (``tests/test_train_no_sync.py`` records every op that reads device
data on the host and finds none). A step whose loss or gradient norm is not finite is
skipped on the device (the fused AdamW kernel and the EMA lerp take a ``found_inf`` flag: no
weight, moment or EMA change) and counted; when a log or checkpoint step finds
``--max-nonfinite-steps`` skipped in a row, the run stops before saving, with the last good
checkpoint intact. Checkpoints (atomic) resume exactly: same batches, same random draws, same
losses. SIGTERM saves and exits.
``--preset demo`` trains on a built-in shapes data set on the CPU in a few minutes.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
import warnings
from typing import Optional

import torch

# run as a file (deepspeed repa_fast/train.py; DALI reader processes see it as __mp_main__)
if __name__ in ("__main__", "__mp_main__") and not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "repa_fast"

from .errors import USAGE_AND_VALUE, UsageError, report
from .training.checkpoint import (checkpoint_path, list_checkpoints, load_checkpoint, prune,
                                  resolve_resume, rng_state, save_atomic, save_safetensors,
                                  set_aside_after, set_rng_state)
from .training.config import TrainConfig, parse_args, save_config
from .training.ema import EMA
from .training.run_dir import check_run_dir, clear_run_dir
from .training.stop import Aborted, Interrupted, StopRequest
from .training.step import (TrainStep, autocast, autocast_dtype, compiled, draw_device_name,
                            make_loss, make_optimizer, resolve_compile)
from .training.metrics import (MetricsLog, Reporter, flops_per_image, peak_tflops,
                               truncate_after)


class Distributed:
    """Rank and world size from ``torchrun`` (or a single process)."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def demo_encoder(resolution: int):
    """A tiny random ViT (patch 8, width 64) standing in for DINOv2 in the demo."""
    from timm.models.vision_transformer import VisionTransformer

    from .encoders import EncoderSpec, FrozenEncoder
    spec = EncoderSpec(name="demo", family="mae", timm_model="vit_tiny_demo", timm_kwargs=(),
                       patch_size=8, embed_dim=64, num_prefix_tokens=1, final_norm=True,
                       checkpoint="", url="(random weights: the demo encoder is never trained)")
    torch.manual_seed(1234)  # the same targets in every demo run
    backbone = VisionTransformer(img_size=resolution, patch_size=8, embed_dim=64, depth=2,
                                 num_heads=2, num_classes=0)
    return FrozenEncoder(spec, backbone, resolution)


def check_encoder_resolution(config: TrainConfig) -> None:
    """Every ``--enc-type`` encoder runs at ``--resolution`` (the official rules: 256 or 512
    px, 512 only for plain DINOv2), checked before anything is built."""
    if config.enc_type == "demo":
        return
    from .encoders import get_spec
    from .encoders.registry import RESOLUTIONS
    for name in config.enc_type.split(","):
        spec = get_spec(name)
        sizes = tuple(r for r in RESOLUTIONS if r != 512 or spec.supports_512)
        if config.resolution in sizes:
            continue
        plain = [n for n in config.enc_type.split(",") if get_spec(n).supports_512]
        others = ("; at 512 px use a plain DINOv2 encoder (--enc-type dinov2-vit-b)"
                  if config.resolution == 512 and not plain else "")
        raise UsageError(
            f"--resolution {config.resolution}: the encoder --enc-type {name} runs at "
            f"{' or '.join(map(str, sizes))} px only (its patch grid and preprocessing follow "
            f"the official code); prepare the data at {sizes[0]} px "
            f"(python -m repa_fast.data.prepare --resolution {sizes[0]}), or train with "
            f"--enc-type demo (a tiny random encoder for any resolution divisible by 8; "
            f"--enc-weights random gives untrained official encoders, still at "
            f"{' or '.join(map(str, sizes))} px){others}")


def encoder_weight_files(config: TrainConfig) -> list:
    """One weights entry (a file or ``random``) per ``--enc-type`` encoder, each file checked
    to exist before anything is built."""
    from .encoders import get_spec
    names = config.enc_type.split(",")
    weights = config.enc_weights.split(",")
    if len(weights) == 1 and weights[0] == "random":
        return weights * len(names)
    if len(weights) == 1 and (os.path.isdir(weights[0]) or len(names) > 1
                              or not os.path.exists(weights[0])
                              and not os.path.splitext(weights[0])[1]):
        folder = weights[0]  # a folder of official file names
        files = [os.path.join(folder, get_spec(n).checkpoint) for n in names]
        for name, file in zip(names, files):
            if not os.path.exists(file):
                where = ("holds no" if os.path.isdir(folder) else "does not exist, so there is no")
                raise UsageError(
                    f"--enc-weights {folder}: the folder {where} {get_spec(name).checkpoint}, "
                    f"the weights of --enc-type {name}; put that file there (from "
                    f"{get_spec(name).url}), pass the file itself as --enc-weights, or try "
                    f"things out with --enc-weights random (an untrained encoder: its features "
                    f"mean nothing for REPA)")
        return files
    if len(weights) == 1:
        weights = weights * len(names)
    if len(weights) != len(names):
        raise UsageError(f"--enc-weights: expected one file per encoder of --enc-type "
                         f"{config.enc_type} ({len(names)}), a folder, or random; got "
                         f"{len(weights)}: {config.enc_weights}")
    for name, file in zip(names, weights):
        if file != "random" and not os.path.exists(file):
            raise UsageError(f"--enc-weights: {file!r} (the weights of --enc-type {name}) does "
                             f"not exist; expected {get_spec(name).checkpoint} from "
                             f"{get_spec(name).url}, or random for a try-out")
    return weights


def build_encoders(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> list:
    if config.enc_type == "demo":
        return [demo_encoder(config.resolution).to(device)]
    from .encoders import load_encoder
    check_encoder_resolution(config)
    names = config.enc_type.split(",")
    weights = encoder_weight_files(config)
    return [load_encoder(n, w, config.resolution, device=device, dtype=dtype)
            for n, w in zip(names, weights)]


def check_deepspeed(config: TrainConfig) -> None:
    """``--ds_config`` needs DeepSpeed installed (the ``deepspeed`` extra)."""
    import importlib.util
    if config.ds_config and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(f"--ds_config {config.ds_config}: DeepSpeed is not installed; "
                         f"pip install 'repa_fast[deepspeed]', or leave out --ds_config to "
                         f"train without it (DDP under torchrun)")


def build_model(config: TrainConfig, in_channels: int, input_size: int, z_dims: list):
    from .models import SiT_models
    return SiT_models[config.model](
        input_size=input_size, in_channels=in_channels, num_classes=config.num_classes,
        use_cfg=config.cfg_prob > 0, class_dropout_prob=config.cfg_prob, z_dims=z_dims,
        encoder_depth=config.encoder_depth, projector_dim=config.projector_dim,
        qk_norm=config.qk_norm, fused_attn=config.fused_attn, attn_backend=config.attn_backend,
        grad_checkpointing=config.grad_checkpointing,
        # the loop checks labels on the host before they reach the GPU; the model's own check
        # would read them back from the GPU every step
        validate_inputs=False)


def warm_kernels(config: TrainConfig, model, encoders: list, device: torch.device,
                 local_batch: int, dist: Distributed, tiles: Optional[dict] = None) -> None:
    """Triton tiles of the fused alignment op fixed before the first step: a resumed run's
    recorded tiles are installed; then rank 0 tunes what is missing (or loads it from the
    on-disk cache) at the training shapes, one line on stdout, and every rank takes rank 0's
    choices. Nothing is tuned inside the training steps."""
    autotune = tile_api()
    if autotune is None:  # no Triton here: nothing to tune (the op runs another backend)
        return
    if tiles:
        try:
            autotune.install_tiles(tiles)
        except ValueError as error:  # e.g. written by a version with other kernels
            warnings.warn(f"--resume: the checkpoint's kernel_tiles cannot be used ({error}); "
                          f"tiles are chosen anew, so this run may launch other tiles than the "
                          f"run it continues (results equal up to rounding)")
    if not config.fused_loss:
        return
    from .ops.alignment import resolved_backend
    dtype = autocast_dtype(config) or torch.float32  # the GEMMs' dtype (fp32 hidden states)
    if resolved_backend(device, dtype) != "triton":
        return
    if dist.main:
        from .ops.alignment_warmup import warm_alignment_op
        tokens = model.x_embedder.num_patches
        for projector, encoder in zip(model.projectors, encoders):
            encoder = getattr(encoder, "_orig_mod", encoder)
            # the features' dtype as the step sees it: under autocast an encoder ending in a
            # LayerNorm (DINOv2) returns fp32 whatever its weights' dtype, and the kernels'
            # tiles are keyed by it
            with torch.no_grad(), autocast(config, device):
                image = torch.zeros(1, 3, encoder.resolution, encoder.resolution,
                                    dtype=torch.uint8, device=device)
                target_dtype = encoder(image).dtype
            message = warm_alignment_op(
                projector, (local_batch, tokens, model.hidden_size),
                (local_batch, encoder.grid ** 2, encoder.embed_dim), dtype, device,
                target_dtype=target_dtype)
            print(message, flush=True)
    autotune.broadcast_tiles(src=0)


def tile_api():
    """``repa_fast.kernels.autotune``, or None where Triton is not installed."""
    try:
        from .kernels import autotune
    except ImportError:
        return None
    return autotune


def check_label_range(num_classes: int, data_dir: str) -> None:
    """The data set's labels (its recorded range) fit in [0, num_classes), before training."""
    from .data import label_range
    found = label_range(data_dir)
    if found is not None and not 0 <= found[0] <= found[1] < num_classes:
        raise UsageError(f"--num-classes {num_classes}: the data set in {data_dir} holds labels "
                         f"in [{found[0]}, {found[1]}]; pass --num-classes {found[1] + 1}")


def check_labels(labels: torch.Tensor, num_classes: int, data_dir: str) -> None:
    """Labels in [0, num_classes), checked on host batches with numpy (no torch op, so nothing
    is ever read back from a GPU); batches already on a device are the loader's to check.
    The safety net for data sets whose index records no label range."""
    if labels.device.type != "cpu" or not labels.numel():
        return
    values = labels.numpy()
    low, high = int(values.min()), int(values.max())
    if not 0 <= low <= high < num_classes:
        raise UsageError(f"--num-classes {num_classes}: a batch of the data set in {data_dir} "
                         f"holds labels in [{low}, {high}] (its index.json records no label "
                         f"range)")


@torch.no_grad()
def sample_grid(ema_model, noise: torch.Tensor, labels: torch.Tensor, latents_scale: float,
                vae, path: str) -> torch.Tensor:
    """EMA samples (50-step ODE, CFG 1.0) from fixed noise and labels, decoded, as one PNG;
    returns the grid (uint8 [3, H, W])."""
    from PIL import Image

    from .transport.samplers import euler_sampler
    x = euler_sampler(ema_model, noise, labels, num_steps=50).float()
    if vae is None:  # pixel space
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    else:
        from .vae import decode
        images = decode(vae, x, latents_scale)
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    c, h, w = images.shape[1:]
    grid = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i, image in enumerate(images.cpu()):
        grid[:, (i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return grid


def resume_state(resume: Optional[str], ckpt_dir: str, dist: Distributed):
    """``(path, state)`` to resume from (``(None, None)``: a fresh start). Rank 0 chooses
    and verifies (``--resume auto`` may pass over damaged files); the other ranks load the
    file it chose, checking its size only: every rank resumes the same step, and the file
    is hashed once."""
    if dist.world_size == 1:
        return resolve_resume(resume, ckpt_dir)
    chosen = [None, None]
    if dist.main:
        try:
            path, state = resolve_resume(resume, ckpt_dir)
            chosen = [path, None]
        except Exception as error:  # noqa: BLE001 -- every rank stops, not only rank 0
            torch.distributed.broadcast_object_list([None, f"{error}"], src=0)
            raise
    torch.distributed.broadcast_object_list(chosen, src=0)
    path, problem = chosen
    if dist.main:
        return path, state
    if problem is not None:
        raise UsageError(f"rank 0 could not resume: {problem}")
    if path is None:
        return None, None
    return path, load_checkpoint(path, f"--resume {resume}:", verify_hash=False)


def train(config: TrainConfig, dist: Optional[Distributed] = None) -> dict:
    """Run training; returns the last logged metrics."""
    from .data import LoaderConfig, make_loader, read_index

    dist = dist or Distributed()
    config.check(dist.world_size)
    device = dist.device
    run_dir = os.path.join(config.output_dir, config.exp_name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    check_run_dir(run_dir, config.resume, config.overwrite)
    check_encoder_resolution(config)
    check_deepspeed(config)
    if config.enc_type != "demo":
        encoder_weight_files(config)  # a missing file stops here, before data and models
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # data
    data_dir = config.data_dir
    if data_dir == "demo":
        from .data.demo import make_demo_dataset
        data_dir = os.path.join(config.output_dir, "demo-data")
        if dist.main:
            make_demo_dataset(data_dir, size=config.resolution)
        dist.barrier()
    if not os.path.isdir(data_dir):
        way_out = ("leave out --data-dir to train on the built-in shapes" if config.preset ==
                   "demo" else "or use --preset demo (built-in data)")
        raise UsageError(f"--data-dir {data_dir!r} does not exist: prepare it with "
                         f"python -m repa_fast.data.prepare, {way_out}")
    index = read_index(data_dir)
    if index["resolution"] != config.resolution:
        raise ValueError(f"--resolution {config.resolution} does not match the data set in "
                         f"{data_dir} ({index['resolution']} px)")
    pixel_space = index["vae"]["fingerprint"] == "pixel space"
    latents_scale = float(index["vae"]["scaling_factor"])
    in_channels = int(index["vae"]["latent_channels"])
    input_size = config.resolution if pixel_space else config.resolution // 8
    num_samples = index.get("num_samples")
    if isinstance(num_samples, int) and config.batch_size > num_samples:
        raise UsageError(f"--batch-size {config.batch_size}: the data set in {data_dir} holds "
                         f"only {num_samples} samples; pass --batch-size {num_samples} or less "
                         f"(or prepare more images)")
    recorded_classes = index.get("num_classes")
    if dist.main and isinstance(recorded_classes, int) and \
            0 < recorded_classes < config.num_classes:
        warnings.warn(f"--num-classes {config.num_classes}: the data set in {data_dir} has "
                      f"{recorded_classes} classes; the model gets {config.num_classes} label "
                      f"embeddings, {config.num_classes - recorded_classes} never trained (pass "
                      f"--num-classes {recorded_classes} unless that is intended)")
    vae_path = config.vae
    if not pixel_space and not vae_path and dist.main:
        recorded = (index["vae"].get("path") or "") if isinstance(index["vae"], dict) else ""
        if recorded and os.path.exists(recorded):
            vae_path = config.vae = recorded  # recorded in config.json and checkpoints
            print(f"sample grids are decoded with the data set's VAE {recorded} (no --vae "
                  f"given)", flush=True)
        else:
            warnings.warn(f"no --vae given and the data set's VAE "
                          f"{recorded or '(not recorded)'} is not found: the sample grids show "
                          f"undecoded latents; pass --vae <SD-VAE folder> to decode them")
    loader = make_loader(LoaderConfig(
        data_dir, batch_size=config.batch_size // dist.world_size, rank=dist.rank,
        world_size=dist.world_size, seed=config.seed, num_workers=config.num_workers,
        backend=config.data_backend, on_bad_sample=config.on_bad_sample,
        verify_shards=config.verify_shards))
    check_label_range(config.num_classes, data_dir)

    # models
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    enc_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with warnings.catch_warnings():
        if config.enc_type == "demo":
            warnings.simplefilter("ignore")
        encoders = build_encoders(config, device, enc_dtype)
    model = build_model(config, in_channels, input_size, [e.embed_dim for e in encoders])
    model = model.to(device).train()
    ema = EMA(model, config.ema_decay)
    resume, state = resume_state(config.resume, ckpt_dir, dist)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
        except RuntimeError as error:  # another --model, --encoder-depth, --projector-dim...
            raise UsageError(f"--resume {resume}: its weights do not fit this run's model "
                             f"(--model {config.model}; the checkpoint was trained with "
                             f"--model {state['args'].get('model')}): "
                             f"{str(error).splitlines()[0]}") from None
    else:
        ema.update(model, decay=0.0)
    optimizer = make_optimizer(config, model.parameters())
    zero = None
    ds_dir = os.path.join(ckpt_dir, "deepspeed")
    if config.ds_config:
        from .training.zero import ZeroEngine, load_ds_config
        zero = ZeroEngine(model, optimizer, load_ds_config(config.ds_config, config,
                                                           dist.world_size, device))
        wrapped = zero.engine
        if state is not None:
            zero.load(ds_dir, int(state["steps"]))
    else:
        wrapped = model
        if dist.world_size > 1:
            wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if state is not None:
            if "opt" not in state:
                raise ValueError(f"--resume: {resume} was written by a DeepSpeed run (its "
                                 f"optimizer state is in {ds_dir}); resume it with --ds_config")
            optimizer.load_state_dict(state["opt"])
    config.compile = resolve_compile(config, device)  # recorded resolved in config.json
    forward, encoders = compiled(wrapped, encoders, config.compile)
    vae = None
    if vae_path and not pixel_space and dist.main:  # rank 0 alone writes sample grids
        from .vae import load_vae
        vae = load_vae(vae_path, device=device)

    # resume
    step = 0
    if state is not None:
        loader.load_state_dict(state["loader"])
        step = int(state["steps"])
    if dist.main and config.resume is not None:
        print(f"--resume {config.resume}: resuming from {resume} at step {step}"
              if state is not None else
              f"--resume {config.resume}: no checkpoint in {ckpt_dir}: starting at step 0",
              flush=True)
    if dist.main:  # the first writes into the run folder: every check has passed
        if config.overwrite:
            found = clear_run_dir(run_dir)
            if found:
                print(f"--overwrite: deleted the previous run's {', '.join(found)} (and its "
                      f"samples and dashboards) in {run_dir}", flush=True)
        moved = set_aside_after(ckpt_dir, step) if resume else []
        if moved:
            warnings.warn(f"--resume: continuing from step {step}; the checkpoints after it "
                          f"(an abandoned continuation, or damaged) were moved out of reach "
                          f"of --resume auto and --keep-last: {', '.join(moved)}")
        os.makedirs(ckpt_dir, exist_ok=True)
        save_config(config, os.path.join(run_dir, "config.json"))
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if dist.main:  # records past the starting step belong to an abandoned run
        truncate_after(metrics_path, step)
    log = MetricsLog(metrics_path if dist.main else None)
    reporter = Reporter(config.report_to, run_dir, enabled=dist.main, config=config.to_dict(),
                        project=config.wandb_project, entity=config.wandb_entity)
    # fixed noise and labels for sample grids (drawn before the training RNG state matters)
    gen = torch.Generator().manual_seed(config.seed)
    grid_noise = torch.randn(16, in_channels, input_size, input_size, generator=gen).to(device)
    grid_labels = (torch.arange(16) % config.num_classes).to(device)
    # every rank draws different noise and times, as the official seed·world + rank
    torch.manual_seed(config.seed * dist.world_size + dist.rank)
    if state is not None:
        rngs = state["rng"]
        if len(rngs) != dist.world_size:
            raise ValueError(f"--resume: {resume} was saved by {len(rngs)} processes, this run "
                             f"has {dist.world_size}; exact resume needs the same number")
        set_rng_state(rngs[dist.rank])
    tiles = state.get("kernel_tiles") if state is not None else None
    skipped_total = int(state.get("skipped_steps", 0)) if state is not None else 0
    here = draw_device_name(device)
    if state is not None and state.get("draw_device", here) != here:
        warnings.warn(f"--resume: {resume} was trained on {state['draw_device']}, this run is "
                      f"on {here}: the random draws (noise, times) follow the device, so the "
                      f"losses will not repeat the uninterrupted run's")
    state = None

    autotune = tile_api()

    last_saved = step if resume else None  # that step's checkpoint exists

    def save(at: int) -> None:
        nonlocal last_saved
        # every rank's RNG state: each draws its own noise and times
        rngs = [rng_state()]
        if dist.world_size > 1:
            rngs = [None] * dist.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        weights = zero.full_state_dict() if zero else model.state_dict()
        if zero:
            zero.save(ds_dir, at)  # optimizer partitions (collective)
        if dist.main:
            state = dict(model=weights, ema=ema.state_dict(), args=config.to_dict(), steps=at,
                         rng=rngs, loader=loader.state_dict(),
                         kernel_tiles=autotune.export_tiles(used_only=True) if autotune
                         else {}, draw_device=draw_device_name(device),
                         skipped_steps=skipped_total + int(counts[1]),
                         **({} if zero else dict(opt=optimizer.state_dict())))
            save_atomic(state, checkpoint_path(ckpt_dir, at))
            if config.save_safetensors:
                save_safetensors(state, os.path.join(ckpt_dir, f"{at:07d}"))
            prune(ckpt_dir, config.keep_last)
        last_saved = at
        dist.barrier()

    warm_kernels(config, model, encoders, device, config.batch_size // dist.world_size, dist,
                 tiles)
    train_step = TrainStep(config, device, model, forward, encoders, make_loss(config),
                           optimizer, ema, x_shape=(in_channels, input_size, input_size),
                           latents_scale=latents_scale, rank=dist.rank,
                           world_size=dist.world_size, zero=zero)
    flops = flops_per_image(model)
    peak = peak_tflops(device)
    from tqdm import tqdm
    bar = tqdm(total=config.max_train_steps, initial=step, disable=not dist.main,
               dynamic_ncols=True, desc=config.exp_name)
    # running sums on the device, read on the host only when logging or saving:
    # loss, proj_loss, grad_norm over finite steps; finite and skipped step counts;
    # the current and the longest run of consecutive skipped steps
    sums, counts = torch.zeros(3, device=device), torch.zeros(2, device=device)
    skip_run, worst_run = torch.zeros((), device=device), torch.zeros((), device=device)
    worst_start = torch.zeros((), device=device)  # first step of the longest skipped run
    logged, pending_save = {}, False
    window_start, window_images, data_wait = time.perf_counter(), 0, 0.0

    def check_nonfinite() -> None:
        worst = int(worst_run)
        if worst >= config.max_nonfinite_steps:
            first = int(worst_start)
            before = [s for s in list_checkpoints(ckpt_dir) if s < first]
            where = (f"The last checkpoint saved before it is {checkpoint_path(ckpt_dir, before[-1])}"
                     f": lower --learning-rate or check the data, then --resume {before[-1]}"
                     if before else "No checkpoint was saved before it: lower --learning-rate "
                     "or check the data and start again (--overwrite)")
            raise FloatingPointError(
                f"{worst} steps in a row had a non-finite loss or gradient (checked at step "
                f"{step}; the first skipped step was {first}); stopping. {where}")

    def save_if_good() -> bool:
        """Save this step unless its latest steps were skipped: their weights may already be
        huge but finite (what made the losses overflow); the save waits for a good step."""
        nonlocal pending_save
        check_nonfinite()  # never save past the stop condition
        run = int(skip_run)
        if run:
            if not pending_save:
                bar.write(f"step {step}: checkpoint postponed: the last {run} step(s) were "
                          f"skipped (non-finite loss or gradient); it is saved at the next "
                          f"good step")
            pending_save = True
            return False
        save(step)
        pending_save = False
        return True

    def finish(at: int) -> None:
        """What the last step owes, also for a run resumed after it was killed past its last
        checkpoint: the final sample grid and the safetensors copies, when missing."""
        if not dist.main:
            return
        path = os.path.join(run_dir, "samples", f"{at:07d}.png")
        if not os.path.exists(path):
            bar.write(f"writing the sample grid of step {at} (50 sampling steps)...")
            grid = sample_grid(ema.model, grid_noise, grid_labels, latents_scale, vae, path)
            reporter.image("samples/ema", grid, at)
        stem, saved = os.path.join(ckpt_dir, f"{at:07d}"), checkpoint_path(ckpt_dir, at)
        if config.save_safetensors and os.path.exists(saved) and \
                not all(os.path.exists(f"{stem}-{k}.safetensors") for k in ("model", "ema")):
            # from the file: under ZeRO-3 this rank alone does not hold the full weights
            save_safetensors(torch.load(saved, map_location="cpu", weights_only=True), stem)

    batches = iter(loader)
    stop = StopRequest(dist.world_size).__enter__()
    try:
        while step < config.max_train_steps:
            t0 = time.perf_counter()
            images, moments, labels = next(batches)
            data_wait += time.perf_counter() - t0
            check_labels(labels, config.num_classes, data_dir)
            out = train_step(step, images, moments, labels)
            found_inf = out.found_inf
            # skipped steps count as steps (their batch is consumed), as with fp16 loss scaling
            step += 1
            window_images += images.shape[0] * dist.world_size
            bad = found_inf.bool()
            values = torch.stack([out.loss, out.proj_loss, out.grad_norm]).float()
            sums += torch.where(bad, torch.zeros_like(values), values)
            counts += torch.stack([1 - found_inf, found_inf])
            skip_run = (skip_run + 1) * found_inf
            worst_start = torch.where(skip_run > worst_run, step + 1 - skip_run, worst_start)
            worst_run = torch.maximum(worst_run, skip_run)
            bar.update(1)
            if step % config.log_every == 0 or step == config.max_train_steps:
                if dist.world_size > 1:  # the global batch's means, not this rank's
                    torch.distributed.all_reduce(sums)
                    sums /= dist.world_size
                good, skipped = counts.tolist()
                means = (sums / max(good, 1)).tolist() if good else [None] * 3
                sums.zero_()
                counts.zero_()
                skipped_total += int(skipped)
                elapsed = time.perf_counter() - window_start
                ips = window_images / elapsed
                logged = dict(step=step, loss=means[0], proj_loss=means[1],
                              grad_norm=means[2], images_per_sec=ips,
                              data_wait_frac=data_wait / elapsed, skipped_steps=skipped_total,
                              skipped_samples=loader.skipped_samples,
                              lr=config.learning_rate)
                if peak:
                    logged["mfu"] = ips * flops / dist.world_size / (peak * 1e12)
                log.write(logged)
                reporter.scalars(logged, step)
                postfix = dict(img_s=f"{ips:.0f}", wait=f"{logged['data_wait_frac']:.0%}")
                if good:
                    postfix = dict(loss=f"{means[0]:.4f}", proj=f"{means[1]:.4f}",
                                   gnorm=f"{means[2]:.3f}", **postfix)
                if skipped_total:
                    postfix["skipped"] = skipped_total
                if "mfu" in logged:
                    postfix["mfu"] = f"{logged['mfu']:.0%}"
                bar.set_postfix(postfix)
                window_start, window_images, data_wait = time.perf_counter(), 0, 0.0
                check_nonfinite()
            if (pending_save or step % config.checkpointing_steps == 0
                    or step == config.max_train_steps):
                save_if_good()
            if dist.main and (step % config.sampling_steps == 0 or step == config.max_train_steps):
                bar.write(f"writing the sample grid of step {step} (50 sampling steps)...")
                grid = sample_grid(ema.model, grid_noise, grid_labels, latents_scale, vae,
                                   os.path.join(run_dir, "samples", f"{step:07d}.png"))
                reporter.image("samples/ema", grid, step)
            signum = stop.poll() if step < config.max_train_steps else None
            if signum is not None:
                saved = step if last_saved == step or save_if_good() else None
                name = signal.Signals(signum).name
                text = (f"{name}: saved step {step} and stopped" if saved is not None else
                        f"{name}: stopped at step {step} without saving (the latest steps were "
                        f"skipped); checkpoints: {list_checkpoints(ckpt_dir)}")
                bar.write(text)
                raise Interrupted(signum, step, saved, text)
        if pending_save:  # the last steps were skipped: the final checkpoint never came
            check_nonfinite()
            raise FloatingPointError(
                f"the last {int(skip_run)} step(s) had a non-finite loss or gradient, so no "
                f"checkpoint was saved at the final step {step}; checkpoints: "
                f"{list_checkpoints(ckpt_dir)}. Lower --learning-rate or check the data, then "
                f"resume from the last one")
        if step >= config.max_train_steps:
            finish(step)
    finally:
        stop.__exit__(*sys.exc_info())
        bar.close()
        log.close()
        reporter.close()
    return logged


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 a flag or input file that cannot work, 1 the machine refused
    (disk full, permissions), 3 too many non-finite steps in a row, 130/143 stopped by
    SIGINT/SIGTERM (after saving). ``REPA_FAST_DEBUG=1`` adds the traceback to errors."""
    config = None
    try:
        config = parse_args(argv)
        dist = Distributed()
        config.check(dist.world_size)
        logged = train(config, dist)
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except Interrupted as stopped:
        return stopped.exit_code
    except Aborted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted before training started: nothing to save", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 -- usage and environment errors; bugs re-raise
        code = report(error, usage=USAGE_AND_VALUE)
        if code is None:
            raise
        return code
    if int(os.environ.get("RANK", 0)) == 0:
        run = os.path.join(config.output_dir, config.exp_name)
        if logged:
            losses = ("" if logged["loss"] is None else
                      f", loss {logged['loss']:.4f}, proj_loss {logged['proj_loss']:.4f}")
            print(f"done: step {logged['step']}{losses}; checkpoints, samples and "
                  f"metrics.jsonl in {run}")
        else:
            print(f"done: nothing left to train (step {config.max_train_steps} reached; raise "
                  f"--max-train-steps to go on); checkpoints, samples and metrics.jsonl in {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
