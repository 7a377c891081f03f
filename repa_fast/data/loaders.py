"""Training loaders over prepared shards: NVIDIA DALI (GPU JPEG decoding) or PyTorch.

Both yield ``(images uint8 [B, 3, H, W], moments float32 [B, 2·C, H/8, W/8], labels int64
[B])`` like the official dataset, and both follow the same sample order, computed in
:mod:`repa_fast.data.samples`. A text-to-image set (``loader.text_to_image``) yields
``(images, moments, contexts [B, L, D], caption int64 [B])`` instead: the text features of
one caption per sample (the set's dtype, float32 for CLIP) and which of the sample's captions
it is, chosen from (seed, epoch, position in the epoch's global order) as
:mod:`repa_fast.data.captions` says, so the choice too is the same for both loaders, any
number of processes, and a resumed run. (The official ``CFGDataset`` replaces a caption by
the empty one with probability ``p_uncond`` in the loader; here that is the training step's
work, on the device: :func:`repa_fast.data.empty_context` gives the empty context.)

    epoch e:  perm = permutation of all N samples drawn from (seed, e)   (identity if not shuffled)
              padded to a multiple of world_size with its own first samples (every sample is
              seen at least once per epoch, every rank gets ceil(N / world_size))
              rank r takes perm[r::world_size], in batches of batch_size (the incomplete last
              batch of an epoch is dropped, as the official DataLoader(drop_last=True))

The position (epoch, batches consumed) is in :meth:`state_dict`; a loader built with the same
arguments and given that state continues with exactly the batches the first had not yielded.

DALI: the order is fed through a parallel ``fn.external_source`` — reader processes
(``py_start_method="spawn"``: safe next to CUDA) read the encoded bytes at their byte offsets
in the shards and the moments, so the training process does no file reading —, into
``fn.decoders.image(device='mixed')`` (nvJPEG on the GPU), or ``device='cpu'`` without a GPU.
On a GPU the images, moments and contexts come out as device tensors and the labels (caption
indices) in pinned host memory: ``.to(device, non_blocking=True)`` never waits.
``num_workers=0`` reads in the training process instead (no reader processes to start).
DALI's own ``readers.webdataset`` cannot reproduce a seeded global shuffle or resume
mid-epoch, which is why the order is not left to it.

Damaged data (details in :mod:`repa_fast.data.samples`): shards are checked against their
``index.json`` checksums when first opened (hashed once per machine and file version: the
records of shards that passed are kept in ``verified-shards/`` of
``${REPA_FAST_CACHE:-~/.cache/repa_fast}``), samples as they are read, and every error names
the shard file and the sample key. I/O errors are not damage: they are raised as an
``OSError`` naming shard and key, under either setting. ``on_bad_sample="error"`` (default)
raises :class:`BadSampleError` (a ``ValueError``) at the batch holding the first bad sample;
``"skip"`` replaces each bad sample by the next good one of the rank's epoch order (batch
shapes and the place of every other sample unchanged), warns once per bad sample
(:class:`BadSampleWarning`) and counts the replacements in ``loader.skipped_samples``
(cumulative, kept in :meth:`state_dict`). A shard that fails its checksum is skipped whole
under ``"skip"``: its damage may leave values that look valid, so none of its samples is
trusted; one loud warning names it. DALI: the reader processes check checksums, moments,
labels and image headers (format, size, PNG chunk CRCs), so its decoder sees only images
that passed them; damage inside a JPEG's compressed data is found by DALI's decoder alone,
and the loader then raises under either setting (a DALI pipeline cannot continue past a
failed decode), naming the sample, which it finds by decoding the batches around the failure
with PIL. JPEG damage that still decodes (libjpeg's "Corrupt JPEG data" warnings) is caught
by neither loader unless the shard's checksum is recorded.
"""
from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .child_process import SignalGuard
from .captions import batch_draws
from .samples import (BadSampleError, BadSampleWarning, DALIBatchSource, SampleTable,
                      batches_per_epoch, check_image_header, decode_latent, decode_pixels,
                      epoch_order, read_batch, read_counts, scan_tar)
from .shards import verified_dir

__all__ = ["BACKENDS", "BadSampleError", "BadSampleWarning", "DALILoader", "LoaderConfig",
           "SampleTable", "TorchLoader", "dali_problem", "decode_latent", "epoch_order",
           "make_loader", "read_counts", "scan_tar"]

BACKENDS = ("auto", "dali", "torch")
ON_BAD_SAMPLE = ("error", "skip")
MAX_READERS = 4  # DALI reader processes at most: reading is light next to decoding


@dataclass
class LoaderConfig:
    data_dir: str
    batch_size: int                 # per rank
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 8            # PyTorch: decode processes; DALI: CPU threads, and
                                    # min(num_workers, MAX_READERS) reader processes (0: none)
    backend: str = "auto"
    device: Optional[str] = None    # where DALI decodes: "cuda:N" (mixed) or "cpu"; default auto
    return_keys: bool = False       # also yield the batch's sample keys, last (tests, debugging)
    on_bad_sample: str = "error"    # "error": raise; "skip": replace, warn, count (module doc)
    verify_shards: bool = True      # hash each shard when first opened (False: size only)

    def check(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}); got {self.rank}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}; got "
                             f"{self.on_bad_sample!r}")


def _batches(table: SampleTable, config: LoaderConfig, epoch: int, batch: int):
    """``(epoch, batch, order, start)`` from position (epoch, batch) on, forever: the batch
    is ``order[start:start + batch_size]`` of the rank's epoch order."""
    while True:
        order = epoch_order(len(table), config.seed, epoch, config.rank, config.world_size,
                            config.shuffle)
        per_epoch = len(order) // config.batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size {config.batch_size} is larger than the "
                             f"{len(order)} samples rank {config.rank} reads per epoch")
        for b in range(batch, per_epoch):
            yield epoch, b, order, b * config.batch_size
        epoch, batch = epoch + 1, 0


class _Loader:
    """Common position bookkeeping: iterate forever, ``state_dict`` / ``load_state_dict``."""

    backend = ""

    def __init__(self, config: LoaderConfig):
        config.check()
        self.config = config
        self.table = SampleTable(config.data_dir)
        self.table.hash_shards = config.verify_shards
        self.epoch, self.batch = 0, 0
        first = self.table.index
        self.resolution, self.num_classes = first["resolution"], first["num_classes"]
        self.text_to_image = self.table.t2i  # batches hold contexts and captions (module doc)
        self.skipped_samples = 0   # bad samples replaced in the batches yielded so far
        self._warned: set = set()  # (shard,) or (shard, key): warned once each

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return batches_per_epoch(len(self.table), self.config.world_size,
                                 self.config.batch_size)

    def state_dict(self) -> dict:
        c = self.config
        return dict(epoch=self.epoch, batch=self.batch, seed=c.seed, world_size=c.world_size,
                    batch_size=c.batch_size, num_samples=len(self.table),
                    skipped_samples=self.skipped_samples)

    def load_state_dict(self, state: dict) -> None:
        c = self.config
        for name, mine in (("seed", c.seed), ("world_size", c.world_size),
                           ("batch_size", c.batch_size), ("num_samples", len(self.table))):
            if state[name] != mine:
                raise ValueError(f"cannot resume: the saved loader had {name}={state[name]}, "
                                 f"this one has {mine}; the sample order would differ")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped_samples = int(state.get("skipped_samples", 0))  # absent from older states

    def _advance(self, epoch: int, batch: int) -> None:
        # position of the first batch not yet handed out
        self.epoch, self.batch = (epoch, batch + 1) if batch + 1 < len(self) else (epoch + 1, 0)

    def _bad_samples(self, bad: list) -> None:
        """Act on the batch's replaced samples ``(slot, shard, key, whole_shard, message)``
        before it is yielded: raise the first ("error"), or warn once each and count."""
        for _, shard, key, whole, message in bad:
            if self.config.on_bad_sample == "error":
                raise BadSampleError(message, shard, key, whole)
            seen = (shard,) if whole else (shard, key)
            if seen in self._warned:
                continue
            self._warned.add(seen)
            if whole:
                warnings.warn(f"SKIPPING A WHOLE SHARD: {message}. Every sample of "
                              f"{self.table.shards[shard]} is replaced by the next good sample "
                              f"of the epoch order until it is recreated", BadSampleWarning,
                              stacklevel=3)
            else:
                warnings.warn(f"skipped a bad sample: {message}; replaced by the next good "
                              f"sample of the epoch order", BadSampleWarning, stacklevel=3)
        self.skipped_samples += len(bad)

    def _scratch(self) -> str:
        """A folder for this iteration's shared state (the DALI readers' table), removed
        when the iteration ends; the shard records go to the machine's folder, or to this
        one when that cannot be written (then shared by this iteration's processes only)."""
        folder = tempfile.mkdtemp(prefix="repa-fast-loader-")
        self.table.records = verified_dir() or folder
        return folder

    def _end_scratch(self, folder: str) -> None:
        self.table.records = None
        shutil.rmtree(folder, ignore_errors=True)


class TorchLoader(_Loader):
    """PyTorch fallback: worker processes read and decode (Pillow, libjpeg-turbo)."""

    backend = "torch"

    def __iter__(self):
        c = self.config
        scratch = self._scratch()
        guard = SignalGuard()
        try:
            dataset = _BatchDataset(self.table, c, self.epoch, self.batch)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=c.num_workers,
                pin_memory=torch.cuda.is_available(), prefetch_factor=2 if c.num_workers else None,
                # its own generator: starting workers must not draw from the global RNG, or a
                # resumed training run would draw different noise from the uninterrupted one
                generator=torch.Generator().manual_seed(c.seed),
                # Ctrl-C / SIGTERM to the process group: training saves first, then stops
                # the workers (SignalGuard: they leave on SIGTERM once it is released)
                worker_init_fn=guard)
            for epoch, batch, images, moments, conditions, keys, bad in loader:
                if isinstance(bad, OSError):  # a worker's read error, raised here
                    raise bad
                self._bad_samples(bad)
                self._advance(epoch, batch)
                out = (images, moments, *conditions)
                yield out + (keys,) if c.return_keys else out
        finally:
            guard.release()
            atexit.unregister(guard.release)
            self._end_scratch(scratch)


class _BatchDataset(torch.utils.data.IterableDataset):
    """Batches in the planned order; worker w decodes batches w, w + W, ... and the
    DataLoader hands them out round-robin, so the order is kept."""

    def __init__(self, table: SampleTable, config: LoaderConfig, epoch: int, batch: int):
        self.table, self.config, self.start = table, config, (epoch, batch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        handles: dict = {}
        batches = _batches(self.table, self.config, *self.start)
        for n, (epoch, batch, order, start) in enumerate(batches):
            if n % workers != worker:
                continue
            c = self.config
            draws = (batch_draws(c.seed, epoch, c.rank, c.world_size, start, c.batch_size)
                     if self.table.t2i else None)
            try:
                ids, pixels, moments, conditions, bad = read_batch(
                    self.table, order, start, c.batch_size, handles, decode_pixels, draws)
            except OSError as error:
                if info is None:
                    raise
                # In a worker: handed to the loader, which raises it whole (errno, path). A
                # worker's own exception comes back as text, and its traceback keeps the
                # DataLoader's iterator, so the workers (they ignore SIGTERM) alive, and an
                # exiting interpreter waits for them forever.
                yield epoch, batch, None, None, None, None, error
                return
            images = [torch.from_numpy(p).permute(2, 0, 1) for p in pixels]
            conditions = (tuple(torch.from_numpy(a) for a in conditions) if self.table.t2i
                          else (torch.from_numpy(conditions),))
            yield (epoch, batch, torch.stack(images),
                   torch.stack([torch.from_numpy(m) for m in moments]), conditions,
                   [f"{k:08d}" for k in self.table.key[ids]], bad)


def dali_problem() -> Optional[str]:
    """Why the DALI backend cannot run here (None when it can)."""
    find = importlib.util.find_spec
    if find("nvidia") is None or find("nvidia.dali") is None:
        return "nvidia-dali is not installed (pip install 'repa_fast[dali]')"
    return None


class DALILoader(_Loader):
    """DALI: reader processes read encoded bytes and moments in the planned order ->
    ``fn.decoders.image`` (nvJPEG on the GPU)."""

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
        # host outputs pinned wherever a GPU may take them: a copy from pageable memory
        # waits for the copy, and with it for the GPU's queue
        self.pin = torch.cuda.is_available()
        self.readers = max(0, min(config.num_workers, MAX_READERS))
        self.reader_pids: set = set()  # processes that read the samples yielded so far

    def _pipeline(self, source: DALIBatchSource):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        t2i = self.table.t2i
        # shared-memory (/dev/shm) slots, one batch each, readers + 3 of them: sized for a
        # typical batch from the start (DALI enlarges a slot a batch does not fit)
        per_sample = self.table.image_size + self.table.latent_size
        if t2i:
            (length, width), context_dtype = self.table.context_spec
            per_sample = per_sample + length * width * context_dtype.itemsize
        hint = int(1.25 * per_sample.mean()) + 1024
        outputs = ["encoded", "moments"] + (["contexts", "captions"] if t2i else ["labels"]) \
            + ["positions", "notes"]
        dtypes = [types.UINT8, types.FLOAT] + (
            [types.to_dali_type(context_dtype), types.INT64] if t2i else [types.INT64]) + \
            [types.INT64, types.UINT8]

        @pipeline_def(batch_size=self.config.batch_size,
                      num_threads=max(1, self.config.num_workers),
                      device_id=self.device.index if gpu else None, prefetch_queue_depth=2,
                      exec_dynamic=True, py_num_workers=self.readers, py_start_method="spawn")
        def pipeline():
            # every reader makes a whole batch; a batch more than readers is kept under way
            parallel = dict(parallel=True, prefetch_queue_depth=self.readers + 1,
                            bytes_per_sample_hint=hint)
            out = dict(zip(outputs, fn.external_source(
                source=source, num_outputs=len(outputs), batch=True, batch_info=True,
                dtype=dtypes, **(parallel if self.readers else {}))))
            images = fn.decoders.image(out.pop("encoded"), device="mixed" if gpu else "cpu",
                                       output_type=types.RGB)
            images = fn.transpose(images, perm=[2, 0, 1])  # HWC -> CHW like the official loader
            if gpu:  # copied ahead of the step, on DALI's stream
                out["moments"] = out["moments"].gpu()
                if t2i:
                    out["contexts"] = out["contexts"].gpu()
            return (images, *out.values())

        pipe = pipeline()
        try:
            pipe.build()  # starts the reader processes
        except RuntimeError as error:
            if self.readers and "initialization failed" in str(error):
                raise RuntimeError(
                    "the DALI loader's reader processes did not start. They are spawned, and "
                    "spawned processes import the main module again: it must be importable "
                    "on its own (run it with python -m, or guard a script's set-up with "
                    "if __name__ in ('__main__', '__mp_main__')); the reason is printed "
                    "above. num_workers=0 reads in this process instead") from error
            raise
        return pipe

    def __iter__(self):
        c = self.config
        if len(self) == 0:
            raise ValueError(f"batch_size {c.batch_size} is larger than the "
                             f"{-(-len(self.table) // c.world_size)} samples rank {c.rank} reads "
                             f"per epoch")
        scratch = self._scratch()  # the readers' table
        pipe = None
        try:
            if self.readers:
                self.table.save(scratch)
            pipe = self._pipeline(DALIBatchSource(self.table, c.seed, c.rank, c.world_size,
                                                  c.shuffle, c.batch_size, self.epoch,
                                                  self.batch, table_dir=scratch if self.readers
                                                  else None))
            gpu = self.device.type == "cuda"
            while True:
                stream = torch.cuda.current_stream(self.device) if gpu else None
                try:  # on the GPU: outputs ordered on the training stream, no host wait
                    images, moments, *conditions, positions, notes = (pipe.run(stream) if gpu
                                                                      else pipe.run())
                except Exception as error:
                    self._diagnose(error)
                    raise
                positions = _as_torch(positions)
                self._bad_samples(_bad_of(positions, notes))
                epoch, batch = int(positions[0, 0]), int(positions[0, 1])
                self._advance(epoch, batch)
                self.reader_pids.update(positions[:, 3].tolist())
                out = (_as_torch(images, self.pin, stream), _as_torch(moments, self.pin, stream))
                if self.text_to_image:
                    contexts, captions = conditions
                    out += (_as_torch(contexts, self.pin, stream),
                            _as_torch(captions, self.pin).reshape(-1))
                else:
                    out += (_as_torch(conditions[0], self.pin).reshape(-1),)
                if c.return_keys:
                    out += ([f"{int(k):08d}" for k in positions[:, 2]],)
                yield out
        finally:  # stop the reader processes now, not when the pipeline is collected
            pool = getattr(pipe, "_py_pool", None)
            if pool is not None:
                pool.close()
            self._end_scratch(scratch)

    def _diagnose(self, error: Exception) -> None:
        """DALI failed on a batch at or a little after the current position (its readers
        and decoder work ahead): decode those batches' samples with PIL here, and raise a
        :class:`BadSampleError` naming the first whose image passes the readers' header
        check but does not decode (under "error", also any other bad sample). Returns when
        none is found."""
        c, handles, found = self.config, {}, None
        epoch, batch = self.epoch, self.batch
        try:
            for _ in range(self.readers + 4):  # DALI's queue depths: readers + 1, then 2
                order = epoch_order(len(self.table), c.seed, epoch, c.rank, c.world_size,
                                    c.shuffle)
                for pos in range(batch * c.batch_size, (batch + 1) * c.batch_size):
                    i = int(order[pos])
                    try:
                        self.table.sample(i, handles, check_image_header)
                    except BadSampleError as bad:
                        found = found or (bad if c.on_bad_sample == "error" else None)
                        continue  # the readers replace it
                    try:
                        self.table.sample(i, handles, decode_pixels)
                    except BadSampleError as bad:
                        raise BadSampleError(
                            f"DALI could not decode a batch ({type(error).__name__}): {bad}. "
                            f"Damage past the image header is not skipped by the DALI "
                            f"loader: recreate the shard, or use backend='torch'",
                            bad.shard, bad.key, bad.whole_shard) from error
                epoch, batch = (epoch, batch + 1) if batch + 1 < len(self) else (epoch + 1, 0)
        finally:
            for f in handles.values():
                f.close()
        if found is not None:
            raise found from error


def _bad_of(positions: torch.Tensor, notes) -> list:
    """The replaced samples ``(slot, shard, key, whole_shard, message)`` of a DALI batch."""
    slots = (positions[:, 4] >= 0).nonzero().flatten().tolist()
    return [(j, int(positions[j, 4]), int(positions[j, 5]), bool(positions[j, 6]),
             bytes(np.array(notes[j])).decode(errors="replace")) for j in slots]


def _as_torch(tensors, pin: bool = False, stream=None) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor. GPU lists: copied on the device, on
    ``stream``. CPU lists: one copy into pinned memory when ``pin``, else no copy (the
    executor hands out buffers it does not reuse while referenced, as DALI's own torch
    iterator relies on)."""
    import ctypes

    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    shapes = tensors.shape()
    if any(tuple(s) != tuple(shapes[0]) for s in shapes):
        raise ValueError(f"samples of different shapes cannot form a batch: {shapes[:4]}...")
    shape, dtype = (len(shapes), *shapes[0]), to_torch_type[tensors.dtype]
    if isinstance(tensors, TensorListGPU):
        dense = tensors.as_tensor()
        out = torch.empty(dense.shape(), dtype=dtype,
                          device=torch.device("cuda", tensors.device_id()))
        return feed_ndarray(dense, out, cuda_stream=stream)
    if not pin:
        return torch.from_dlpack(tensors.as_tensor()).reshape(shape)
    out = torch.empty(shape, dtype=dtype, pin_memory=True)
    tensors.copy_to_external(ctypes.c_void_p(out.data_ptr()))  # straight from DALI's samples
    return out


def make_loader(config: LoaderConfig) -> _Loader:
    """The loader ``config.backend`` asks for; ``auto``: DALI when installed, else PyTorch."""
    config.check()
    if config.backend == "dali" or (config.backend == "auto" and dali_problem() is None):
        return DALILoader(config)
    return TorchLoader(config)
