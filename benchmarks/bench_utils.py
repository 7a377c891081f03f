"""Helpers of the benchmark suites: device, dtype, synchronised timing with FLOP/s."""
import datetime
import platform
import time

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# bf16 is the training dtype on GPU; the CPU runs fp32 with small shapes so the suite always works.
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def device_name() -> str:
    """The GPU's name, or the CPU's model name and the torch threads used."""
    if ON_GPU:
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def timed(benchmark, fn, *, flops: float = 0.0, rounds: int = 20, warmup: int = 3,
          setup=None):
    """Run ``fn`` under pytest-benchmark with device synchronisation; record TFLOP/s and
    peak memory in ``extra_info``. ``setup`` (untimed) runs before every call, e.g. to set
    ``.grad`` to None as ``optimizer.zero_grad()`` does. Returns ``fn``'s last result."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    if setup is not None:
        setup()
    sync()
    if ON_GPU:
        base_mem = torch.cuda.memory_allocated()  # inputs, weights (and what setup keeps)
        torch.cuda.reset_peak_memory_stats()

    def run():
        out = fn()
        sync()
        return out

    result = benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    median = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(device=device_name(), dtype=str(DTYPE), torch=torch.__version__,
                date=datetime.date.today().isoformat())
    if flops:
        info["gflop"] = flops / 1e9
        info["tflops_per_s"] = flops / median / 1e12
    if ON_GPU:
        info["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        # what one call adds on top of what already exists: the memory a trainer pays for it
        info["peak_extra_mem_mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2 ** 20
    return result


_MATMUL_PEAK: dict = {}


def bf16_matmul_peak_tflops() -> float:
    """This card's measured bf16 matmul throughput (8192³, best of 20), the ceiling GEMM
    efficiency is stated against; measured once per session. 0.0 on CPU."""
    if not ON_GPU:
        return 0.0
    if "tflops" not in _MATMUL_PEAK:
        n = 8192
        a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        _MATMUL_PEAK["tflops"] = 2 * n ** 3 / min(times) / 1e12
    return _MATMUL_PEAK["tflops"]


def cpu_fp32_matmul_peak_tflops() -> float:
    """This machine's measured float32 matmul ceiling on all its torch threads: the faster of
    MKL's sgemm (``torch.mm``) and oneDNN's matmul (``mkldnn::_linear_pointwise``, where this
    torch has it), 2048³, best of 5 each. The CPU suites run float32. Measured once."""
    if "cpu_fp32" not in _MATMUL_PEAK:
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        candidates = [lambda: a @ b.t()]
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_linear_pointwise"):
            candidates.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none",
                                                                         [], ""))
        best = float("inf")
        for matmul in candidates:
            matmul()
            for _ in range(5):
                start = time.perf_counter()
                matmul()
                best = min(best, time.perf_counter() - start)
        _MATMUL_PEAK["cpu_fp32"] = 2 * n ** 3 / best / 1e12
    return _MATMUL_PEAK["cpu_fp32"]


def official_projection_loss(zs, zs_tilde):
    """The official loss.py: normalise and average sample by sample in Python."""
    import torch.nn.functional as F
    total = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            total = total + (-(F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1))
                             .sum(dim=-1)).mean()
    return total / (len(zs) * zs[0].shape[0])


def record_memory_and_mfu(info: dict) -> None:
    """Add to a training step's ``extra_info``: the peak allocated memory (GPU) and the
    achieved TFLOP/s as a fraction of the card's measured bf16 matmul peak."""
    if ON_GPU:
        info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    peak = bf16_matmul_peak_tflops()
    if peak:
        info["mfu_vs_measured_peak"] = info["tflops_per_s"] / peak


def loader_step(train_step, cond: torch.Tensor, image_size: int):
    """A no-argument call of ``train_step`` on one fixed batch as the loader hands it over
    (random uint8 images and positive moments of ``train_step.x_shape``, host tensors pinned
    on CUDA), ``cond`` being the batch's labels or contexts; each call is the next step."""
    batch, (channels, size, _) = cond.shape[0], train_step.x_shape
    moments = torch.randn(batch, 2 * channels, size, size, pin_memory=ON_GPU).abs_()
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                           pin_memory=ON_GPU)
    counter = iter(range(10 ** 9))
    return lambda: train_step(next(counter), images, moments, cond)
