"""The prepared-dataset format: WebDataset tar shards plus an index.

Each sample ``{key}`` is three tar members (WebDataset convention: same stem, different
extensions)::

    {key}.jpg | {key}.png    the center-cropped image (RGB)
    {key}.latent.npy         float32 [2·C, H/8, W/8] SD-VAE moments, concat(mean, std)
    {key}.cls                the class index, ASCII

``shard-NNNNNN.tar`` is written as ``.tar.tmp`` and renamed when complete, together with
``shard-NNNNNN.json`` (its samples, their byte offsets inside the tar, and the inputs that
were skipped), so a crash never leaves a half-written shard that looks finished and a
restarted run skips the shards that are. ``index.json`` (written last) summarises the set.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Optional

from ..atomic_write import publish, temporary_name, write_json_atomic

INDEX = "index.json"
FORMAT = "repa_fast-webdataset-v1"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


class ShardWriter:
    """Write one shard; nothing appears under the final names until :meth:`commit`."""

    def __init__(self, directory: str, index: int):
        self.path = os.path.join(directory, shard_name(index) + ".tar")
        self.meta_path = os.path.join(directory, shard_name(index) + ".json")
        self._tmp = temporary_name(self.path)
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[dict] = []

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible bytes
        self._tar.addfile(info, io.BytesIO(data))
        # the member's data starts one 512-byte header before the end of what was written
        end = self._file.tell()
        padded = (len(data) + 511) // 512 * 512
        return end - padded, len(data)

    def add(self, key: str, image: bytes, image_ext: str, latent: bytes, label: int) -> None:
        image_at = self._add(f"{key}.{image_ext}", image)
        latent_at = self._add(f"{key}.latent.npy", latent)
        self._add(f"{key}.cls", str(int(label)).encode())
        self.samples.append(dict(key=key, label=int(label), ext=image_ext,
                                 image=image_at, latent=latent_at))

    def commit(self, skipped: list[dict]) -> dict:
        """Close, flush to disk, and publish the shard and its metadata (the metadata last:
        a shard counts as finished only when both exist)."""
        self._tar.close()
        self._file.close()
        publish(self._tmp, self.path)
        meta = dict(shard=os.path.basename(self.path), samples=self.samples, skipped=skipped)
        write_json_atomic(self.meta_path, meta)
        return meta

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def finished_shard(directory: str, index: int) -> Optional[dict]:
    """The metadata of shard ``index`` if it was completed, else None."""
    path = os.path.join(directory, shard_name(index))
    if not (os.path.exists(path + ".tar") and os.path.exists(path + ".json")):
        return None
    with open(path + ".json") as f:
        return json.load(f)


def read_index(directory: str) -> dict:
    """``index.json`` of a prepared dataset, checked."""
    path = os.path.join(directory, INDEX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {INDEX} in {directory!r}: prepare the dataset first with "
                                f"python -m repa_fast.data.prepare --source ... --dest {directory}")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} has format {index.get('format')!r}; expected {FORMAT!r}")
    return index


def read_member(directory: str, shard: str, where: tuple[int, int]) -> bytes:
    """The bytes of one tar member at ``(offset, size)``."""
    with open(os.path.join(directory, shard), "rb") as f:
        f.seek(where[0])
        return f.read(where[1])
