"""Text encoders: captions -> the text features (contexts) stored in text-to-image sets.

Both are called with a list of captions and return a float32 array [n, L, D], and describe
themselves in ``identity`` (recorded in ``index.json`` as ``text_encoder``).

* :class:`CLIPTextEncoder`: CLIP ViT-L/14's text model, as U-ViT's ``FrozenCLIPEmbedder``
  that made the official REPA MS-COCO features: ``CLIPTokenizer`` padded (and truncated) to
  77 tokens, ``CLIPTextModel`` without attention mask, its last hidden state: [n, 77, 768].
  It reads a local folder (``transformers`` ``from_pretrained(local_files_only=True)``):
  nothing is downloaded.
* :class:`WordTextEncoder`: a word-level tokenizer over a fixed vocabulary and a tiny causal
  transformer with random weights drawn from a seed, in numpy; the demo's encoder
  (:mod:`repa_fast.data.demo_t2i`: L = 16 tokens, D = 64). Deterministic, no download, no
  torch.

They live in the data layer (not ``repa_fast.encoders``, the alignment targets) because text
features, like the VAE's moments, are computed while a set is prepared, and the data layer
may import no model package but ``vae``; training and generation, which may import the data
layer, use them from here.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Optional, Sequence

import numpy as np

from ..errors import UsageError

CLIP_LENGTH = 77  # tokens: CLIP's context, padded to it as U-ViT does
CLIP_SOURCE = "https://huggingface.co/openai/clip-vit-large-patch14"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


class WordTextEncoder:
    """Word-level tokens (lower-cased ``[a-z]+`` words; unknown ones are ``<unk>``) as
    ``<bos> words <eos>``, truncated and padded with ``<pad>`` to ``length``; then token plus
    position embeddings and ``layers`` pre-norm blocks of causal single-head attention and a
    tanh MLP, a final layer norm: [n, length, width] float32. Weights are drawn from
    ``numpy.random.default_rng(seed)``; every position after the caption attends to all of
    it (causal, as CLIP), so different captions give different contexts everywhere."""

    def __init__(self, vocabulary: Sequence[str], length: int = 16, width: int = 64,
                 layers: int = 2, seed: int = 0):
        words = [w.lower() for w in vocabulary]
        if length < 2 or width < 1 or layers < 0:
            raise ValueError(f"length >= 2, width >= 1 and layers >= 0 needed; got {length}, "
                             f"{width}, {layers}")
        self.tokens = [PAD, BOS, EOS, UNK] + sorted(set(words))
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.length, self.width, self.layers, self.seed = length, width, layers, seed
        rng = np.random.default_rng(seed)
        scale = 1 / np.sqrt(width)
        self.embed = rng.normal(size=(len(self.tokens), width))
        self.position = rng.normal(size=(length, width)) * 0.5
        self.blocks = [dict(q=rng.normal(size=(width, width)) * scale,
                            k=rng.normal(size=(width, width)) * scale,
                            v=rng.normal(size=(width, width)) * scale,
                            o=rng.normal(size=(width, width)) * scale,
                            up=rng.normal(size=(width, 2 * width)) * scale,
                            down=rng.normal(size=(2 * width, width)) * scale / np.sqrt(2))
                       for _ in range(layers)]
        digest = hashlib.sha256(" ".join(self.tokens).encode()).hexdigest()[:16]
        self.identity = dict(name="word", length=length, width=width, layers=layers, seed=seed,
                             vocabulary=self.tokens[4:], fingerprint=digest)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """int64 token ids [n, length]."""
        out = np.full((len(texts), self.length), self.ids[PAD], dtype=np.int64)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z]+", text.lower())[:self.length - 2]
            ids = [self.ids[BOS]] + [self.ids.get(w, self.ids[UNK]) for w in words] + \
                [self.ids[EOS]]
            out[row, :len(ids)] = ids
        return out

    @staticmethod
    def _norm(x: np.ndarray) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Contexts float32 [len(texts), length, width]."""
        x = self.embed[self.tokenize(texts)] + self.position
        future = np.triu(np.ones((self.length, self.length), dtype=bool), 1)
        for block in self.blocks:
            h = self._norm(x)
            q, k, v = h @ block["q"], h @ block["k"], h @ block["v"]
            scores = np.where(future, -np.inf, q @ k.transpose(0, 2, 1) / np.sqrt(self.width))
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            x = x + (weights / weights.sum(-1, keepdims=True)) @ v @ block["o"]
            x = x + np.tanh(self._norm(x) @ block["up"]) @ block["down"]
        return self._norm(x).astype(np.float32)


def _clip_files_problem(folder: str) -> Optional[str]:
    """What a CLIP text model folder lacks (naming the file), or None."""
    if not os.path.isdir(folder):
        return f"the text encoder folder {folder!r} does not exist"
    names = set(os.listdir(folder))
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
    if "config.json" not in names:
        return f"{os.path.join(folder, 'config.json')} is missing"
    if not names & set(weights):
        return (f"{os.path.join(folder, 'model.safetensors')} is missing (or "
                f"pytorch_model.bin): the text model's weights")
    if "tokenizer.json" not in names:
        for name in ("vocab.json", "merges.txt"):
            if name not in names:
                return (f"{os.path.join(folder, name)} is missing (the tokenizer needs "
                        f"vocab.json and merges.txt, or tokenizer.json)")
    return None


class CLIPTextEncoder:
    """CLIP's text model from the local folder ``folder`` (a ``transformers`` save:
    ``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, and the tokenizer's
    ``vocab.json`` + ``merges.txt`` or ``tokenizer.json``; the official one is
    openai/clip-vit-large-patch14). A missing folder or file is a
    :class:`~repa_fast.errors.UsageError` naming it. Encodes as U-ViT did (module doc),
    ``batch_size`` captions at a time on ``device``."""

    def __init__(self, folder: str, device="cpu", batch_size: int = 64,
                 max_length: int = CLIP_LENGTH):
        problem = _clip_files_problem(folder)
        if problem:
            raise UsageError(f"--text-encoder: {problem}. Give a local folder holding CLIP "
                             f"ViT-L/14's text model and tokenizer (save {CLIP_SOURCE} there; "
                             f"nothing is downloaded)")
        try:
            import torch
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as error:
            raise UsageError(f"the CLIP text encoder needs transformers: pip install "
                             f"transformers ({error})") from None
        self.torch, self.device, self.batch_size = torch, torch.device(device), batch_size
        self.max_length = max_length
        from transformers.utils import logging
        verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()  # the vision half of a full CLIP folder is not loaded:
        logging.disable_progress_bar()  # expected, not worth a table of unused weights
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = CLIPTextModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise UsageError(f"--text-encoder {folder}: cannot load a CLIP text model and "
                             f"tokenizer from it ({error})") from None
        finally:
            logging.set_verbosity(verbosity)
            if bar:
                logging.enable_progress_bar()
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        weight = self.model.get_input_embeddings().weight.detach().float().cpu()
        self.identity = dict(
            name="clip-text", path=os.path.abspath(folder), max_length=max_length,
            width=int(self.model.config.hidden_size),
            fingerprint=hashlib.sha256(weight[:64].contiguous().numpy().tobytes()).hexdigest()[
                :16])

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Contexts float32 [len(texts), max_length, hidden size]."""
        out = []
        with self.torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start:start + self.batch_size]),
                                        truncation=True, max_length=self.max_length,
                                        padding="max_length", return_tensors="pt")
                hidden = self.model(input_ids=tokens["input_ids"].to(self.device))
                out.append(hidden.last_hidden_state.float().cpu().numpy())
        width = int(self.model.config.hidden_size)
        return np.concatenate(out) if out else np.zeros((0, self.max_length, width), np.float32)
