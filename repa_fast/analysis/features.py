"""Features for the alignment analysis: a SiT's (or DiT's) hidden states on noisy inputs, its
REPA projections, and the frozen encoders' features of the clean images.

Per sample i and time t (all drawn once, on the CPU, from ``seed``: the same numbers for every
batch size and device):

* the clean latent ``x₀ = (mean + std·ε₀)·scale`` (:func:`repa_fast.vae.sample_posterior`, as
  training draws it; pixel-space sets: the image itself);
* the noisy input on the model's path, ``x_t = α(t)·x₀ + σ(t)·ε`` (SiT:
  :func:`repa_fast.transport.interpolate`; the same ε for every t); a DiT sees its diffusion's
  ``x_s = √ᾱ_s·x₀ + √(1−ᾱ_s)·ε`` at step ``s = round(t·999)`` of its 1000 training steps;
* the label: the null class (``condition="null"``, the default: the probe must not read the
  label off the conditioning) or the true one;
* ``h_b`` = the output of block b, mean-pooled over tokens: [D];
* ``p_k`` = projector k on the block-``encoder_depth`` tokens, mean-pooled: [z_k], and
  ``cos_k`` = the mean over tokens of cos(projector k's token, encoder k's token), the finer
  grid average-pooled to the coarser as the alignment op does: what REPA's loss maximises
  (``proj_loss = −cos`` averaged over samples);
* ``e_k`` = encoder k's patch tokens of the clean image, mean-pooled: [e_k];
* per token, for the first encoder: one token position ``p_i`` per sample (seeded), on the
  coarser of the model's and the encoder's grids (the finer one average-pooled to it, as the
  alignment op does): ``h_b[p_i]`` [D] and ``e_0[p_i]`` [e_0], so that CKNNA also measures
  what REPA aligns, patch token against patch token, not only the image-level means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..diffusion import create_diffusion
from ..errors import UsageError
from ..ops.alignment_common import avg_pool_tokens, pool_ratio
from ..transport import interpolate
from ..vae import sample_posterior

DIT_STEPS = 1000  # the diffusion DiT trains on (create_diffusion(timestep_respacing=""))
CONDITIONS = ("null", "label")


@dataclass
class Features:
    """Everything the metrics need, on the CPU in float32 (n samples)."""
    blocks: torch.Tensor            # [times, blocks, n, D]
    encoders: list                  # per encoder: [n, e_k]
    projections: list               # per projector: [times, n, z_k]
    cosines: list                   # per projector: [times, n], or None (grids differ)
    labels: torch.Tensor            # int64 [n]
    block_tokens: Optional[torch.Tensor] = None    # [times, blocks, n, D] at p_i, or None
    encoder_tokens: Optional[torch.Tensor] = None  # [n, e_0] at p_i (None: grids differ)


class NoisyInput:
    """``(x_t, model time)`` for the model of ``spec`` (a SiT on its path, or a DiT)."""

    def __init__(self, spec):
        self.dit = spec.is_dit
        self.path_type = spec.path_type
        self.diffusion = create_diffusion(timestep_respacing="", diffusion_steps=DIT_STEPS) \
            if self.dit else None

    def __call__(self, x0: torch.Tensor, noise: torch.Tensor, t: float):
        n = x0.shape[0]
        if self.dit:
            step = torch.full((n,), round(t * (DIT_STEPS - 1)), dtype=torch.int64,
                              device=x0.device)
            return self.diffusion.q_sample(x0, step, noise), step
        time = torch.full((n, 1, 1, 1), float(t), dtype=x0.dtype, device=x0.device)
        return interpolate(x0, noise, time, self.path_type)[0], time.view(n)


def check_model(spec, condition: str) -> None:
    """The analysis runs class-conditional SiTs and DiTs; ``--condition null`` needs the
    checkpoint's null class."""
    if spec.is_t2i:
        raise UsageError(f"--ckpt: {spec.model} is a text-to-image MMDiT; the analysis runs "
                         f"class-conditional SiT and DiT checkpoints (it probes class labels)")
    if condition not in CONDITIONS:
        raise UsageError(f"--condition must be one of {', '.join(CONDITIONS)}; got "
                         f"{condition!r}")
    if condition == "null" and not spec.has_null_class:
        raise UsageError("--condition null: the checkpoint's label table has no null class "
                         "(trained without CFG dropout); pass --condition label (the hidden "
                         "states then carry the label through the conditioning)")


def check_blocks(blocks: Optional[Sequence[int]], depth: int) -> list:
    """1-based block numbers (None: all of them), each in [1, depth]."""
    if blocks is None:
        return list(range(1, depth + 1))
    wrong = [b for b in blocks if not 1 <= b <= depth]
    if wrong or not blocks:
        raise UsageError(f"--blocks must list block numbers between 1 and the model's depth "
                         f"({depth}), or be all; got {','.join(map(str, blocks)) or 'nothing'}")
    return sorted(set(blocks))


def draw_noise(count: int, shape: tuple, seed: int) -> tuple:
    """``(ε₀, ε)`` [count, *shape]: the posterior's and the path's noise, one CPU stream."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(count, *shape, generator=generator)
    return eps, torch.randn(count, *shape, generator=generator)


class BlockHooks:
    """Forward hooks keeping the mean over tokens of chosen blocks' outputs, and, while
    ``pick`` is set (a :class:`TokenPick`), the picked token of each sample."""

    def __init__(self, model: torch.nn.Module, blocks: Sequence[int]):
        self.pooled: dict = {}
        self.picked: dict = {}
        self.pick: Optional[TokenPick] = None
        self.handles = [model.blocks[b - 1].register_forward_hook(self._keep(b))
                        for b in blocks]

    def _keep(self, block: int):
        def hook(module, inputs, output):
            self.pooled[block] = output.float().mean(1)
            if self.pick is not None:
                self.picked[block] = self.pick.model(output)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class TokenPick:
    """One token per sample at ``positions`` [b] of the common grid of a model's and an
    encoder's token grids (the finer average-pooled to the coarser)."""

    def __init__(self, model_tokens: int, encoder_tokens: int, fractions: torch.Tensor):
        self.sides = [math.isqrt(model_tokens), math.isqrt(encoder_tokens)]
        if any(side * side != n for side, n in zip(self.sides, (model_tokens, encoder_tokens))):
            raise ValueError("token grids must be square")
        self.k_model, self.k_encoder = pool_ratio(*self.sides)  # ValueError: no common grid
        side = self.sides[0] // self.k_model
        self.positions = (fractions * side * side).long().clamp_max(side * side - 1)

    @classmethod
    def maybe(cls, model_tokens: int, encoder_tokens: int,
              fractions: torch.Tensor) -> Optional["TokenPick"]:
        try:
            return cls(model_tokens, encoder_tokens, fractions)
        except ValueError:
            return None

    def _at(self, tokens: torch.Tensor, side: int, k: int) -> torch.Tensor:
        pooled = avg_pool_tokens(tokens.float(), side, k)
        rows = torch.arange(len(tokens), device=tokens.device)
        return pooled[rows, self.positions.to(tokens.device)].cpu()

    def model(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._at(tokens, self.sides[0], self.k_model)

    def encoder(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._at(tokens, self.sides[1], self.k_encoder)


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.float().mean(1).cpu()


def token_cosine(projected: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """Per sample, the mean over tokens of cos(projected token, target token) [b], the finer
    grid average-pooled to the coarser as the alignment op does (training's ``proj_loss`` is
    minus its mean); None when the widths differ or the grids are not integer multiples."""
    if projected.shape[-1] != target.shape[-1]:
        return None
    sides = [math.isqrt(x.shape[1]) for x in (projected, target)]
    if any(side * side != x.shape[1] for side, x in zip(sides, (projected, target))):
        return None
    try:
        k_projected, k_target = pool_ratio(*sides)
    except ValueError:
        return None
    p = avg_pool_tokens(projected.float(), sides[0], k_projected)
    z = avg_pool_tokens(target.float(), sides[1], k_target)
    return torch.nn.functional.cosine_similarity(p, z, dim=-1).mean(-1).cpu()


@torch.no_grad()
def extract(model: torch.nn.Module, spec, encoders: list, reader, times: Sequence[float],
            blocks: Sequence[int], batch_size: int, device: torch.device, seed: int,
            condition: str = "null", progress=None, per_token: bool = True) -> Features:
    """Run ``reader``'s samples (:class:`repa_fast.analysis.samples.SampleReader`) through
    the encoders once and the model once per time (module doc)."""
    check_model(spec, condition)
    n, shape = len(reader), reader.latent_shape
    eps, noise = draw_noise(n, shape, seed)
    noisy = NoisyInput(spec)
    model = model.to(device).eval()
    width = model.hidden_size
    out = torch.empty(len(times), len(blocks), n, width)
    projections = [torch.empty(len(times), n, z) for z in spec.z_dims]
    cosines: list = [torch.empty(len(times), n) for _ in spec.z_dims]
    encoded: list = [torch.empty(n, enc.embed_dim) for enc in encoders]
    # per token: where each sample is read, as a fraction of the common grid (seeded)
    fractions = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1))
    block_tokens = torch.empty(len(times), len(blocks), n, width) if encoders and per_token \
        else None  # as large as ``out``: per_token=False halves the host memory
    encoder_tokens = None
    hooks = BlockHooks(model, blocks)
    try:
        start = 0
        for images, moments, labels in reader.batches(batch_size):
            part = slice(start, start + len(labels))
            targets = [enc(images.to(device)) for enc in encoders]
            for k, tokens in enumerate(targets):
                encoded[k][part] = pooled(tokens)
            hooks.pick = None
            if block_tokens is not None:
                hooks.pick = TokenPick.maybe(model.num_patches,
                                             targets[0].shape[1], fractions[part])
                if hooks.pick is None:
                    block_tokens = None  # no common grid: no per-token numbers
                else:
                    if encoder_tokens is None:
                        encoder_tokens = torch.empty(n, targets[0].shape[-1])
                    encoder_tokens[part] = hooks.pick.encoder(targets[0])
            x0 = sample_posterior(moments.to(device), reader.latents_scale,
                                  noise=eps[part].to(device))
            y = labels.to(device)
            drop = torch.ones_like(y) if condition == "null" else None
            for i, t in enumerate(times):
                x_t, model_t = noisy(x0, noise[part].to(device), t)
                _, hidden = model.forward_with_hidden(x_t, model_t, y, force_drop_ids=drop)
                out[i, :, part] = torch.stack([hooks.pooled[b] for b in blocks]).cpu()
                if block_tokens is not None:
                    block_tokens[i, :, part] = torch.stack([hooks.picked[b] for b in blocks])
                for k, projector in enumerate(model.projectors):
                    projected = projector(hidden)
                    projections[k][i, part] = pooled(projected)
                    cos = token_cosine(projected, targets[k]) if k < len(targets) else None
                    if cos is None:
                        cosines[k] = None
                    elif cosines[k] is not None:
                        cosines[k][i, part] = cos
            start += len(labels)
            if progress is not None:
                progress.update(len(labels))
    finally:
        hooks.remove()
    return Features(out, encoded, projections, cosines, reader.labels, block_tokens,
                    encoder_tokens if block_tokens is not None else None)
