"""Encoder names (the official ``--enc-type`` spellings) -> architecture and checkpoint facts.

A name is ``{type}-{arch}-{config}``, as the official ``load_encoders`` splits it. Every encoder
is a timm ``VisionTransformer`` configured to match the official model:

======================  ==================================  =====  ==========  ==============
name                    timm model (+ overrides)            patch  prefix tok  tokens used
======================  ==================================  =====  ==========  ==============
dinov2-vit-{s,b,l,g}    vit_*_patch14_dinov2                14     1 (CLS)     final norm
dinov2reg-vit-{s,b,l,g} vit_*_patch14_reg4_dinov2           14     5 (CLS+4)   final norm
mocov3-vit-{s,b,l}      vit_*_patch16_224 (S: 12 heads)     16     1           final norm
dinov1-vit-b            vit_base_patch16_224                16     1           final norm
mae-vit-l               vit_large_patch16_224               16     1           no final norm
jepa-vit-h              vit_huge_patch14_224, no CLS        14     0           final norm
clip-vit-L              vit_large_patch14_clip_quickgelu    14     1           ln_pre, no ln_post
======================  ==================================  =====  ==========  ==============

At 256 px every grid is 16x16 (DINOv2 at 512 px: 32x32); see ``preprocess.py`` for the input
side each family sees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

FAMILIES = ("dinov2", "mocov3", "mae", "dinov1", "jepa", "clip")
RESOLUTIONS = (256, 512)  # the official load_encoders asserts one of these


@dataclass(frozen=True)
class EncoderSpec:
    """Static facts about one ``--enc-type`` name."""

    name: str
    family: str                # selects preprocessing and the checkpoint reader
    timm_model: str            # timm architecture name
    timm_kwargs: Tuple[Tuple[str, object], ...]  # overrides that make it match the official model
    patch_size: int
    embed_dim: int
    num_prefix_tokens: int     # CLS + registers the backbone carries (removed from the output)
    final_norm: bool           # whether the official features pass the backbone's last norm
    checkpoint: str            # file name the official code / hub uses
    url: str                   # where that file comes from
    registers: bool = False

    @property
    def supports_512(self) -> bool:
        # The official code checks ``encoder_type != 'dinov2'``, so only plain DINOv2 names
        # (not ``dinov2reg``) run at 512 px.
        return self.name.split("-")[0] == "dinov2"


_DINOV2_SIZES = {  # config letter -> (timm size word, embed dim)
    "s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536),
}
_FB = "https://dl.fbaipublicfiles.com"


def _dinov2(config: str, registers: bool) -> EncoderSpec:
    word, dim = _DINOV2_SIZES[config]
    base = f"dinov2_vit{config}14"                       # hub entry point without registers
    file = f"{base}{'_reg4' if registers else ''}_pretrain.pth"
    timm_model = f"vit_{word}_patch14_{'reg4_' if registers else ''}dinov2"
    return EncoderSpec(
        name=("dinov2reg" if registers else "dinov2") + f"-vit-{config}",
        family="dinov2", timm_model=timm_model, timm_kwargs=(),
        patch_size=14, embed_dim=dim, num_prefix_tokens=5 if registers else 1, final_norm=True,
        checkpoint=file,
        url=f"{_FB}/dinov2/{base}/{file} (torch.hub facebookresearch/dinov2 "
            f"'{base}{'_reg' if registers else ''}'), "
            f"or model.safetensors of timm/{timm_model}.lvd142m",
        registers=registers,
    )


def _mocov3(config: str) -> EncoderSpec:
    timm_model, dim, kwargs = {
        # The official MoCo v3 ViT-S has 12 heads (timm's ViT-S has 6).
        "s": ("vit_small_patch16_224", 384, (("num_heads", 12),)),
        "b": ("vit_base_patch16_224", 768, ()),
        "l": ("vit_large_patch16_224", 1024, ()),
    }[config]
    return EncoderSpec(
        name=f"mocov3-vit-{config}", family="mocov3", timm_model=timm_model, timm_kwargs=kwargs,
        patch_size=16, embed_dim=dim, num_prefix_tokens=1, final_norm=True,
        checkpoint=f"mocov3_vit{config}.pth",
        url=f"MoCo v3 ViT-{config.upper()}/16 from https://github.com/LTH14/rcg (RCG) or "
            f"https://github.com/facebookresearch/moco-v3, e.g. "
            f"{_FB}/moco-v3/vit-{config}-300ep/vit-{config}-300ep.pth.tar",
    )


def _build_registry() -> Dict[str, EncoderSpec]:
    specs = [_dinov2(c, reg) for reg in (False, True) for c in "sblg"]
    specs += [_mocov3(c) for c in "sbl"]
    specs.append(EncoderSpec(
        # The official repo imports models/dinov1.py but does not ship it. DINO's ViT-B/16 is
        # timm's ViT-B/16 (LayerNorm eps 1e-6, qkv bias); like the other CLS encoders we return
        # the final-normed tokens minus CLS, at 256 px (no resize, pos-embed resampled to 16x16).
        name="dinov1-vit-b", family="dinov1", timm_model="vit_base_patch16_224", timm_kwargs=(),
        patch_size=16, embed_dim=768, num_prefix_tokens=1, final_norm=True,
        checkpoint="dinov1_vitb.pth",
        url=f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth "
            "(https://github.com/facebookresearch/dino)",
    ))
    specs.append(EncoderSpec(
        # The official MAE forward_features skips the final norm (features straight from the
        # last block); the norm weights are still in the checkpoint.
        name="mae-vit-l", family="mae", timm_model="vit_large_patch16_224", timm_kwargs=(),
        patch_size=16, embed_dim=1024, num_prefix_tokens=1, final_norm=False,
        checkpoint="mae_vitl.pth",
        url=f"{_FB}/mae/pretrain/mae_pretrain_vit_large.pth "
            "(https://github.com/facebookresearch/mae)",
    ))
    specs.append(EncoderSpec(
        # I-JEPA: no class token, sin-cos pos-embed stored in the checkpoint, final norm applied.
        name="jepa-vit-h", family="jepa", timm_model="vit_huge_patch14_224",
        timm_kwargs=(("class_token", False), ("global_pool", ""), ("fc_norm", False)),
        patch_size=14, embed_dim=1280, num_prefix_tokens=0, final_norm=True,
        checkpoint="ijepa_vith.pth",
        url=f"{_FB}/ijepa/IN1K-vit.h.14-300e.pth.tar (https://github.com/facebookresearch/ijepa)",
    ))
    specs.append(EncoderSpec(
        # OpenAI CLIP ViT-L/14: QuickGELU, ln_pre (timm norm_pre), no patch bias; the official
        # UpdatedVisionTransformer stops after the transformer (no ln_post, no proj).
        name="clip-vit-L", family="clip", timm_model="vit_large_patch14_clip_quickgelu_224",
        timm_kwargs=(), patch_size=14, embed_dim=1024, num_prefix_tokens=1, final_norm=False,
        checkpoint="ViT-L-14.pt",
        url="https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cd"
            "b84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt (https://github.com/openai/CLIP), or the "
            "timm/open_clip weights of timm/vit_large_patch14_clip_224.openai",
    ))
    return {s.name: s for s in specs}


ENCODERS: Dict[str, EncoderSpec] = _build_registry()
ENCODER_NAMES: Tuple[str, ...] = tuple(ENCODERS)


def get_spec(name: str) -> EncoderSpec:
    """The spec for an official ``--enc-type`` name (exact spelling, e.g. ``clip-vit-L``)."""
    if not isinstance(name, str) or name not in ENCODERS:
        raise ValueError(
            f"name: unknown encoder {name!r}; expected one of: {', '.join(ENCODER_NAMES)}")
    return ENCODERS[name]
