"""Per-sample random streams: sample ``i`` of a run draws everything from its own generator.

Every random number that sample ``i`` uses — its class label, its initial noise and, in SDE
mode, the noise of every Euler-Maruyama step — comes from one CPU generator seeded with
``index_seed(global_seed, i)``, in this order::

    label  = randint(num_classes)                  one draw
    z      = randn(C, H, W)          float32       the initial latents (or pixels)
    dW_k   = randn(C, H, W)          float64       SDE step k = 0 .. num_steps - 2
    n_k    = randn(C, H, W)          float32       a DiT's DDPM step k = 0 .. N - 1 (.dit_sampling)

So a sample does not depend on which process made it, on the number of processes, on the other
samples in its batch (up to floating-point rounding of batched kernels), or on whether the run
was resumed. The official ``generate.py`` seeds each rank with ``global_seed·world + rank`` and
draws batches from the global RNG instead, which ties every sample to the process layout.

Drawing the label first keeps the label of index ``i`` the same for models of any latent shape.
The streams are generated on the CPU (the same numbers on every device) and copied to the GPU
asynchronously from pinned memory: the SDE noise of a 64-sample batch of 4×32×32 latents is
2 MiB per step and takes about 5 ms of one (slow, shared) CPU core, which overlaps with the
GPU's model call since nothing in a step waits for the GPU.
"""
from __future__ import annotations

from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    """MurmurHash3's finaliser: a bijection of 32-bit integers that mixes every bit."""
    h &= _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def index_seed(global_seed: int, index: int) -> int:
    """The 32-bit seed of sample ``index``: ``fmix32(offset(global_seed) + index mod 2³²)``.

    PyTorch's CPU generator (mt19937) only uses the low 32 bits of a seed, so the pair is mixed
    into 32 bits. ``fmix32`` is a bijection, so within one run (indices < 2³²) no two samples
    share a stream; the offset (a hash of the global seed) puts runs with different seeds at
    unrelated places of the 2³² streams.
    """
    seed = global_seed & 0xFFFFFFFFFFFFFFFF
    offset = _fmix32((seed & _MASK32) + _fmix32(seed >> 32))
    return _fmix32(offset + index)


def index_generator(global_seed: int, index: int) -> torch.Generator:
    """A fresh CPU generator at the start of sample ``index``'s stream."""
    return torch.Generator().manual_seed(index_seed(global_seed, index))


def initial_draws(indices: Sequence[int], global_seed: int, num_classes: int,
                  shape: Sequence[int]):
    """``(latents [B, *shape] float32, labels [B] int64, generators)`` of these sample indices
    (the samplers' argument order).

    Each generator is left right after its sample's initial draws, where its SDE noise starts.
    """
    generators, labels, latents = [], [], []
    for index in indices:
        gen = index_generator(global_seed, index)
        labels.append(torch.randint(num_classes, (1,), generator=gen))
        latents.append(torch.randn(tuple(shape), generator=gen))
        generators.append(gen)
    return torch.stack(latents), torch.cat(labels), generators


class PerSampleNoise:
    """``noise(x)``: like ``torch.randn_like(x)``, but row ``j`` is drawn from
    ``generators[j]`` — the ``noise_fn`` of
    :func:`repa_fast.transport.samplers.euler_maruyama_sampler`, which calls it once per step but the
    last. For a batch of one sample the numbers are exactly those ``randn_like`` draws when the
    global CPU RNG holds the generator's state (the test suite checks this)."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)
        self.draws = 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 0 or like.shape[0] != len(self.generators):
            raise RuntimeError(f"PerSampleNoise holds {len(self.generators)} streams but "
                               f"was asked for noise of shape {list(like.shape)}")
        # A pinned host buffer lets the copy to the GPU run asynchronously; a new one per draw
        # (the caching host allocator recycles it once its copy is done).
        pin = like.device.type == "cuda"
        noise = torch.empty((len(self.generators), *like.shape[1:]), dtype=like.dtype,
                            pin_memory=pin)
        for row, gen in zip(noise, self.generators):
            torch.randn(like.shape[1:], generator=gen, dtype=like.dtype, out=row)
        self.draws += 1
        return noise.to(like.device, non_blocking=pin)
