"""Training loaders: images/s for read + decode + batch (+ host-to-device copy), DALI vs the
PyTorch fallback, at 256px and 512px. DALI decodes with nvJPEG on the GPU (``mixed``) where
there is one, else on the CPU. The shards hold random JPEGs (quality 95, 4:4:4) and random
moments: decoding cost depends on size and entropy, not content. Rounds are whole batches.

Also recorded: ``startup_s`` (make_loader to the first batch: DALI spawns its reader
processes, PyTorch forks its workers) and the sample files the benchmark's own process read
during the timed batches (``main_process_file_reads``, ``main_thread_file_reads``): 0 for DALI,
whose parallel external source reads in reader processes; and the CPU time the benchmark's
thread spent per batch (``main_thread_cpu_ms_per_batch``)."""
import io
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bench_utils import ON_GPU, timed
from repa_fast.data import LoaderConfig, make_loader
from repa_fast.data.loaders import dali_problem
from repa_fast.data.samples import read_counts
from repa_fast.data.shards import FORMAT, INDEX, ShardWriter, shard_name, write_json_atomic

SAMPLES, BATCH, WORKERS = (2048, 256, 8) if ON_GPU else (48, 8, 2)


def smooth_jpeg(rng, size):
    # low-frequency noise compresses like a photo, unlike white noise
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, subsampling=0)
    return out.getvalue()


@pytest.fixture(scope="module", params=[256, 512])
def shards(request, tmp_path_factory):
    size = request.param
    root = tmp_path_factory.mktemp(f"shards{size}")
    rng = np.random.default_rng(0)
    jpegs = [smooth_jpeg(rng, size) for _ in range(16)]
    moments = io.BytesIO()
    np.save(moments, rng.standard_normal((8, size // 8, size // 8)).astype(np.float32))
    per_shard, names = 512, []
    for s in range(0, SAMPLES, per_shard):
        writer = ShardWriter(str(root), s // per_shard)
        for i in range(s, min(s + per_shard, SAMPLES)):
            writer.add(f"{i:08d}", jpegs[i % 16], "jpg", moments.getvalue(), i % 10)
        writer.commit([])
        names.append(dict(name=shard_name(s // per_shard) + ".tar",
                          num_samples=min(per_shard, SAMPLES - s)))
    write_json_atomic(str(root / INDEX), dict(format=FORMAT, resolution=size, num_classes=10,
                                              shards=names, num_samples=SAMPLES))
    return str(root), size


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_images_per_second(benchmark, shards, backend):
    if backend == "dali" and dali_problem():
        pytest.skip(dali_problem())
    root, size = shards
    start = time.perf_counter()
    loader = make_loader(LoaderConfig(root, batch_size=BATCH, num_workers=WORKERS,
                                      backend=backend))
    batches = iter(loader)
    first = next(batches)
    startup = time.perf_counter() - start
    del first
    device = torch.device("cuda" if ON_GPU else "cpu")

    def next_batch():
        images, moments, labels = next(batches)
        return images.to(device, non_blocking=True), moments.to(device, non_blocking=True)

    rounds, warmup = (20, 3) if ON_GPU else (5, 3)
    reads, cpu = read_counts(), time.thread_time()
    timed(benchmark, next_batch, rounds=rounds, warmup=warmup)
    cpu, after = time.thread_time() - cpu, read_counts()
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        images_per_s=BATCH / median, resolution=size, backend=backend, batch=BATCH,
        workers=WORKERS, startup_s=startup,
        # what handing out a batch costs the training loop's thread (DALI: unpacking what the
        # readers sent; before the parallel source also reading and parsing every sample)
        main_thread_cpu_ms_per_batch=1e3 * cpu / (rounds + warmup),
        decode="nvJPEG (mixed)" if backend == "dali" and ON_GPU else "CPU",
        main_process_file_reads=after["reads"] - reads["reads"],
        main_process_bytes_read=after["bytes"] - reads["bytes"],
        main_thread_file_reads=after["main_thread_reads"] - reads["main_thread_reads"])
    if backend == "dali":
        benchmark.extra_info["reader_processes"] = len(loader.reader_pids)
        assert benchmark.extra_info["main_process_file_reads"] == 0, \
            "the DALI loader read sample files in the training process"
        assert os.getpid() not in loader.reader_pids
