"""CLIP score of text-to-image samples against their captions, from local CLIP weights.

    CLIP score = 100 · mean_i max(cos(E_img(x_i), E_txt(c_i)), 0)

the convention of torchmetrics' ``CLIPScore`` (Hessel et al.'s CLIP-S is the same mean with the
weight 2.5 instead of 100). ``E_img`` / ``E_txt`` are ``CLIPModel.get_image_features`` /
``get_text_features`` (each tower's pooled output through its projection) of a
``transformers`` CLIP folder given by the user (nothing is downloaded); images go through its
``CLIPImageProcessor`` (resize the short side to 224 bicubic, center crop, CLIP's mean/std)
and captions through its tokenizer, truncated to the model's 77 positions. Which CLIP is used changes the number (ViT-L/14 and
ViT-B/32 are both common): the result records the folder and the model's sizes.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .errors import EvaluationInputError

CAPTIONS_KEY = "captions"  # what `generate` stores beside arr_0 for text-to-image samples
CLIP_FILES = ("config.json",)  # plus weights: model.safetensors or pytorch_model.bin


def _check_clip_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise EvaluationInputError(f"--clip-model: expected a local transformers CLIP folder "
                                   f"(config.json, weights, tokenizer and preprocessor files, "
                                   f"e.g. a download of openai/clip-vit-large-patch14); got "
                                   f"{path!r}, which is not a folder")
    missing = [name for name in CLIP_FILES if not os.path.exists(os.path.join(path, name))]
    weights = ("model.safetensors", "pytorch_model.bin")
    if not any(os.path.exists(os.path.join(path, name)) for name in weights):
        missing.append(" or ".join(weights))
    if missing:
        raise EvaluationInputError(f"--clip-model {path}: missing {', '.join(missing)}")


class CLIPScorer:
    """A local CLIP model that scores (image, caption) pairs. ``device``: where it runs."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        _check_clip_folder(path)
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
        self.path = os.path.abspath(path)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, TypeError, ValueError) as error:
            raise EvaluationInputError(f"--clip-model {path}: no usable CLIP tokenizer "
                                       f"(vocab.json and merges.txt): {error}") from None
        if os.path.exists(os.path.join(path, "preprocessor_config.json")):
            self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        else:  # CLIP's own preprocessing: the class defaults
            self.processor = CLIPImageProcessor()
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def cosines(self, images: np.ndarray, captions: Sequence[str]) -> torch.Tensor:
        """cos(E_img, E_txt) per pair, float64 [N]; ``images`` uint8 N×H×W×3."""
        if len(images) != len(captions):
            raise EvaluationInputError(f"CLIP score: {len(images)} images but {len(captions)} "
                                       f"captions")
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer(list(captions), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        # the towers' pooled outputs through their projections (what get_image_features /
        # get_text_features return; spelled out, since transformers 5 wraps them in an output)
        model = self.model
        image = model.visual_projection(
            model.vision_model(pixel_values=pixels.to(self.device)).pooler_output)
        text = model.text_projection(model.text_model(
            **{k: v.to(self.device) for k, v in tokens.items()}).pooler_output)
        image = torch.nn.functional.normalize(image.double(), dim=-1)
        text = torch.nn.functional.normalize(text.double(), dim=-1)
        return (image * text).sum(-1).cpu()

    def info(self) -> dict:
        config = self.model.config
        return {"clip_model": self.path, "projection_dim": int(config.projection_dim),
                "image_size": int(config.vision_config.image_size),
                "patch_size": int(config.vision_config.patch_size)}


def clip_score(scorer: CLIPScorer, batches: Iterator[np.ndarray], captions: Sequence[str],
               progress: Optional[Callable[[int], None]] = None) -> dict:
    """``{"clip_score": 100·mean max(cos, 0), "clip_cosine_mean": mean cos, "count": N}`` over
    the image ``batches`` paired in order with ``captions`` (exactly one caption per image)."""
    cosines, start = [], 0
    for batch in batches:
        if start + len(batch) > len(captions):
            raise EvaluationInputError(f"--captions: {len(captions)} captions for more images "
                                       f"than that; give one caption per sample")
        cosines.append(scorer.cosines(batch, captions[start:start + len(batch)]))
        start += len(batch)
        if progress is not None:
            progress(start)
    if start != len(captions):
        raise EvaluationInputError(f"--captions: {len(captions)} captions for {start} images; "
                                   f"give one caption per sample")
    if start == 0:
        raise EvaluationInputError("CLIP score: no images")
    cos = torch.cat(cosines)
    return {"clip_score": float(100.0 * cos.clamp(min=0).mean()),
            "clip_cosine_mean": float(cos.mean()), "count": start, **scorer.info()}


def read_captions(samples: str, captions: Optional[str]) -> list[str]:
    """The samples' captions: ``captions`` (a text file, one per line), else the ``captions``
    array that ``generate`` stores in the samples ``.npz``."""
    if captions is not None:
        if not os.path.isfile(captions):
            raise EvaluationInputError(f"--captions: file not found: {captions}")
        with open(captions, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    with np.load(samples) as data:  # no pickles: a str array loads without them
        if CAPTIONS_KEY not in data.files:
            raise EvaluationInputError(f"--clip-model: {samples} holds no '{CAPTIONS_KEY}' "
                                       f"array; pass --captions FILE (one caption per line, in "
                                       f"sample order)")
        return [str(c) for c in data[CAPTIONS_KEY]]
