"""SiT, DiT and MMDiT models with REPA projectors, checkpoint-compatible with the official REPA
and DiT code."""
from .self_attention import Attention
from .checkpoint import (
    extract_state_dict,
    is_legacy_state_dict,
    load_legacy_checkpoints,
    load_pretrained,
    read_checkpoint,
)
from .dit import DiT, DiT_models
from .mmdit import MMDiT, MMDiT_models
from .embeddings import LabelEmbedder, TimestepEmbedder, sincos_2d_pos_embed
from .projector import REPAProjector, build_mlp
from .sit import FinalLayer, SiT, SiT_models, SiTBlock, UnknownModelError, create_model, modulate

__all__ = [
    "Attention", "DiT", "DiT_models", "FinalLayer", "REPAProjector", "LabelEmbedder", "MMDiT",
    "MMDiT_models", "SiT",
    "SiTBlock", "SiT_models",
    "TimestepEmbedder", "UnknownModelError", "build_mlp", "create_model", "extract_state_dict",
    "is_legacy_state_dict", "load_legacy_checkpoints", "load_pretrained", "modulate",
    "read_checkpoint", "sincos_2d_pos_embed",
]
