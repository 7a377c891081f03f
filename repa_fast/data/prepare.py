"""Prepare a training set: ADM center crop + SD-VAE moments into WebDataset shards.

    python -m repa_fast.data.prepare --source ImageNet/train --dest data/in256 \\
        --resolution 256 --vae weights/sd-vae-ft-ema

``--source`` is an image folder (class subfolders), a zip, or an official REPA preprocessed
folder (``images/`` + ``vae-sd/``: converted as is, no VAE needed). Images are cropped and
encoded in ``--workers`` processes; the VAE encodes batches on the GPU when there is one.
Shards are published atomically, so rerunning the same command after a crash continues with
the unfinished shards. Unreadable images are skipped and listed in ``report.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..version import __version__
from .encode import process_entry
from ..atomic_write import write_json_atomic
from .shards import FORMAT, INDEX, ShardWriter, finished_shard, shard_name
from .sources import OfficialSource, open_source

REPORT = "report.json"
MANIFEST = "prepare.json"   # what the shards were planned from; a resumed run must match it
LOCK = ".prepare.lock"


@dataclass
class PrepareConfig:
    source: str
    dest: str
    resolution: int = 256
    vae: Optional[str] = None
    image_format: str = "jpg"
    jpeg_quality: int = 95
    shard_size: int = 1000
    workers: int = min(8, os.cpu_count() or 1)
    vae_batch_size: int = 32
    device: str = "auto"
    max_images: Optional[int] = None

    def check(self) -> None:
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE's "
                             f"downsampling; REPA uses 256 or 512); got {self.resolution}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"--image-format must be jpg or png; got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in [1, 100]; got {self.jpeg_quality}")
        for name in ("shard_size", "vae_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got "
                                 f"{getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0: in this process); got {self.workers}")


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Latents:
    """Moments per entry: from the VAE, or read from an official folder."""

    def __init__(self, config: PrepareConfig, source):
        self.source, self.vae, self.identity = source, None, None
        if isinstance(source, OfficialSource):
            self.identity = dict(path=os.path.join(os.path.abspath(source.path), "vae-sd"),
                                 scaling_factor=0.18215, latent_channels=4,
                                 fingerprint="official REPA vae-sd files")
            return
        if config.vae is None:
            raise ValueError("--vae is required (a local SD-VAE folder or file) unless --source "
                             "is an official REPA folder with vae-sd/ latents")
        from ..vae import load_vae, vae_identity
        self.vae = load_vae(config.vae, device=_device(config.device))
        self.identity = vae_identity(self.vae, config.vae)
        self.batch_size = config.vae_batch_size

    def __call__(self, done: list) -> list[bytes]:
        if self.vae is None:
            return [self.source.read_latent(entry) for entry, *_ in done]
        import torch

        from ..vae import encode_moments
        pixels = torch.from_numpy(np.stack([p for _, _, p in done])).permute(0, 3, 1, 2)
        moments = encode_moments(self.vae, pixels.contiguous(), self.batch_size).numpy()
        return [_npy_bytes(m) for m in moments]


def _shards(entries: list, size: int) -> list[list]:
    return [entries[i:i + size] for i in range(0, len(entries), size)]


def prepare(config: PrepareConfig, progress: bool = True) -> dict:
    """Run the preparation (see module doc); returns the index it wrote."""
    config.check()
    source = open_source(config.source)
    entries = source.entries[:config.max_images] if config.max_images else source.entries
    if not entries:
        raise ValueError(f"--source {config.source!r} holds no images")
    os.makedirs(config.dest, exist_ok=True)
    plan = _shards(entries, config.shard_size)
    todo = [i for i in range(len(plan)) if finished_shard(config.dest, i) is None]
    image_format = "png" if isinstance(source, OfficialSource) else config.image_format
    job = dict(resolution=config.resolution, image_format=image_format,
               quality=config.jpeg_quality)
    with _DestLock(config.dest):
        _check_manifest(config, source, len(entries), image_format)
        latents = _Latents(config, source) if todo or not os.path.exists(
            os.path.join(config.dest, INDEX)) else None
        from tqdm import tqdm
        bar = tqdm(total=sum(len(plan[i]) for i in todo), unit="img", disable=not progress,
                   desc=f"preparing {len(todo)}/{len(plan)} shards", dynamic_ncols=True)
        # workers receive the source once (initializer), then only entries: a source with a
        # million entries pickled per task would cost more than the images themselves
        pool = (ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_init_worker, initargs=(source, job))
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
                            _flush(writer, pending, latents, image_format)
                            pending = []
                    _flush(writer, pending, latents, image_format)
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
        identity = latents.identity if latents else _read_json(config.dest, INDEX)["vae"]
        return _write_index(config, source, plan, identity, image_format)


_WORKER: dict = {}


def _init_worker(source, job: dict) -> None:
    _WORKER.update(source=source, job=job)


def _work(entry):
    return process_entry(_WORKER["source"], entry, **_WORKER["job"])


def _read_json(directory: str, name: str) -> dict:
    with open(os.path.join(directory, name)) as f:
        return json.load(f)


def _check_manifest(config: PrepareConfig, source, count: int, image_format: str) -> None:
    """First run: record what the shards are planned from. Later runs: refuse to mix shards
    of a different plan into the same folder (missing samples, mixed sizes)."""
    plan = dict(source=os.path.abspath(config.source), entries=count,
                resolution=config.resolution, image_format=image_format,
                jpeg_quality=config.jpeg_quality, shard_size=config.shard_size,
                max_images=config.max_images, vae=os.path.abspath(config.vae) if config.vae else None)
    path = os.path.join(config.dest, MANIFEST)
    if not os.path.exists(path):
        write_json_atomic(path, plan)
        return
    old = _read_json(config.dest, MANIFEST)
    differ = [f"{k}: {old.get(k)!r} before, {v!r} now" for k, v in plan.items() if old.get(k) != v]
    if differ:
        raise ValueError(f"--dest {config.dest} holds shards prepared with other settings ("
                         + "; ".join(differ) + "). Use the same options to continue that run, "
                         "or a new --dest")


class _DestLock:
    """One preparation per --dest at a time (two would overwrite each other's shards)."""

    def __init__(self, dest: str):
        self.path = os.path.join(dest, LOCK)

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise ValueError(f"another prepare run is writing to this --dest ({self.path} "
                             f"exists); if none is running, delete that file") from None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return self

    def __exit__(self, *exc):
        os.remove(self.path)


def _flush(writer: ShardWriter, pending: list, latents: _Latents, image_format: str) -> None:
    if not pending:
        return
    for (entry, data, _), latent in zip(pending, latents(pending)):
        writer.add(entry.key, data, image_format, latent, entry.label)


def _write_index(config: PrepareConfig, source, plan: list, vae: dict, image_format: str) -> dict:
    shards, skipped, class_counts = [], [], {}
    for i in range(len(plan)):
        meta = finished_shard(config.dest, i)
        shards.append(dict(name=shard_name(i) + ".tar", num_samples=len(meta["samples"])))
        skipped += meta["skipped"]
        for sample in meta["samples"]:
            class_counts[sample["label"]] = class_counts.get(sample["label"], 0) + 1
    write_json_atomic(os.path.join(config.dest, REPORT),
                      dict(num_skipped=len(skipped), skipped=skipped))
    index = dict(format=FORMAT, tool=f"repa_fast {__version__}", source=os.path.abspath(config.source),
                 source_kind=source.kind, resolution=config.resolution, image_format=image_format,
                 num_samples=sum(s["num_samples"] for s in shards), num_skipped=len(skipped),
                 num_classes=(max(class_counts) + 1) if class_counts else 0,
                 class_counts={str(k): v for k, v in sorted(class_counts.items())},
                 vae=vae, shards=shards, report=REPORT,
                 config={k: v for k, v in asdict(config).items() if k not in ("source", "dest")})
    write_json_atomic(os.path.join(config.dest, INDEX), index)
    return index


def parse_args(argv=None) -> PrepareConfig:
    defaults = PrepareConfig(source="", dest="")
    p = argparse.ArgumentParser(prog="python -m repa_fast.data.prepare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="image folder, .zip, or official REPA folder")
    p.add_argument("--dest", required=True, help="output folder for shards and index.json")
    p.add_argument("--resolution", type=int, default=defaults.resolution)
    p.add_argument("--vae", help="local SD-VAE folder (diffusers) or weights file")
    p.add_argument("--image-format", choices=["jpg", "png"], default=defaults.image_format)
    p.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    p.add_argument("--shard-size", type=int, default=defaults.shard_size)
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="crop/encode processes (0: in this process)")
    p.add_argument("--vae-batch-size", type=int, default=defaults.vae_batch_size)
    p.add_argument("--device", default=defaults.device, help="VAE device: auto, cuda, cpu, ...")
    p.add_argument("--max-images", type=int, default=None)
    return PrepareConfig(**{k.replace("-", "_"): v for k, v in vars(p.parse_args(argv)).items()})


def main(argv=None) -> int:
    config = parse_args(argv)
    try:
        index = prepare(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{index['num_samples']} samples in {len(index['shards'])} shards at {config.dest}; "
          f"{index['num_skipped']} skipped (listed in {os.path.join(config.dest, REPORT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
