"""REPA training losses: velocity MSE and the projection (representation alignment) loss."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..ops.alignment_common import normalize
from .paths import check_path_type, interpolate
from .timesteps import WEIGHTINGS, sample_time

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.dim())))


def denoising_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample velocity MSE ``mean_flat((output - target)²)``, shape [N]."""
    if output.shape != target.shape:
        raise ValueError(f"output and target must have the same shape; got {list(output.shape)} "
                         f"and {list(target.shape)}")
    return mean_flat((output - target) ** 2)


def _as_list(x: TensorList) -> list:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def projection_loss(zs: TensorList, zs_tilde: TensorList) -> torch.Tensor:
    """REPA's alignment loss, vectorised (reference implementation).

    ``zs[k]`` [N, T, Z_k] are the encoder features, ``zs_tilde[k]`` the projected SiT tokens;

        loss = mean_k mean_{n, t} -<z / max(|z|, ε), z̃ / max(|z̃|, ε)>,   ε = 1e-12,

    which equals the official per-sample loop. Computed in at least float32 (half and bf16
    inputs, and autocast, are upcast; float64 stays float64) and returned in that dtype.
    """
    zs, zs_tilde = _as_list(zs), _as_list(zs_tilde)
    if len(zs) != len(zs_tilde) or not zs:
        raise ValueError(f"zs and zs_tilde must be non-empty lists of the same length (one per "
                         f"encoder); got {len(zs)} and {len(zs_tilde)}")
    total = None
    for k, (z, z_tilde) in enumerate(zip(zs, zs_tilde)):
        if z.dim() != 3 or z.shape != z_tilde.shape:
            raise ValueError(f"zs[{k}] and zs_tilde[{k}] must both be [N, T, Z] of one shape; got "
                             f"{list(z.shape)} and {list(z_tilde.shape)}")
        dtype = torch.promote_types(torch.promote_types(z.dtype, z_tilde.dtype), torch.float32)
        with torch.autocast(z.device.type, enabled=False):
            z = normalize(z.to(dtype))  # F.normalize without overflow for large finite rows
            z_tilde = normalize(z_tilde.to(dtype))
            term = -(z * z_tilde).sum(dim=-1).mean()
        total = term if total is None else total + term
    return total / len(zs)


class SILoss:
    """The official ``SILoss``: same constructor and call, fused or vectorised projection loss.

    ``loss_fn(model, images, model_kwargs, zs)`` draws times and noise, runs the model on
    ``x_t`` and returns ``(denoising_loss [N], proj_loss scalar)``. Random draws happen in the
    official order (times on the CPU, then ``randn_like(images)``), so a seeded run draws the
    same numbers.

    ``fused=True`` (default) calls ``model(x_t, t, **model_kwargs, align_to=zs) -> (v,
    proj_loss)``: the repa_fast SiT computes the loss with the fused alignment op
    (``align_kwargs``, e.g. ``backend`` or ``recompute``, are passed to it). ``fused=False``
    calls ``model(x_t, t, **model_kwargs) -> (v, zs_tilde)`` like the official code, for
    models without ``align_to``, and applies :func:`projection_loss`.
    """

    def __init__(self, prediction: str = "v", path_type: str = "linear",
                 weighting: str = "uniform", encoders=(), accelerator=None,
                 latents_scale: Optional[torch.Tensor] = None,
                 latents_bias: Optional[torch.Tensor] = None, *, fused: bool = True,
                 align_kwargs: Optional[dict] = None):
        if prediction != "v":
            raise ValueError(f"prediction must be 'v' (velocity; the only target REPA trains); "
                             f"got {prediction!r}")
        check_path_type(path_type)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        self.prediction = prediction
        self.path_type = path_type
        self.weighting = weighting
        self.encoders = encoders
        self.accelerator = accelerator
        self.latents_scale = latents_scale
        self.latents_bias = latents_bias
        self.fused = fused
        self.align_kwargs = dict(align_kwargs or {})

    def __call__(self, model, images: torch.Tensor, model_kwargs: Optional[dict] = None,
                 zs: Optional[TensorList] = None, *, time: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None):
        """``time`` [N, 1, 1, 1] and ``noise`` (like ``images``) may be given instead of drawn
        (the training loop draws them per global batch, independent of the process count)."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        t = (sample_time(images.shape[0], self.weighting, self.path_type,
                         device=images.device, dtype=images.dtype) if time is None
             else time.to(images.device, images.dtype))
        noise = torch.randn_like(images) if noise is None else noise.to(images.device, images.dtype)
        model_input, model_target = interpolate(images, noise, t, self.path_type)
        zs = [] if zs is None else _as_list(zs)
        if zs and self.fused:
            model_output, proj_loss = model(model_input, t.flatten(), **model_kwargs,
                                            align_to=zs, **self.align_kwargs)
        else:
            model_output, zs_tilde = model(model_input, t.flatten(), **model_kwargs)
            proj_loss = (projection_loss(zs, zs_tilde) if zs
                         else torch.zeros((), device=images.device))
        loss = denoising_loss(model_output, model_target)
        return loss, proj_loss
