"""Prepare a training set: ADM center crop + SD-VAE moments into WebDataset shards.

    python -m repa_fast.data.prepare --source ImageNet/train --dest data/in256 \\
        --resolution 256 --vae weights/sd-vae-ft-ema

``--source`` is an image folder (class subfolders), a zip, or an official REPA preprocessed
folder (``images/`` + ``vae-sd/``: converted as is, no VAE needed). Images are cropped and
encoded in ``--workers`` processes; the VAE encodes batches on the GPU when there is one.
Shards are published atomically, so rerunning the same command after a crash continues with
the unfinished shards. Unreadable images are skipped and listed in ``report.json``.
``index.json`` records each shard's size and CRC-32 (the loaders check them) and the range of
class labels.

One run per --dest: ``.prepare.lock`` names the pid and host of the run holding it; the lock
of a run that died (``kill -9``, a crash) is taken over with a message, a live one is
refused with its pid. Worker processes exit within a second of their parent's death.
Errors are one line (``repa_fast.errors``): exit 2 for usage, 1 for the machine's.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import socket
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..errors import USAGE_AND_VALUE, UsageError, run_cli
from ..version import __version__
from .child_process import exit_with_parent, leave_signals_to_parent
from .encode import process_entry
from ..atomic_write import write_json_atomic
from .shards import (FORMAT, INDEX, DataError, ShardWriter, file_checksum, finished_shard,
                     read_json, shard_name)
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
        old_index = None
        if not todo and os.path.exists(os.path.join(config.dest, INDEX)):
            try:  # nothing to encode: the VAE's identity comes from the index
                old_index = read_json(os.path.join(config.dest, INDEX), INDEX)
            except DataError:
                pass  # damaged: rewritten below
        latents = _Latents(config, source) if old_index is None else None
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
        identity = latents.identity if latents else old_index["vae"]
        return _write_index(config, source, plan, identity, image_format)


_WORKER: dict = {}


def _init_worker(source, job: dict, parent: Optional[int] = None) -> None:
    _WORKER.update(source=source, job=job)
    if parent is not None:  # a pool process (not the in-process path of --workers 0)
        leave_signals_to_parent()
        exit_with_parent(parent)


def _work(entry):
    return process_entry(_WORKER["source"], entry, **_WORKER["job"])


def _read_json(directory: str, name: str) -> dict:
    return read_json(os.path.join(directory, name), name,
                     "it records the settings of the first run: delete it only if this run "
                     "uses the same ones, else use a new --dest")


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


def _flush(writer: ShardWriter, pending: list, latents: _Latents, image_format: str) -> None:
    if not pending:
        return
    for (entry, data, _), latent in zip(pending, latents(pending)):
        writer.add(entry.key, data, image_format, latent, entry.label)


def _write_index(config: PrepareConfig, source, plan: list, vae: dict, image_format: str) -> dict:
    shards, skipped, class_counts = [], [], {}
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
            class_counts[sample["label"]] = class_counts.get(sample["label"], 0) + 1
    write_json_atomic(os.path.join(config.dest, REPORT),
                      dict(num_skipped=len(skipped), skipped=skipped))
    index = dict(format=FORMAT, tool=f"repa_fast {__version__}", source=os.path.abspath(config.source),
                 source_kind=source.kind, resolution=config.resolution, image_format=image_format,
                 num_samples=sum(s["num_samples"] for s in shards), num_skipped=len(skipped),
                 num_classes=(max(class_counts) + 1) if class_counts else 0,
                 label_range=[min(class_counts), max(class_counts)] if class_counts else None,
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
    """The command; errors are reported by :func:`repa_fast.errors.run_cli` (one line; exit 2
    for usage errors, 1 for the machine's: a --dest that cannot be written, a full disk)."""
    config = parse_args(argv)

    def body() -> int:
        index = prepare(config)
        print(f"{index['num_samples']} samples in {len(index['shards'])} shards at "
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
