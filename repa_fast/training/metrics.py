"""Training metrics: FLOPs per image (for MFU), and the ``metrics.jsonl`` log.

FLOPs of one training image (forward + backward = 3 × forward), counted from the model config::

    forward = depth · T · (24·D² + 4·T·D)       T tokens, D hidden size
              (qkv 6D², out 2D², MLP 16D² per token; QKᵀ and AV 4·T·D per token)
            + 2·T·(D·P + P·P + P·Z) per projector

An MMDiT (text-to-image) runs L caption tokens beside the T image tokens through the same
per-token work, attends over all T + L, and embeds the captions (width C)::

    forward = depth · ((T + L)·24·D² + 4·(T + L)²·D) − L·18·D²   (the last block's caption half
              + 2·L·C·D + projectors                              has qkv and modulation only)
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch

from ..atomic_write import atomic_open

# dense bf16 tensor-core peaks (TFLOP/s) of common cards, for MFU; others report no MFU
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0,
                    "L40S": 362.0, "A10": 125.0}


def flops_per_image(model, context_shape: Optional[tuple] = None) -> float:
    """Training FLOPs per image (forward + backward) of a SiT / DiT, or of an MMDiT given its
    caption features' ``context_shape`` (L, C)."""
    d, t = model.hidden_size, model.num_patches
    if hasattr(model, "joint_blocks"):
        if context_shape is None:
            raise ValueError("flops_per_image of an MMDiT needs context_shape (L, C) of its "
                             "caption features")
        length, width = context_shape
        depth, joint = len(model.joint_blocks), t + length
        forward = (depth * (joint * 24 * d * d + 4 * joint * joint * d) - length * 18 * d * d
                   + 2 * length * width * d)
    else:
        depth = len(model.blocks)
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
    """One JSON object per logged step in ``metrics.jsonl``, appended; a run first cuts the
    log back to the step it starts from (:func:`truncate_after`), so records never mix."""

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
    """Drop records past ``step``: a run that starts at ``step`` (0 for a fresh start) writes
    them anew. A line that is not a JSON record (a torn write, a stray edit) is dropped with a
    warning naming the file and line, so it can never block a resume."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                warnings.warn(f"{path}:{number}: not a metrics record, dropped: "
                              f"{line.strip()[:80]!r}")
                continue
            if record_step <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with atomic_open(path, "w") as f:  # a crash here must not lose the log
        f.writelines(keep)


REPORTERS = ("tensorboard", "wandb", "none")


class Reporter:
    """Scalars and sample grids for a dashboard: TensorBoard under ``<run>/tensorboard``,
    Weights & Biases (project ``--wandb-project``, run name ``--exp-name``, the config as the
    run config; a resumed run continues the same wandb run, its id kept in
    ``<run>/wandb_run_id``; ``WANDB_MODE=offline`` works without a network), or nothing.
    A missing package falls back to nothing, with a message saying what to install
    (``pip install 'repa_fast[tensorboard]'`` / ``'repa_fast[wandb]'``)."""

    def __init__(self, kind: str, run_dir: str, enabled: bool = True, config: Optional[dict] = None,
                 project: str = "REPA", entity: Optional[str] = None):
        if kind not in REPORTERS:
            raise ValueError(f"--report-to must be one of {', '.join(REPORTERS)}; got {kind!r}")
        self.writer = self.wandb_run = None
        if not enabled or kind == "none":
            return
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("--report-to tensorboard: the tensorboard package is not installed "
                      "(pip install 'repa_fast[tensorboard]'); logging to metrics.jsonl only")
                return
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        else:
            try:
                import wandb
            except ImportError:
                print("--report-to wandb: the wandb package is not installed "
                      "(pip install 'repa_fast[wandb]'); logging to metrics.jsonl only")
                return
            self._wandb = wandb
            id_file = os.path.join(run_dir, "wandb_run_id")
            run_id = open(id_file).read().strip() if os.path.exists(id_file) else None
            try:
                self.wandb_run = wandb.init(project=project, entity=entity,
                                            name=os.path.basename(run_dir), dir=run_dir,
                                            config=config, id=run_id, resume="allow")
            except wandb.errors.UsageError as error:  # e.g. no API key
                raise ValueError(f"--report-to wandb: {error} (or set WANDB_MODE=offline to "
                                 f"log locally and `wandb sync` later)") from None
            if run_id is None:
                with atomic_open(id_file, "w") as f:
                    f.write(self.wandb_run.id)

    def scalars(self, record: dict, step: int) -> None:
        values = {f"train/{k}": v for k, v in record.items() if k != "step" and v is not None}
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run:
            self.wandb_run.log(values, step=step)

    def image(self, tag: str, image_chw, step: int) -> None:
        if self.writer:
            self.writer.add_image(tag, image_chw, step)
        if self.wandb_run:
            self.wandb_run.log({tag: self._wandb.Image(image_chw.permute(1, 2, 0).numpy())},
                               step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb_run:
            self.wandb_run.finish()
