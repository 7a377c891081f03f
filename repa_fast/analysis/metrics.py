"""The analysis's numbers from extracted features: CKNNA of every (time, block) against each
encoder, and linear-probe accuracies, batched over feature sets within a memory budget."""
from __future__ import annotations

from typing import Optional

import torch

from .cknna import KernelStats, cknna, prepare_features
from .probe import ProbeConfig, linear_probe

# bytes of device memory one batch of feature sets may take (CKNNA: about 8 float64 [n, n]
# matrices per set; probe: 4 float32 copies of the set's features)
MEMORY_BUDGET = 2 << 30


def chunk_size(per_set: int, budget: int = MEMORY_BUDGET) -> int:
    return max(1, budget // max(per_set, 1))


def cknna_table(sets: torch.Tensor, reference: torch.Tensor, topk: int, quantile: float,
                device: torch.device, budget: int = MEMORY_BUDGET) -> torch.Tensor:
    """CKNNA of each of ``sets`` [..., n, d] against ``reference`` [n, e] after
    :func:`prepare_features` (clamp at ``quantile``, unit rows): float64 [...] on the CPU."""
    lead, (n, d) = sets.shape[:-2], sets.shape[-2:]
    flat = sets.reshape(-1, n, d)
    ref = KernelStats(prepare_features(reference.to(device), quantile), topk)
    step = chunk_size(8 * 8 * n * n, budget)
    out = [cknna(prepare_features(flat[i:i + step].to(device), quantile), None, topk,
                 reference=ref).cpu() for i in range(0, len(flat), step)]
    return torch.cat(out).reshape(lead)


def probe_table(sets: torch.Tensor, labels: torch.Tensor, num_train: int, num_classes: int,
                config: ProbeConfig, device: torch.device, progress=None,
                budget: int = MEMORY_BUDGET) -> dict:
    """Linear probes on each of ``sets`` [..., n, d]: samples ``:num_train`` train, the rest
    test. ``{"accuracy", "train_accuracy", "train_loss"}``, each float64 [...]."""
    lead, (n, d) = sets.shape[:-2], sets.shape[-2:]
    flat = sets.reshape(-1, n, d)
    train_y, test_y = labels[:num_train], labels[num_train:]
    step = chunk_size(4 * 4 * n * d, budget)
    parts = []
    for i in range(0, len(flat), step):
        chunk = flat[i:i + step].to(device)
        parts.append(linear_probe(chunk[:, :num_train], train_y, chunk[:, num_train:], test_y,
                                  num_classes, config, progress))
    return {name: torch.cat([getattr(p, key) for p in parts]).reshape(lead)
            for name, key in [("accuracy", "test_accuracy"), ("train_accuracy",
                                                              "train_accuracy"),
                              ("train_loss", "train_loss")]}


def probe_steps(num_sets: int, n: int, d: int, config: ProbeConfig,
                budget: int = MEMORY_BUDGET) -> int:
    """The optimizer steps :func:`probe_table` takes for ``num_sets`` sets (progress bars)."""
    step = chunk_size(4 * 4 * n * d, budget)
    return -(-num_sets // step) * config.steps


def split_size(n: int, fraction: float) -> Optional[int]:
    """Train samples of a probe on ``n`` (None when either side would be empty)."""
    train = int(round(n * fraction))
    return train if 0 < train < n else None
