"""A sample-quality proxy for the demo: a small CNN that judges generated shapes.

FID needs Inception weights and tens of thousands of samples; the demo has neither. Its data
are procedural, so a judge trained on freshly drawn shapes (seconds on the CPU, cached like
the demo encoder) can say what a sample shows::

    class accuracy   argmax judge(sample) == the class the sample was generated for
    shape accuracy   the same, shape only (disc / square / triangle: what the eye checks)
    colour accuracy  the same, colour only
    FD               Fréchet distance between the judge's pooled features [64] of the
                     samples and of as many freshly drawn real shapes (an "FID" in the
                     judge's space: lower is closer to the data)

The judge is a CNN, not the ViT that REPA aligns to (:mod:`repa_fast.training.demo_encoder`),
so a REPA run is not scored by its own target's eyes.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..data.demo import NUM_CLASSES
from ..machine_cache import cache_root
from ..training.demo_encoder import cached_weights, draw_shapes, fit_classifier

FORMAT = "repa_fast demo judge"
VERSION = 1
SEED = 4321  # not the encoder's, not the data set's
NUM_SHAPES = 3  # class c = shape c % 3, colour c // 3 (repa_fast.data.demo)


class ShapeJudge(nn.Module):
    """Four 3×3 convolutions (GELU; 3→32→64→64→64, a 2×2 max pool between each) → max over
    pixels per channel (the features) → linear."""

    def __init__(self) -> None:
        super().__init__()
        layers, width = [], 3
        for i, out in enumerate((32, 64, 64, 64)):
            layers += ([nn.MaxPool2d(2)] if i else []) + [nn.Conv2d(width, out, 3, padding=1),
                                                          nn.GELU()]
            width = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, r, r] -> [B, 64]."""
        x = images.to(self.head.weight.dtype) / 127.5 - 1
        return self.body(x).amax(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def judge_path(resolution: int) -> str:
    return os.path.join(cache_root(), "demo", f"judge_v{VERSION}_{resolution}px.pt")


def train_judge(resolution: int) -> tuple:
    """``(judge, held-out accuracy)``, trained on freshly drawn shapes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        judge = ShapeJudge()
    return judge, fit_classifier(judge, judge, resolution, SEED)


def load_judge(resolution: int, log=print) -> ShapeJudge:
    """The judge of ``resolution`` px shapes, trained first (and cached) when needed."""
    judge = ShapeJudge()
    judge.load_state_dict(cached_weights(judge_path(resolution), FORMAT, resolution,
                                         lambda: train_judge(resolution),
                                         "demo's shape judge", VERSION, log))
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_features(judge: ShapeJudge, images: torch.Tensor) -> tuple:
    """``(features [N, 64] float64 numpy, predicted classes [N])`` in batches of 256."""
    feats, preds = [], []
    for batch in images.split(256):
        f = judge.features(batch)
        feats.append(f.double().numpy())
        preds.append(judge.head(f).argmax(dim=1))
    return np.concatenate(feats), torch.cat(preds)


def accuracies(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    """Class, shape and colour accuracy of ``predicted`` against ``labels``."""
    predicted, labels = predicted.long(), labels.long()
    return dict(
        class_accuracy=float((predicted == labels).float().mean()),
        shape_accuracy=float((predicted % NUM_SHAPES == labels % NUM_SHAPES).float().mean()),
        colour_accuracy=float((predicted // NUM_SHAPES == labels // NUM_SHAPES).float().mean()))


def reference_shapes(count: int, resolution: int, seed: int = SEED + 2) -> tuple:
    """Real shapes to compare samples with (the judge never trained on them)."""
    return draw_shapes(count, resolution, seed)
