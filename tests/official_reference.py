"""Independent re-writings of official REPA code, for equality tests.

* :func:`official_forward`: the forward pass of the official SiT. It composes the building
  blocks the official ``models/sit.py`` uses (timm's ``PatchEmbed``, ``Attention`` with
  LayerNorm q/k-norm, ``Mlp`` with tanh GELU) with functional adaLN code, and reads weights from
  a state dict with the official parameter names. It shares no code with ``repa_fast.models``.
* :func:`official_t2i_euler_sampler`, :func:`official_t2i_euler_maruyama_sampler`: the official
  ``samplers_t2i.py`` step for step (its branches, float64 state and draw order), sharing no
  code with ``repa_fast.transport``.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed


def _sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _linear(sd, prefix, x):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def _projector(sd, prefix, h):
    h = F.silu(_linear(sd, prefix + ".0", h))
    h = F.silu(_linear(sd, prefix + ".2", h))
    return _linear(sd, prefix + ".4", h)


def official_forward(sd, x, t, y, *, patch_size, num_heads, encoder_depth, qk_norm=False):
    """``(output, zs)`` of the official ``SiT.forward`` in eval mode."""
    n, c_in, size, _ = x.shape
    hidden = sd["pos_embed"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    n_proj = len({k.split(".")[1] for k in sd if k.startswith("projectors.")})

    embed = PatchEmbed(size, patch_size, c_in, hidden, bias=True)
    embed.load_state_dict(_sub(sd, "x_embedder."))
    h = embed(x) + sd["pos_embed"]

    half = 128  # frequency_embedding_size 256
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(t.dtype)
    t_emb = _linear(sd, "t_embedder.mlp.2", F.silu(_linear(sd, "t_embedder.mlp.0", t_freq)))
    cond = t_emb + sd["y_embedder.embedding_table.weight"][y]

    def mod(v, shift, scale):
        return F.layer_norm(v, (hidden,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    zs = None
    for i in range(depth):
        attn = Attention(hidden, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                         norm_layer=nn.LayerNorm)
        attn.load_state_dict(_sub(sd, f"blocks.{i}.attn."))
        mlp = Mlp(hidden, int(hidden * 4), act_layer=lambda: nn.GELU(approximate="tanh"))
        mlp.load_state_dict(_sub(sd, f"blocks.{i}.mlp."))
        modulation = _linear(sd, f"blocks.{i}.adaLN_modulation.1", F.silu(cond))
        s1, sc1, g1, s2, sc2, g2 = modulation.chunk(6, -1)
        h = h + g1[:, None] * attn(mod(h, s1, sc1))
        h = h + g2[:, None] * mlp(mod(h, s2, sc2))
        if i + 1 == encoder_depth:
            zs = [_projector(sd, f"projectors.{k}", h) for k in range(n_proj)]
    shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", F.silu(cond)).chunk(2, -1)
    out = _linear(sd, "final_layer.linear", mod(h, shift, scale))
    g, p = size // patch_size, patch_size
    out = out.view(n, g, g, p, p, c_in).permute(0, 5, 1, 3, 2, 4).reshape(n, c_in, size, size)
    return out, zs


def official_keys(depth, n_projectors, qk_norm=False):
    """The state-dict keys of an official REPA SiT, in the official order."""
    keys = ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
            "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
            "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight"]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [b + "attn.qkv.weight", b + "attn.qkv.bias"]
        if qk_norm:
            keys += [b + "attn.q_norm.weight", b + "attn.q_norm.bias",
                     b + "attn.k_norm.weight", b + "attn.k_norm.bias"]
        keys += [b + "attn.proj.weight", b + "attn.proj.bias",
                 b + "mlp.fc1.weight", b + "mlp.fc1.bias", b + "mlp.fc2.weight", b + "mlp.fc2.bias",
                 b + "adaLN_modulation.1.weight", b + "adaLN_modulation.1.bias"]
    for k in range(n_projectors):
        for j in (0, 2, 4):
            keys += [f"projectors.{k}.{j}.weight", f"projectors.{k}.{j}.bias"]
    keys += ["final_layer.linear.weight", "final_layer.linear.bias",
             "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
    return keys


# ----------------------------------------------------------------- official samplers_t2i.py

def _official_score(v, x, t, path_type):
    """``get_score_from_velocity`` of the official samplers."""
    t = t.view(t.size(0), *([1] * (x.dim() - 1)))
    if path_type == "linear":
        alpha, d_alpha = 1 - t, -torch.ones_like(x)
        sigma, d_sigma = t, torch.ones_like(x)
    elif path_type == "cosine":
        alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        d_alpha, d_sigma = -math.pi / 2 * sigma, math.pi / 2 * alpha
    else:
        raise NotImplementedError(path_type)
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


def _official_t2i_call(model, x, t_value, y, y_null, guided, dtype):
    """``(velocity, model_input, time_input)`` of one official model call."""
    model_input = torch.cat([x] * 2, dim=0) if guided else x
    context = torch.cat([y, y_null], dim=0) if guided else y
    time_input = torch.ones(model_input.size(0)).to(device=x.device, dtype=torch.float64) * t_value
    v = model(model_input.to(dtype=dtype), time_input.to(dtype=dtype), context=context)[0]
    return v.to(torch.float64), model_input, time_input


def _official_cfg(d, guided, cfg_scale):
    if not guided:
        return d
    d_cond, d_uncond = d.chunk(2)
    return d_uncond + cfg_scale * (d_cond - d_uncond)


def official_t2i_euler_sampler(model, latents, y, y_null, num_steps=20, heun=False,
                               cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                               path_type="linear"):
    """The official ``samplers_t2i.euler_sampler``."""
    dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    with torch.no_grad():
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur = x_next
            guided = cfg_scale > 1.0 and t_cur <= guidance_high and t_cur >= guidance_low
            d_cur, _, _ = _official_t2i_call(model, x_cur, t_cur, y, y_null, guided, dtype)
            d_cur = _official_cfg(d_cur, guided, cfg_scale)
            x_next = x_cur + (t_next - t_cur) * d_cur
            if heun and (i < num_steps - 1):
                # the official decides the corrector's guidance at t_cur
                d_prime, _, _ = _official_t2i_call(model, x_next, t_next, y, y_null, guided,
                                                   dtype)
                d_prime = _official_cfg(d_prime, guided, cfg_scale)
                x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def official_t2i_euler_maruyama_sampler(model, latents, y, y_null, num_steps=20, heun=False,
                                        cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                                        path_type="linear"):
    """The official ``samplers_t2i.euler_maruyama_sampler`` (global-RNG ``randn_like``)."""
    dtype = latents.dtype
    t_steps = torch.linspace(1., 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.], dtype=torch.float64)])
    x_next = latents.to(torch.float64)

    def drift(x_cur, t_cur):
        guided = cfg_scale > 1.0 and t_cur <= guidance_high and t_cur >= guidance_low
        v, model_input, time_input = _official_t2i_call(model, x_cur, t_cur, y, y_null, guided,
                                                        dtype)
        s = _official_score(v, model_input, time_input, path_type)
        return _official_cfg(v - 0.5 * (2 * t_cur) * s, guided, cfg_scale)

    with torch.no_grad():
        for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
            dt = t_next - t_cur
            x_cur = x_next
            diffusion = 2 * t_cur
            eps = torch.randn_like(x_cur).to(x_cur.device)  # before the model call
            deps = eps * torch.sqrt(torch.abs(dt))
            x_next = x_cur + drift(x_cur, t_cur) * dt + torch.sqrt(diffusion) * deps
        t_cur, t_next = t_steps[-2], t_steps[-1]
        x_cur = x_next
        return x_cur + (t_next - t_cur) * drift(x_cur, t_cur)
