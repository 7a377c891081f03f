"""SiT (Scalable Interpolant Transformer) with REPA projectors, as in the official REPA code.

Same constructor arguments, parameter names and function as ``models/sit.py`` of sihyun-yu/REPA,
so official checkpoints load with ``strict=True`` and give the same outputs. Differences:

* attention runs on a selectable backend (flash-attn 2/3/4, xformers, SDPA, plain math);
* SiT-S: the official configs leave ``decoder_hidden_size`` at 768 while ``hidden_size`` is
  384, so the official SiT-S cannot run a forward pass; here the final layer width follows
  ``hidden_size``;
* :meth:`SiT.forward_with_hidden` returns the block-``encoder_depth`` hidden states without
  running the projectors, and ``forward(..., align_to=zs)`` returns the fused alignment loss
  instead of the projected tokens;
* inputs are checked, with errors that name the argument.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import Mlp, PatchEmbed

from .self_attention import Attention
from .embeddings import LabelEmbedder, TimestepEmbedder, sincos_2d_pos_embed
from .projector import build_mlp
from .repa_head import repa_outputs


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x·(1 + scale) + shift``, with per-sample ``shift, scale`` [N, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on ``c`` [N, D]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 qk_norm: bool = False, fused_attn: bool = True, attn_backend: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # fused_attn=False is the official switch to explicit softmax attention.
        backend = attn_backend if fused_attn else "math"
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              backend=backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=_gelu_tanh, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1)
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map to ``patch_size² · out_channels``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


class SiT(nn.Module):
    """Class-conditional SiT on latents ``x`` [N, C, H, W]: ``model(x, t, y) -> (v, zs)``.

    ``zs[k]`` [N, T, z_dims[k]] is projector k applied to the hidden states after block
    ``encoder_depth`` (1-based), T = (input_size / patch_size)².
    """

    def __init__(
        self,
        path_type: str = "edm",
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        decoder_hidden_size: Optional[int] = None,
        encoder_depth: int = 8,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_cfg: bool = False,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        *,
        qk_norm: bool = False,
        fused_attn: bool = True,
        attn_backend: Optional[str] = None,
        validate_inputs: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        for name, value in [("input_size", input_size), ("patch_size", patch_size),
                            ("in_channels", in_channels), ("hidden_size", hidden_size),
                            ("depth", depth), ("num_heads", num_heads),
                            ("num_classes", num_classes), ("projector_dim", projector_dim)]:
            _check_positive(name, value)
        if input_size % patch_size:
            raise ValueError(f"input_size must be a multiple of patch_size={patch_size}; "
                             f"got {input_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size must be a multiple of num_heads={num_heads}; "
                             f"got {hidden_size}")
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be between 1 and depth={depth}; "
                             f"got {encoder_depth}")
        if decoder_hidden_size is not None and decoder_hidden_size != hidden_size:
            raise ValueError(f"decoder_hidden_size must equal hidden_size={hidden_size} (the final "
                             f"layer reads the last block's output); got {decoder_hidden_size}")
        z_dims = list(z_dims)
        if any(not isinstance(z, int) or z < 0 for z in z_dims):
            raise ValueError(f"z_dims must be a list of non-negative integers; got {z_dims}")
        if not 0 <= class_dropout_prob <= 1:
            raise ValueError(f"class_dropout_prob must be in [0, 1]; got {class_dropout_prob}")

        self.path_type = path_type
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.use_cfg = use_cfg
        self.num_classes = num_classes
        self.z_dims = z_dims
        self.encoder_depth = encoder_depth
        self.validate_inputs = validate_inputs
        # recompute each block's activations in the backward instead of keeping them: about
        # a third more compute for a fraction of the activation memory (large batches)
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding; a parameter (not a buffer) so the state dict matches official.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm,
                     fused_attn=fused_attn, attn_backend=attn_backend)
            for _ in range(depth)
        ])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def num_patches(self) -> int:
        return self.x_embedder.num_patches

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier linears, adaLN-Zero, zeroed output layer."""
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        grid = int(self.num_patches ** 0.5)
        self.pos_embed.data.copy_(sincos_2d_pos_embed(self.pos_embed.shape[-1], grid).unsqueeze(0))
        # Patch embedding initialised like an nn.Linear over the flattened patch.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor, patch_size: Optional[int] = None) -> torch.Tensor:
        """[N, T, p²·C] tokens -> [N, C, H, W] image, T = (H/p)·(W/p) in row-major order."""
        c = self.out_channels
        p = self.patch_size if patch_size is None else patch_size
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"unpatchify needs a square number of tokens; got {x.shape[1]}")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [N, {want[0]}, {want[1]}, {want[2]}] "
                             f"(in_channels={want[0]}, input_size={want[1]}); got {list(x.shape)}")
        n = x.shape[0]
        if t.dim() == 0:
            t = t.expand(n)
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"t must have shape [{n}] (one time per sample); got {list(t.shape)}")
        if y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"y must have shape [{n}] (one label per sample); got {list(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels; got dtype {y.dtype}")
        # Reading the label range syncs with the device: skipped under torch.compile and when
        # validate_inputs is False (the trainer checks labels at the data loader instead).
        if self.validate_inputs and not torch.compiler.is_compiling() and n > 0:
            top = self.y_embedder.embedding_table.num_embeddings - 1
            lo, hi = (int(v) for v in torch.aminmax(y))
            if lo < 0 or hi > top:
                null = " (the last one is the CFG null class)" if top == self.num_classes else ""
                raise ValueError(f"y must hold labels in [0, {top}]{null}; got values in "
                                 f"[{lo}, {hi}]")
        return t

    def _embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids=None):
        t = self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed  # [N, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # [N, D]
        return x, c

    def forward_with_hidden(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                            force_drop_ids: Optional[torch.Tensor] = None):
        """``(v, h)``: the velocity [N, C, H, W] and the hidden states [N, T, D] after block
        ``encoder_depth``, without running the projectors (for fused alignment losses)."""
        x, c = self._embed(x, t, y, force_drop_ids)
        hidden = x
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
            if i + 1 == self.encoder_depth:
                hidden = x
        x = self.final_layer(x, c)  # [N, T, p²·C]
        return self.unpatchify(x), hidden

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                return_logvar: bool = False, *, align_to: Optional[Sequence[torch.Tensor]] = None,
                force_drop_ids: Optional[torch.Tensor] = None, **align_kwargs):
        """``(v, zs)`` as the official model; ``return_logvar`` is accepted and ignored, as there.

        With ``align_to`` (one encoder's patch tokens [N, T', z_dims[k]] per projector):
        ``(v, proj_loss)``, where proj_loss is the mean over encoders of the fused alignment op
        (:func:`repa_fast.ops.repa_alignment_loss`, ``align_kwargs`` passed on) and the
        projected tokens are never materialised. Computing it inside ``forward`` keeps it under
        DDP/DeepSpeed wrappers, which only see ``forward`` calls. ``force_drop_ids`` (1 = use
        the null class) replaces the random label dropout, as in the official LabelEmbedder.
        """
        out, hidden = self.forward_with_hidden(x, t, y, force_drop_ids=force_drop_ids)
        return out, repa_outputs(self.projectors, self.z_dims, hidden, align_to, **align_kwargs)


class UnknownModelError(KeyError, ValueError):
    """Raised for a model name not in :data:`SiT_models` (both a KeyError and a ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _ModelRegistry(dict):
    def __missing__(self, name):
        raise UnknownModelError(f"model must be one of {', '.join(self)}; got {name!r}")


# name: (depth, hidden_size, num_heads); "T" (tiny) is not an official size: it is for the
# CPU demo and tests.
_CONFIGS = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
            "T": (8, 128, 2)}


def register_sizes(registry: dict, cls: type, family: str, patch_sizes: Sequence[int],
                   namespace: dict) -> None:
    """Fill ``registry`` with ``"{family}-{size}/{patch}"`` builders of ``cls`` for every size
    of :data:`_CONFIGS` (also bound as ``{family}_{size}_{patch}`` in ``namespace``, the
    module's globals, as the official ``SiT_XL_2``)."""
    def builder(depth: int, hidden: int, heads: int, patch: int):
        def build(**kwargs):
            return cls(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads,
                       **kwargs)
        return build

    for size, (depth, hidden, heads) in _CONFIGS.items():
        for patch in patch_sizes:
            build = builder(depth, hidden, heads, patch)
            build.__name__ = f"{family}_{size}_{patch}"
            build.__doc__ = (f"{family}-{size}/{patch}: depth {depth}, hidden {hidden}, "
                             f"{heads} heads.")
            registry[f"{family}-{size}/{patch}"] = build
            namespace[build.__name__] = build


SiT_models: dict = _ModelRegistry()
register_sizes(SiT_models, SiT, "SiT", (1, 2, 4, 8), globals())


def create_model(name: str, **kwargs) -> SiT:
    """``SiT_models[name](**kwargs)``, with a ``ValueError`` naming the choices for a bad name."""
    return SiT_models[name](**kwargs)
