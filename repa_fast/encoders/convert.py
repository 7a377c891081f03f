"""Each project's checkpoint layout -> a timm ``VisionTransformer`` state dict at the target grid.

Layouts read (a timm-layout state dict is also accepted for every family):

* DINOv2 torch-hub ``.pth``: drop ``mask_token``; SwiGLU ``mlp.w12/w3 -> mlp.fc1/fc2`` (ViT-g);
  with registers, ``register_tokens -> reg_token`` and, because timm's register models add no
  position embedding to prefix tokens, fold the CLS one in: ``cls_token += pos_embed[:, 0]``,
  ``pos_embed = pos_embed[:, 1:]`` (exact: the hub model adds it to CLS before the blocks).
* MoCo v3: ``state_dict``; keep ``module.base_encoder.*`` minus the prefix, fix the checkpoint's
  naming bug in blocks 13/14, drop ``head`` and ``fc`` keys (official ``fix_mocov3_state_dict``).
* MAE: ``model`` (decoder keys of full checkpoints dropped). DINO: flat (or ``teacher`` with
  ``module.``/``backbone.`` prefixes). I-JEPA: ``encoder`` minus its ``module.`` prefix.
* OpenAI CLIP / open_clip: ``visual.*`` mapped onto timm names (``ln_pre -> norm_pre``,
  ``in_proj -> attn.qkv``, ...); ``visual.proj`` and the text tower are not used.

Finally ``pos_embed`` is resampled to the target grid with ``timm.layers.resample_abs_pos_embed``
(bicubic, antialiased, prefix entries untouched), as the official loaders do.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from timm.layers import resample_abs_pos_embed

from .registry import EncoderSpec

StateDict = Dict[str, torch.Tensor]


def _strip(sd: Mapping[str, Any], prefix: str) -> StateDict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _dinov2(ckpt: Mapping[str, Any], spec: EncoderSpec) -> StateDict:
    if any(k.startswith("embeddings.") for k in ckpt):
        raise ValueError("weights: this is a Hugging Face transformers DINOv2 layout; use the "
                         "torch-hub .pth or timm's safetensors (timm/vit_*_patch14_dinov2.lvd142m)")
    sd = dict(ckpt)
    sd.pop("mask_token", None)  # only used for masked training
    out: StateDict = {}
    for k, v in sd.items():
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        out[re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)] = v
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    if ("reg_token" in out) != spec.registers:
        has = "has" if "reg_token" in out else "has no"
        raise ValueError(f"weights: the checkpoint {has} register tokens but {spec.name!r} "
                         f"{'expects' if spec.registers else 'does not expect'} them; use the "
                         f"{'dinov2' if spec.registers else 'dinov2reg'}-vit-* name")
    return out


_MOCOV3_BUG = (  # (text in the key, wrong name, right name), exactly the official fixes
    ("blocks.13.norm13", "norm13", "norm1"),
    ("blocks.13.mlp.fc13", "fc13", "fc1"),
    ("blocks.14.norm14", "norm14", "norm2"),
    ("blocks.14.mlp.fc14", "fc14", "fc2"),
)


def _mocov3(ckpt: Mapping[str, Any], spec: EncoderSpec) -> StateDict:
    sd = ckpt.get("state_dict", ckpt)
    prefix = "module.base_encoder."
    if not any(k.startswith(prefix) for k in sd):
        return dict(sd)  # already a plain (timm-layout) state dict
    out: StateDict = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue  # momentum encoder, predictor
        k = k[len(prefix):]
        for text, wrong, right in _MOCOV3_BUG:
            if text in k:
                k = k.replace(wrong, right)
        if "head" not in k and k.split(".")[0] != "fc":  # projection head is not the encoder
            out[k] = v
    return out


def _mae(ckpt: Mapping[str, Any], spec: EncoderSpec) -> StateDict:
    sd = ckpt.get("model", ckpt)
    return {k: v for k, v in sd.items() if not k.startswith("decoder") and k != "mask_token"}


def _dinov1(ckpt: Mapping[str, Any], spec: EncoderSpec) -> StateDict:
    if "teacher" in ckpt:  # full training checkpoint rather than the released backbone
        sd = _strip(_strip(ckpt["teacher"], "module."), "backbone.")
        return {k: v for k, v in sd.items() if not k.startswith("head.")}
    return dict(ckpt)


def _jepa(ckpt: Mapping[str, Any], spec: EncoderSpec) -> StateDict:
    # The official loader takes the context encoder ('encoder'), not 'target_encoder'.
    return _strip(ckpt.get("encoder", ckpt), "module.")


_CLIP_TOP = {
    "conv1.weight": "patch_embed.proj.weight",
    "class_embedding": "cls_token", "positional_embedding": "pos_embed",
    "ln_pre.weight": "norm_pre.weight", "ln_pre.bias": "norm_pre.bias",
    "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias",
    "proj": None,  # projection into the joint image-text space: not part of the features
}
_CLIP_BLOCK = (  # OpenAI ResidualAttentionBlock name -> timm Block name
    ("ln_1.", "norm1."), ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"), ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
)


def _openai_clip_name(key: str) -> Optional[str]:
    block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if block:
        i, rest = block.groups()
        for old, new in _CLIP_BLOCK:
            if rest.startswith(old):
                return f"blocks.{i}.{new}{rest[len(old):]}"
    elif key in _CLIP_TOP:
        return _CLIP_TOP[key]
    raise ValueError(f"weights: unexpected CLIP visual key {'visual.' + key!r}")


def openai_clip_to_timm(visual: Mapping[str, torch.Tensor]) -> StateDict:
    """OpenAI ``VisionTransformer`` keys (``visual.`` removed) -> timm CLIP ViT keys."""
    out: StateDict = {}
    for k, v in visual.items():
        name = _openai_clip_name(k)
        if name == "cls_token":
            v = v.reshape(1, 1, -1)       # [D] -> [1, 1, D]
        elif name == "pos_embed":
            v = v.unsqueeze(0)            # [1+T, D] -> [1, 1+T, D]
        if name is not None:
            out[name] = v
    return out


def _clip(ckpt: Mapping[str, Any], spec: EncoderSpec) -> StateDict:
    sd = _strip(ckpt.get("state_dict", ckpt), "module.")
    if any(k.startswith("visual.") for k in sd):
        return openai_clip_to_timm({k[len("visual."):]: v for k, v in sd.items()
                                    if k.startswith("visual.")})
    return dict(sd)


_CONVERTERS: Dict[str, Callable[[Mapping[str, Any], EncoderSpec], StateDict]] = {
    "dinov2": _dinov2, "mocov3": _mocov3, "mae": _mae, "dinov1": _dinov1,
    "jepa": _jepa, "clip": _clip,
}


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, p + s², D] -> [1, p + grid², D]; p ∈ {0, 1} prefix entries, inferred as n - ⌊√n⌋²."""
    n = pos.shape[1]
    side = math.isqrt(n)
    prefix = n - side * side
    if prefix not in (0, 1):
        raise ValueError(f"weights: pos_embed with {n} entries is not a square grid plus 0 or 1 "
                         "prefix entries")
    return resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=prefix)


def to_timm_state_dict(ckpt: Mapping[str, Any], spec: EncoderSpec, grid: int) -> StateDict:
    """Checkpoint dict (any supported layout of ``spec.family``) -> timm state dict at ``grid``."""
    sd = _CONVERTERS[spec.family](ckpt, spec)
    out: StateDict = {}
    for k, v in sd.items():
        if k.startswith("head.") or not isinstance(v, torch.Tensor):
            continue  # classifier / projection heads are not used; skip non-tensor entries
        # Resample in float32 as the official (fp32) models do; CLIP ships fp16.
        out[k] = v.float() if v.is_floating_point() else v
    if "pos_embed" in out:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], grid)
    return out
