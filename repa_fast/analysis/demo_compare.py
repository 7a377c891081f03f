"""What ``python -m repa_fast.compare`` measures on one finished demo run (EMA weights).

* **denoising loss**: the training objective, velocity MSE ``‖v_θ(x_t, t, y) − (dα·x₀ +
  dσ·ε)‖²`` (mean over pixels), on ``EVAL_IMAGES`` (1200) freshly drawn shapes no run saw,
  at ``EVAL_TIMES`` stratified times with fixed noise: the same inputs for every run, so two
  runs differ only by their weights (training's own logged loss is a noisy one-batch value);
* **alignment**: :func:`repa_fast.analysis.run.run_analysis` on the run's data set (CKNNA of
  every block's mean-pooled hidden states with the demo encoder, and per token, at t = 0 and
  0.5; the projector's cosine, what REPA maximises; linear probes);
* **sample quality**: ``SAMPLES_PER_CLASS`` samples of each class (50 Euler ODE steps, no
  guidance: the training grid's sampler; fixed noise) scored by the shape judge
  (:mod:`repa_fast.analysis.shape_judge`): class, shape and colour accuracy and the Fréchet
  distance of its features to real shapes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UsageError
from ..evaluation.metrics import FeatureStats, frechet_distance
from ..generation.loading import load_checkpoint
from ..generation.sample_batch import to_uint8
from ..transport import interpolate
from ..transport.samplers import euler_sampler
from .shape_judge import accuracies, judge_features, load_judge, reference_shapes

EVAL_IMAGES = 1200
EVAL_TIMES = 16          # t_i = (i + ½) / 16
SAMPLES_PER_CLASS = 24
SAMPLE_STEPS = 50
ALIGN_TIMES = (0.0, 0.5)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, r, r] -> the demo's pixel-space x₀ in [-1, 1]."""
    return images.float() / 127.5 - 1


@torch.no_grad()
def denoising_loss(model, images: torch.Tensor, labels: torch.Tensor, path_type: str,
                   seed: int, batch: int = 200) -> dict:
    """Velocity MSE at each of ``EVAL_TIMES`` times and their mean (module doc)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = pixels(images)
    noise = torch.randn(x0.shape, generator=gen)
    keep = torch.zeros_like(labels)  # the true label, never the dropped one
    per_time = []
    for i in range(EVAL_TIMES):
        t = (i + 0.5) / EVAL_TIMES
        total = 0.0
        for start in range(0, len(x0), batch):
            x, e, y = (v[start:start + batch] for v in (x0, noise, labels))
            time = torch.full((len(x), 1, 1, 1), t)
            x_t, target = interpolate(x, e, time, path_type)
            out = model(x_t, time.view(-1), y, force_drop_ids=keep[start:start + batch])
            prediction = out[0] if isinstance(out, tuple) else out
            error = (prediction.double() - target.double()) ** 2  # float64: batch-size-free
            total += float(error.mean(dim=(1, 2, 3)).sum())
        per_time.append(total / len(x0))
    return dict(mean=float(np.mean(per_time)), per_time=per_time,
                times=[(i + 0.5) / EVAL_TIMES for i in range(EVAL_TIMES)])


@torch.no_grad()
def class_samples(model, num_classes: int, per_class: int, resolution: int, seed: int,
                  steps: int = SAMPLE_STEPS) -> tuple:
    """``(uint8 [n, 3, r, r], labels [n])``: ``per_class`` samples of every class, class by
    class, from noise seeded with ``seed``."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 3, resolution, resolution,
                        generator=torch.Generator().manual_seed(seed))
    out = []
    for x, y in zip(noise.split(96), labels.split(96)):
        out.append(torch.from_numpy(to_uint8(euler_sampler(model, x, y, num_steps=steps))))
    return torch.cat(out).permute(0, 3, 1, 2).contiguous(), labels


def sample_quality(judge, samples: torch.Tensor, labels: torch.Tensor,
                   reference: FeatureStats) -> dict:
    feats, predicted = judge_features(judge, samples)
    return dict(accuracies(predicted, labels),
                fd=frechet_distance(FeatureStats.from_activations(feats), reference))


def reference_stats(judge, resolution: int, count: int = EVAL_IMAGES) -> FeatureStats:
    images, _ = reference_shapes(count, resolution)
    return FeatureStats.from_activations(judge_features(judge, images)[0])


def evaluate_run(ckpt: str, data_dir: str, seed: int, per_class: int = SAMPLES_PER_CLASS,
                 analysis_samples: int = 10_000, device: str = "auto",
                 progress: bool = False, loss_images: int = EVAL_IMAGES) -> tuple:
    """``(record, samples uint8 [n, 3, r, r])`` of the checkpoint ``ckpt`` (module doc); the
    denoising loss and the samples are computed on the CPU (the same numbers everywhere)."""
    from .run import AnalysisSettings, run_analysis
    model, spec, args = load_checkpoint(ckpt, "ema", {})
    model.eval()
    if not spec.pixel_space or spec.is_dit or spec.is_t2i:
        raise UsageError(f"{ckpt}: compare measures pixel-space SiT demo runs (the shape "
                         f"judge reads pixels); this checkpoint holds a {spec.model} on "
                         f"{'pixels' if spec.pixel_space else 'latents'}")
    resolution = spec.resolution
    images, labels = reference_shapes(loss_images, resolution)
    loss = denoising_loss(model, images, labels, spec.path_type, seed)
    analysis = run_analysis(AnalysisSettings(
        ckpt=ckpt, data_dir=data_dir, times=ALIGN_TIMES, seed=seed, device=device,
        num_samples=analysis_samples, progress=progress))
    judge = load_judge(resolution)
    samples, sample_labels = class_samples(model, spec.num_classes, per_class, resolution, seed)
    quality = sample_quality(judge, samples, sample_labels, reference_stats(judge, resolution))
    depth = spec.encoder_depth
    at = analysis["blocks"].index(depth)
    cknna, token = analysis["encoders"][0]["cknna"], analysis["encoders"][0]["cknna_token"]
    projection = analysis["projection"][0] if analysis["projection"] else {}
    probe = analysis["probe"]
    record = dict(
        checkpoint=ckpt, proj_coeff=args.get("proj_coeff"), steps=args.get("max_train_steps"),
        denoising_loss=loss,
        alignment=dict(times=list(ALIGN_TIMES), encoder_depth=depth,
                       cknna_at_encoder_depth=[row[at] for row in cknna],
                       cknna_token_at_encoder_depth=None if token is None else
                       [row[at] for row in token],
                       cknna_best=[(row[analysis["blocks"].index(b)], b) for row, b in
                                   zip(cknna, analysis["summary"]["best_cknna_block"])],
                       projector_cosine=projection.get("cosine"),
                       probe_at_encoder_depth=None if probe is None else
                       [row[at] for row in probe["accuracy"]]),
        samples=dict(per_class=per_class, steps=SAMPLE_STEPS, sampler="Euler ODE, no CFG",
                     **quality),
        analysis=analysis)
    return record, samples
