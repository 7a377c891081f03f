"""``--log-alignment-every N``: the paper's representation alignment, measured during training.

Every N steps (rank 0, no gradient, the training random state untouched) ::

    h   = mean over tokens of the model's hidden states after block encoder_depth,
          on x_t of ALIGN_SAMPLES fixed samples (fixed noise), t ∈ ALIGN_TIMES
    z   = mean over tokens of the (first) encoder's features of the clean images
    log   alignment_cknna_t{t} = CKNNA_k=10(prepare(h), prepare(z))

with the reference pipeline's preprocessing (``prepare``: clamp at the 0.95 quantile of |x|,
unit rows; :mod:`repa_fast.analysis.cknna`). The samples are a seeded choice of the training
set (the paper measures on ImageNet's validation images; ``python -m repa_fast.analyze`` takes
any prepared set). Written to ``metrics.jsonl`` as records of their own and to the dashboards.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..analysis.cknna import cknna, prepare_features
from ..analysis.features import NoisyInput
from ..analysis.samples import SampleReader
from ..vae import sample_posterior
from .config import TrainConfig, is_dit

ALIGN_SAMPLES = 64
ALIGN_TIMES = (0.0, 0.5)
ALIGN_KNN = 10


class AlignmentLog:
    """Reads the fixed samples once (images, latents, labels, noise on ``device``)."""

    def __init__(self, config: TrainConfig, data_dir: str, latents_scale: float,
                 device: torch.device):
        reader = SampleReader(data_dir, ALIGN_SAMPLES, config.seed)
        ((images, moments, labels),) = list(reader.batches(ALIGN_SAMPLES))
        gen = torch.Generator().manual_seed(config.seed + 1)
        eps = torch.randn(moments[:, : moments.shape[1] // 2].shape, generator=gen)
        self.x0 = sample_posterior(moments, latents_scale, noise=eps).to(device)
        self.noise = torch.randn(self.x0.shape, generator=gen).to(device)
        self.images, self.labels = images.to(device), labels.to(device)
        self.noisy = NoisyInput(SimpleNamespace(is_dit=is_dit(config),
                                                path_type=config.path_type))

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, encoder, step: int) -> dict:
        """The record of ``step``: ``alignment_cknna_t{t}`` for each time."""
        z = encoder(self.images).float().mean(dim=1)
        z = prepare_features(z)
        record = {"step": step}
        keep = torch.zeros_like(self.labels)  # no label dropout (and no global-RNG draw)
        for t in ALIGN_TIMES:
            x_t, time = self.noisy(self.x0, self.noise, t)
            _, hidden = model.forward_with_hidden(x_t, time, self.labels, force_drop_ids=keep)
            h = prepare_features(hidden.float().mean(dim=1))
            record[f"alignment_cknna_t{t:g}"] = float(cknna(h, z, topk=ALIGN_KNN))
        return record
