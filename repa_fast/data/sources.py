"""Inputs of dataset preparation: an image folder, a zip, or an official REPA folder; for
text-to-image sets an image folder with an MS-COCO captions JSON, or a folder preprocessed by
U-ViT's MS-COCO scripts.

Every source lists its entries in a fixed order (sorted paths, as the official
``dataset_tools.py``) with labels from ``dataset.json`` when present, else from the sorted
top-level folder names. ``Entry.key`` is the ordinal of the entry, so keys stay the same when
some images turn out unreadable and are skipped.

Folders are walked following symbolic links (linked class folders are common), each real
file and folder once: a file reachable through several paths (a linked folder, a link to a
file) is listed once, under the first of its paths in sorted order, and takes that path's
label. Links that lead back into a folder being walked (``fish/loop -> ../fish``,
``selfloop -> .``) or to a folder already listed are not followed, with one warning naming
them. Where the top-level folders are the classes (no labels in ``dataset.json``), a
top-level folder that is a second path to a folder already listed (``b -> a``, or ``b`` also
reached as ``a/x -> ../b``) is refused with a :class:`~repa_fast.errors.UsageError`: its
images would belong to two classes, and leaving it out would drop a class and shift the
labels of every class after it.
"""
from __future__ import annotations

import abc
import heapq
import io
import json
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import UsageError

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


def walk_files(top: str, wanted, classes: bool = False) -> list[str]:
    """Relative ``/``-separated paths of the files under ``top`` whose name ``wanted`` accepts,
    sorted, following symbolic links, each real file once (see module doc). ``classes``: the
    top-level folders define the labels, and one that is a second path to a folder already
    listed is a :class:`UsageError`, naming both paths.

    Folders are expanded in the sorted order of their paths: a heap keyed by ``path + "/"``,
    and a folder's key extends its parent's, so the pops come in the sorted order of all
    reachable paths. The first path to pop a real folder is therefore its smallest, and the
    later ones are not expanded: every real folder is walked once and loops end.
    """
    walked: dict[str, str] = {}   # real folder -> the relative path it was walked under
    found: dict[str, str] = {}    # real file -> its smallest relative path
    cut, heap = [], [("", top)]
    while heap:
        rel, path = heapq.heappop(heap)
        real = os.path.realpath(path)
        if real in walked:
            parent = os.path.realpath(os.path.dirname(path))
            loop = parent == real or parent.startswith(real.rstrip(os.sep) + os.sep)
            target = os.readlink(path) if os.path.islink(path) else real
            if classes and rel.count("/") == 1 and not loop:  # a top-level class folder
                link = f" (a link to {target})" if os.path.islink(path) else ""
                raise UsageError(
                    f"{top}: the class folder {rel[:-1]!r}{link} is a second path to the "
                    f"folder {walked[real][:-1]!r} ({real}), already listed: each of its "
                    f"images would get two labels, and leaving {rel[:-1]!r} out would drop "
                    f"its class and shift the labels of the classes after it. Make one of "
                    f"them a copy or remove it, or give the labels in dataset.json")
            cut.append(f"{rel[:-1]} -> {target} ("
                       + ("a loop back to " if loop else "the same folder as ")
                       + f"{walked[real][:-1] or '.'})")
            continue
        walked[real] = rel
        try:
            with os.scandir(path) as listing:
                items = list(listing)
        except OSError as error:  # os.walk skipped these silently; say so
            cut.append(f"{rel[:-1] or '.'} (unreadable: {error.strerror or error})")
            continue
        for item in items:
            child = rel + item.name
            try:
                is_dir = item.is_dir()  # follows links: linked class folders
            except OSError:
                is_dir = False
            if is_dir:
                heapq.heappush(heap, (child + "/", item.path))
            elif wanted(item.name):
                # only a linked file needs resolving (ImageNet: a million realpath calls)
                key = os.path.realpath(item.path) if item.is_symlink() else os.path.join(
                    real, item.name)
                found[key] = min(found.get(key, child), child)
    if cut:
        warnings.warn(f"{top}: {len(cut)} linked folder(s) not followed (each real file is "
                      f"listed once): " + "; ".join(cut), stacklevel=2)
    return sorted(found.values())


class Source(abc.ABC):
    """Entries plus a way to read each entry's encoded image bytes."""

    kind = ""

    def __init__(self, path: str):
        self.path = path
        self.entries: list[Entry] = []

    t2i = False  # a text-to-image source: captions per entry (CocoSource, UViTSource)

    @abc.abstractmethod
    def read(self, entry: Entry) -> bytes:
        """The entry's file as stored (encoded image bytes)."""

    def problem(self, entry: Entry) -> Optional[str]:
        """Why ``entry`` is skipped before its image is read (reported), or None."""
        return None

    def open_image(self, entry: Entry) -> Image.Image:
        import io
        image = Image.open(io.BytesIO(self.read(entry)))
        image.load()  # decode now: truncated files fail here, not later
        return image


class FolderSource(Source):
    kind = "folder"

    def __init__(self, path: str):
        super().__init__(path)
        meta = os.path.join(path, "dataset.json")
        listed = _listed_labels(open(meta, "rb").read()) if os.path.exists(meta) else None
        # linked class folders too, loops cut; the top-level folders are the classes unless
        # dataset.json gives the labels
        names = walk_files(path, _is_image, classes=not listed)
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
            listed = (_listed_labels(z.read("dataset.json")) if "dataset.json" in z.namelist()
                      else None)
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
        images = walk_files(images_dir, _is_image)
        latents = walk_files(latents_dir, lambda f: f.endswith(".npy"))
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


def read_coco_captions(path: str) -> tuple[list[tuple[int, str]], dict[int, list[str]]]:
    """``([(image id, file name)] sorted by id, {image id: [captions]})`` of an MS-COCO
    captions file (``captions_train2014.json``: ``images`` [{id, file_name}], ``annotations``
    [{image_id, caption}]); each image's captions in the file's order, as ``pycocotools``
    gives them (and U-ViT numbered their features)."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
        images = sorted((int(i["id"]), str(i["file_name"])) for i in data["images"])
        captions: dict[int, list[str]] = {}
        for note in data["annotations"]:
            captions.setdefault(int(note["image_id"]), []).append(str(note["caption"]))
    except FileNotFoundError:
        raise UsageError(f"--captions {path!r} does not exist: give an MS-COCO captions file "
                         f"such as annotations/captions_train2014.json") from None
    except (ValueError, KeyError, TypeError) as error:  # JSON, a missing key, a wrong type
        raise UsageError(f"--captions {path}: not an MS-COCO captions file (images [{{id, "
                         f"file_name}}], annotations [{{image_id, caption}}]): "
                         f"{type(error).__name__}: {error}") from None
    return images, captions


class CocoSource(Source):
    """MS-COCO images (``--source``, e.g. ``train2014/``) with their captions (``--captions``
    JSON): one entry per image of the JSON, sorted by image id (U-ViT's order, so entry i
    is U-ViT's ``{i}.png``); an image without captions is skipped and reported."""

    kind = "coco"
    t2i = True

    def __init__(self, path: str, captions_path: str):
        super().__init__(path)
        if not os.path.isdir(path):
            raise UsageError(f"--source {path!r} must be the folder of the MS-COCO images "
                             f"(e.g. train2014/) when --captions is given")
        images, captions = read_coco_captions(captions_path)
        self.captions_path = captions_path
        self.entries = [Entry(f"{i:08d}", name, 0) for i, (_, name) in enumerate(images)]
        self.captions = {f"{i:08d}": captions.get(image_id, [])
                         for i, (image_id, _) in enumerate(images)}
        self.uncaptioned = {k for k, c in self.captions.items() if not c}

    def __getstate__(self):  # workers need no captions (400 000 for COCO train)
        return {**self.__dict__, "captions": {}}

    def read(self, entry: Entry) -> bytes:
        with open(os.path.join(self.path, entry.name), "rb") as f:
            return f.read()

    def problem(self, entry: Entry) -> Optional[str]:
        if entry.key in self.uncaptioned:
            return f"has no caption in {self.captions_path}"
        return None


_UVIT_MOMENTS, _UVIT_CONTEXT = re.compile(r"(\d+)\.npy"), re.compile(r"(\d+)_(\d+)\.npy")
UVIT_EMPTY = "empty_context.npy"


def is_uvit_folder(path: str) -> bool:
    """Whether ``path`` is a split folder of U-ViT's MS-COCO features (``{i}.png``,
    ``{i}.npy``, ``{i}_{k}.npy``)."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return any(_UVIT_CONTEXT.fullmatch(n) for n in names) and \
        any(_UVIT_MOMENTS.fullmatch(n) for n in names)


class UViTSource(Source):
    """A split folder made by U-ViT's ``scripts/extract_mscoco_feature.py`` (with the images
    the official REPA data has): ``{i}.png`` the 256 px crop, ``{i}.npy`` its SD-VAE moments
    [8, 32, 32], ``{i}_{k}.npy`` caption k's CLIP features [77, 768]; ``empty_context.npy``
    in the folder or its parent (U-ViT's root). Converted as is: nothing is re-encoded.
    The caption texts are not in such a folder: given ``captions_path`` (the COCO JSON of the
    same split) they are taken from it, else stored as unknown (null)."""

    kind = "uvit"
    t2i = True

    def __init__(self, path: str, captions_path: Optional[str] = None):
        super().__init__(path)
        names = os.listdir(path)
        counts: dict[int, set] = {}
        moments = {int(m.group(1)) for m in map(_UVIT_MOMENTS.fullmatch, names) if m}
        for m in filter(None, map(_UVIT_CONTEXT.fullmatch, names)):
            counts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        pngs = {n for n in names if n.endswith(".png")}
        total = max(moments | set(counts)) + 1
        self.problems: dict[str, str] = {}
        self.num_captions: dict[str, int] = {}
        for i in range(total):
            key, found = f"{i:08d}", counts.get(i, set())
            self.entries.append(Entry(key, f"{i}.png", 0, f"{i}.npy"))
            self.num_captions[key] = len(found)
            missing = [n for n, ok in ((f"{i}.png", f"{i}.png" in pngs),
                                       (f"{i}.npy", i in moments),
                                       (f"{i}_0.npy", bool(found))) if not ok]
            if missing:
                self.problems[key] = f"lacks {', '.join(missing)} in {path}"
            elif found != set(range(len(found))):
                gap = min(set(range(len(found))) - found)
                self.problems[key] = f"has {len(found)} caption features but not {i}_{gap}.npy"
        self.texts: dict[str, list] = {}
        if captions_path:
            images, captions = read_coco_captions(captions_path)
            if len(images) != total:
                raise UsageError(f"--captions {captions_path} lists {len(images)} images, the "
                                 f"U-ViT folder {path} {total}: not the same split")
            for i, (image_id, _) in enumerate(images):
                key = f"{i:08d}"
                if key not in self.problems and len(captions.get(image_id, [])) != \
                        self.num_captions[key]:
                    raise UsageError(
                        f"--captions {captions_path}: image {image_id} has "
                        f"{len(captions.get(image_id, []))} captions, {path}/{i}_*.npy "
                        f"{self.num_captions[key]}: not the file these features came from")
                self.texts[key] = captions.get(image_id, [])
        candidates = [os.path.join(path, UVIT_EMPTY),
                      os.path.join(os.path.dirname(os.path.abspath(path)), UVIT_EMPTY)]
        self.empty_path = next((c for c in candidates if os.path.exists(c)), None)
        if self.empty_path is None:
            raise UsageError(f"the U-ViT folder {path} has no {UVIT_EMPTY} (looked for "
                             f"{candidates[0]} and {candidates[1]}): the empty caption's "
                             f"features, made by U-ViT's scripts/extract_empty_feature.py")

    def __getstate__(self):  # workers read images only
        return {**self.__dict__, "texts": {}}

    def read(self, entry: Entry) -> bytes:
        with open(os.path.join(self.path, entry.name), "rb") as f:
            return f.read()

    def problem(self, entry: Entry) -> Optional[str]:
        return self.problems.get(entry.key)

    def read_latent(self, entry: Entry) -> bytes:
        """The stored moments [8, h, w] as ``.npy`` bytes (a leading axis of 1 dropped)."""
        moments = np.load(os.path.join(self.path, entry.latent))
        while moments.ndim > 3 and moments.shape[0] == 1:
            moments = moments[0]
        out = io.BytesIO()
        np.save(out, np.ascontiguousarray(moments))
        return out.getvalue()

    def read_contexts(self, entry: Entry):
        """``(captions, features [n, L, D])`` of ``entry``: the texts (None where unknown)
        and its ``{i}_{k}.npy`` stacked, dtype as stored."""
        i, count = int(entry.key), self.num_captions[entry.key]
        features = [np.load(os.path.join(self.path, f"{i}_{k}.npy")) for k in range(count)]
        shapes = {f.shape for f in features}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"its caption features {self.path}/{i}_*.npy are "
                             f"{sorted(shapes)}, not all [L, D]")
        return self.texts.get(entry.key, [None] * count), np.stack(features)

    def empty_context(self):
        return np.load(self.empty_path)


def open_source(path: str, captions: Optional[str] = None) -> Source:
    """The source at ``path``: an official REPA folder, a U-ViT MS-COCO folder, a folder of
    MS-COCO images with ``captions`` (the JSON), a zip, or an image folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--source {path!r} does not exist")
    if is_uvit_folder(path):
        return UViTSource(path, captions)
    if captions:
        return CocoSource(path, captions)
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "images")) and \
                os.path.isdir(os.path.join(path, "vae-sd")):
            return OfficialSource(path)
        return FolderSource(path)
    if zipfile.is_zipfile(path):
        return ZipSource(path)
    raise ValueError(f"--source must be an image folder, a .zip, or an official REPA folder "
                     f"(images/ + vae-sd/); got the file {path!r}")
