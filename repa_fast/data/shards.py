"""The prepared-dataset format: WebDataset tar shards plus an index.

Each sample ``{key}`` is three tar members (WebDataset convention: same stem, different
extensions)::

    {key}.jpg | {key}.png    the center-cropped image (RGB)
    {key}.latent.npy         float32 [2·C, H/8, W/8] SD-VAE moments, concat(mean, std)
    {key}.cls                the class index, ASCII

A text-to-image set (``index.json``: ``"kind": "text-to-image"``, ``format``
``repa_fast-webdataset-t2i-v1``, so an older reader refuses it instead of misreading it) has
no ``.cls``; each sample carries its captions instead::

    {key}.txt                its captions, a JSON list of UTF-8 strings (``null`` for a
                             caption whose text is unknown: U-ViT folders store features only)
    {key}.ctx.npy            their text features [n_captions, L, D] (CLIP ViT-L/14: float32
                             [n, 77, 768], the text model's last hidden state), dtype as produced

and the set stores once, next to ``index.json``, ``empty_context.npy``: the features [L, D]
of the empty caption (classifier-free guidance's unconditional branch), written atomically
and recorded in ``index.json`` (``empty_context``: name, size, CRC-32, like a shard).
``index.json`` also records ``context``: ``{"shape": [L, D], "dtype": "float32"}``, the text
encoder (``text_encoder``) and the number of captions (``num_captions``); ``label_range`` is
null. The shard metadata records per sample the byte ranges of ``captions`` and ``context``
and ``num_captions``.

``shard-NNNNNN.tar`` is written as ``.tar.tmp`` and renamed when complete, together with
``shard-NNNNNN.json`` (its samples, their byte offsets inside the tar, and the inputs that
were skipped), so a crash never leaves a half-written shard that looks finished and a
restarted run skips the shards that are. ``index.json`` (written last) summarises the set.

Each shard's entry in ``index.json`` (and its ``.json``) records ``size`` (bytes) and
``checksum``, ``crc32:<8 hex digits>`` of the whole tar file: CRC-32 (zlib) because the
loaders check every shard they open, and it runs at about 3 GB/s here against 1.2 for SHA-256
and 0.6 for BLAKE2b; it is meant to catch accidental damage (bit rot, truncation, a bad copy),
not tampering. ``label_range`` is ``[min, max]`` of the class labels.

A shard is hashed once per machine and file version (:func:`verify_shard` with ``records``):
one that passes is recorded in ``${REPA_FAST_CACHE:-~/.cache/repa_fast}/verified-shards/``
(``$XDG_CACHE_HOME/repa_fast`` when that is set), one small file per shard named after a hash
of its absolute path and holding its key: that path, the file's size, mtime (ns) and inode,
and the checksum ``index.json`` records. A record whose key differs from the file's now (the
shard was rewritten, replaced or touched, or the index changed) is ignored, and overwritten
once the shard passes again. Processes about to hash the same shard take turns (``flock`` on
``<record>.lock``), so the later ones find the first one's record instead of hashing too.
Damage that leaves size and mtime unchanged after a shard was recorded (bit rot, a write that
restores the mtime) is therefore caught only with a fresh cache: set ``REPA_FAST_CACHE`` to
another folder, or delete ``verified-shards/``. An I/O error while checking (EIO, ESTALE,
permission denied) is raised as an ``OSError`` naming the shard, never reported as damage; a
missing shard file is damage.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from contextlib import contextmanager
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX: processes may hash a shard at the same time, no harm done
    fcntl = None

from ..atomic_write import publish, temporary_name, write_json_atomic
from ..errors import UsageError
from ..machine_cache import cache_root

INDEX = "index.json"
FORMAT = "repa_fast-webdataset-v1"
FORMAT_T2I = "repa_fast-webdataset-t2i-v1"   # text-to-image sets (module doc)
FORMATS = (FORMAT, FORMAT_T2I)
KIND_T2I = "text-to-image"
EMPTY_CONTEXT = "empty_context.npy"


CHUNK = 4 << 20  # bytes hashed at a time
VERIFIED = "verified-shards"


class DataError(UsageError):
    """A file of a prepared data set is damaged or unreadable; the message names the file
    (and the sample) and how to recreate it."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def crc32_text(crc: int) -> str:
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def file_checksum(path: str) -> tuple[str, int]:
    """``("crc32:...", size)`` of the file at ``path``."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return crc32_text(crc), size


class _Checksummed:
    """A write-only file that keeps the CRC-32 and size of what went through it."""

    def __init__(self, file):
        self.file, self.crc, self.size = file, 0, 0

    def write(self, data) -> int:
        self.crc, self.size = zlib.crc32(data, self.crc), self.size + len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()


class ShardWriter:
    """Write one shard; nothing appears under the final names until :meth:`commit`."""

    def __init__(self, directory: str, index: int):
        self.path = os.path.join(directory, shard_name(index) + ".tar")
        self.meta_path = os.path.join(directory, shard_name(index) + ".json")
        self._tmp = temporary_name(self.path)
        self._file = open(self._tmp, "wb")
        self._sink = _Checksummed(self._file)  # hashed as written: no second read
        self._tar = tarfile.open(fileobj=self._sink, mode="w", format=tarfile.USTAR_FORMAT)
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

    def add_captioned(self, key: str, image: bytes, image_ext: str, latent: bytes,
                      captions: list, context: bytes, num_captions: int,
                      name: Optional[str] = None) -> None:
        """A text-to-image sample: ``captions`` (strings, or None where unknown) and
        ``context``, the ``.npy`` bytes of their features [n, L, D]; ``name``: where the
        image came from (e.g. the COCO file name), recorded in the metadata."""
        if len(captions) != num_captions or num_captions < 1:
            raise ValueError(f"sample {key}: {len(captions)} captions for {num_captions} "
                             f"contexts; each sample needs one context per caption, at least "
                             f"one")
        image_at = self._add(f"{key}.{image_ext}", image)
        latent_at = self._add(f"{key}.latent.npy", latent)
        text = json.dumps(list(captions), ensure_ascii=False).encode("utf-8")
        captions_at = self._add(f"{key}.txt", text)
        context_at = self._add(f"{key}.ctx.npy", context)
        sample = dict(key=key, ext=image_ext, image=image_at, latent=latent_at,
                      captions=captions_at, context=context_at, num_captions=int(num_captions))
        if name is not None:
            sample["name"] = name
        self.samples.append(sample)

    def commit(self, skipped: list[dict]) -> dict:
        """Close, flush to disk, and publish the shard and its metadata (the metadata last:
        a shard counts as finished only when both exist)."""
        self._tar.close()
        self._file.close()
        publish(self._tmp, self.path)
        meta = dict(shard=os.path.basename(self.path), size=self._sink.size,
                    checksum=crc32_text(self._sink.crc), samples=self.samples, skipped=skipped)
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
    return read_json(path + ".json", "shard metadata", REDO_SHARD)


REDO_SHARD = ("delete it and the shard's .tar, then rerun the prepare command that made this "
              "data set (it redoes missing shards)")
REDO_INDEX = ("rerun the prepare command that made this data set: it rewrites index.json from "
              "the shards")


def read_json(path: str, what: str, fix: str = REDO_INDEX) -> dict:
    """The JSON file at ``path``; a damaged one is a :class:`DataError` naming it, what it is
    and ``fix``."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path}: the {what} is damaged (not valid JSON: {error}); {fix}") from None


def read_index(directory: str) -> dict:
    """``index.json`` of a prepared dataset, checked."""
    path = os.path.join(directory, INDEX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {INDEX} in {directory!r}: prepare the dataset first with "
                                f"python -m repa_fast.data.prepare --source ... --dest {directory}")
    index = read_json(path, "data set index")
    if not isinstance(index, dict) or index.get("format") not in FORMATS:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise DataError(f"{path} has format {found!r}; expected {FORMAT!r} (or "
                        f"{FORMAT_T2I!r}, text-to-image)")
    if (index["format"] == FORMAT_T2I) != (index.get("kind") == KIND_T2I):
        raise DataError(f"{path}: format {index['format']!r} and kind {index.get('kind')!r} "
                        f"disagree; {REDO_INDEX}")
    return index


def is_text_to_image(index: dict) -> bool:
    """Whether ``index`` (``index.json``) is a captioned, text-to-image set."""
    return index.get("kind") == KIND_T2I


def write_file_atomic(directory: str, name: str, data: bytes) -> dict:
    """``data`` under ``directory/name``, atomically; its ``index.json`` entry (name, size,
    CRC-32)."""
    path = os.path.join(directory, name)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dict(name=name, size=len(data), checksum=crc32_text(zlib.crc32(data)))


def verify_shard(directory: str, entry: dict, full: bool = True,
                 records: Optional[str] = None) -> Optional[str]:
    """Why shard ``entry`` (an ``index.json`` shard entry) cannot be used: it is missing or
    fails its checksum (``full=False``: only its size is compared, no read); None when it
    passes, or exists and has no checksum (an index from before checksums). With ``records``
    (a folder, :func:`verified_dir`) a shard is hashed once per file version (module doc).
    Any other ``OSError`` (EIO, ESTALE, EACCES: the storage, not the data) is raised, naming
    the shard."""
    path = os.path.join(directory, entry["name"])
    want, want_size = entry.get("checksum"), entry.get("size")
    try:
        stat = os.stat(path)
        if not want:
            return None
        if want_size is not None and stat.st_size != want_size:
            got = None
        elif not full:
            return None
        else:
            got = _hash_once(path, stat, want, records)
    except FileNotFoundError:
        return (f"{path} is missing (index.json lists it). Recreate it: delete "
                f"{entry['name'][:-len('.tar')]}.json if present, then rerun the prepare "
                f"command that made this data set (it redoes missing shards)")
    except OSError as error:
        raise OSError(error.errno, f"{error.strerror or error} (checking the shard against "
                                   f"its index.json checksum)", path) from error
    if got == want:
        return None
    size = stat.st_size
    found = f"{size} bytes" if got is None else f"{got} ({size} bytes)"
    return (f"{path} is damaged: index.json records checksum {want} ({want_size} bytes), the "
            f"file has {found}. Recreate it: delete {entry['name']} and its .json, then rerun "
            f"the prepare command that made this data set (it redoes missing shards)")


def verified_dir() -> Optional[str]:
    """This machine's folder of verified-shard records (module doc), created; None when it
    cannot be written."""
    folder = os.path.join(cache_root(), VERIFIED)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.remove(probe)
    except OSError:
        return None
    return folder


def _record_key(path: str, stat: os.stat_result, want: str) -> str:
    return json.dumps(dict(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                           inode=stat.st_ino, checksum=want), sort_keys=True)


def _read_record(record: str) -> Optional[str]:
    try:
        with open(record, encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _write_record(record: str, key: str) -> None:
    """``key`` under ``record``, atomically (a temporary file of its own, renamed); nothing
    when the folder refuses."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(record), prefix=".record-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key)
        os.replace(tmp, record)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


@contextmanager
def _turn(lock: str) -> Iterator[None]:
    """Hold ``lock`` (an exclusive ``flock``) for the block; without it when it cannot be
    taken (a folder refusing, a file system without locks)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _hash_once(path: str, stat: os.stat_result, want: str, records: Optional[str]) -> str:
    """The checksum of the shard at ``path`` (``stat``: its ``os.stat``), or ``want`` when
    ``records`` holds a record of this very file version passing (module doc)."""
    if records is None:
        return file_checksum(path)[0]
    real = os.path.realpath(path)
    key = _record_key(real, stat, want)
    record = os.path.join(records, hashlib.sha256(
        real.encode("utf-8", "surrogateescape")).hexdigest()[:32])
    if _read_record(record) == key:
        return want
    with _turn(record + ".lock"):
        if _read_record(record) == key:  # another process hashed it while we waited
            return want
        got = file_checksum(path)[0]
        if got == want and _record_key(real, os.stat(path), want) == key:  # unchanged meanwhile
            _write_record(record, key)
    return got


def label_range(data_dir: str) -> Optional[tuple[int, int]]:
    """``(min, max)`` class label of the prepared data set in ``data_dir``: from
    ``index.json`` (``label_range``; ``class_counts`` in indexes of older versions), else
    from the labels in the shards' ``.json`` metadata. None when neither exists (shards made
    by another tool, read only by scanning whole tars), the set is empty, or it is a
    text-to-image set (it has no labels)."""
    index = read_index(data_dir)
    if is_text_to_image(index):
        return None
    if index.get("label_range"):
        low, high = index["label_range"]
        return int(low), int(high)
    if index.get("class_counts"):
        labels = [int(k) for k in index["class_counts"]]
        return min(labels), max(labels)
    low = high = None
    for shard in index.get("shards", []):
        meta = os.path.join(data_dir, shard["name"][:-len(".tar")] + ".json")
        if not os.path.exists(meta):
            return None
        for sample in read_json(meta, "shard metadata", REDO_SHARD)["samples"]:
            label = int(sample["label"])
            low = label if low is None else min(low, label)
            high = label if high is None else max(high, label)
    return None if low is None else (low, high)


def read_member(directory: str, shard: str, where: tuple[int, int]) -> bytes:
    """The bytes of one tar member at ``(offset, size)``."""
    with open(os.path.join(directory, shard), "rb") as f:
        f.seek(where[0])
        return f.read(where[1])
