"""Loading official REPA / SiT checkpoints (and ours) into :class:`~repa_fast.models.SiT`."""
from __future__ import annotations

import argparse
import os
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_legacy_checkpoints(state_dict: Mapping[str, torch.Tensor], encoder_depth: int) -> dict:
    """Rename the early REPA layout's ``decoder_blocks.i.*`` to ``blocks.{i + encoder_depth}.*``.

    Same name and behaviour as the official ``utils.load_legacy_checkpoints``.
    """
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("decoder_blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{int(index) + encoder_depth}.{rest}"
        converted[key] = value
    return converted


def is_legacy_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("decoder_blocks.") for k in state_dict)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Drop ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def read_checkpoint(path: Union[str, os.PathLike], map_location="cpu") -> dict:
    """``torch.load`` with ``weights_only=True``, allowing the ``argparse.Namespace`` that
    official checkpoints store under ``args``. Errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True)


def extract_state_dict(checkpoint: Mapping, which: str = "ema",
                       encoder_depth: Optional[int] = None) -> dict:
    """The model state dict inside a checkpoint.

    ``checkpoint`` is either a bare state dict (as the official ``last.pt``) or a training
    checkpoint with ``model``/``ema`` entries; ``which`` picks one of those. Wrapper prefixes are
    stripped, and a legacy ``decoder_blocks`` layout is converted when ``encoder_depth`` is given.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model'; got {which!r}")
    if "ema" in checkpoint or "model" in checkpoint:
        if which not in checkpoint:
            raise ValueError(f"checkpoint has no {which!r} entry; it has {sorted(checkpoint)}")
        state_dict = checkpoint[which]
    else:
        state_dict = checkpoint
    state_dict = strip_wrapper_prefixes(state_dict)
    if is_legacy_state_dict(state_dict):
        if encoder_depth is None:
            raise ValueError("the state dict has the legacy 'decoder_blocks' layout: pass "
                             "encoder_depth (the value the model was trained with) to convert it")
        state_dict = load_legacy_checkpoints(state_dict, encoder_depth)
    return state_dict


def load_pretrained(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping],
                    which: str = "ema", strict: bool = True):
    """Load an official REPA/SiT checkpoint (path or loaded dict) into ``model``.

    Legacy ``decoder_blocks`` checkpoints are converted with ``model.encoder_depth``.
    Returns ``load_state_dict``'s result.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    state_dict = extract_state_dict(checkpoint, which, getattr(model, "encoder_depth", None))
    return model.load_state_dict(state_dict, strict=strict)
