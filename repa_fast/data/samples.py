"""Where samples live and in which order they are read; the reading itself. No torch here:
the DALI loader's reader processes import this module (spawned, they start faster without
torch).

Sample order (both loaders)::

    epoch e:  perm = permutation of all N samples drawn from (seed, e)   (identity if not shuffled)
              padded to a multiple of world_size with its own first samples (every sample is
              seen at least once per epoch, every rank gets ceil(N / world_size))
              rank r takes perm[r::world_size], in batches of batch_size (the incomplete last
              batch of an epoch is dropped, as the official DataLoader(drop_last=True))
"""
from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import threading
from typing import Optional

import numpy as np

from .shards import read_index

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


class SampleTable:
    """Where every sample lives: shard, byte ranges of image and moments, label, key."""

    COLUMNS = ("shard", "image_offset", "image_size", "latent_offset", "latent_size", "label",
               "key")

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.index = read_index(data_dir)
        self.shards, rows = [], []
        for s, shard in enumerate(self.index["shards"]):
            self.shards.append(shard["name"])
            for sample in self._samples(shard["name"]):
                rows.append((s, *sample["image"], *sample["latent"], sample["label"],
                             int(sample["key"])))
        if not rows:
            raise ValueError(f"{data_dir} holds no samples")
        for name, column in zip(self.COLUMNS, np.array(rows, dtype=np.int64).T):
            setattr(self, name, column)

    def _samples(self, name: str) -> list[dict]:
        meta = os.path.join(self.data_dir, name[:-len(".tar")] + ".json")
        if os.path.exists(meta):
            with open(meta) as f:
                return json.load(f)["samples"]
        return scan_tar(os.path.join(self.data_dir, name))  # shards made by another tool

    def __len__(self) -> int:
        return len(self.label)

    def save(self, directory: str) -> None:
        """Write the table for :meth:`load` (reader processes get a path, not the table:
        ImageNet's is 72 MB)."""
        np.save(os.path.join(directory, "table.npy"),
                np.stack([getattr(self, name) for name in self.COLUMNS]))
        with open(os.path.join(directory, "shards.json"), "w") as f:
            json.dump(dict(data_dir=self.data_dir, shards=self.shards), f)

    @classmethod
    def load(cls, directory: str) -> "SampleTable":
        """A table written by :meth:`save`, its columns memory-mapped (shared by the
        processes that load it; the mapping outlives the file)."""
        table = cls.__new__(cls)
        with open(os.path.join(directory, "shards.json")) as f:
            meta = json.load(f)
        table.data_dir, table.shards, table.index = meta["data_dir"], meta["shards"], None
        columns = np.load(os.path.join(directory, "table.npy"), mmap_mode="r")
        for name, column in zip(cls.COLUMNS, columns):
            setattr(table, name, column)
        return table

    def read(self, i: int, handles: dict) -> tuple[bytes, bytes]:
        """Encoded image and moments bytes of sample ``i``. ``handles`` keeps the most
        recently used shard files open (at most MAX_OPEN: ImageNet has over a thousand
        shards, more than the usual limit of open files)."""
        s = int(self.shard[i])
        f = handles.pop(s, None)  # re-inserted below: the dict's order is the recency order
        if f is None:
            if len(handles) >= MAX_OPEN:
                handles.pop(next(iter(handles))).close()
            f = open(os.path.join(self.data_dir, self.shards[s]), "rb")
        handles[s] = f
        f.seek(int(self.image_offset[i]))
        image = f.read(int(self.image_size[i]))
        f.seek(int(self.latent_offset[i]))
        latent = f.read(int(self.latent_size[i]))
        thread = threading.current_thread().name
        READS[thread] += 1
        READ_BYTES[thread] += len(image) + len(latent)
        return image, latent


def scan_tar(path: str) -> list[dict]:
    """Samples of a WebDataset tar written by any tool: byte ranges from its member headers."""
    samples: dict[str, dict] = {}
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
                sample["label"] = int(tar.extractfile(member).read())
    return [s for s in samples.values() if {"image", "latent", "label"} <= s.keys()]


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
    moments [B, ...], labels [B] and [B, 4] rows of epoch, batch, key and reader pid."""

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

    def __call__(self, info):
        epoch, batch = divmod(self.start + info.iteration, self.per_epoch)
        if epoch != self._order_epoch:
            self._order = epoch_order(len(self.table), self.seed, epoch, self.rank,
                                      self.world_size, self.shuffle)
            self._order_epoch = epoch
        ids = self._order[batch * self.batch_size:(batch + 1) * self.batch_size]
        encoded, moments = [], []
        for i in ids:
            image, latent = self.table.read(int(i), self._handles)
            encoded.append(np.frombuffer(image, dtype=np.uint8))
            moments.append(decode_latent(latent))
        positions = np.empty((len(ids), 4), dtype=np.int64)
        positions[:, 0], positions[:, 1], positions[:, 3] = epoch, batch, os.getpid()
        positions[:, 2] = self.table.key[ids]
        return encoded, np.stack(moments), self.table.label[ids].astype(np.int64), positions
