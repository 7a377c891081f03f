"""Timestep respacing: a diffusion on a subset of the original steps (DiT's ``respace.py``)."""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np
import torch

from .gaussian import GaussianDiffusion


def _bad_respacing(section_counts, why: str) -> ValueError:
    return ValueError(f"timestep_respacing {why}; got {section_counts!r}")


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> set:
    """The original steps to keep.

    * ``"ddimN"``: the integer stride ``s`` (the smallest that works) with
      ``len(range(0, T, s)) == N``, i.e. ``{0, s, 2s, ...}`` as in the DDIM paper;
    * ``"a,b,c"`` or ``[a, b, c]``: T split into equal sections (the first ``T mod k`` one step
      longer), each strided to its count: section of size L starting at o keeps
      ``o + round(j·(L-1)/(n-1))`` for j < n (just ``o`` when n = 1). ``"250"`` is one section.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise _bad_respacing(section_counts, "must be 'ddimN' with N an integer") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise _bad_respacing(section_counts, f"cannot take exactly that many of "
                                 f"{num_timesteps} steps with an integer stride")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise _bad_respacing(section_counts, "must be 'ddimN' or comma-separated step "
                                 "counts such as '250' or '10,10'") from None
    if not section_counts or any(count < 1 for count in section_counts):
        raise _bad_respacing(section_counts, "needs at least one section, each of at least 1 step")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise _bad_respacing(section_counts, f"cannot divide a section of {size} steps "
                                 f"into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            # Python's round (half to even) on an accumulated float: the original's index set
            steps.append(start + round(position))
            position += stride
        start += size
    return set(steps)


class SpacedDiffusion(GaussianDiffusion):
    """The diffusion on the kept steps ``use_timesteps`` of the one ``kwargs`` describe.

    Keeping steps t_0 < t_1 < ... gives β'_k = 1 - ᾱ_{t_k} / ᾱ_{t_{k-1}} (ᾱ before t_0 is 1),
    so ᾱ'_k equals the original ᾱ at t_k. Models see the original timestep t_k for index k
    (``timestep_map``), not rescaled: DiT trains with rescale_timesteps off.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        self.timestep_map = []
        last_alpha_cumprod, new_betas = 1.0, []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    # every entry point that calls the model goes through the wrapper
    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self)

    def original_timesteps(self, ts: torch.Tensor) -> torch.Tensor:
        """``timestep_map[ts]`` in ``ts``'s dtype, the map kept on ``ts``'s device after its
        first use (the original builds it from a list at every model call)."""
        key = ("timestep_map", ts.device, ts.dtype)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
            self._device_tables[key] = table
        return table[ts]


class _WrappedModel:
    """Calls ``model(x, timestep_map[t])``: respaced index → original timestep, same dtype."""

    def __init__(self, model, diffusion: SpacedDiffusion):
        self.model = model
        self.diffusion = diffusion
        self.timestep_map = diffusion.timestep_map
        self.original_num_steps = diffusion.original_num_steps

    def __call__(self, x, ts, **kwargs):
        return self.model(x, self.diffusion.original_timesteps(ts), **kwargs)
