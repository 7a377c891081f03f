"""``load_encoder`` / ``load_encoders``: name + weights -> ready ``FrozenEncoder`` modules."""
from __future__ import annotations

import inspect
import os
import warnings
from typing import List, Mapping, Optional, Sequence, Union

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoints import read_checkpoint
from .convert import to_timm_state_dict
from .encoder import FrozenEncoder
from .preprocess import input_side
from .registry import RESOLUTIONS, EncoderSpec, get_spec

Weights = Union[str, "os.PathLike[str]"]
_TIMM_TAKES_DEVICE = "device" in inspect.signature(VisionTransformer.__init__).parameters


class RandomWeightsWarning(UserWarning):
    """An encoder was built with untrained (random) weights."""


def check_resolution(spec: EncoderSpec, resolution: int) -> None:
    """The official rules: 256 or 512 px, and 512 px only for plain DINOv2 encoders."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution: expected one of {RESOLUTIONS} for {spec.name!r} (its "
                         f"patch grid and preprocessing follow the official code), got "
                         f"{resolution!r}")
    if resolution == 512 and not spec.supports_512:
        raise ValueError(f"resolution: 512 is only supported for DINOv2 encoders "
                         f"(dinov2-vit-*), as in the official code; got name={spec.name!r}")


def build_backbone(spec: EncoderSpec, resolution: int, device=None, **overrides) -> nn.Module:
    """The timm ViT for ``spec`` at the input side its family sees; ``overrides`` go to timm
    (tests use them for small models of the same architecture)."""
    kwargs = dict(spec.timm_kwargs)
    kwargs.update(img_size=input_side(spec.family, resolution), num_classes=0)
    kwargs.update(overrides)
    if _TIMM_TAKES_DEVICE:  # built in place: on "meta" that costs no memory and no init
        return timm.create_model(spec.timm_model, pretrained=False, device=device, **kwargs)
    model = timm.create_model(spec.timm_model, pretrained=False, **kwargs)  # older timm
    return model if device is None else model.to(device)


def load_state_dict_strict(backbone: nn.Module, state_dict, spec: EncoderSpec, source: str) -> None:
    """Strict load (``assign=True`` so a meta-device backbone takes the tensors as they are)."""
    try:
        backbone.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise RuntimeError(f"weights: {source!r} does not fit {spec.name!r} "
                           f"({spec.timm_model}) after conversion: {err}") from None


def load_encoder(name: str, weights: Weights, resolution: int = 256,
                 device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None) -> FrozenEncoder:
    """Build the official ``--enc-type`` encoder ``name``.

    ``weights``: a checkpoint path in the encoder project's format (see ``convert.py``), or
    ``"random"`` for an untrained encoder (tests, demos; warns). ``dtype`` (default float32) is
    the compute dtype of the backbone; ``device`` defaults to the CPU.
    """
    spec = get_spec(name)
    check_resolution(spec, resolution)
    if dtype is None:
        dtype = torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    device = torch.device("cpu" if device is None else device)
    if isinstance(weights, str) and weights == "random":
        warnings.warn(f"{name}: weights='random' builds an UNTRAINED encoder; its features are "
                      f"meaningless for REPA. Pass the checkpoint path ({spec.url}).",
                      RandomWeightsWarning, stacklevel=2)
        backbone = build_backbone(spec, resolution, device=device)
    elif isinstance(weights, (str, os.PathLike)):
        source = os.fspath(weights)
        ckpt = read_checkpoint(source, hint=f"Get the {name} weights from {spec.url}.")
        grid = input_side(spec.family, resolution) // spec.patch_size
        state_dict = to_timm_state_dict(ckpt, spec, grid)
        # Built on the meta device (no memory, no init): the checkpoint supplies every tensor.
        backbone = build_backbone(spec, resolution, device="meta")
        load_state_dict_strict(backbone, state_dict, spec, source)
    else:
        raise ValueError(f"weights: expected a checkpoint path or 'random', got {weights!r}; "
                         f"the {name} checkpoint comes from {spec.url}")
    return FrozenEncoder(spec, backbone.to(device=device, dtype=dtype), resolution)


def load_encoders(names: Union[str, Sequence[str]],
                  weights: Union[Weights, Sequence[Weights], Mapping[str, Weights]],
                  resolution: int = 256, device=None, dtype=None) -> List[FrozenEncoder]:
    """Several encoders; ``names`` as the official comma-separated ``--enc-type``
    (``"dinov2-vit-b,mae-vit-l"``) or a list. ``weights``: ``"random"`` for all, a list in the
    same order, a ``{name: path}`` dict, or one path when there is one name."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = list(names)
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"weights: no entry for {missing} in the dict (keys: {list(weights)})")
        per_name = [weights[n] for n in names]
    elif isinstance(weights, (str, os.PathLike)):
        if weights != "random" and len(names) != 1:
            raise ValueError(f"weights: one path given for {len(names)} encoders {names}; pass "
                             "a list or a {name: path} dict")
        per_name = [weights] * len(names)
    else:
        per_name = list(weights)
        if len(per_name) != len(names):
            raise ValueError(f"weights: expected {len(names)} entries (one per name in {names}), "
                             f"got {len(per_name)}")
    return [load_encoder(n, w, resolution, device, dtype) for n, w in zip(names, per_name)]
