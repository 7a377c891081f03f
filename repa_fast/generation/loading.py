"""Load a SiT, DiT or MMDiT for sampling from an official REPA or DiT checkpoint, one of ours,
or a bare state dict.

Where each setting comes from, first match wins:

1. the command-line flag;
2. the checkpoint's ``args`` (an ``argparse.Namespace`` in official checkpoints, a plain dict of
   :class:`repa_fast.training.config.TrainConfig` fields in ours);
3. the weights themselves: patch size, width and depth (hence the model name), input channels
   and size, the projectors' ``z_dims`` and width, ``qk_norm``, and whether the label table has
   the CFG null row; a final layer with twice the input channels (ε and the variance) is a
   DiT with ``learn_sigma`` (the original ``DiT-XL-2-256x256.pt``), anything else a SiT unless
   the name (flag or args) says DiT;
4. the official default (``num_classes`` 1000, ``encoder_depth`` 8, ``fused_attn``), where it fits.

An MMDiT (text-to-image: ``joint_blocks.*`` in the weights) is read the same way: depth and
patch size give its name ``MMDiT-d{depth}/{patch}``, and the weights give the caption-feature
width, ``learn_sigma``, the projectors, q/k norms, SwiGLU, registers and the modulation count;
it has no classes (guidance uses the empty caption's context). ``rmsnorm`` leaves no trace in
the weights: it comes from the checkpoint's args (the official ``train_t2i.py`` never sets it).

Whatever is given is checked against the weights, with errors that name the flag. A checkpoint
is in pixel space when the SiT's ``input_size`` equals the image resolution (the CPU demo:
3 channels, 32×32), and in SD-VAE latent space when ``resolution = 8·input_size``.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import torch

from ..models import (MMDiT, DiT_models, SiT_models, extract_state_dict,
                      is_legacy_state_dict, read_checkpoint)
from ..models.checkpoint import strip_wrapper_prefixes
from .errors import UsageError

VAE_FACTOR = 8  # the SD-VAE's spatial down-sampling


@dataclass(frozen=True)
class Weights:
    """What the state dict says about the architecture."""

    in_channels: int
    patch_size: int
    input_size: int
    hidden_size: int
    depth: int
    z_dims: tuple
    projector_dim: Optional[int]
    qk_norm: bool
    label_rows: int
    out_channels: int
    context_dim: Optional[int] = None  # an MMDiT's caption-feature width (None: SiT or DiT)
    mmdit_options: tuple = ()          # an MMDiT's constructor options read off the weights

    @property
    def learn_sigma(self) -> bool:
        """Whether the output holds a variance as well: DiT's ``learn_sigma``."""
        return self.out_channels == 2 * self.in_channels


@dataclass(frozen=True)
class ModelSpec:
    """A resolved SiT or DiT configuration for sampling (``learn_sigma`` None: a SiT)."""

    model: str
    num_classes: int
    encoder_depth: int
    z_dims: tuple
    projector_dim: int
    qk_norm: bool
    fused_attn: bool
    resolution: int
    input_size: int
    in_channels: int
    has_null_class: bool
    path_type: Optional[str]
    learn_sigma: Optional[bool] = None
    context_dim: Optional[int] = None  # text-to-image (MMDiT): the caption-feature width
    mmdit_options: tuple = ()

    @property
    def pixel_space(self) -> bool:
        return self.input_size == self.resolution

    @property
    def is_t2i(self) -> bool:
        return self.context_dim is not None

    @property
    def is_dit(self) -> bool:
        return self.learn_sigma is not None and not self.is_t2i

    @property
    def model_depth(self) -> int:
        """An MMDiT name's depth (``MMDiT-d24/2`` -> 24)."""
        return int(self.model.split("-d")[1].split("/")[0])

    @property
    def model_patch_size(self) -> int:
        return int(self.model.rsplit("/", 1)[1])

    def to_dict(self) -> dict:
        record = dict(asdict(self), z_dims=list(self.z_dims), pixel_space=self.pixel_space,
                      mmdit_options=dict(self.mmdit_options))
        # a SiT's record stays as before DiT and MMDiT existed (resumed runs match)
        if not self.is_dit and not self.is_t2i:
            del record["learn_sigma"]
        if not self.is_t2i:
            del record["context_dim"], record["mmdit_options"]
        return record


def checkpoint_args(checkpoint: Mapping) -> dict:
    """The ``args`` of a training checkpoint as a dict (empty for a bare state dict)."""
    args = checkpoint.get("args") if "ema" in checkpoint or "model" in checkpoint else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def _projectors(state_dict: Mapping[str, torch.Tensor]) -> tuple:
    """(z_dims, projector width or None) of the REPA projectors in a state dict."""
    projectors = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("projectors.")})
    z_dims = tuple(int(state_dict[f"projectors.{k}.4.weight"].shape[0]) for k in projectors)
    return z_dims, (int(state_dict["projectors.0.0.weight"].shape[0]) if projectors else None)


def inspect_mmdit(state_dict: Mapping[str, torch.Tensor]) -> Weights:
    """Read the architecture off an MMDiT state dict (official ``models/mmdit.py`` names)."""
    for key in ("x_embedder.proj.weight", "pos_embed", "context_embedder.weight",
                "final_layer.linear.weight"):
        if key not in state_dict:
            raise UsageError(f"--ckpt: not an MMDiT checkpoint (no {key!r} in the weights)")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    grid = math.isqrt(state_dict["pos_embed"].shape[1])
    depth = len({int(k.split(".")[1]) for k in state_dict if k.startswith("joint_blocks.")})
    z_dims, projector_dim = _projectors(state_dict)
    x_block = "joint_blocks.0.x_block"
    mods = int(state_dict[f"{x_block}.adaLN_modulation.1.weight"].shape[0]) // int(hidden)
    qk = state_dict.get(f"{x_block}.attn.ln_q.weight")
    qk_norm = None if qk is None else \
        ("ln" if f"{x_block}.attn.ln_q.bias" in state_dict else "rms")
    options = dict(qk_norm=qk_norm, swiglu=f"{x_block}.mlp.w1.weight" in state_dict,
                   scale_mod_only=mods == 4,
                   qkv_bias=f"{x_block}.attn.qkv.bias" in state_dict,
                   register_length=int(state_dict["register"].shape[1])
                   if "register" in state_dict else 0,
                   adm_in_channels=int(state_dict["y_embedder.mlp.0.weight"].shape[1])
                   if "y_embedder.mlp.0.weight" in state_dict else None)
    return Weights(in_channels=int(in_channels), patch_size=int(patch), input_size=grid * patch,
                   hidden_size=int(hidden), depth=depth, z_dims=z_dims,
                   projector_dim=projector_dim, qk_norm=qk_norm is not None, label_rows=0,
                   out_channels=int(state_dict["final_layer.linear.weight"].shape[0])
                   // int(patch) ** 2,
                   context_dim=int(state_dict["context_embedder.weight"].shape[1]),
                   mmdit_options=tuple(sorted(options.items())))


def inspect_weights(state_dict: Mapping[str, torch.Tensor]) -> Weights:
    """Read the architecture off a SiT, DiT or MMDiT state dict."""
    if any(k.startswith("joint_blocks.") for k in state_dict):
        return inspect_mmdit(state_dict)
    for key in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight"):
        if key not in state_dict:
            raise UsageError(f"--ckpt: not a SiT or DiT checkpoint (no {key!r} in the weights; "
                             f"found {sorted(state_dict)[:5]}...)")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    grid = math.isqrt(state_dict["pos_embed"].shape[1])
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
    z_dims, projector_dim = _projectors(state_dict)
    return Weights(in_channels=int(in_channels), patch_size=int(patch), input_size=grid * patch,
                   hidden_size=int(hidden), depth=max(blocks) + 1 if blocks else 0,
                   z_dims=z_dims, projector_dim=projector_dim,
                   qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
                   label_rows=int(state_dict["y_embedder.embedding_table.weight"].shape[0]),
                   out_channels=int(state_dict["final_layer.linear.weight"].shape[0])
                   // int(patch) ** 2)


def _registry(name: str) -> dict:
    """The model table a name belongs to: DiT_models for ``DiT-*``, else SiT_models."""
    return DiT_models if name in DiT_models else SiT_models


@functools.lru_cache(maxsize=None)
def _architecture(name: str) -> tuple:
    """(depth, hidden_size, patch_size) of a model name, from a parameter-free build."""
    with torch.device("meta"):
        model = _registry(name)[name](input_size=8, z_dims=[], num_classes=1, encoder_depth=1)
    return len(model.blocks), model.hidden_size, model.patch_size


def _fits(name: str, weights: Weights) -> bool:
    return _architecture(name) == (weights.depth, weights.hidden_size, weights.patch_size)


def _pick(flag, saved, fallback=None):
    """Flag, else the checkpoint's args, else the fallback."""
    if flag is not None:
        return flag
    return saved if saved is not None else fallback


def _resolve_model(flag: Optional[str], saved: Optional[str], weights: Weights) -> str:
    name = _pick(flag, saved)
    source = "--model" if flag is not None else "the checkpoint's args.model"
    if name is not None and name not in SiT_models and name not in DiT_models:
        raise UsageError(f"{source} must be one of {', '.join(SiT_models)}, "
                         f"{', '.join(DiT_models)}; got {name!r}")
    if name is not None and name in DiT_models and \
            weights.out_channels not in (weights.in_channels, 2 * weights.in_channels):
        raise UsageError(f"{source} {name} does not match the checkpoint's final layer "
                         f"({weights.out_channels} output channels for {weights.in_channels} "
                         f"input channels; a DiT has as many, or twice as many with learn_sigma)")
    if name is not None and name in SiT_models and weights.learn_sigma:
        dit = name.replace("SiT-", "DiT-")
        raise UsageError(f"{source} {name} does not match the checkpoint's final layer: "
                         f"{weights.out_channels} output channels for {weights.in_channels} input "
                         f"channels is a DiT with learn_sigma (e.g. --model {dit})")
    if name is not None and _fits(name, weights):
        return name
    # without a name, a variance output says DiT; the architectures are otherwise the same
    table = _registry(name) if name is not None else \
        (DiT_models if weights.learn_sigma else SiT_models)
    matches = [candidate for candidate in table if _fits(candidate, weights)]
    found = (f"depth {weights.depth}, hidden size {weights.hidden_size}, patch size "
             f"{weights.patch_size}" + (f": {', '.join(matches)}" if matches else ""))
    if name is not None:
        raise UsageError(f"{source} {name} does not match the checkpoint's weights ({found})")
    if len(matches) != 1:
        raise UsageError(f"--model: the checkpoint does not say which model it holds and its "
                         f"weights ({found}) do not identify one; pass --model")
    return matches[0]


def _resolve_num_classes(flag, saved, weights: Weights) -> int:
    rows = weights.label_rows
    num_classes = _pick(flag, saved)
    if num_classes is None:
        # Official models always carry the null row; 1000/1001 rows is ImageNet either way.
        if rows in (1000, 1001):
            return 1000
        raise UsageError(f"--num-classes: the checkpoint does not say how many classes it has "
                         f"and its label table has {rows} rows ({rows - 1} classes + the CFG "
                         f"null class, or {rows} classes); pass --num-classes")
    if rows not in (num_classes, num_classes + 1):
        source = "--num-classes" if flag is not None else "the checkpoint's args.num_classes"
        raise UsageError(f"{source} {num_classes} does not match the checkpoint's label table "
                         f"({rows} rows: {rows - 1} classes + the CFG null class, or {rows})")
    return num_classes


def _resolve_resolution(flag, saved, weights: Weights) -> int:
    size = weights.input_size
    allowed = (size, VAE_FACTOR * size)
    if flag is None and saved is None:
        # The demo's pixel-space models read 3 channels; everything else is SD-VAE latents.
        return size if weights.in_channels == 3 else VAE_FACTOR * size
    resolution = _pick(flag, saved)
    if resolution not in allowed:
        source = "--resolution" if flag is not None else "the checkpoint's args.resolution"
        raise UsageError(f"{source} {resolution} does not match the checkpoint: its SiT takes "
                         f"{size}×{size} inputs, so the resolution is {size} in pixel space or "
                         f"{VAE_FACTOR * size} with the SD-VAE")
    return resolution


def _check_head_flags(flags: Mapping, args: Mapping, weights: Weights) -> int:
    """The encoder depth (flag, args, else min(8, depth)), after checking it and the
    ``--projector-embed-dims`` / ``--qk-norm`` flags against the weights."""
    encoder_depth = _pick(flags.get("encoder_depth"), args.get("encoder_depth"),
                          min(8, weights.depth))
    if not 1 <= encoder_depth <= weights.depth:
        raise UsageError(f"--encoder-depth must be between 1 and the model's depth "
                         f"({weights.depth}); got {encoder_depth}")
    z_flag = flags.get("projector_embed_dims")
    if z_flag is not None and tuple(z_flag) != weights.z_dims:
        raise UsageError(f"--projector-embed-dims {','.join(map(str, z_flag))} does not match "
                         f"the checkpoint's projectors (z_dims "
                         f"{','.join(map(str, weights.z_dims)) or 'none'})")
    qk_norm = flags.get("qk_norm")
    if qk_norm is not None and qk_norm != weights.qk_norm:
        raise UsageError(f"--{'' if qk_norm else 'no-'}qk-norm does not match the checkpoint, "
                         f"whose attention {'has' if weights.qk_norm else 'has no'} q/k norms")
    return int(encoder_depth)


def _resolve_path_type(flags: Mapping, args: Mapping) -> str:
    """The interpolant of a SiT or MMDiT: flag, else the checkpoint's args, else linear."""
    path_type = _pick(flags.get("path_type"), args.get("path_type"), "linear")
    if path_type not in ("linear", "cosine"):
        raise UsageError(f"--path-type must be linear or cosine; the checkpoint's args say "
                         f"{path_type!r}")
    return path_type


def resolve_mmdit_spec(flags: Mapping, args: Mapping, weights: Weights) -> ModelSpec:
    """:func:`resolve_spec` for an MMDiT (text-to-image) checkpoint."""
    name = f"MMDiT-d{weights.depth}/{weights.patch_size}"
    given = _pick(flags.get("model"), args.get("model"))
    if given is not None and given != name:
        source = "--model" if flags.get("model") is not None else "the checkpoint's args.model"
        raise UsageError(f"{source} {given} does not match the checkpoint's weights (an MMDiT "
                         f"of depth {weights.depth}, patch size {weights.patch_size}: {name})")
    if flags.get("num_classes") is not None:
        raise UsageError(f"--num-classes: {name} is a text-to-image model (no classes); leave "
                         f"it out")
    encoder_depth = _check_head_flags(flags, args, weights)
    resolution = _resolve_resolution(flags.get("resolution"), args.get("resolution"), weights)
    path_type = _resolve_path_type(flags, args)
    options = dict(weights.mmdit_options, rmsnorm=bool(args.get("rmsnorm", False)))
    return ModelSpec(
        model=name, num_classes=0, encoder_depth=int(encoder_depth), z_dims=weights.z_dims,
        projector_dim=weights.projector_dim or 2048, qk_norm=weights.qk_norm,
        fused_attn=bool(_pick(flags.get("fused_attn"), args.get("fused_attn"), True)),
        resolution=int(resolution), input_size=weights.input_size,
        in_channels=weights.in_channels, has_null_class=False, path_type=path_type,
        learn_sigma=weights.learn_sigma, context_dim=weights.context_dim,
        mmdit_options=tuple(sorted(options.items())))


def resolve_spec(flags: Mapping, args: Mapping, weights: Weights) -> ModelSpec:
    """Combine flags (None = not given), the checkpoint's args and the weights (module doc)."""
    if weights.context_dim is not None:
        return resolve_mmdit_spec(flags, args, weights)
    model = _resolve_model(flags.get("model"), args.get("model"), weights)
    num_classes = _resolve_num_classes(flags.get("num_classes"), args.get("num_classes"), weights)
    encoder_depth = _check_head_flags(flags, args, weights)
    # DiT's train.py records the resolution as args.image_size
    saved_resolution = args.get("resolution", args.get("image_size"))
    resolution = _resolve_resolution(flags.get("resolution"), saved_resolution, weights)
    pixel_space = resolution == weights.input_size
    if weights.in_channels != (3 if pixel_space else 4):
        space = "a pixel-space model must read 3 (RGB)" if pixel_space else \
            "an SD-VAE latent model must read 4"
        raise UsageError(f"--resolution {resolution}: {space} channels; this checkpoint reads "
                         f"{weights.in_channels}")
    if model in DiT_models:
        # DiT samples its discrete diffusion: no path; learn_sigma is the output's width
        path_type, learn_sigma = None, weights.learn_sigma
    else:
        path_type, learn_sigma = _resolve_path_type(flags, args), None
    return ModelSpec(
        model=model, num_classes=num_classes, encoder_depth=int(encoder_depth),
        z_dims=weights.z_dims, projector_dim=weights.projector_dim or 2048,
        qk_norm=weights.qk_norm,
        fused_attn=bool(_pick(flags.get("fused_attn"), args.get("fused_attn"), True)),
        resolution=int(resolution), input_size=weights.input_size,
        in_channels=weights.in_channels, has_null_class=weights.label_rows == num_classes + 1,
        path_type=path_type, learn_sigma=learn_sigma)


def build_model(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor],
                attn_backend: Optional[str] = None) -> torch.nn.Module:
    """The SiT or DiT of ``spec`` holding ``state_dict`` (fp32, eval mode, no grad, on the CPU).

    Built on the meta device and filled with ``assign=True``: no time is spent initialising
    weights that are overwritten, and no second copy of them is made.
    """
    # labels are checked once per run; the per-call range check would sync the GPU
    common = dict(input_size=spec.input_size, in_channels=spec.in_channels,
                  num_classes=spec.num_classes,
                  class_dropout_prob=0.1 if spec.has_null_class else 0.0,
                  z_dims=list(spec.z_dims), encoder_depth=spec.encoder_depth,
                  projector_dim=spec.projector_dim, qk_norm=spec.qk_norm,
                  fused_attn=spec.fused_attn, attn_backend=attn_backend, validate_inputs=False)
    with torch.device("meta"):
        if spec.is_t2i:
            model = MMDiT(input_size=spec.input_size, patch_size=spec.model_patch_size,
                          in_channels=spec.in_channels, depth=spec.model_depth,
                          learn_sigma=spec.learn_sigma, z_dims=list(spec.z_dims),
                          encoder_depth=spec.encoder_depth, projector_dim=spec.projector_dim,
                          context_dim=spec.context_dim, fused_attn=spec.fused_attn,
                          attn_backend=attn_backend, validate_inputs=False,
                          **dict(spec.mmdit_options))
        elif spec.is_dit:
            model = DiT_models[spec.model](learn_sigma=spec.learn_sigma, **common)
        else:
            model = SiT_models[spec.model](use_cfg=spec.has_null_class, **common)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise UsageError(f"--ckpt: the weights do not fit {spec.model} with this configuration "
                         f"({error})") from error
    return model.float().eval().requires_grad_(False)


def _read(path: str):
    """The checkpoint, memory-mapped when its format allows: only the tensors used (one set of
    weights) are read, not the optimizer state of a training checkpoint, and processes on one
    machine share the pages. Old (non-zip) torch files are read whole. A training checkpoint's
    size is checked against its record (hashing it would read it all)."""
    from ..training.checkpoint_files import checkpoint_problem
    problem = checkpoint_problem(path, verify_hash=False)
    if problem is not None:
        raise UsageError(f"--ckpt {path}: {problem}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
    return read_checkpoint(path)


def legacy_encoder_depth(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The ``encoder_depth`` of the early REPA layout (``blocks.*`` = the first
    ``encoder_depth`` blocks, ``decoder_blocks.*`` the rest); None for the current layout."""
    keys = strip_wrapper_prefixes(state_dict)
    if not is_legacy_state_dict(keys):
        return None
    return len({k.split(".")[1] for k in keys if k.startswith("blocks.")})


def load_checkpoint(path: str, which: str, flags: Mapping):
    """``(model, spec, args)`` from a checkpoint file; ``which`` is ``ema`` or ``model``.

    The legacy ``decoder_blocks`` layout (the official ``--legacy``) is recognised by its keys
    and converted; its encoder depth is the number of ``blocks.*``, and a different
    ``--encoder-depth`` (or checkpoint ``args.encoder_depth``) is an error.
    """
    if not os.path.isfile(path):
        raise UsageError(f"--ckpt: checkpoint file not found: {path!r}")
    try:
        checkpoint = _read(path)
    except Exception as error:  # unpickling errors come in many types
        raise UsageError(f"--ckpt: cannot read {path!r} as a torch checkpoint ({error})") from error
    if not isinstance(checkpoint, Mapping):
        raise UsageError(f"--ckpt: {path!r} holds a {type(checkpoint).__name__}, not a "
                         f"checkpoint dict or a state dict")
    args = checkpoint_args(checkpoint)
    entry = checkpoint.get(which, {}) if "ema" in checkpoint or "model" in checkpoint \
        else checkpoint
    depth = legacy_encoder_depth(entry)
    given = _pick(flags.get("encoder_depth"), args.get("encoder_depth"))
    if depth is not None and given is not None and given != depth:
        source = ("--encoder-depth" if flags.get("encoder_depth") is not None
                  else "the checkpoint's args.encoder_depth")
        raise UsageError(f"{source} {given} does not match the checkpoint's legacy layout, "
                         f"which has {depth} encoder blocks ('blocks.*') before its "
                         f"'decoder_blocks.*'")
    try:
        state_dict = extract_state_dict(checkpoint, which, depth)
    except ValueError as error:
        raise UsageError(f"--weights {which}: {error}") from error
    weights = inspect_weights(state_dict)
    if depth is not None and given is None:
        flags = dict(flags, encoder_depth=depth)
    spec = resolve_spec(flags, args, weights)
    return build_model(spec, state_dict, flags.get("attn_backend")), spec, args
