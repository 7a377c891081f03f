"""Where samples live and in which order they are read; the reading itself. No torch here:
the DALI loader's reader processes import this module (spawned, they start faster without
torch).

Sample order (both loaders)::

    epoch e:  perm = permutation of all N samples drawn from (seed, e)   (identity if not shuffled)
              padded to a multiple of world_size with its own first samples (every sample is
              seen at least once per epoch, every rank gets ceil(N / world_size))
              rank r takes perm[r::world_size], in batches of batch_size (the incomplete last
              batch of an epoch is dropped, as the official DataLoader(drop_last=True))

Damaged data (both loaders, in the processes that read):

* a shard is checked against its ``index.json`` checksum when first opened, never per
  sample, and hashed once per machine and file version: a shard that passes is recorded in
  ``${REPA_FAST_CACHE:-~/.cache/repa_fast}/verified-shards/``, keyed by its absolute path,
  size, mtime, inode and recorded checksum (:mod:`repa_fast.data.shards`), so the other ranks
  and loader processes of the machine, and later runs, do not hash it again; processes about
  to hash the same shard take turns. A rewritten shard (size, mtime or inode changed) is
  hashed again; damage that leaves size and mtime unchanged after it was recorded (bit rot)
  is caught only with a fresh cache (another ``REPA_FAST_CACHE``, or delete the folder).
  Where that folder cannot be written, the records go to a temporary folder of the loader
  iteration, shared by its processes. Indexes without checksums (older versions) are read
  unchecked, with one warning;
* every sample is checked as it is read: its moments parse as a float32 ``.npy`` of the data
  set's shape with finite values, its label is an integer, its image is a JPEG or PNG of
  the data set's size with valid PNG chunk checksums, and decodes (PyTorch loader; DALI
  decodes in its own operator, so damage inside a JPEG's compressed data shows there); in a
  text-to-image set, in place of the label, the ``.ctx.npy`` header says dtype and shape
  ``[n_captions, L, D]`` as ``index.json`` and the shard metadata record, and the chosen
  caption's context is finite (:mod:`repa_fast.data.captions`);
* a bad sample (or every sample of a shard that fails its checksum) is replaced by the next
  good sample of the rank's epoch order, so the batch keeps its shape and every other sample
  its place, and reported to the loader with a message naming the shard file and the key;
  the loader then raises it (``on_bad_sample="error"``) or warns and counts (``"skip"``);
* an I/O error (EIO, ESTALE on network storage, permission denied) is the storage's, not
  the data's: it is raised as an ``OSError`` naming the shard file and the sample key (exit
  code 1), neither remembered nor skipped under either setting, so a transient error never
  drops a sample on some workers only (a resumed run reads what an uninterrupted one would).
  A missing shard file is damage.
"""
from __future__ import annotations

import collections
import io
import json
import multiprocessing
import os
import tarfile
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .child_process import leave_signals_to_parent

from .captions import (HEADER_PROBE, batch_draws, check_context_header, context_spec,
                       decode_captions, decode_context)
from .crop import to_rgb8
from .shards import (REDO_SHARD, DataError, is_text_to_image, read_index, read_json,
                     verify_shard)

MAX_OPEN = 32  # open shard files per reader

# Samples read by this process, per thread name (``SampleTable.read`` counts them). Each
# process has its own counts: reads done in the DALI loader's reader processes or in
# DataLoader workers never show up in the training process's counts.
READS: collections.Counter = collections.Counter()
READ_BYTES: collections.Counter = collections.Counter()


def read_counts() -> dict:
    """This process's sample reads so far: ``{"reads", "bytes", "main_thread_reads"}``."""
    return dict(reads=sum(READS.values()), bytes=sum(READ_BYTES.values()),
                main_thread_reads=READS[threading.main_thread().name])


class BadSampleError(DataError):
    """A sample that cannot be used (or one of a shard that fails its checksum:
    ``whole_shard``); the message names the shard file and the sample key."""

    def __init__(self, message: str, shard: int = -1, key: int = -1, whole_shard: bool = False):
        super().__init__(message)
        self.shard, self.key, self.whole_shard = shard, key, whole_shard

    def __reduce__(self):  # keeps the fields across processes (DataLoader workers)
        return type(self), (str(self), self.shard, self.key, self.whole_shard)


class BadSampleWarning(UserWarning):
    """A bad sample (or shard) was skipped: ``on_bad_sample="skip"``."""


def latent_shape(index: dict) -> Optional[tuple]:
    """The moments' shape ``[2·C, H/8, W/8]`` (pixel space: ``[2·3, H, W]``) from
    ``index.json``; None when the index does not say."""
    vae, resolution = index.get("vae") or {}, index.get("resolution")
    if not resolution or not vae.get("latent_channels"):
        return None
    side = resolution if vae.get("fingerprint") == "pixel space" else resolution // 8
    return (2 * int(vae["latent_channels"]), side, side)


class SampleTable:
    """Where every sample lives: shard, byte ranges of image and moments, label, key (in a
    text-to-image set: byte ranges of the captions and their contexts, and their number, the
    label being 0); and the checks of what is read (module doc)."""

    COLUMNS = ("shard", "image_offset", "image_size", "latent_offset", "latent_size", "label",
               "key")
    T2I_COLUMNS = ("captions_offset", "captions_size", "context_offset", "context_size",
                   "num_captions")

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.index = read_index(data_dir)
        self.t2i = is_text_to_image(self.index)
        self.context_spec = context_spec(self.index) if self.t2i else None
        self.shards, rows = [], []
        for s, shard in enumerate(self.index["shards"]):
            self.shards.append(shard["name"])
            for sample in self._samples(shard["name"]):
                if self.t2i:
                    rows.append((s, *sample["image"], *sample["latent"], 0, int(sample["key"]),
                                 *sample["captions"], *sample["context"],
                                 sample["num_captions"]))
                else:
                    rows.append((s, *sample["image"], *sample["latent"], sample["label"],
                                 int(sample["key"])))
        if not rows:
            raise ValueError(f"{data_dir} holds no samples")
        for name, column in zip(self.columns, np.array(rows, dtype=np.int64).T):
            setattr(self, name, column)
        self.checks = [dict(name=e["name"], checksum=e.get("checksum"), size=e.get("size"))
                       for e in self.index["shards"]]
        unchecked = sum(not c["checksum"] for c in self.checks)
        if unchecked:
            warnings.warn(f"{data_dir}/index.json records no checksum for {unchecked} of its "
                          f"{len(self.checks)} shards (prepared by an older version or another "
                          f"tool): damaged shards cannot be detected. Rerunning the prepare "
                          f"command that made it adds them", stacklevel=3)
        self.latent_shape, self.resolution = latent_shape(self.index), self.index.get("resolution")
        self.records: Optional[str] = None  # folder of verified-shard records (module doc)
        self.hash_shards = True           # False: shards are checked by size only (no read)
        self._reset()

    def _reset(self) -> None:
        self._shard_problem: dict[int, Optional[str]] = {}  # checked shards: None when good
        self._bad: dict[int, tuple] = {}  # bad samples met in this process: error arguments

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_shard_problem={}, _bad={})  # each process checks for itself
        return state

    def _samples(self, name: str) -> list[dict]:
        meta = os.path.join(self.data_dir, name[:-len(".tar")] + ".json")
        if os.path.exists(meta):
            return read_json(meta, "shard metadata", REDO_SHARD)["samples"]
        return scan_tar(os.path.join(self.data_dir, name))  # shards made by another tool

    @property
    def columns(self) -> tuple:
        return self.COLUMNS + (self.T2I_COLUMNS if self.t2i else ())

    def __len__(self) -> int:
        return len(self.label)

    def save(self, directory: str) -> None:
        """Write the table for :meth:`load` (reader processes get a path, not the table:
        ImageNet's is 72 MB)."""
        np.save(os.path.join(directory, "table.npy"),
                np.stack([getattr(self, name) for name in self.columns]))
        spec = self.context_spec
        with open(os.path.join(directory, "shards.json"), "w") as f:
            json.dump(dict(data_dir=self.data_dir, shards=self.shards, checks=self.checks,
                           latent_shape=self.latent_shape, resolution=self.resolution,
                           records=self.records, hash_shards=self.hash_shards, t2i=self.t2i,
                           context=dict(shape=spec[0], dtype=str(spec[1])) if spec else None),
                      f)

    @classmethod
    def load(cls, directory: str) -> "SampleTable":
        """A table written by :meth:`save`, its columns memory-mapped (shared by the
        processes that load it; the mapping outlives the file)."""
        table = cls.__new__(cls)
        with open(os.path.join(directory, "shards.json")) as f:
            meta = json.load(f)
        table.data_dir, table.shards, table.index = meta["data_dir"], meta["shards"], None
        table.checks, table.resolution = meta["checks"], meta["resolution"]
        table.records, table.hash_shards = meta["records"], meta["hash_shards"]
        table.latent_shape = tuple(meta["latent_shape"]) if meta["latent_shape"] else None
        table.t2i = meta["t2i"]
        table.context_spec = context_spec(meta) if table.t2i else None
        table._reset()
        columns = np.load(os.path.join(directory, "table.npy"), mmap_mode="r")
        for name, column in zip(table.columns, columns):
            setattr(table, name, column)
        return table

    def read(self, i: int, handles: dict) -> tuple[bytes, bytes]:
        """Encoded image and moments bytes of sample ``i`` (:meth:`read_ranges`)."""
        image, latent = self.read_ranges(i, handles, [
            (int(self.image_offset[i]), int(self.image_size[i])),
            (int(self.latent_offset[i]), int(self.latent_size[i]))])
        return image, latent

    def read_ranges(self, i: int, handles: dict, ranges: list, count: bool = True
                    ) -> list[bytes]:
        """The bytes at ``(offset, size)`` ``ranges`` of sample ``i``'s shard (``count``:
        counted as a sample read, :func:`read_counts`). ``handles``
        keeps the most recently used shard files open (at most MAX_OPEN: ImageNet has over a
        thousand shards, more than the usual limit of open files). A missing shard raises
        ``FileNotFoundError``; any other ``OSError`` is raised naming the shard and key."""
        s = int(self.shard[i])
        f = handles.pop(s, None)  # re-inserted below: the dict's order is the recency order
        if f is None:
            problem = self.check_shard(s)
            if problem:
                raise BadSampleError(f"{problem} (reading sample {self.key_text(i)})", s,
                                     int(self.key[i]), whole_shard=True)
            if len(handles) >= MAX_OPEN:
                handles.pop(next(iter(handles))).close()
        path = os.path.join(self.data_dir, self.shards[s])
        parts = []
        try:
            if f is None:
                f = open(path, "rb")
            for offset, size in ranges:
                f.seek(offset)
                parts.append(f.read(size))
        except OSError as error:
            if f is not None:  # not kept: the next try opens the file afresh (ESTALE)
                try:
                    f.close()
                except OSError:
                    pass
            if isinstance(error, FileNotFoundError):
                raise
            raise OSError(error.errno, f"{error.strerror or error} (reading sample "
                                       f"{self.key_text(i)})", path) from error
        handles[s] = f
        thread = threading.current_thread().name
        READS[thread] += count
        READ_BYTES[thread] += sum(len(p) for p in parts)
        return parts

    def key_text(self, i: int) -> str:
        return f"{int(self.key[i]):08d}"

    def check_shard(self, s: int) -> Optional[str]:
        """Why shard ``s`` cannot be used (it is missing or fails its checksum), or None;
        asked once per process, hashed unless ``records`` shows this version of the file
        passed (module doc). An ``OSError`` (EIO, ...) is raised and not remembered."""
        if s in self._shard_problem:
            return self._shard_problem[s]
        problem = verify_shard(self.data_dir, self.checks[s], full=self.hash_shards,
                               records=self.records)
        self._shard_problem[s] = problem
        return problem

    def _where(self, i: int) -> str:
        shard_path = os.path.join(self.data_dir, self.shards[int(self.shard[i])])
        return f"{shard_path}, sample {self.key_text(i)}"

    def sample(self, i: int, handles: dict, decode_image: Callable, draw=None):
        """``(decode_image(image bytes, resolution), moments, condition)`` of sample ``i``,
        each checked (module doc); the condition is the label, or in a text-to-image set
        ``(caption, context [L, D])``: caption ``draw mod n_captions`` (0 when ``draw`` is
        None) and its features. :class:`BadSampleError` naming the shard and key when one
        fails (remembered: asked again, it fails again without a read). An I/O error is
        raised as an ``OSError`` naming both, and not remembered."""
        if i in self._bad:  # a new error each time: a re-raised one grows its traceback
            raise BadSampleError(*self._bad[i])
        where = self._where(i)

        def bad(why: str):
            self._bad[i] = (f"{where}: {why}", int(self.shard[i]), int(self.key[i]))
            return BadSampleError(*self._bad[i])

        ranges = [(int(self.image_offset[i]), int(self.image_size[i])),
                  (int(self.latent_offset[i]), int(self.latent_size[i]))]
        if self.t2i:  # the .ctx.npy member's header first, then the caption's slice
            offset, size = int(self.context_offset[i]), int(self.context_size[i])
            ranges.append((offset, min(size, HEADER_PROBE)))
        try:
            image, latent, *context = self.read_ranges(i, handles, ranges)
            label = int(self.label[i])
            if self.t2i:
                count = int(self.num_captions[i])
                caption = 0 if draw is None else int(np.uint64(draw) % np.uint64(max(count, 1)))
                try:
                    header = check_context_header(context[0], size, count, self.context_spec)
                except ValueError as error:
                    raise bad(f"its text features (.ctx.npy) cannot be used: {error}") from None
                (length, width), dtype = self.context_spec
                step = length * width * dtype.itemsize
                data, = self.read_ranges(i, handles, [(offset + header + caption * step, step)],
                                         count=False)
                try:
                    label = (caption, decode_context(data, self.context_spec))
                except ValueError as error:
                    raise bad(f"its text features (.ctx.npy) cannot be used: {error}") from None
        except FileNotFoundError as error:  # the shard went after it was checked
            raise bad(f"cannot be read: the shard file is missing ({error.strerror or error})"
                      ) from None
        if not self.t2i and label < 0:
            raise bad("its .cls label is not an integer")
        try:
            moments = decode_latent(latent)
        except Exception as error:  # numpy's header parser raises SyntaxError, TokenError, ...
            raise bad(f"its moments (.latent.npy) cannot be read: {type(error).__name__}: "
                      f"{error}") from None
        want = self.latent_shape
        if moments.dtype != np.float32 or moments.ndim != 3 or (want and moments.shape != want):
            raise bad(f"its moments (.latent.npy) are {moments.dtype} {list(moments.shape)}, "
                      f"not float32 {list(want) if want else '[C, H, W]'}")
        if not np.isfinite(moments).all():
            raise bad("its moments (.latent.npy) hold non-finite values")
        try:
            pixels = decode_image(image, self.resolution)
        except Exception as error:  # PIL: UnidentifiedImageError, truncated files, ...
            raise bad(f"its image cannot be decoded: {type(error).__name__}: {error}") from None
        return pixels, moments, label

    def captions(self, i: int, handles: dict) -> list:
        """The caption texts of sample ``i`` of a text-to-image set (None for one whose text
        is unknown); :class:`BadSampleError` naming the shard and key when its ``.txt`` is
        damaged."""
        count = int(self.num_captions[i])
        data, = self.read_ranges(i, handles, [(int(self.captions_offset[i]),
                                               int(self.captions_size[i]))])
        try:
            return decode_captions(data, count)
        except ValueError as error:  # JSON and UTF-8 errors are ValueErrors
            raise BadSampleError(f"{self._where(i)}: its captions (.txt) cannot be used: "
                                 f"{error}", int(self.shard[i]), int(self.key[i])) from None

    def sample_or_next(self, order: np.ndarray, pos: int, handles: dict, decode_image: Callable,
                       draw=None):
        """``(i, sample(i), problem)``: sample ``order[pos]``, or when it is bad the next
        good one in ``order`` (cyclically), with the bad one's :class:`BadSampleError`;
        ``draw``: the caption draw of position ``pos`` (text-to-image)."""
        first = None
        for step in range(len(order)):
            i = int(order[(pos + step) % len(order)])
            try:
                return i, self.sample(i, handles, decode_image, draw), first
            except BadSampleError as error:
                first = first or error
        raise BadSampleError(f"{first}; and no sample of this rank's epoch is readable",
                             first.shard, first.key, first.whole_shard)


def read_batch(table: SampleTable, order: np.ndarray, start: int, count: int, handles: dict,
               decode_image: Callable, draws: Optional[np.ndarray] = None):
    """Samples ``order[start:start + count]``, bad ones replaced (:meth:`SampleTable.
    sample_or_next`): ``(ids, images, moments, conditions, bad)``; the conditions are the
    labels int64 [count], or in a text-to-image set ``(contexts [count, L, D], caption
    int64 [count])`` with ``draws`` the caption draws of the batch's positions
    (:func:`repa_fast.data.captions.batch_draws`); ``bad`` holds ``(slot, shard, key,
    whole_shard, message)`` per replaced sample."""
    ids, images, moments, conditions, bad = [], [], [], [], []
    for slot in range(count):
        draw = None if draws is None else draws[slot]
        i, (pixels, latent, condition), problem = table.sample_or_next(
            order, start + slot, handles, decode_image, draw)
        ids.append(i)
        images.append(pixels)
        moments.append(latent)
        conditions.append(condition)
        if problem is not None:
            bad.append((slot, problem.shard, problem.key, problem.whole_shard, str(problem)))
    if table.t2i:
        conditions = (np.stack([c for _, c in conditions]),
                      np.array([k for k, _ in conditions], dtype=np.int64))
    else:
        conditions = np.array(conditions, dtype=np.int64)
    return np.array(ids, dtype=np.int64), images, moments, conditions, bad


def _check_header(data: bytes, resolution: Optional[int]) -> None:
    """A JPEG or PNG of the data set's size; for PNG also every chunk's CRC (damage inside
    the compressed pixels can decode without an error). JPEG has no checksum."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        if image.format not in ("JPEG", "PNG"):
            raise ValueError(f"it is {image.format}, not JPEG or PNG")
        if resolution and image.size != (resolution, resolution):
            raise ValueError(f"it is {image.size[0]}x{image.size[1]}, not the data set's "
                             f"{resolution}x{resolution}")
        if image.format == "PNG":
            image.verify()


def decode_pixels(data: bytes, resolution: Optional[int] = None) -> np.ndarray:
    """HWC uint8 RGB pixels of encoded image ``data``, checked (PyTorch loader)."""
    from PIL import Image
    _check_header(data, resolution)
    with Image.open(io.BytesIO(data)) as image:
        return np.array(to_rgb8(image))


def check_image_header(data: bytes, resolution: Optional[int] = None) -> np.ndarray:
    """``data`` as uint8 once its header (and PNG checksums) pass (DALI loader: decoding
    is DALI's work; damage inside a JPEG's compressed data shows only there)."""
    _check_header(data, resolution)
    return np.frombuffer(data, dtype=np.uint8)


def scan_tar(path: str) -> list[dict]:
    """Samples of a WebDataset tar written by any tool: byte ranges from its member headers."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                sample = samples.setdefault(key, dict(key=key))
                where = (member.offset_data, member.size)
                if ext in ("jpg", "jpeg", "png"):
                    sample["image"], sample["ext"] = where, ext
                elif ext == "latent.npy":
                    sample["latent"] = where
                elif ext == "cls":
                    try:
                        sample["label"] = int(tar.extractfile(member).read())
                    except ValueError:
                        sample["label"] = -1  # reported when read: a bad sample, named
                elif ext == "txt":
                    sample["captions"] = where
                elif ext == "ctx.npy":  # the number of captions from its .npy header
                    sample["context"] = where
                    try:
                        sample["num_captions"] = int(np.load(tar.extractfile(member)).shape[0])
                    except Exception:  # reported when read: a bad sample, named
                        sample["num_captions"] = 0
    except (tarfile.TarError, FileNotFoundError) as error:  # other OSErrors: the storage's
        raise DataError(f"{path} cannot be read as a tar file ({error}); recreate it") from None
    return [s for s in samples.values() if {"image", "latent"} <= s.keys() and (
        "label" in s or {"captions", "context", "num_captions"} <= s.keys())]


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int, world_size: int,
                shuffle: bool) -> np.ndarray:
    """Sample indices rank ``rank`` reads in ``epoch`` (see module doc)."""
    order = (np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle
             else np.arange(num_samples))
    total = -(-num_samples // world_size) * world_size
    order = np.resize(order, total)  # pads by repeating from the start, however short
    return order[rank::world_size]


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    return -(-num_samples // world_size) // batch_size


def decode_latent(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


class DALIBatchSource:
    """The DALI loader's ``external_source`` callback (``batch=True, batch_info=True``,
    ``parallel=True``): the ``info.iteration``-th batch after position (epoch, batch).
    Stateless as DALI requires (the answer depends on ``info`` only; the cached epoch order
    and open files are per process), so reader processes can each make a different batch.

    Pickled for spawned reader processes with ``table_dir`` (a :meth:`SampleTable.save`
    directory) in place of the table: a few hundred bytes whatever the data set. The table is
    loaded on unpickling — before DALI reports the readers started, so the directory can go
    once the pipeline is built. (A large pickle is also a hang: a reader that fails to start
    leaves the parent blocked writing a pickle longer than a pipe's buffer.)

    Returns the batch's encoded images (a list: their sizes differ), then dense arrays — less
    work for the training process, which unpacks what the readers send sample by sample —:
    moments [B, ...], labels [B] (text-to-image: contexts [B, L, D] and caption indices [B])
    and [B, 7] rows of epoch, batch, key, reader pid and, for a sample that replaces a bad
    one, the bad one's shard, key and whole-shard flag (else -1); last the bad samples'
    messages (UTF-8 bytes, empty for the others)."""

    COLUMNS = ("epoch", "batch", "key", "pid", "bad_shard", "bad_key", "whole_shard")

    def __init__(self, table: SampleTable, seed: int, rank: int, world_size: int,
                 shuffle: bool, batch_size: int, epoch: int, batch: int,
                 table_dir: Optional[str] = None):
        self.table, self.table_dir = table, table_dir
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.batch_size = shuffle, batch_size
        self.per_epoch = batches_per_epoch(len(table), world_size, batch_size)
        self.start = epoch * self.per_epoch + batch  # batches before the first one asked for
        self._order_epoch, self._order, self._handles = None, None, {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_order_epoch=None, _order=None, _handles={})  # per process
        if self.table_dir is not None:
            state["table"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.table is None:
            self.table = SampleTable.load(self.table_dir)
        if multiprocessing.parent_process() is not None:  # unpickled in a reader process
            leave_signals_to_parent()

    def __call__(self, info):
        epoch, batch = divmod(self.start + info.iteration, self.per_epoch)
        if epoch != self._order_epoch:
            self._order = epoch_order(len(self.table), self.seed, epoch, self.rank,
                                      self.world_size, self.shuffle)
            self._order_epoch = epoch
        start = batch * self.batch_size
        draws = (batch_draws(self.seed, epoch, self.rank, self.world_size, start,
                             self.batch_size) if self.table.t2i else None)
        ids, encoded, moments, conditions, bad = read_batch(
            self.table, self._order, start, self.batch_size, self._handles, check_image_header,
            draws)
        positions = np.full((len(ids), len(self.COLUMNS)), -1, dtype=np.int64)
        positions[:, 0], positions[:, 1], positions[:, 3] = epoch, batch, os.getpid()
        positions[:, 2] = self.table.key[ids]
        notes = [np.zeros(0, dtype=np.uint8)] * len(ids)
        for slot, shard, key, whole, message in bad:
            positions[slot, 4:] = shard, key, whole
            notes[slot] = np.frombuffer(message.encode(), dtype=np.uint8)
        if self.table.t2i:
            contexts, captions = conditions
            return encoded, np.stack(moments), contexts, captions, positions, notes
        return encoded, np.stack(moments), conditions, positions, notes


@dataclass
class GridSamples:
    """Fixed samples of a text-to-image set for sample grids (:func:`grid_samples`)."""
    keys: list             # sample keys, "00000123"
    captions: list         # the text of each one's caption (None where unknown)
    caption_index: np.ndarray  # int64 [n]: which of the sample's captions
    contexts: np.ndarray   # [n, L, D] their text features, the set's dtype
    images: np.ndarray     # uint8 [n, 3, H, W]
    moments: np.ndarray    # float32 [n, 2·C, h, w]


def grid_samples(data_dir: str, count: int = 16, caption: int = 0) -> GridSamples:
    """``count`` fixed samples of the text-to-image set in ``data_dir`` for sample grids:
    samples ``j·N // count`` (j < count) of the set's storage order, so the same ones
    whatever the seed, rank or number of processes; each with its caption ``caption`` (mod
    its number of captions), as text, index and features, and its image and moments
    (the grid's ground truth). A bad sample (damaged, or in a shard failing its checksum)
    is replaced by the next good one. The shards are hashed as the loaders do, without
    the machine's records."""
    table = SampleTable(data_dir)
    if not table.t2i:
        raise ValueError(f"{data_dir} is not a text-to-image set: it has labels, not captions")
    if count < 1:
        raise ValueError(f"count must be >= 1; got {count}")
    order = np.arange(len(table))
    handles: dict = {}
    keys, texts, indices, contexts, images, moments = [], [], [], [], [], []
    try:
        for j in range(count):
            i, (pixels, latent, (k, context)), _ = table.sample_or_next(
                order, j * len(table) // count, handles, decode_pixels, caption)
            keys.append(table.key_text(i))
            texts.append(table.captions(i, handles)[k])
            indices.append(k)
            contexts.append(context)
            images.append(pixels.transpose(2, 0, 1))
            moments.append(latent)
    finally:
        for f in handles.values():
            f.close()
    return GridSamples(keys, texts, np.array(indices, dtype=np.int64), np.stack(contexts),
                       np.stack(images), np.stack(moments))
