"""MMDiT (the SD3 joint text-image transformer) with REPA projectors, as in the official REPA code.

Same constructor arguments (in the same order, with the same defaults), parameter and buffer
names and forward maths as ``models/mmdit.py`` of sihyun-yu/REPA (built by its
``train_t2i.py`` as ``MMDiT(input_size=latent_size, z_dims=z_dims,
encoder_depth=args.encoder_depth)`` and called as ``model(x, t, context=context)``), so its
state dicts load with ``strict=True`` and give the same outputs. Each of ``depth`` joint blocks
runs one attention over the concatenated ``[context; image]`` tokens, each half with its own
adaLN-modulated weights; the last block's context half only feeds that attention
(``pre_only``). The width is the official "magic" ``hidden = 32·depth`` with ``depth`` heads.

Differences from the official code (where it runs, this module computes the same numbers):

* ``pos_embed_max_size`` is forced to 16 there, so the official model runs only when
  ``input_size / patch_size == 16`` (its 256 px, patch 2 setting); here the position table's
  side is the patch grid ``input_size // patch_size`` (16 in that setting), and inputs with a
  smaller grid are cropped from its centre as the official crops. ``pos_embed_max_size``,
  ``num_patches``, ``pos_embed_scaling_factor`` and ``pos_embed_offset`` are accepted and
  stored as there and, as there, change nothing.
* the context embedder: the official overwrites ``context_embedder_config`` with a hard-coded
  ``Linear(768, hidden)``; here that is the default (``context_embedder_config=None``), and a
  given config is honoured (``{"target": "torch.nn.Linear", "params": {"in_features": C,
  "out_features": hidden}}``, SD3's format, or ``"torch.nn.Identity"``); the keyword-only
  ``context_dim`` sets the text feature width C directly.
* ``qk_norm="rms"``: the official ``RMSNorm(elementwise_affine=True)`` takes its weight from
  ``torch.empty`` (uninitialised memory); here it starts at ones.
* no ``print`` of the arguments at construction.
* ``z_dims`` defaults to the tuple ``(768,)`` (the official list ``[768]`` is a shared
  mutable default) and is stored as a list.
* ``encoder_depth`` must be in ``[1, depth]`` (``ValueError`` at construction); the official
  fails at the first forward (``zs`` undefined) otherwise.
* ``dtype`` / ``device`` apply to every parameter; the official leaves the projectors and the
  SwiGLU MLPs in the default dtype and device (so its ``dtype=torch.bfloat16`` model fails
  in the forward).
* ``attn_mode`` is checked as the official asserts (a ``ValueError`` here) and, as there,
  unused: attention runs on this project's backends (``attn_backend``; ``fused_attn=False``
  is explicit softmax attention), all computing the official's SDPA maths.
* weights: as the official, PyTorch's default initialisation plus the fixed sin-cos
  ``pos_embed`` and ``randn`` registers; no Xavier, no adaLN-Zero (the official trains from
  this, so a fresh model does not output zeros).
* inputs are checked (shapes only: no device sync, no graph break under ``torch.compile``;
  ``validate_inputs=False`` skips them), with errors that name the argument:
  ``context=None`` is a ``ValueError`` (the official fails inside the context embedder), as is
  ``y`` without ``adm_in_channels`` (the official: ``AttributeError``); a 0-d ``t`` is
  broadcast over the batch.
* :meth:`MMDiT.forward_with_hidden` returns the block-``encoder_depth`` image tokens without
  running the projectors, ``forward(..., align_to=zs)`` the fused alignment loss instead of
  the projected tokens, and ``grad_checkpointing`` recomputes each joint block in the backward.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ..ops.attention import attention, requested_backend
from .embeddings import TimestepEmbedder, sincos_2d_pos_embed
from .projector import build_mlp
from .repa_head import repa_outputs
from .sit import FinalLayer, _check_positive, _ModelRegistry

ATTENTION_MODES = ("xformers", "torch", "torch-hb", "math", "debug")  # the official's choices
QK_NORMS = (None, "ln", "rms")
DEFAULT_CONTEXT_DIM = 768  # the official's hard-coded text feature width (CLIP ViT-L/14)


def modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """``x·(1 + scale) + shift`` with per-sample [N, D] factors; no shift when it is None."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps)`` over the last dimension, times ``weight`` when affine."""

    def __init__(self, dim: int, elementwise_affine: bool = False, eps: float = 1e-6,
                 device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.learnable_scale = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight.to(device=x.device, dtype=x.dtype)


def _norm(dim: int, rmsnorm: bool, dd: dict) -> nn.Module:
    """The blocks' pre-norm: LayerNorm or RMSNorm, eps 1e-6, no affine parameters."""
    if rmsnorm:
        return RMSNorm(dim, elementwise_affine=False, eps=1e-6)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **dd)


class PatchEmbed(nn.Module):
    """[N, C, H, W] -> [N, (H/p)·(W/p), D] tokens (row-major) by a stride-p convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.img_size = (img_size, img_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                              bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MMDiTTimestepEmbedder(TimestepEmbedder):
    """SiT's timestep embedder with the official MMDiT cast: the fp32 sinusoids go to ``t``'s
    dtype when ``t`` is floating, then to ``dtype`` (the image tokens') before the MLP."""

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        freq = self.positional_embedding(t, self.frequency_embedding_size)
        if t.is_floating_point():
            freq = freq.to(t.dtype)
        return self.mlp(freq.to(dtype))


class VectorEmbedder(nn.Module):
    """``Linear - SiLU - Linear`` of a pooled vector (the ``adm_in_channels`` input ``y``)."""

    def __init__(self, input_dim: int, hidden_size: int, dtype=None, device=None):
        super().__init__()
        dd = dict(dtype=dtype, device=device)
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size, **dd), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``."""

    def __init__(self, in_features: int, hidden_features: int, dtype=None, device=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, dtype=dtype, device=device)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFeedForward(nn.Module):
    """``w2(silu(w1(x)) · w3(x))`` without biases; the inner width is ⅔ of ``hidden_dim``
    rounded up to a multiple of ``multiple_of`` (LLaMA's rule, as the official)."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int,
                 ffn_dim_multiplier: Optional[float] = None, dtype=None, device=None):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * -(-hidden_dim // multiple_of)
        dd = dict(bias=False, dtype=dtype, device=device)
        self.w1 = nn.Linear(dim, hidden_dim, **dd)
        self.w2 = nn.Linear(hidden_dim, dim, **dd)
        self.w3 = nn.Linear(dim, hidden_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class SelfAttention(nn.Module):
    """The projections of one half of a joint block: ``qkv`` (with per-head ``ln_q``/``ln_k``)
    before the joint attention, ``proj`` after it (absent when ``pre_only``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, pre_only: bool = False,
                 qk_norm: Optional[str] = None, dtype=None, device=None):
        super().__init__()
        dd = dict(dtype=dtype, device=device)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pre_only = pre_only
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        if not pre_only:
            self.proj = nn.Linear(dim, dim, **dd)
        if qk_norm == "rms":
            self.ln_q = RMSNorm(self.head_dim, elementwise_affine=True, eps=1e-6, **dd)
            self.ln_k = RMSNorm(self.head_dim, elementwise_affine=True, eps=1e-6, **dd)
        elif qk_norm == "ln":
            self.ln_q = nn.LayerNorm(self.head_dim, elementwise_affine=True, eps=1e-6, **dd)
            self.ln_k = nn.LayerNorm(self.head_dim, elementwise_affine=True, eps=1e-6, **dd)
        else:
            self.ln_q = nn.Identity()
            self.ln_k = nn.Identity()

    def pre_attention(self, x: torch.Tensor):
        """``(q, k, v)``, each [B, L, heads, head_dim] (the attention op's layout)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).unbind(2)
        return self.ln_q(q), self.ln_k(k), v

    def post_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# adaLN modulation chunks, by (pre_only, scale_mod_only), in the official order.
_MODULATIONS = {
    (False, False): ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp"),
    (True, False): ("shift_msa", "scale_msa"),
    (False, True): ("scale_msa", "gate_msa", "scale_mlp", "gate_mlp"),
    (True, True): ("scale_msa",),
}


class DismantledBlock(nn.Module):
    """One half (context or image) of a joint block: adaLN-modulated pre-norm, the attention
    projections and the MLP, split around the joint attention (``pre_attention`` /
    ``post_attention``). ``pre_only``: only the pre-attention part (the last context half)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, pre_only: bool = False, rmsnorm: bool = False,
                 scale_mod_only: bool = False, swiglu: bool = False,
                 qk_norm: Optional[str] = None, dtype=None, device=None):
        super().__init__()
        dd = dict(dtype=dtype, device=device)
        self.norm1 = _norm(hidden_size, rmsnorm, dd)
        self.attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias, pre_only=pre_only,
                                  qk_norm=qk_norm, **dd)
        if not pre_only:
            self.norm2 = _norm(hidden_size, rmsnorm, dd)
            mlp_hidden = int(hidden_size * mlp_ratio)
            if swiglu:
                self.mlp = SwiGLUFeedForward(hidden_size, mlp_hidden, multiple_of=256, **dd)
            else:
                self.mlp = Mlp(hidden_size, mlp_hidden, **dd)
        self.pre_only = pre_only
        self.scale_mod_only = scale_mod_only
        self.modulations = _MODULATIONS[(pre_only, scale_mod_only)]
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, len(self.modulations) * hidden_size, **dd))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """``((q, k, v), mods)``: this half's queries, keys and values, and its modulations
        (a dict by the official names; no shifts with ``scale_mod_only``)."""
        chunks = self.adaLN_modulation(c).chunk(len(self.modulations), dim=1)
        mods = dict(zip(self.modulations, chunks))
        h = modulate(self.norm1(x), mods.get("shift_msa"), mods["scale_msa"])
        return self.attn.pre_attention(h), mods

    def post_attention(self, attn: torch.Tensor, x: torch.Tensor, mods: dict) -> torch.Tensor:
        """The residual updates after the joint attention ``attn`` [B, L, D] of this half."""
        x = x + mods["gate_msa"].unsqueeze(1) * self.attn.post_attention(attn)
        h = modulate(self.norm2(x), mods.get("shift_mlp"), mods["scale_mlp"])
        return x + mods["gate_mlp"].unsqueeze(1) * self.mlp(h)


class JointBlock(nn.Module):
    """A context half and an image half sharing one attention over ``[context; x]`` tokens.

    ``forward(context, x, c) -> (context, x)``; the context is None after a ``pre_only`` block.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 pre_only: bool, attn_backend: Optional[str] = None, **kwargs):
        super().__init__()
        self.context_block = DismantledBlock(hidden_size, num_heads, mlp_ratio,
                                             pre_only=pre_only, **kwargs)
        self.x_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, pre_only=False,
                                       **kwargs)
        self.attn_backend = requested_backend(attn_backend)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        context_qkv, context_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_mods = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(context_qkv, x_qkv))
        out = attention(q, k, v, self.attn_backend).flatten(2)  # [B, L_ctx + L_x, D]
        n = context.shape[1]
        if self.context_block.pre_only:
            context = None
        else:
            context = self.context_block.post_attention(out[:, :n], context, context_mods)
        return context, self.x_block.post_attention(out[:, n:], x, x_mods)


def _context_embedder(config: Optional[Dict], context_dim: Optional[int], hidden: int,
                      dd: dict) -> tuple[nn.Module, int]:
    """The context embedder and the context width it reads (module docstring)."""
    if config is None:
        width = DEFAULT_CONTEXT_DIM if context_dim is None else context_dim
        _check_positive("context_dim", width)
        return nn.Linear(width, hidden, **dd), width
    target = config.get("target") if isinstance(config, dict) else None
    if target == "torch.nn.Linear":
        params = dict(config.get("params", {}))
        if params.get("out_features") != hidden:
            raise ValueError(f"context_embedder_config['params']['out_features'] must be the "
                             f"hidden size {hidden} (32·depth); got {params.get('out_features')}")
        _check_positive("context_embedder_config['params']['in_features']",
                        params.get("in_features"))
        layer, width = nn.Linear(**params, **dd), params["in_features"]
    elif target == "torch.nn.Identity":
        layer, width = nn.Identity(), hidden
    else:
        raise ValueError(f"context_embedder_config must be None or a dict with target "
                         f"'torch.nn.Linear' (and params) or 'torch.nn.Identity'; got {config!r}")
    if context_dim is not None and context_dim != width:
        raise ValueError(f"context_dim must match context_embedder_config (context width "
                         f"{width}); got {context_dim}")
    return layer, width


class MMDiT(nn.Module):
    """Text-conditional MMDiT on latents ``x`` [N, C, H, W] and text tokens ``context``
    [N, L, context_dim]: ``model(x, t, context=context) -> (v, zs)``.

    ``zs[k]`` [N, T, z_dims[k]] is projector k applied to the image tokens after joint block
    ``encoder_depth`` (1-based), T = (H / patch_size)·(W / patch_size).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        depth: int = 24,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = False,
        adm_in_channels: Optional[int] = None,
        context_embedder_config: Optional[Dict] = None,
        register_length: int = 0,
        attn_mode: str = "torch",
        rmsnorm: bool = False,
        scale_mod_only: bool = False,
        swiglu: bool = False,
        out_channels: Optional[int] = None,
        pos_embed_scaling_factor: Optional[float] = None,
        pos_embed_offset: Optional[float] = None,
        pos_embed_max_size: Optional[int] = None,
        num_patches: Optional[int] = None,
        qk_norm: Optional[str] = None,
        qkv_bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
        encoder_depth: int = 8,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        *,
        context_dim: Optional[int] = None,
        fused_attn: bool = True,
        attn_backend: Optional[str] = None,
        validate_inputs: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        for name, value in [("input_size", input_size), ("patch_size", patch_size),
                            ("in_channels", in_channels), ("depth", depth),
                            ("projector_dim", projector_dim)]:
            _check_positive(name, value)
        if input_size % patch_size:
            raise ValueError(f"input_size must be a multiple of patch_size={patch_size}; "
                             f"got {input_size}")
        if not isinstance(encoder_depth, int) or not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be between 1 and depth={depth}; "
                             f"got {encoder_depth}")
        z_dims = list(z_dims)
        if any(not isinstance(z, int) or z < 0 for z in z_dims):
            raise ValueError(f"z_dims must be a list of non-negative integers; got {z_dims}")
        if not isinstance(register_length, int) or register_length < 0:
            raise ValueError(f"register_length must be a non-negative integer; "
                             f"got {register_length!r}")
        for name, value in [("adm_in_channels", adm_in_channels),
                            ("out_channels", out_channels)]:
            if value is not None:
                _check_positive(name, value)
        if attn_mode not in ATTENTION_MODES:
            raise ValueError(f"attn_mode must be one of {ATTENTION_MODES}; got {attn_mode!r}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}; got {qk_norm!r}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive; got {mlp_ratio!r}")
        dd = dict(dtype=dtype, device=device)

        # the official "magic": 32-wide heads, as many as blocks
        hidden_size = 32 * depth
        num_heads = depth
        self.dtype = dtype
        self.learn_sigma = learn_sigma
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else \
            in_channels * (2 if learn_sigma else 1)
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        self.pos_embed_scaling_factor = pos_embed_scaling_factor
        self.pos_embed_offset = pos_embed_offset
        # the official forces 16 here (see the module docstring): the patch grid's side
        self.pos_embed_max_size = input_size // patch_size
        self.attn_mode = attn_mode
        self.register_length = register_length
        self.encoder_depth = encoder_depth
        self.z_dims = z_dims
        self.validate_inputs = validate_inputs
        # recompute each joint block's activations in the backward instead of keeping them
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size,
                                     bias=True, **dd)
        self.t_embedder = MMDiTTimestepEmbedder(hidden_size).to(**dd)
        if adm_in_channels is not None:
            self.y_embedder = VectorEmbedder(adm_in_channels, hidden_size, **dd)
        self.adm_in_channels = adm_in_channels
        self.context_embedder, self.context_dim = _context_embedder(
            context_embedder_config, context_dim, hidden_size, dd)
        if register_length > 0:
            self.register = nn.Parameter(torch.randn(1, register_length, hidden_size, **dd))
        grid = self.pos_embed_max_size
        self.register_buffer("pos_embed",
                             sincos_2d_pos_embed(hidden_size, grid).unsqueeze(0).to(**dd))
        backend = attn_backend if fused_attn else "math"
        self.joint_blocks = nn.ModuleList([
            JointBlock(hidden_size, num_heads, mlp_ratio, pre_only=i == depth - 1,
                       attn_backend=backend, qkv_bias=qkv_bias, rmsnorm=rmsnorm,
                       scale_mod_only=scale_mod_only, swiglu=swiglu, qk_norm=qk_norm, **dd)
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels).to(**dd)
        self.projectors = nn.ModuleList([
            build_mlp(hidden_size, projector_dim, z).to(**dd) for z in z_dims])

    @property
    def num_patches(self) -> int:
        return self.x_embedder.num_patches

    def cropped_pos_embed(self, hw) -> torch.Tensor:
        """The [1, h·w, D] centre crop of the position table for an input of size ``hw``."""
        p, g = self.patch_size, self.pos_embed_max_size
        h, w = hw[0] // p, hw[1] // p
        if h == g and w == g:
            return self.pos_embed
        top, left = (g - h) // 2, (g - w) // 2
        table = self.pos_embed.view(1, g, g, self.hidden_size)
        return table[:, top:top + h, left:left + w].reshape(1, h * w, self.hidden_size)

    def unpatchify(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        """[N, T, p²·C] tokens -> [N, C, H, W]; ``hw`` = (H, W), square when None."""
        c, p = self.out_channels, self.patch_size
        if hw is None:
            h = w = int(x.shape[1] ** 0.5)
        else:
            h, w = hw[0] // p, hw[1] // p
        if h * w != x.shape[1]:
            raise ValueError(f"unpatchify needs {h}·{w} tokens; got {x.shape[1]}")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor],
                      context: Optional[torch.Tensor]) -> None:
        c, p, size = self.in_channels, self.patch_size, self.input_size
        if x.dim() != 4 or x.shape[1] != c or any(
                s % p or not 0 < s <= size for s in x.shape[2:]):
            raise ValueError(f"x must have shape [N, {c}, {size}, {size}] (in_channels={c}, "
                             f"input_size={size}; H and W may be smaller multiples of "
                             f"patch_size={p}); got {list(x.shape)}")
        n = x.shape[0]
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"t must have shape [{n}] (one time per sample); got {list(t.shape)}")
        if context is None:
            raise ValueError(f"context must be the text tokens [N, L, {self.context_dim}] "
                             f"(MMDiT attends over them jointly); got None")
        if context.dim() != 3 or context.shape[0] != n or context.shape[2] != self.context_dim:
            raise ValueError(f"context must have shape [{n}, L, {self.context_dim}] "
                             f"(context_dim={self.context_dim}); got {list(context.shape)}")
        if y is not None and self.adm_in_channels is None:
            raise ValueError(f"y must be None: this model has no y_embedder "
                             f"(adm_in_channels=None); got a tensor of shape {list(y.shape)}")
        if y is not None and (y.dim() != 2 or tuple(y.shape) != (n, self.adm_in_channels)):
            raise ValueError(f"y must have shape [{n}, {self.adm_in_channels}] "
                             f"(adm_in_channels={self.adm_in_channels}); got {list(y.shape)}")

    def forward_with_hidden(self, x: torch.Tensor, t: torch.Tensor,
                            y: Optional[torch.Tensor] = None,
                            context: Optional[torch.Tensor] = None, detach: bool = False):
        """``(v, h)``: the output [N, out_channels, H, W] and the image tokens [N, T, D] after
        joint block ``encoder_depth`` (detached with ``detach``), without the projectors."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.validate_inputs:
            self._check_inputs(x, t, y, context)
        hw = x.shape[-2:]
        x = self.x_embedder(x) + self.cropped_pos_embed(hw)  # [N, T, D]
        c = self.t_embedder(t, dtype=x.dtype)  # [N, D]
        if y is not None:
            c = c + self.y_embedder(y)
        context = self.context_embedder(context)  # [N, L, D]
        if self.register_length > 0:
            registers = self.register.expand(x.shape[0], -1, -1)
            context = torch.cat((registers, context), dim=1)
        hidden = x
        for i, block in enumerate(self.joint_blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                context, x = torch.utils.checkpoint.checkpoint(block, context, x, c,
                                                               use_reentrant=False)
            else:
                context, x = block(context, x, c)
            if i + 1 == self.encoder_depth:
                hidden = x.detach() if detach else x
        x = self.final_layer(x, c)  # [N, T, p²·out_channels]
        return self.unpatchify(x, hw), hidden

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, detach: bool = False, *,
                align_to: Optional[Sequence[torch.Tensor]] = None, **align_kwargs):
        """``(v, zs)`` as the official model (``detach``: the projectors see detached tokens).

        With ``align_to`` (one encoder's patch tokens [N, T', z_dims[k]] per projector):
        ``(v, proj_loss)``, the mean over encoders of the fused alignment op
        (:func:`repa_fast.ops.repa_alignment_loss`, ``align_kwargs`` passed on), as
        :meth:`repa_fast.models.SiT.forward`.
        """
        out, hidden = self.forward_with_hidden(x, t, y, context, detach)
        return out, repa_outputs(self.projectors, self.z_dims, hidden, align_to,
                                 **align_kwargs)


# name: (depth, patch_size). MMDiT-d24/2 is the official train_t2i.py model (hidden 768,
# 24 heads of 32); the d4 sizes (hidden 128, 4 heads) are not official: CPU demos and tests.
_SIZES = {f"MMDiT-d{depth}/{patch}": (depth, patch)
          for depth in (24, 12, 4) for patch in (2, 4)}


def _builder(depth: int, patch: int):
    def build(**kwargs) -> MMDiT:
        kwargs.setdefault("encoder_depth", min(8, depth))
        return MMDiT(depth=depth, patch_size=patch, **kwargs)

    build.__name__ = f"MMDiT_d{depth}_{patch}"
    build.__doc__ = (f"MMDiT-d{depth}/{patch}: depth {depth}, hidden {32 * depth}, {depth} "
                     f"heads, patch {patch}; encoder_depth defaults to {min(8, depth)}.")
    return build


MMDiT_models: dict = _ModelRegistry({name: _builder(*size) for name, size in _SIZES.items()})
