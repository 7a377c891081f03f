"""Read a checkpoint file into a dict, whatever container the encoder's project shipped.

* ``.safetensors`` file, or a Hugging Face folder holding ``model.safetensors`` /
  ``open_clip_model.safetensors`` / ``pytorch_model.bin`` / ``open_clip_pytorch_model.bin``;
* a TorchScript archive (OpenAI CLIP's ``ViT-L-14.pt``): read with ``torch.jit.load``, which
  rebuilds the module from its serialized TorchScript, not from a Python pickle;
* anything else: ``torch.load(..., weights_only=True)`` (DINOv2 hub, MoCo v3, DINO, MAE,
  I-JEPA ``.pth`` / ``.pth.tar``); files that pickle other Python objects are refused.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict

import torch

HF_FILES = ("model.safetensors", "open_clip_model.safetensors",
            "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _is_torchscript(path: Path) -> bool:
    # torch.save zips hold <root>/data.pkl; TorchScript zips also hold <root>/constants.pkl.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 1)[-1] == "constants.pkl" for n in zf.namelist())


def _resolve(path: Path, hint: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"weights: checkpoint file not found: {str(path)!r}. {hint}")
    if path.is_dir():
        for name in HF_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"weights: folder {str(path)!r} holds none of {', '.join(HF_FILES)}. {hint}")
    return path


def read_checkpoint(path: "str | os.PathLike", hint: str = "") -> Dict[str, Any]:
    """Load ``path`` on the CPU; ``hint`` (where to get the file) goes into not-found errors."""
    file = _resolve(Path(path).expanduser(), hint)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file  # a timm dependency

        return load_file(str(file), device="cpu")
    if _is_torchscript(file):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load is deprecated but reads CLIP's .pt
            return dict(torch.jit.load(str(file), map_location="cpu").state_dict())
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"weights: {str(file)!r} pickles Python objects besides tensors, which "
            f"torch.load(weights_only=True) refuses to run. Re-save only its state dict, e.g. "
            f"torch.save(torch.load(path, weights_only=False)['model'], new_path), if you trust "
            f"the file. ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"weights: {str(file)!r} holds a {type(obj).__name__}, expected a dict "
                         "of tensors (a state dict or a checkpoint dict)")
    return obj
