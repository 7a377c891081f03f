"""The frozen encoders a run aligns to (``--enc-type``, ``--enc-weights``), checked before
anything is built: their resolutions and weight files; ``demo`` is the demo's tiny ViT
(:mod:`.demo_encoder`)."""
from __future__ import annotations

import os

import torch

from ..errors import UsageError
from .config import TrainConfig


def check_encoder_resolution(config: TrainConfig) -> None:
    """Every ``--enc-type`` encoder runs at ``--resolution`` (the official rules: 256 or 512
    px, 512 only for plain DINOv2), checked before anything is built."""
    if config.enc_type == "demo":
        return
    from ..encoders import get_spec
    from ..encoders.registry import RESOLUTIONS
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
            f"--enc-type demo (the demo's tiny encoder, any resolution divisible by 8; "
            f"--enc-weights random gives untrained official encoders, still at "
            f"{' or '.join(map(str, sizes))} px){others}")


def encoder_weight_files(config: TrainConfig) -> list:
    """One weights entry (a file or ``random``) per ``--enc-type`` encoder, each file checked
    to exist before anything is built."""
    from ..encoders import get_spec
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
        from .demo_encoder import demo_encoder
        return [demo_encoder(config.resolution, config.enc_weights).to(device)]
    from ..encoders import load_encoder
    check_encoder_resolution(config)
    names = config.enc_type.split(",")
    weights = encoder_weight_files(config)
    return [load_encoder(n, w, config.resolution, device=device, dtype=dtype)
            for n, w in zip(names, weights)]
