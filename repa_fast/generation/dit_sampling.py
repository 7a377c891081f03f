"""One DiT batch: per-sample streams -> the Gaussian diffusion's DDPM or DDIM steps -> latents.

As DiT's ``sample_ddp.py``: the diffusion is ``create_diffusion("N")`` (N respaced DDPM steps)
or ``create_diffusion("ddimN")`` (DDIM, η = 0), the state is float32, ``clip_denoised=False``,
and with ``cfg_scale > 1`` the batch is ``[z; z]`` with labels ``[y; null]`` through
``DiT.forward_with_cfg`` (guidance on the first 3 channels, the original's), the second half
dropped at the end. What differs is where the noise comes from: DDPM step k of sample ``i``
draws ``randn(C, H, W)`` from sample i's own generator (:mod:`.seeding`, after its label and
initial noise; T draws, the last one masked out as in the original), where the original draws
the whole ``[2B, C, H, W]`` from the global RNG. The step is ``p_sample`` with that noise
(``noise_fn``), so a batch equals ``diffusion.p_sample_loop`` fed the same noise (the test
suite checks this).
DDIM with η = 0 uses no noise after the initial draw.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..diffusion import create_diffusion
from .errors import UsageError
from .sample_batch import ModelCall
from .seeding import PerSampleNoise

DIT_SAMPLERS = ("ddpm", "ddim")
DIT_DEFAULT_STEPS = 250  # sample_ddp.py's --num-sampling-steps


@dataclass(frozen=True)
class DiTSamplerConfig:
    """DiT's sampling flags (``--sampler`` added: ``ddim`` is the original's respacing
    ``ddimN``), and whether the model predicts its variance (from its weights)."""

    sampler: str = "ddpm"
    num_sampling_steps: int = DIT_DEFAULT_STEPS
    cfg_scale: float = 1.5
    learn_sigma: bool = True

    @property
    def respacing(self) -> str:
        """The ``timestep_respacing`` string the original passes to ``create_diffusion``."""
        steps = str(self.num_sampling_steps)
        return "ddim" + steps if self.sampler == "ddim" else steps

    def diffusion(self):
        """The respaced diffusion; UsageError naming the flag for step counts it cannot make."""
        if self.sampler not in DIT_SAMPLERS:
            raise UsageError(f"--sampler must be one of {', '.join(DIT_SAMPLERS)}; got "
                             f"{self.sampler!r}")
        try:
            return create_diffusion(self.respacing, learn_sigma=self.learn_sigma)
        except ValueError as error:
            raise UsageError(f"--num-sampling-steps {self.num_sampling_steps} with --sampler "
                             f"{self.sampler}: {error}") from error

    def to_dict(self) -> dict:
        return asdict(self)


class DiTOutput(ModelCall):
    """``call(x, t, y)``: the original DiT output [N, out_channels, H, W] in float32 —
    ``forward_with_cfg(x, t, y, cfg_scale)`` when ``cfg_scale > 1``, else ``predict`` (the
    original ``forward``); REPA projectors are skipped.

    ``autocast_dtype`` and ``compile`` as :class:`~.sample_batch.ModelCall` (the original runs
    in float32: the default for DiT). The diffusion calls it with integer timesteps.
    """

    def __init__(self, model: torch.nn.Module, *, cfg_scale: float, **kwargs):
        super().__init__(model, **kwargs)
        self.cfg_scale = float(cfg_scale)

    def _output(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cfg_scale > 1.0:
            return self.model.forward_with_cfg(x, t, y, self.cfg_scale).float()
        return self.model.predict(x, t, y).float()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.call(x, t, y)
        # the diffusion keeps the output past the next CUDA-graph replay
        return out.clone() if self._cudagraphs else out


def sample_dit_latents(call: DiTOutput, diffusion, latents: torch.Tensor, labels: torch.Tensor,
                       generators: Sequence[torch.Generator],
                       config: DiTSamplerConfig) -> torch.Tensor:
    """Run the configured DiT sampler on one batch; float32 samples [B, C, H, W].

    DDPM noise for row ``j`` comes from ``generators[j]`` (continuing after its initial draws);
    under guidance the unconditional half gets the same noise (the original draws it separately,
    but ``forward_with_cfg`` reads only the conditional half, so it never matters).
    """
    n = latents.shape[0]
    guided = config.cfg_scale > 1.0
    x = torch.cat([latents, latents]) if guided else latents
    y = torch.cat([labels, torch.full_like(labels, call.num_classes)]) if guided else labels
    kwargs = dict(y=y)
    noise = PerSampleNoise(generators)
    # DDIM with η = 0 multiplies its step noise by 0: a scratch stream keeps the samples' own
    # streams and the global RNG untouched
    scratch = torch.Generator(device=x.device).manual_seed(0) if config.sampler == "ddim" \
        else None

    def step_noise(x: torch.Tensor) -> torch.Tensor:
        z = noise(latents)  # each sample's own stream; the guided half shares its row's
        return torch.cat([z, z]) if guided else z

    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)  # no host copy
        if config.sampler == "ddim":
            x = diffusion.ddim_sample(call, x, t, clip_denoised=False, model_kwargs=kwargs,
                                      eta=0.0, generator=scratch)["sample"]
            continue
        # the last step's noise is drawn and masked, as the original's
        x = diffusion.p_sample(call, x, t, clip_denoised=False, model_kwargs=kwargs,
                               noise_fn=step_noise)["sample"]
    if config.sampler == "ddpm" and noise.draws != diffusion.num_timesteps:
        raise RuntimeError(f"DiT sampling drew noise {noise.draws} times for "
                           f"{diffusion.num_timesteps} steps: per-sample seeding needs updating")
    return x[:n]
