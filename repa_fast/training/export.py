"""``python -m repa_fast.training.export CKPT.pt [--out-dir DIR]``: a training checkpoint's
model and EMA weights as ``<name>-model.safetensors`` / ``<name>-ema.safetensors`` (the config
and step in the metadata), for loaders that should not unpickle. Files are written atomically.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .checkpoint_files import save_safetensors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="repa_fast.training.export", description=__doc__)
    parser.add_argument("ckpt", help="a checkpoint written by repa_fast.train (NNNNNNN.pt)")
    parser.add_argument("--out-dir", default=None, help="default: beside the checkpoint")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        print(f"error: ckpt {args.ckpt!r} does not exist", file=sys.stderr)
        return 2
    state = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"model", "ema"} & state.keys():
        print(f"error: ckpt {args.ckpt!r} holds neither 'model' nor 'ema' weights (keys: "
              f"{sorted(state) if isinstance(state, dict) else type(state).__name__})",
              file=sys.stderr)
        return 2
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.ckpt))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(args.ckpt))[0])
    for path in save_safetensors(state, stem):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
