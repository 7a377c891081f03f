"""One analysis, from settings to the numbers: load the checkpoint and the encoders, read the
samples, extract the features (:mod:`.features`), compute CKNNA and the probes
(:mod:`.metrics`), and return everything as one JSON-ready dict (:mod:`.report`)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..errors import UsageError
from .features import CONDITIONS, check_blocks, check_model, extract
from .metrics import cknna_table, probe_steps, probe_table, split_size
from .probe import ProbeConfig
from .report import results
from .samples import SampleReader


@dataclass
class AnalysisSettings:
    ckpt: str
    data_dir: str
    weights: str = "ema"
    enc_type: Optional[str] = None      # None: the checkpoint's args.enc_type
    enc_weights: Optional[str] = None   # None: the checkpoint's args.enc_weights, else ckpts
    times: tuple = (0.0, 0.25, 0.5, 0.75)
    blocks: Optional[tuple] = None      # None: all
    num_samples: int = 10_000
    knn: int = 10
    outlier_quantile: float = 0.95
    probe: bool = True
    probe_train_fraction: float = 0.8
    probe_steps: int = 300
    probe_lr: float = 0.01
    probe_weight_decay: float = 1e-4
    condition: str = "null"
    per_token: bool = True
    batch_size: int = 64
    device: str = "auto"
    seed: int = 0
    model: Optional[str] = None         # the flags load_checkpoint takes for bare state dicts
    num_classes: Optional[int] = None
    encoder_depth: Optional[int] = None
    path_type: Optional[str] = None
    progress: bool = True

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(self.probe_steps, self.probe_lr, self.probe_weight_decay)

    def check(self) -> None:
        """UsageError naming the flag for values that cannot work, before anything loads."""
        def need(ok: bool, flag: str, expected: str, given) -> None:
            if not ok:
                raise UsageError(f"{flag} must be {expected}; got {given}")

        need(os.path.isfile(self.ckpt), "--ckpt", "an existing checkpoint file", repr(self.ckpt))
        need(self.weights in ("ema", "model"), "--weights", "ema or model", repr(self.weights))
        need(len(self.times) > 0 and all(0 <= t <= 1 for t in self.times), "--times",
             "comma-separated times in [0, 1] (0: clean data, 1: pure noise)",
             ",".join(map(str, self.times)) or "nothing")
        need(len(set(self.times)) == len(self.times), "--times", "distinct times",
             ",".join(map(str, self.times)))
        need(self.num_samples >= 4, "--num-samples", ">= 4", self.num_samples)
        need(self.knn >= 2, "--knn", ">= 2", self.knn)
        need(0 < self.outlier_quantile <= 1, "--outlier-quantile", "in (0, 1] (1: no clamp)",
             self.outlier_quantile)
        need(0 < self.probe_train_fraction < 1, "--probe-train-fraction", "in (0, 1)",
             self.probe_train_fraction)
        need(self.batch_size >= 1, "--batch-size", ">= 1", self.batch_size)
        need(self.condition in CONDITIONS, "--condition", " or ".join(CONDITIONS),
             repr(self.condition))
        try:
            self.probe_config().check()
        except ValueError as error:
            raise UsageError(str(error)) from None

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got "
                             f"{self.device!r}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device}: no CUDA device is available here")
        return device


def load_model(settings: AnalysisSettings, resolution: int):
    """``(model, spec, args)`` of ``--ckpt`` (:func:`repa_fast.generation.loading.
    load_checkpoint`), its resolution taken from the data set."""
    from ..generation.loading import load_checkpoint
    flags = dict(model=settings.model, num_classes=settings.num_classes,
                 encoder_depth=settings.encoder_depth, path_type=settings.path_type,
                 resolution=resolution)
    return load_checkpoint(settings.ckpt, settings.weights, flags)


def build_encoders(enc_type: str, enc_weights: str, resolution: int,
                   device: torch.device) -> list:
    """The frozen encoders of ``--enc-type`` (``demo``: the demo run's tiny ViT)."""
    from ..encoders import ENCODER_NAMES
    from ..training.config import TrainConfig
    from ..training.encoders import build_encoders as build, check_encoder_resolution
    names = enc_type.split(",")
    known = ENCODER_NAMES + ("demo",)
    bad = [n for n in names if n not in known]
    if bad:
        raise UsageError(f"--enc-type must be one or more (comma-separated) of "
                         f"{', '.join(known)}; got {bad[0]!r}")
    config = TrainConfig(enc_type=enc_type, enc_weights=enc_weights, resolution=resolution)
    try:
        check_encoder_resolution(config)
    except UsageError as error:
        raise UsageError(f"--enc-type {enc_type}: the data set's images are {resolution} px: "
                         f"{error}") from None
    return build(config, device, torch.float32)


def encoder_choice(settings: AnalysisSettings, args: dict) -> tuple:
    """``(enc_type, enc_weights)``: the flags, else the checkpoint's training args, else the
    official defaults (``dinov2-vit-b``, the folder ``ckpts``; the demo's: ``trained``)."""
    enc_type = settings.enc_type or args.get("enc_type") or "dinov2-vit-b"
    enc_weights = settings.enc_weights or args.get("enc_weights") or \
        ("trained" if enc_type == "demo" else "ckpts")
    return str(enc_type), str(enc_weights)


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed."""

    def update(self, count: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="it", leave=False, disable=not enabled,
                dynamic_ncols=True)


def run_analysis(settings: AnalysisSettings) -> dict:
    """The analysis of ``settings``: a JSON-ready dict (:func:`repa_fast.analysis.report.
    results` says what it holds)."""
    settings.check()
    device = settings.resolved_device()
    reader = SampleReader(settings.data_dir, settings.num_samples, settings.seed)
    resolution = int(reader.index["resolution"])
    model, spec, args = load_model(settings, resolution)
    check_model(spec, settings.condition)
    if reader.latent_shape[0] != spec.in_channels:
        raise UsageError(f"--data-dir {settings.data_dir!r}: its latents have "
                         f"{reader.latent_shape[0]} channels; the checkpoint's model reads "
                         f"{spec.in_channels}")
    blocks = check_blocks(settings.blocks, len(model.blocks))
    n = len(reader)
    if settings.knn > n - 1:
        raise UsageError(f"--knn {settings.knn}: needs more than {settings.knn} samples; the "
                         f"analysis has {n} (--num-samples, or the data set's size)")
    num_train = split_size(n, settings.probe_train_fraction)
    if settings.probe and num_train is None:
        raise UsageError(f"--probe-train-fraction {settings.probe_train_fraction} leaves no "
                         f"train or no test sample of {n}")
    enc_type, enc_weights = encoder_choice(settings, args)
    encoders = build_encoders(enc_type, enc_weights, resolution, device)
    with _bar(n, "features", settings.progress) as bar:
        feats = extract(model, spec, encoders, reader, settings.times, blocks,
                        settings.batch_size, device, settings.seed, settings.condition, bar,
                        settings.per_token)
    q, k = settings.outlier_quantile, settings.knn
    alignment = [cknna_table(feats.blocks, e, k, q, device) for e in feats.encoders]
    token_alignment = None if feats.block_tokens is None else \
        cknna_table(feats.block_tokens, feats.encoder_tokens, k, q, device)
    # projector j was trained against encoder j (when the encoders are the training's)
    projection = [cknna_table(p, feats.encoders[j], k, q, device) if j < len(feats.encoders)
                  else None for j, p in enumerate(feats.projections)]
    probes = None
    if settings.probe:
        config = settings.probe_config()
        sets = feats.blocks.shape[:2].numel() + len(feats.encoders)
        total = probe_steps(feats.blocks.shape[:2].numel(), n, feats.blocks.shape[-1], config) \
            + sum(probe_steps(1, n, e.shape[-1], config) for e in feats.encoders)
        with _bar(total, f"probes ({sets} sets)", settings.progress) as bar:
            probes = dict(blocks=probe_table(feats.blocks, feats.labels, num_train,
                                             reader.num_classes, config, device, bar),
                          encoders=[probe_table(e, feats.labels, num_train,
                                                reader.num_classes, config, device, bar)
                                    for e in feats.encoders])
    return results(settings=asdict(settings), spec=spec, args=args, enc_type=enc_type,
                   enc_weights=enc_weights, encoders=encoders, reader=reader, blocks=blocks,
                   features=feats, alignment=alignment, token_alignment=token_alignment,
                   projection=projection, probes=probes,
                   num_train=num_train, device=device)
