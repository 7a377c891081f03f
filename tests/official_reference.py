"""An independent forward pass of the official REPA SiT, for equality tests.

It composes the building blocks the official ``models/sit.py`` uses (timm's ``PatchEmbed``,
``Attention`` with LayerNorm q/k-norm, ``Mlp`` with tanh GELU) with functional adaLN code, and
reads weights from a state dict with the official parameter names. It shares no code with
``repa_fast.models``.
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
        s1, sc1, g1, s2, sc2, g2 = _linear(sd, f"blocks.{i}.adaLN_modulation.1", F.silu(cond)).chunk(6, -1)
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
