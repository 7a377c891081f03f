"""Frozen pretrained encoders for REPA targets (the official ``--enc-type`` names).

Usage::

    enc = load_encoder("dinov2-vit-b", weights="ckpts/dinov2_vitb14_pretrain.pth")
    tokens = enc(raw_images)    # uint8 [B, 3, 256, 256] -> [B, 256, 768]

Files: ``registry`` (names -> specs), ``preprocess`` (official input transform), ``checkpoints``
(file readers), ``convert`` (checkpoint layouts -> timm), ``encoder`` (the module), ``load``.
"""
from .checkpoints import read_checkpoint
from .convert import openai_clip_to_timm, resample_pos_embed, to_timm_state_dict
from .encoder import FrozenEncoder
from .load import (
    RandomWeightsWarning,
    build_backbone,
    check_resolution,
    load_encoder,
    load_encoders,
    load_state_dict_strict,
)
from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, preprocess_raw_image
from .registry import ENCODER_NAMES, ENCODERS, EncoderSpec, get_spec

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "ENCODERS", "ENCODER_NAMES", "EncoderSpec", "FrozenEncoder",
    "IMAGENET_MEAN", "IMAGENET_STD", "RandomWeightsWarning", "build_backbone", "check_resolution",
    "get_spec", "load_encoder", "load_encoders", "load_state_dict_strict", "openai_clip_to_timm",
    "preprocess_raw_image", "read_checkpoint", "resample_pos_embed", "to_timm_state_dict",
]
