"""Training loaders over prepared shards: NVIDIA DALI (GPU JPEG decoding) or PyTorch.

Both yield ``(images uint8 [B, 3, H, W], moments float32 [B, 2·C, H/8, W/8], labels int64
[B])`` like the official dataset, and both follow the same sample order, computed here:

    epoch e:  perm = permutation of all N samples drawn from (seed, e)   (identity if not shuffled)
              padded to a multiple of world_size with its own first samples (every sample is
              seen at least once per epoch, every rank gets ceil(N / world_size))
              rank r takes perm[r::world_size], in batches of batch_size (the incomplete last
              batch of an epoch is dropped, as the official DataLoader(drop_last=True))

The position (epoch, batches consumed) is in :meth:`state_dict`; a loader built with the same
arguments and given that state continues with exactly the batches the first had not yielded.

DALI: the order is fed through ``fn.external_source`` (encoded bytes read at their byte
offsets in the shards) into ``fn.decoders.image(device='mixed')`` — nvJPEG on the GPU —, or
``device='cpu'`` without a GPU. DALI's own ``readers.webdataset`` cannot reproduce a seeded
global shuffle or resume mid-epoch, which is why the order is not left to it.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .shards import read_index

BACKENDS = ("auto", "dali", "torch")
MAX_OPEN = 32  # open shard files per reader


@dataclass
class LoaderConfig:
    data_dir: str
    batch_size: int                 # per rank
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 8            # PyTorch: decode processes; DALI: CPU threads
    backend: str = "auto"
    device: Optional[str] = None    # where DALI decodes: "cuda:N" (mixed) or "cpu"; default auto
    return_keys: bool = False       # also yield the batch's sample keys (tests, debugging)

    def check(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}); got {self.rank}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")


class SampleTable:
    """Where every sample lives: shard, byte ranges of image and moments, label, key."""

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
        table = np.array(rows, dtype=np.int64)
        (self.shard, self.image_offset, self.image_size, self.latent_offset, self.latent_size,
         self.label, self.key) = table.T

    def _samples(self, name: str) -> list[dict]:
        meta = os.path.join(self.data_dir, name[:-len(".tar")] + ".json")
        if os.path.exists(meta):
            with open(meta) as f:
                return json.load(f)["samples"]
        return scan_tar(os.path.join(self.data_dir, name))  # shards made by another tool

    def __len__(self) -> int:
        return len(self.label)

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
        return image, f.read(int(self.latent_size[i]))


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


def decode_latent(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def _batches(table: SampleTable, config: LoaderConfig, epoch: int, batch: int):
    """Sample-index batches from position (epoch, batch) on, forever."""
    while True:
        order = epoch_order(len(table), config.seed, epoch, config.rank, config.world_size,
                            config.shuffle)
        per_epoch = len(order) // config.batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size {config.batch_size} is larger than the "
                             f"{len(order)} samples rank {config.rank} reads per epoch")
        for b in range(batch, per_epoch):
            yield epoch, b, order[b * config.batch_size:(b + 1) * config.batch_size]
        epoch, batch = epoch + 1, 0


class _Loader:
    """Common position bookkeeping: iterate forever, ``state_dict`` / ``load_state_dict``."""

    backend = ""

    def __init__(self, config: LoaderConfig):
        config.check()
        self.config = config
        self.table = SampleTable(config.data_dir)
        self.epoch, self.batch = 0, 0
        first = self.table.index
        self.resolution, self.num_classes = first["resolution"], first["num_classes"]

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return -(-len(self.table) // self.config.world_size) // self.config.batch_size

    def state_dict(self) -> dict:
        c = self.config
        return dict(epoch=self.epoch, batch=self.batch, seed=c.seed, world_size=c.world_size,
                    batch_size=c.batch_size, num_samples=len(self.table))

    def load_state_dict(self, state: dict) -> None:
        c = self.config
        for name, mine in (("seed", c.seed), ("world_size", c.world_size),
                           ("batch_size", c.batch_size), ("num_samples", len(self.table))):
            if state[name] != mine:
                raise ValueError(f"cannot resume: the saved loader had {name}={state[name]}, "
                                 f"this one has {mine}; the sample order would differ")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _advance(self, epoch: int, batch: int) -> None:
        # position of the first batch not yet handed out
        self.epoch, self.batch = (epoch, batch + 1) if batch + 1 < len(self) else (epoch + 1, 0)


class TorchLoader(_Loader):
    """PyTorch fallback: worker processes read and decode (Pillow, libjpeg-turbo)."""

    backend = "torch"

    def __iter__(self):
        c = self.config
        dataset = _BatchDataset(self.table, c, self.epoch, self.batch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=c.num_workers, pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if c.num_workers else None,
            # its own generator: starting workers must not draw from the global RNG, or a
            # resumed training run would draw different noise from the uninterrupted one
            generator=torch.Generator().manual_seed(c.seed))
        for epoch, batch, images, moments, labels, keys in loader:
            self._advance(epoch, batch)
            yield (images, moments, labels, keys) if c.return_keys else (images, moments, labels)


class _BatchDataset(torch.utils.data.IterableDataset):
    """Batches in the planned order; worker w decodes batches w, w + W, ... and the
    DataLoader hands them out round-robin, so the order is kept."""

    def __init__(self, table: SampleTable, config: LoaderConfig, epoch: int, batch: int):
        self.table, self.config, self.start = table, config, (epoch, batch)

    def __iter__(self):
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        handles: dict = {}
        for n, (epoch, batch, ids) in enumerate(_batches(self.table, self.config, *self.start)):
            if n % workers != worker:
                continue
            images, moments = [], []
            for i in ids:
                image, latent = self.table.read(int(i), handles)
                pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
                images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
                moments.append(torch.from_numpy(decode_latent(latent)))
            yield (epoch, batch, torch.stack(images), torch.stack(moments),
                   torch.from_numpy(self.table.label[ids].copy()),
                   [f"{k:08d}" for k in self.table.key[ids]])


def dali_problem() -> Optional[str]:
    """Why the DALI backend cannot run here (None when it can)."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return "nvidia-dali is not installed (pip install 'repa_fast[dali]')"
    return None


class DALILoader(_Loader):
    """DALI: encoded bytes in the planned order -> ``fn.decoders.image`` (nvJPEG on the GPU)."""

    backend = "dali"

    def __init__(self, config: LoaderConfig):
        super().__init__(config)
        problem = dali_problem()
        if problem:
            raise ValueError(f"the DALI loader cannot run: {problem}")
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _pipeline(self, feed):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=self.config.batch_size, num_threads=max(1, self.config.num_workers),
                      device_id=self.device.index if gpu else None, prefetch_queue_depth=2,
                      exec_dynamic=True)
        def pipeline():
            encoded, moments, labels, positions = fn.external_source(
                source=feed, num_outputs=4, batch=True, dtype=[types.UINT8, types.FLOAT,
                                                               types.INT64, types.INT64])
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                       output_type=types.RGB)
            images = fn.transpose(images, perm=[2, 0, 1])  # HWC -> CHW like the official loader
            return images, moments, labels, positions

        pipe = pipeline()
        pipe.build()
        return pipe

    def __iter__(self):
        plan = _batches(self.table, self.config, self.epoch, self.batch)
        table, handles = self.table, {}

        def feed():
            epoch, batch, ids = next(plan)
            encoded, moments = [], []
            for i in ids:
                image, latent = table.read(int(i), handles)
                encoded.append(np.frombuffer(image, dtype=np.uint8))
                moments.append(decode_latent(latent))
            positions = [np.array([epoch, batch, table.key[i]], dtype=np.int64) for i in ids]
            return (encoded, moments, [np.array(table.label[i], dtype=np.int64) for i in ids],
                    positions)

        pipe = self._pipeline(feed)
        while True:
            images, moments, labels, positions = pipe.run()
            positions = _as_torch(positions, torch.device("cpu"))
            epoch, batch = int(positions[0, 0]), int(positions[0, 1])
            self._advance(epoch, batch)
            out = (_as_torch(images, self.device), _as_torch(moments, torch.device("cpu")),
                   _as_torch(labels, torch.device("cpu")).reshape(-1))
            if self.config.return_keys:
                out += ([f"{int(k):08d}" for k in positions[:, 2]],)
            yield out


def _as_torch(tensors, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor on ``device`` (GPU lists copied on-device)."""
    if hasattr(tensors, "as_cpu") and device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dense = tensors.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensors.as_array()))


def make_loader(config: LoaderConfig) -> _Loader:
    """The loader ``config.backend`` asks for; ``auto``: DALI when installed, else PyTorch."""
    config.check()
    if config.backend == "dali" or (config.backend == "auto" and dali_problem() is None):
        return DALILoader(config)
    return TorchLoader(config)
