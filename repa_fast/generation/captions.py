"""Where a text-to-image run's captions come from: a caption file or prompts encoded by a text
encoder, or the stored features of a prepared text-to-image set (what the official
``generate_t2i.py`` does with MS-COCO's validation features).

Sample ``i`` of a run takes caption ``i mod n`` of a caption list; of a data set of N samples,
sample ``i mod N`` with its caption ``i div N`` (mod its caption count), so the first N samples
cover every image once with its first caption. The empty caption's context (classifier-free
guidance) is the data set's ``empty_context.npy``, else the encoder's features of ``""``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import UsageError


def read_caption_file(path: str) -> list[str]:
    """Captions from ``path``: a text file (one caption per non-empty line) or an MS-COCO
    captions JSON (``images`` + ``annotations``: each image's first caption, images by id,
    the official one-sample-per-validation-image protocol)."""
    if not os.path.isfile(path):
        raise UsageError(f"--captions: file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
            first = {}
            for note in data["annotations"]:
                first.setdefault(int(note["image_id"]), str(note["caption"]).strip())
            ids = sorted(int(image["id"]) for image in data["images"])
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"--captions {path}: not an MS-COCO captions JSON (images + "
                             f"annotations with image_id and caption): {error}") from None
        captions = [first[i] for i in ids if i in first]
    else:
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise UsageError(f"--captions {path}: holds no caption")
    return captions


def text_encoder_for(flag: Optional[str], recorded: Optional[dict], device, context_dim: int):
    """The text encoder of ``--text-encoder`` (``demo``, or a local CLIP folder), else the one
    the training data set's index records; its width must be the model's ``context_dim``."""
    from ..data.demo_t2i import demo_text_encoder
    from ..data.text_encoders import CLIPTextEncoder
    if flag == "demo":
        encoder = demo_text_encoder()
    elif flag is not None:
        encoder = CLIPTextEncoder(flag, device=device)
    elif recorded and recorded.get("name") == "word" and \
            recorded.get("fingerprint") == demo_text_encoder().identity["fingerprint"]:
        encoder = demo_text_encoder()
    elif recorded and recorded.get("name") == "clip-text" and \
            os.path.isdir(str(recorded.get("path"))):
        encoder = CLIPTextEncoder(recorded["path"], device=device)
    else:
        raise UsageError("--text-encoder: captions must be encoded, and the training data set's "
                         "text encoder is not found here; pass --text-encoder DIR (the local "
                         "CLIP text model the data set was prepared with) or demo")
    width = int(encoder.identity["width"])
    if width != context_dim:
        raise UsageError(f"--text-encoder: its features are {width} wide, but the model reads "
                         f"{context_dim}-wide contexts")
    return encoder


class EncodedCaptions:
    """Captions encoded on demand by ``encoder`` (a callable: list of str -> [n, L, D])."""

    def __init__(self, captions: Sequence[str], encoder, source: str,
                 empty: Optional[np.ndarray] = None):
        self.captions, self.encoder, self.source = list(captions), encoder, source
        self.empty = torch.from_numpy(np.asarray(empty if empty is not None
                                                 else encoder([""])[0], dtype=np.float32))

    def caption(self, i: int) -> str:
        return self.captions[i % len(self.captions)]

    def contexts(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.encoder([self.caption(i) for i in indices]),
                                           dtype=np.float32))

    def identity(self) -> dict:
        digest = hashlib.sha256("\n".join(self.captions).encode()).hexdigest()[:16]
        return dict(captions=self.source, count=len(self.captions), sha256=digest,
                    text_encoder=self.encoder.identity)


class DataSetCaptions:
    """The captions and stored features of a prepared text-to-image set (module doc)."""

    def __init__(self, data_dir: str, context_dim: int):
        from ..data import empty_context, read_index
        from ..data.samples import SampleTable
        index = read_index(data_dir)
        if index.get("kind") != "text-to-image":
            raise UsageError(f"--data-dir {data_dir}: not a text-to-image set (it has class "
                             f"labels, not captions)")
        width = int(index["context"]["shape"][1])
        if width != context_dim:
            raise UsageError(f"--data-dir {data_dir}: its caption features are {width} wide, "
                             f"but the model reads {context_dim}-wide contexts")
        self.data_dir, self.table, self.handles = data_dir, SampleTable(data_dir), {}
        self.empty = torch.from_numpy(empty_context(data_dir).astype(np.float32))
        self.source = os.path.abspath(data_dir)
        self._index = index

    def _where(self, i: int) -> tuple[int, int]:
        return i % len(self.table), i // len(self.table)

    def caption(self, i: int) -> str:
        j, k = self._where(i)
        texts = self.table.captions(j, self.handles)
        text = texts[k % len(texts)]
        return text if text is not None else f"(sample {self.table.key_text(j)}, caption {k})"

    def contexts(self, indices: Sequence[int]) -> torch.Tensor:
        rows = []
        for i in indices:
            j, k = self._where(i)
            _, _, (_, context) = self.table.sample(j, self.handles, lambda data, size: None,
                                                   draw=k)
            rows.append(np.asarray(context, dtype=np.float32))
        return torch.from_numpy(np.stack(rows))

    def identity(self) -> dict:
        return dict(data_dir=self.source, num_samples=len(self.table),
                    text_encoder=self._index.get("text_encoder"))

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()
