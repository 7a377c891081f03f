"""Inputs of dataset preparation: an image folder, a zip, or an official REPA folder.

Every source lists its entries in a fixed order (sorted paths, as the official
``dataset_tools.py``) with labels from ``dataset.json`` when present, else from the sorted
top-level folder names. ``Entry.key`` is the ordinal of the entry, so keys stay the same when
some images turn out unreadable and are skipped.
"""
from __future__ import annotations

import abc
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Optional

from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


@dataclass(frozen=True)
class Entry:
    key: str                       # "00001234": the entry's ordinal
    name: str                      # path relative to the source, for reports
    label: int
    latent: Optional[str] = None   # official folders: the stored vae-sd moments file


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _labels(names: list[str], listed: Optional[dict]) -> list[int]:
    if listed:
        missing = [n for n in names if n not in listed]
        if missing:
            raise ValueError(f"dataset.json has no label for {len(missing)} images, e.g. "
                             f"{missing[:3]}")
        return [int(listed[n]) for n in names]
    tops = [n.split("/")[0] if "/" in n else "" for n in names]
    classes = {t: i for i, t in enumerate(sorted(set(tops)))}
    return [classes[t] for t in tops]


def _listed_labels(raw: Optional[bytes]) -> Optional[dict]:
    if raw is None:
        return None
    data = json.loads(raw).get("labels")
    return {name: label for name, label in data} if data else None


class Source(abc.ABC):
    """Entries plus a way to read each entry's encoded image bytes."""

    kind = ""

    def __init__(self, path: str):
        self.path = path
        self.entries: list[Entry] = []

    @abc.abstractmethod
    def read(self, entry: Entry) -> bytes:
        """The entry's file as stored (encoded image bytes)."""

    def open_image(self, entry: Entry) -> Image.Image:
        import io
        image = Image.open(io.BytesIO(self.read(entry)))
        image.load()  # decode now: truncated files fail here, not later
        return image


class FolderSource(Source):
    kind = "folder"

    def __init__(self, path: str):
        super().__init__(path)
        names = []
        for root, _, files in os.walk(path, followlinks=True):  # linked class folders too
            names += [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                      for f in files if _is_image(f)]
        names.sort()
        meta = os.path.join(path, "dataset.json")
        listed = _listed_labels(open(meta, "rb").read()) if os.path.exists(meta) else None
        self.entries = [Entry(f"{i:08d}", n, lab)
                        for i, (n, lab) in enumerate(zip(names, _labels(names, listed)))]

    def read(self, entry: Entry) -> bytes:
        with open(os.path.join(self.path, entry.name), "rb") as f:
            return f.read()


class ZipSource(Source):
    kind = "zip"

    def __init__(self, path: str):
        super().__init__(path)
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if _is_image(n))
            listed = _listed_labels(z.read("dataset.json")) if "dataset.json" in z.namelist() else None
        self.entries = [Entry(f"{i:08d}", n, lab)
                        for i, (n, lab) in enumerate(zip(names, _labels(names, listed)))]
        self._zip = None

    def read(self, entry: Entry) -> bytes:
        if self._zip is None:  # opened lazily: one handle per worker process
            self._zip = zipfile.ZipFile(self.path)
        return self._zip.read(entry.name)

    def __getstate__(self):
        return {**self.__dict__, "_zip": None}


class OfficialSource(FolderSource):
    """An official REPA preprocessed folder: ``images/`` (cropped PNGs) and ``vae-sd/``
    (moments ``.npy`` and ``dataset.json``); converted without re-encoding anything."""

    kind = "official"

    def __init__(self, path: str):
        Source.__init__(self, path)
        images_dir, latents_dir = os.path.join(path, "images"), os.path.join(path, "vae-sd")
        images = sorted(os.path.relpath(os.path.join(r, f), images_dir).replace(os.sep, "/")
                        for r, _, fs in os.walk(images_dir, followlinks=True) for f in fs if _is_image(f))
        latents = sorted(os.path.relpath(os.path.join(r, f), latents_dir).replace(os.sep, "/")
                         for r, _, fs in os.walk(latents_dir, followlinks=True) for f in fs
                         if f.endswith(".npy"))
        if len(images) != len(latents):
            raise ValueError(f"{path}: images/ has {len(images)} images but vae-sd/ has "
                             f"{len(latents)} latents; they must pair up in sorted order")
        with open(os.path.join(latents_dir, "dataset.json"), "rb") as f:
            listed = _listed_labels(f.read())
        if not listed:  # folder names here are chunk numbers, not classes
            raise ValueError(f"{latents_dir}/dataset.json has no labels; REPA trains "
                             f"class-conditionally and needs them")
        labels = _labels(latents, listed)
        self.entries = [Entry(f"{i:08d}", "images/" + n, lab, "vae-sd/" + lat)
                        for i, (n, lat, lab) in enumerate(zip(images, latents, labels))]

    def read_latent(self, entry: Entry) -> bytes:
        """The stored moments file (``.npy``, float32 [8, H/8, W/8]) as is."""
        with open(os.path.join(self.path, entry.latent), "rb") as f:
            return f.read()


def open_source(path: str) -> Source:
    """The source at ``path``: an official REPA folder, a zip, or an image folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--source {path!r} does not exist")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "images")) and os.path.isdir(os.path.join(path, "vae-sd")):
            return OfficialSource(path)
        return FolderSource(path)
    if zipfile.is_zipfile(path):
        return ZipSource(path)
    raise ValueError(f"--source must be an image folder, a .zip, or an official REPA folder "
                     f"(images/ + vae-sd/); got the file {path!r}")
