"""Prepare a training set: ADM center crop + SD-VAE moments into WebDataset shards.

    python -m repa_fast.data.prepare --source ImageNet/train --dest data/in256 \\
        --resolution 256 --vae weights/sd-vae-ft-ema

``--source`` is an image folder (class subfolders), a zip, or an official REPA preprocessed
folder (``images/`` + ``vae-sd/``: converted as is, no VAE needed). ``--vae none`` prepares a
pixel-space set like the demo's (``repa_fast.data.demo``): the moments are ``concat(x, 0)``
with ``x = crop/127.5 - 1`` (float32 ``[2·3, H, W]``), and training models the pixels.
Images are cropped and encoded in ``--workers`` processes (default: the CPUs this process may
use, at most 8); the VAE encodes batches on the GPU when there is one. A ``--resolution``
other than 256 or 512 is prepared with a warning: the default DINOv2 encoders train at those.
Shards are published atomically, so rerunning the same command after a crash continues with
the unfinished shards. Unreadable images are skipped and listed in ``report.json``.
``index.json`` records each shard's size and CRC-32 (the loaders check them) and the range of
class labels.

The settings are recorded in ``prepare.json`` with the first finished shard; a later run with
other settings is refused while shards of the first exist (``--restart`` deletes prepare's
shards, index, report and settings in --dest, and starts over).

One run per --dest: ``.prepare.lock`` names the pid and host of the run holding it; the lock
of a run that died (``kill -9``, a crash) is taken over with a message, a live one is
refused with its pid. Worker processes exit within a second of their parent's death.
Errors are one line (``repa_fast.errors``): exit 2 for usage, 1 for the machine's.

Text-to-image sets (the official ``train_t2i.py``'s MS-COCO data, U-ViT's protocol)::

    python -m repa_fast.data.prepare --source coco/train2014 \
        --captions coco/annotations/captions_train2014.json \
        --text-encoder ckpts/clip-vit-large-patch14 --vae ckpts/sd-vae-ft-ema --dest data/coco256

crops and encodes each image of the captions file (sorted by image id, as U-ViT numbered
them) like an image set, encodes each of its captions with CLIP ViT-L/14's text model (a local
folder, :class:`~repa_fast.data.text_encoders.CLIPTextEncoder`: [77, 768] per caption) and
the empty caption once (``empty_context.npy``), and writes captioned shards
(:mod:`repa_fast.data.shards`); images without a caption are skipped and reported. A folder
already preprocessed by U-ViT's scripts (``{i}.png``, ``{i}.npy``, ``{i}_{k}.npy``, and
``empty_context.npy`` there or in its parent) given as ``--source`` is converted as is, with
no VAE or text encoder (``--captions`` then only adds the caption texts, which U-ViT does not
store). Locks, resuming, ``--restart`` and the report work as for image sets.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
import socket
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from ..errors import USAGE_AND_VALUE, UsageError, run_cli
from ..version import __version__
from .child_process import exit_with_parent, leave_signals_to_parent
from .encode import process_entry
from ..atomic_write import write_json_atomic
from .captions import empty_context_entry, npy_bytes, t2i_index_fields, write_empty_context
from .shards import (EMPTY_CONTEXT, FORMAT, FORMATS, INDEX, DataError, ShardWriter,
                     file_checksum, finished_shard, read_json, shard_name)
from .sources import CocoSource, OfficialSource, UViTSource, open_source

REPORT = "report.json"
MANIFEST = "prepare.json"   # what the shards were planned from; a resumed run must match it
LOCK = ".prepare.lock"
PIXEL_SPACE = "none"        # --vae none: no VAE, the moments are the pixels (as the demo's)
PIXEL_IDENTITY = dict(path=None, scaling_factor=1.0, latent_channels=3, fingerprint="pixel space")
ENCODER_RESOLUTIONS = (256, 512)  # what the default DINOv2 alignment encoders train at
SHARD_FILE = re.compile(r"shard-\d{6}\.(tar|json)")
TEMPORARY = re.compile(r"(shard-\d{6}\.(tar|json)|index\.json|report\.json|prepare\.json|"
                       r"empty_context\.npy)(\.\d+)?\.tmp")


def default_workers() -> int:
    """Crop/encode processes by default: the CPUs this process may run on (its affinity, which
    a batch scheduler or ``taskset`` narrows; ``os.cpu_count`` counts the whole machine), at
    most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity (macOS, Windows)
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


@dataclass
class PrepareConfig:
    source: str
    dest: str
    resolution: int = 256
    vae: Optional[str] = None
    image_format: str = "jpg"
    jpeg_quality: int = 95
    shard_size: int = 1000
    workers: int = field(default_factory=default_workers)
    vae_batch_size: int = 32
    device: str = "auto"
    max_images: Optional[int] = None
    restart: bool = False
    captions: Optional[str] = None       # MS-COCO captions JSON: a text-to-image set
    text_encoder: Optional[str] = None   # local CLIP text model folder (with --captions)
    text_batch_size: int = 64

    @property
    def pixel_space(self) -> bool:
        return self.vae is not None and self.vae.lower() == PIXEL_SPACE

    def check(self) -> None:
        if self.resolution <= 0 or self.resolution % 8:
            raise UsageError(f"--resolution must be a positive multiple of 8 (the VAE's "
                             f"downsampling; REPA uses 256 or 512); got {self.resolution}: "
                             f"give e.g. --resolution 256")
        if self.image_format not in ("jpg", "png"):
            raise UsageError(f"--image-format must be jpg or png; got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality must be in [1, 100]; got {self.jpeg_quality}: "
                             f"give e.g. --jpeg-quality 95")
        for name in ("shard_size", "vae_batch_size", "text_batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1; got "
                                 f"{getattr(self, name)}")
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0 (0: in this process); got {self.workers}")
        if self.max_images is not None and self.max_images < 1:
            raise UsageError(f"--max-images must be >= 1 (leave it out for all images); got "
                             f"{self.max_images}")


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_MISSING_VAE = ("--vae is missing: give a local SD-VAE folder (diffusers) or weights file "
                "(e.g. --vae weights/sd-vae-ft-ema), or --vae none for pixel space (no VAE: "
                "training then models the pixels, as the demo does); only an official REPA "
                "--source (images/ + vae-sd/) needs no --vae")


def pixel_moments(pixels: np.ndarray) -> np.ndarray:
    """The pixel-space "moments" of an HWC uint8 crop, as ``repa_fast.data.demo`` stores them:
    ``concat(x, 0)`` with ``x = pixels/127.5 - 1``, float32 ``[2·3, H, W]``, so
    ``sample_posterior(moments, 1, 0)`` returns ``x`` itself."""
    x = pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    return np.concatenate([x, np.zeros_like(x)])


class _Latents:
    """Moments per entry: from the VAE, or read from an official or U-ViT folder."""

    def __init__(self, config: PrepareConfig, source):
        self.source, self.vae, self.identity = source, None, None
        self.resolution = config.resolution
        if isinstance(source, OfficialSource):
            self.identity = dict(path=os.path.join(os.path.abspath(source.path), "vae-sd"),
                                 scaling_factor=0.18215, latent_channels=4,
                                 fingerprint="official REPA vae-sd files")
            return
        if isinstance(source, UViTSource):
            self.identity = dict(path=os.path.abspath(source.path), scaling_factor=0.18215,
                                 latent_channels=4, fingerprint="U-ViT MS-COCO moments files "
                                 "(Stable Diffusion autoencoder_kl.pth)")
            return
        if config.pixel_space:
            self.identity = dict(PIXEL_IDENTITY)
            return
        if config.vae is None:
            raise UsageError(_MISSING_VAE)
        from ..vae import load_vae, vae_identity
        self.vae = load_vae(config.vae, device=_device(config.device))
        self.identity = vae_identity(self.vae, config.vae)
        self.batch_size = config.vae_batch_size

    def __call__(self, done: list) -> list:
        """The ``.npy`` bytes of each entry's moments (U-ViT folders: or why they cannot be
        used, a string)."""
        if self.identity.get("fingerprint") == PIXEL_IDENTITY["fingerprint"]:
            return [_npy_bytes(pixel_moments(pixels)) for _, _, pixels in done]
        if isinstance(self.source, UViTSource):
            return [self._uvit(entry) for entry, *_ in done]
        if self.vae is None:
            return [self.source.read_latent(entry) for entry, *_ in done]
        import torch

        from ..vae import encode_moments
        pixels = torch.from_numpy(np.stack([p for _, _, p in done])).permute(0, 3, 1, 2)
        moments = encode_moments(self.vae, pixels.contiguous(), self.batch_size).numpy()
        return [_npy_bytes(m) for m in moments]

    def _uvit(self, entry):
        want = (8, self.resolution // 8, self.resolution // 8)
        try:
            data = self.source.read_latent(entry)
            moments = np.load(io.BytesIO(data))
        except (OSError, ValueError, EOFError) as error:
            return f"its moments {entry.latent} cannot be read: {error}"
        if moments.dtype != np.float32 or moments.shape != want:
            return (f"its moments {entry.latent} are {moments.dtype} {list(moments.shape)}, "
                    f"not float32 {list(want)} (--resolution {self.resolution})")
        return data


class _Contexts:
    """Captions and their text features per entry: encoded with the CLIP text model
    (``--captions`` + ``--text-encoder``), or read from a U-ViT folder; and the empty
    caption's features (``empty``)."""

    def __init__(self, config: PrepareConfig, source):
        self.source, self.encoder = source, None
        if isinstance(source, UViTSource):
            self.identity = dict(name="U-ViT MS-COCO features (CLIP ViT-L/14 text model, "
                                      "FrozenCLIPEmbedder)", path=os.path.abspath(source.path))
            empty = source.empty_context()
            while empty.ndim > 2 and empty.shape[0] == 1:
                empty = empty[0]
        else:
            from .text_encoders import CLIPTextEncoder
            self.encoder = CLIPTextEncoder(config.text_encoder, device=_device(config.device),
                                           batch_size=config.text_batch_size)
            self.identity = self.encoder.identity
            empty = self.encoder([""])[0]
        if empty.ndim != 2:
            raise UsageError(f"the empty context ({getattr(source, 'empty_path', 'encoded')}) "
                             f"is {list(empty.shape)}, not [L, D]")
        self.empty = empty

    def __call__(self, done: list) -> list:
        """``(captions, features [n, L, D])`` per entry, or why it is skipped (a string)."""
        if self.encoder is None:
            out = []
            for entry, *_ in done:
                try:
                    captions, features = self.source.read_contexts(entry)
                except (OSError, ValueError, EOFError) as error:
                    out.append(f"its caption features cannot be read: {error}")
                    continue
                if features.shape[1:] != self.empty.shape or features.dtype != self.empty.dtype:
                    out.append(f"its caption features are {features.dtype} "
                               f"{list(features.shape[1:])}, the empty context's "
                               f"{self.empty.dtype} {list(self.empty.shape)}")
                    continue
                out.append((captions, features))
            return out
        captions = [self.source.captions[entry.key] for entry, *_ in done]
        features = self.encoder([c for group in captions for c in group])
        ends = np.cumsum([len(group) for group in captions])
        return [(group, part) for group, part in zip(captions, np.split(features, ends[:-1]))]


def _shards(entries: list, size: int) -> list[list]:
    return [entries[i:i + size] for i in range(0, len(entries), size)]


def prepare(config: PrepareConfig, progress: bool = True) -> dict:
    """Run the preparation (see module doc); returns the index it wrote."""
    config.check()
    source = open_source(config.source, config.captions)
    stored = isinstance(source, (OfficialSource, UViTSource))  # moments stored: converted
    if stored and config.pixel_space:
        what = ("an official REPA folder, converted with its vae-sd/ latents" if isinstance(
            source, OfficialSource) else "a U-ViT folder, converted with its moments")
        raise UsageError(f"--vae none (pixel space) does not apply to --source "
                         f"{config.source}: it is {what}; leave --vae out to convert it, or "
                         f"give an image folder or zip for pixel space")
    if not stored and config.vae is None:
        raise UsageError(_MISSING_VAE)
    if isinstance(source, CocoSource) and not config.text_encoder:
        raise UsageError("--captions needs --text-encoder: a local folder holding CLIP "
                         "ViT-L/14's text model and tokenizer (e.g. --text-encoder "
                         "ckpts/clip-vit-large-patch14)")
    if config.text_encoder and not isinstance(source, CocoSource):
        raise UsageError(f"--text-encoder applies to --source image folders with --captions; "
                         f"--source {config.source} is "
                         + ("a U-ViT folder, whose stored features are converted as they are"
                            if isinstance(source, UViTSource) else "not captioned (no "
                            "--captions)"))
    entries = source.entries[:config.max_images] if config.max_images else source.entries
    if not entries:
        raise UsageError(f"--source {config.source!r} holds no images: give a folder of "
                         f"class subfolders, a zip of them, or an official REPA folder")
    os.makedirs(config.dest, exist_ok=True)
    plan = _shards(entries, config.shard_size)
    image_format = "png" if stored else config.image_format
    job = dict(resolution=config.resolution, image_format=image_format,
               quality=config.jpeg_quality)
    with _DestLock(config.dest):
        if config.restart:
            _restart(config.dest)
        settings = _check_manifest(config, source, len(entries), image_format)
        todo = [i for i in range(len(plan)) if finished_shard(config.dest, i) is None]
        old_index = None
        if not todo and os.path.exists(os.path.join(config.dest, INDEX)):
            try:  # nothing to encode: the VAE's identity comes from the index
                old_index = read_json(os.path.join(config.dest, INDEX), INDEX)
            except DataError:
                pass  # damaged: rewritten below
        latents = _Latents(config, source) if old_index is None else None
        contexts = _Contexts(config, source) if source.t2i and old_index is None else None
        if config.resolution not in ENCODER_RESOLUTIONS:  # said once the run goes ahead
            print(f"prepare: warning: --resolution {config.resolution}: the default DINOv2 "
                  f"alignment encoders train at 256 or 512 px; training at "
                  f"{config.resolution} px needs --enc-type/--enc-weights that take it (e.g. "
                  f"--enc-type demo)", file=sys.stderr)
        from tqdm import tqdm
        bar = tqdm(total=sum(len(plan[i]) for i in todo), unit="img", disable=not progress,
                   desc=f"preparing {len(todo)}/{len(plan)} shards", dynamic_ncols=True)
        # workers receive the source once (initializer), then only entries: a source with a
        # million entries pickled per task would cost more than the images themselves
        pool = (ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_init_worker, initargs=(source, job, os.getpid()))
                if config.workers else None)
        if pool is None:
            _init_worker(source, job)
        try:
            for i in todo:
                results = (pool.map(_work, plan[i], chunksize=16) if pool
                           else map(_work, plan[i]))
                writer = ShardWriter(config.dest, i)
                try:
                    skipped, pending = [], []
                    for entry, data, pixels, error in results:
                        bar.update(1)
                        if error is not None:
                            skipped.append(dict(key=entry.key, name=entry.name, error=error))
                            continue
                        pending.append((entry, data, pixels))
                        if len(pending) == config.vae_batch_size:
                            _flush(writer, pending, latents, contexts, image_format, skipped)
                            pending = []
                    _flush(writer, pending, latents, contexts, image_format, skipped)
                    if settings is not None:  # recorded with the first shard, not before
                        write_json_atomic(os.path.join(config.dest, MANIFEST), settings)
                        settings = None
                    writer.commit(skipped)
                except BrokenProcessPool as error:
                    writer.abort()
                    raise RuntimeError(
                        f"a worker process died while preparing {shard_name(i)} (killed for "
                        f"memory, or a decoder crashed on an image among "
                        f"{plan[i][0].name} .. {plan[i][-1].name}); finished shards are kept: "
                        f"rerun the same command to continue, with fewer --workers if memory "
                        f"ran out") from error
                except BaseException:
                    writer.abort()  # leaves no half-written shard behind
                    raise
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if settings is not None:  # finished shards of a run that recorded none
            write_json_atomic(os.path.join(config.dest, MANIFEST), settings)
        identity = latents.identity if latents else old_index["vae"]
        text_encoder = None
        if source.t2i:
            if not os.path.exists(os.path.join(config.dest, EMPTY_CONTEXT)):
                contexts = contexts or _Contexts(config, source)
                write_empty_context(config.dest, contexts.empty)
            text_encoder = contexts.identity if contexts else old_index["text_encoder"]
        return _write_index(config, source, plan, identity, image_format, text_encoder)


_WORKER: dict = {}


def _init_worker(source, job: dict, parent: Optional[int] = None) -> None:
    _WORKER.update(source=source, job=job)
    if parent is not None:  # a pool process (not the in-process path of --workers 0)
        leave_signals_to_parent()
        exit_with_parent(parent)


def _work(entry):
    return process_entry(_WORKER["source"], entry, **_WORKER["job"])


_START_OVER = ("Use the same options to continue that run, --restart to delete its shards, index "
               "and settings and start over with these, or a new --dest")


def _shard_files(dest: str) -> list[str]:
    """The finished-shard files (``shard-NNNNNN.tar`` / ``.json``) in ``dest``."""
    return sorted(n for n in os.listdir(dest) if SHARD_FILE.fullmatch(n))


def _check_manifest(config: PrepareConfig, source, count: int,
                    image_format: str) -> Optional[dict]:
    """Refuse to mix shards of a different plan into --dest (missing samples, mixed sizes).

    The settings (``prepare.json``) are recorded with the first finished shard; returns them
    when they are still to be written, None when ``prepare.json`` already holds them. A
    ``prepare.json`` with no shard beside it (a run that stopped before finishing one, e.g.
    on a usage error) binds nothing: it is replaced."""
    vae = (PIXEL_SPACE if config.pixel_space
           else os.path.abspath(config.vae) if config.vae else None)
    plan = dict(source=os.path.abspath(config.source), entries=count,
                resolution=config.resolution, image_format=image_format,
                jpeg_quality=config.jpeg_quality, shard_size=config.shard_size,
                max_images=config.max_images, vae=vae)
    if source.t2i:  # only then: the manifests of image sets stay as they were
        plan.update(captions=os.path.abspath(config.captions) if config.captions else None,
                    text_encoder=os.path.abspath(config.text_encoder) if config.text_encoder
                    else None)
    path = os.path.join(config.dest, MANIFEST)
    if not os.path.exists(path) or not _shard_files(config.dest):
        return plan
    old = read_json(path, MANIFEST,
                    f"it records the settings of the shards in --dest {config.dest}: delete it "
                    f"only if this run uses the same ones; else rerun with --restart to start "
                    f"over, or use a new --dest")
    old = old if isinstance(old, dict) else {}
    differ = [f"{k}: {old.get(k)!r} before, {v!r} now" for k, v in plan.items() if old.get(k) != v]
    if differ:
        raise UsageError(f"--dest {config.dest} holds shards prepared with other settings ("
                         + "; ".join(differ) + "). " + _START_OVER)
    return None


def _restart(dest: str) -> None:
    """``--restart``: delete the shards, shard metadata, index, report and settings of an
    earlier prepare run in ``dest`` (and their temporary files), after checking that each is
    prepare's own; anything else in ``dest`` is left alone. Refuses, deleting nothing, when a
    file under one of those names was not written by prepare."""
    names = sorted(os.listdir(dest))
    doomed = [n for n in names if TEMPORARY.fullmatch(n)]
    for name in names:
        path = os.path.join(dest, name)
        if SHARD_FILE.fullmatch(name) or name in (INDEX, REPORT, MANIFEST, EMPTY_CONTEXT):
            why = _not_ours(dest, name)
            if why:
                raise UsageError(
                    f"--restart: {path} {why}, so it is not a file of python -m "
                    f"repa_fast.data.prepare; nothing was deleted. Move it out of --dest "
                    f"{dest} (or use a new --dest) and rerun")
            doomed.append(name)
    # the index first (a set half deleted must not look complete), then the shards' metadata
    # (which makes them unfinished), the settings last: an interrupted --restart leaves no
    # finished shard without the settings it was made with
    order = {INDEX: 0, EMPTY_CONTEXT: 3, REPORT: 4, MANIFEST: 5}
    doomed.sort(key=lambda n: (order.get(n, 1 if n.endswith(".json") else 2 if
                                         n.endswith(".tar") else 3), n))
    for name in doomed:
        os.remove(os.path.join(dest, name))
    if doomed:
        print(f"prepare: --restart: deleted {len(doomed)} files of the earlier run in {dest}",
              file=sys.stderr)


def _json_dict(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _not_ours(dest: str, name: str) -> Optional[str]:
    """Why ``dest/name`` is not what prepare writes under that name; None when it is."""
    path = os.path.join(dest, name)
    if not os.path.isfile(path) or os.path.islink(path):
        return "is not a regular file"
    if name == INDEX:
        index = _json_dict(path)
        if index is None or index.get("format") not in FORMATS:
            return f"is not a data set index (format {' or '.join(FORMATS)})"
    elif name == EMPTY_CONTEXT:
        try:
            if np.load(path).ndim != 2:
                return "is not an empty context (features [L, D])"
        except (OSError, ValueError, EOFError):
            return "is not a .npy array"
    elif name == REPORT:
        report = _json_dict(path)
        if report is None or "skipped" not in report:
            return "is not a report of skipped images"
    elif name == MANIFEST:
        if not os.path.getsize(path):
            return None  # written empty by a run that died: prepare's all the same
        manifest = _json_dict(path)
        if manifest is None or not {"source", "shard_size", "resolution"} <= set(manifest):
            return "is not a record of prepare settings"
    elif name.endswith(".json"):
        meta = _json_dict(path)
        if meta is None or meta.get("shard") != name[:-len(".json")] + ".tar" \
                or "samples" not in meta:
            return "is not shard metadata"
    else:  # a shard: an uncompressed tar of {key}.{jpg,png,latent.npy,cls,txt,ctx.npy} members
        try:
            with tarfile.open(path, mode="r:") as tar:
                for _, member in zip(range(8), tar):
                    if not re.fullmatch(r"[^/]+\.(jpg|png|latent\.npy|cls|txt|ctx\.npy)",
                                        member.name):
                        return f"holds {member.name!r}, not a sample of a shard"
        except (OSError, tarfile.TarError) as error:
            return f"is not a shard (tar) file ({error})"
    return None


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux ``/proc``), to tell a live lock holder from
    a new process that reuses its pid; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    """Whether process ``pid`` of this host runs (and is the one that started at ``start``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False  # a zombie: dead, not yet reaped
    except (OSError, IndexError):
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class _DestLock:
    """One preparation per --dest at a time (two would overwrite each other's shards).

    The lock file holds the holder's pid, host and process start time, and the holder keeps
    an ``flock`` on it, which the kernel drops when the process dies however it dies. A lock
    left by a dead process (``kill -9``, a crash, a lost machine on this host) is taken
    over with a message; one held by a live process is refused, naming it. A lock written on
    another host cannot be checked from here: refused, saying which host and pid to check.
    """

    def __init__(self, dest: str):
        self.path = os.path.join(dest, LOCK)
        self.fd = None

    def __enter__(self):
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._flock(fd):
                    self._refuse(self._holder(fd), "it holds the lock")
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)  # released and deleted while we opened it: try again
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            holder = self._holder(fd)
            if holder:
                self._take_over(fd, holder)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                         start=_process_start(os.getpid()))).encode())
            self.fd = fd
        return self

    @staticmethod
    def _flock(fd: int) -> bool:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the pid check alone decides
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    @staticmethod
    def _holder(fd: int) -> dict:
        """What the lock file says about its writer; ``{}`` for an empty file. Old versions
        wrote the pid alone."""
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace").strip()
        if not text:
            return {}
        try:
            holder = json.loads(text)
            return holder if isinstance(holder, dict) else dict(pid=holder)
        except json.JSONDecodeError:
            return dict(pid=text)

    def _refuse(self, holder: dict, why: str):
        pid, host = holder.get("pid", "?"), holder.get("host") or "this host"
        raise UsageError(
            f"another prepare run is writing to this --dest (pid {pid} on {host}: {why}; lock "
            f"file {self.path}). Wait for it to finish, or stop it (kill {pid}) and rerun the "
            f"same command to continue; if no such run exists, delete {self.path}")

    def _take_over(self, fd: int, holder: dict) -> None:
        host = holder.get("host")
        if host and host != socket.gethostname():
            os.close(fd)
            self._refuse(holder, "a process on another host cannot be checked from here")
        try:
            pid = int(holder.get("pid"))
        except (TypeError, ValueError):
            pid = None
        if pid is not None and pid != os.getpid() and _alive(pid, holder.get("start")):
            os.close(fd)  # a live process that holds no flock: an older repa_fast
            self._refuse(holder, "that process is running")
        print(f"taking over the stale lock {self.path} of prepare run pid {holder.get('pid')} "
              f"({host or 'this host'}), which is no longer running; finished shards are kept",
              file=sys.stderr)

    def __exit__(self, *exc):
        try:
            os.remove(self.path)  # before the flock goes: the next run finds no stale file
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


def _flush(writer: ShardWriter, pending: list, latents: _Latents,
           contexts: Optional[_Contexts], image_format: str, skipped: list) -> None:
    """Write the ``pending`` entries' samples; those that cannot be written (stored moments
    or features that cannot be used) go to ``skipped``."""
    if not pending:
        return
    conditions = contexts(pending) if contexts is not None else [None] * len(pending)
    for (entry, data, _), latent, condition in zip(pending, latents(pending), conditions):
        problem = next((p for p in (latent, condition) if isinstance(p, str)), None)
        if problem is not None:
            skipped.append(dict(key=entry.key, name=entry.name, error=problem))
        elif contexts is None:
            writer.add(entry.key, data, image_format, latent, entry.label)
        else:
            captions, features = condition
            writer.add_captioned(entry.key, data, image_format, latent, captions,
                                 npy_bytes(features), len(captions), name=entry.name)


def _write_index(config: PrepareConfig, source, plan: list, vae: dict, image_format: str,
                 text_encoder: Optional[dict] = None) -> dict:
    shards, skipped, class_counts, captions = [], [], {}, 0
    for i in range(len(plan)):
        meta = finished_shard(config.dest, i)
        name = shard_name(i) + ".tar"
        if "checksum" in meta:
            checksum, size = meta["checksum"], meta["size"]
        else:  # finished by an older version: hashed now
            checksum, size = file_checksum(os.path.join(config.dest, name))
        shards.append(dict(name=name, num_samples=len(meta["samples"]), size=size,
                           checksum=checksum))
        skipped += meta["skipped"]
        for sample in meta["samples"]:
            if source.t2i:
                captions += sample["num_captions"]
            else:
                class_counts[sample["label"]] = class_counts.get(sample["label"], 0) + 1
    write_json_atomic(os.path.join(config.dest, REPORT),
                      dict(num_skipped=len(skipped), skipped=skipped))
    index = dict(format=FORMAT, tool=f"repa_fast {__version__}",
                 source=os.path.abspath(config.source),
                 source_kind=source.kind, resolution=config.resolution, image_format=image_format,
                 num_samples=sum(s["num_samples"] for s in shards), num_skipped=len(skipped),
                 num_classes=(max(class_counts) + 1) if class_counts else 0,
                 label_range=[min(class_counts), max(class_counts)] if class_counts else None,
                 class_counts={str(k): v for k, v in sorted(class_counts.items())},
                 vae=vae, shards=shards, report=REPORT,
                 config={k: v for k, v in asdict(config).items()
                         if k not in ("source", "dest", "restart")})
    if source.t2i:
        del index["class_counts"]
        index.update(t2i_index_fields(empty_context_entry(config.dest), text_encoder, captions))
    write_json_atomic(os.path.join(config.dest, INDEX), index)
    return index


def parse_args(argv=None) -> PrepareConfig:
    defaults = PrepareConfig(source="", dest="")
    p = argparse.ArgumentParser(prog="python -m repa_fast.data.prepare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, metavar="PATH",
                   help="image folder (class subfolders; with --captions: the MS-COCO "
                        "images), .zip, official REPA folder (images/ + vae-sd/), or U-ViT "
                        "MS-COCO features folder ({i}.png, {i}.npy, {i}_{k}.npy)")
    p.add_argument("--dest", required=True, metavar="DIR",
                   help="output folder for the shards, index.json, report.json and "
                        "prepare.json")
    p.add_argument("--resolution", type=int, metavar="PX", default=defaults.resolution,
                   help="side of the square center crop in pixels, a multiple of 8 (REPA: 256 "
                        "or 512) (default: %(default)s)")
    p.add_argument("--vae", metavar="PATH|none", default=defaults.vae,
                   help="local SD-VAE folder (diffusers) or weights file whose moments are "
                        "stored; 'none' for pixel space (no VAE: training models the pixels, "
                        "as the demo) (no default: required unless --source is an official "
                        "REPA or U-ViT folder, whose stored latents are used)")
    p.add_argument("--image-format", choices=["jpg", "png"], default=defaults.image_format,
                   help="how the crops are stored: JPEG (4:4:4) or lossless PNG "
                        "(default: %(default)s; official REPA folders keep their PNGs)")
    p.add_argument("--jpeg-quality", type=int, metavar="Q", default=defaults.jpeg_quality,
                   help="JPEG quality, 1-100 (default: %(default)s)")
    p.add_argument("--shard-size", type=int, metavar="N", default=defaults.shard_size,
                   help="samples per shard (default: %(default)s)")
    p.add_argument("--workers", type=int, metavar="N", default=defaults.workers,
                   help="crop/encode processes, 0: in this process (default: %(default)s, the "
                        "CPUs this process may use, at most 8)")
    p.add_argument("--vae-batch-size", type=int, metavar="N", default=defaults.vae_batch_size,
                   help="images per VAE encoding batch (default: %(default)s)")
    p.add_argument("--device", metavar="DEVICE", default=defaults.device,
                   help="VAE and text encoder device: auto (cuda when available, else "
                        "cpu), cuda, cuda:1, cpu, "
                        "... (default: %(default)s)")
    p.add_argument("--max-images", type=int, metavar="N", default=defaults.max_images,
                   help="prepare only the first N images of --source (default: all)")
    p.add_argument("--captions", metavar="JSON", default=defaults.captions,
                   help="MS-COCO captions file (captions_train2014.json) of the --source "
                        "images: prepares a text-to-image set (needs --text-encoder); with a "
                        "U-ViT folder as --source it only adds the caption texts (default: "
                        "none, an image set)")
    p.add_argument("--text-encoder", metavar="DIR", default=defaults.text_encoder,
                   help="local folder of CLIP ViT-L/14's text model and tokenizer "
                        "(transformers; openai/clip-vit-large-patch14) encoding the --captions "
                        "(default: none; required with --captions)")
    p.add_argument("--text-batch-size", type=int, metavar="N",
                   default=defaults.text_batch_size,
                   help="captions per text-encoder batch (default: %(default)s)")
    p.add_argument("--restart", action="store_true",
                   help="delete the shards, index, report and settings that an earlier prepare "
                        "run left in --dest (after checking they are prepare's), then start "
                        "over (default: off: continue the earlier run's unfinished shards)")
    return PrepareConfig(**{k.replace("-", "_"): v for k, v in vars(p.parse_args(argv)).items()})


def main(argv=None) -> int:
    """The command; errors are reported by :func:`repa_fast.errors.run_cli` (one line; exit 2
    for usage errors, 1 for the machine's: a --dest that cannot be written, a full disk)."""
    config = parse_args(argv)

    def body() -> int:
        index = prepare(config)
        captions = (f" with {index['num_captions']} captions" if "num_captions" in index
                    else "")
        print(f"{index['num_samples']} samples{captions} in {len(index['shards'])} shards at "
              f"{config.dest}; {index['num_skipped']} skipped (listed in "
              f"{os.path.join(config.dest, REPORT)})")
        return 0

    try:
        return run_cli(body, prog="prepare", usage=USAGE_AND_VALUE)
    except KeyboardInterrupt:
        print(f"prepare: interrupted; finished shards are kept in {config.dest}: rerun the "
              f"same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
