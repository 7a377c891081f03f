"""Linear probes: multinomial logistic regression on frozen features, many feature sets at once.

For each set b (a block's mean-pooled hidden states), with train features ``X`` [n, d] and
labels ``y``, the features are standardised with the train set's mean and standard deviation,
then ``W`` [d, C], ``c`` [C] minimise::

    mean_i −log softmax(X_i·W + c)[y_i]  +  λ·‖W‖²

by full-batch Adam (``steps`` steps, learning rate ``lr`` with a cosine decay to 0), started at
zero. Adam's update is elementwise and the sets' losses are summed, so each set follows the
trajectory it would alone (up to rounding): batching changes the speed, not the result. The
accuracy is that of ``argmax(X·W + c)`` on the held-out set (standardised with the train
statistics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProbeConfig:
    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-4

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--probe-steps must be >= 1; got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"--probe-lr must be > 0; got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--probe-weight-decay must be >= 0; got {self.weight_decay}")


@dataclass
class ProbeResult:
    test_accuracy: torch.Tensor   # [B]
    train_accuracy: torch.Tensor  # [B]
    train_loss: torch.Tensor      # [B], the objective at the end (without λ·‖W‖²)


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple:
    """Both sets scaled by the train set's per-feature mean and standard deviation."""
    mean = train.mean(-2, keepdim=True)
    std = train.std(-2, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _accuracy(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor) -> torch.Tensor:
    logits = torch.baddbmm(bias[:, None, :], x, weight)
    return (logits.argmax(-1) == labels).double().mean(-1)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, num_classes: int, config: ProbeConfig = ProbeConfig(),
                 progress=None) -> ProbeResult:
    """Probe ``B`` feature sets: ``train_x`` [B, n, d], ``train_y`` int64 [n] (shared),
    ``test_x`` [B, m, d], ``test_y`` [m]; on the features' device, in float32.
    ``progress``: a tqdm-like bar, advanced once per step."""
    config.check()
    if train_x.dim() != 3 or test_x.dim() != 3:
        raise ValueError(f"features must be [B, n, d]; got {list(train_x.shape)} and "
                         f"{list(test_x.shape)}")
    device = train_x.device
    train_x, test_x = standardise(train_x.float(), test_x.float().to(device))
    train_y, test_y = train_y.to(device), test_y.to(device)
    sets, _, dim = train_x.shape
    weight = torch.zeros(sets, dim, num_classes, device=device, requires_grad=True)
    bias = torch.zeros(sets, num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=config.lr)
    targets = train_y.expand(sets, -1).reshape(-1)
    for step in range(config.steps):
        for group in optimizer.param_groups:  # cosine decay to 0 over the steps
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        logits = torch.baddbmm(bias[:, None, :], train_x, weight)
        data = torch.nn.functional.cross_entropy(logits.reshape(-1, num_classes), targets,
                                                 reduction="none").view(sets, -1).mean(-1)
        loss = data.sum() + config.weight_decay * weight.square().sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress.update(1)
    with torch.no_grad():
        logits = torch.baddbmm(bias[:, None, :], train_x, weight)
        final = torch.nn.functional.cross_entropy(logits.reshape(-1, num_classes), targets,
                                                  reduction="none").view(sets, -1).mean(-1)
        return ProbeResult(_accuracy(test_x, test_y, weight, bias).cpu(),
                           _accuracy(train_x, train_y, weight, bias).cpu(),
                           final.double().cpu())
