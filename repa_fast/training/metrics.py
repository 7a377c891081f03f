"""Training metrics: FLOPs per image (for MFU), and the ``metrics.jsonl`` log.

FLOPs of one training image (forward + backward = 3 × forward), counted from the model config::

    forward = depth · T · (24·D² + 4·T·D)       T tokens, D hidden size
              (qkv 6D², out 2D², MLP 16D² per token; QKᵀ and AV 4·T·D per token)
            + 2·T·(D·P + P·P + P·Z) per projector
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

# dense bf16 tensor-core peaks (TFLOP/s) of common cards, for MFU; others report no MFU
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0,
                    "L40S": 362.0, "A10": 125.0}


def flops_per_image(model) -> float:
    d, t, depth = model.hidden_size, model.num_patches, len(model.blocks)
    forward = depth * t * (24 * d * d + 4 * t * d)
    for projector in model.projectors:
        p, z = projector[0].out_features, projector[4].out_features
        forward += 2 * t * (d * p + p * p + p * z)
    return 3.0 * forward


def peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class MetricsLog:
    """One JSON object per logged step in ``metrics.jsonl`` (appended; survives resumes)."""

    def __init__(self, path: Optional[str]):
        self.file = open(path, "a") if path else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def truncate_after(path: str, step: int) -> None:
    """Drop records past ``step`` (a resumed run rewrites them)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


REPORTERS = ("tensorboard", "none")


class Reporter:
    """Scalars and sample grids for a dashboard: TensorBoard under ``<run>/tensorboard``, or
    nothing. ``tensorboard`` falls back to nothing, with a message, when the package is
    missing (``pip install 'repa_fast[tensorboard]'``)."""

    def __init__(self, kind: str, run_dir: str, enabled: bool = True):
        if kind not in REPORTERS:
            raise ValueError(f"--report-to must be one of {', '.join(REPORTERS)}; got {kind!r}")
        self.writer = None
        if kind == "tensorboard" and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("--report-to tensorboard: the tensorboard package is not installed "
                      "(pip install 'repa_fast[tensorboard]'); logging to metrics.jsonl only")
                return
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def scalars(self, record: dict, step: int) -> None:
        if self.writer:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)

    def image(self, tag: str, image_chw, step: int) -> None:
        if self.writer:
            self.writer.add_image(tag, image_chw, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
