"""Helpers of the benchmark suites: device, dtype, synchronised timing with FLOP/s."""
import datetime
import platform

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# bf16 is the training dtype on GPU; the CPU runs fp32 with small shapes so the suite always works.
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def timed(benchmark, fn, *, flops: float = 0.0, rounds: int = 20, warmup: int = 3):
    """Run ``fn`` under pytest-benchmark with device synchronisation; record TFLOP/s and
    peak memory in ``extra_info``. Returns ``fn``'s last result."""
    for _ in range(warmup):
        fn()
    sync()
    if ON_GPU:
        base_mem = torch.cuda.memory_allocated()  # inputs, weights, .grad buffers
        torch.cuda.reset_peak_memory_stats()

    def run():
        out = fn()
        sync()
        return out

    result = benchmark.pedantic(run, rounds=rounds, iterations=1)
    median = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if ON_GPU else platform.processor() or "cpu",
                dtype=str(DTYPE), torch=torch.__version__,
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



def official_projection_loss(zs, zs_tilde):
    """The official loss.py: normalise and average sample by sample in Python."""
    import torch.nn.functional as F
    total = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            total = total + (-(F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1))
                             .sum(dim=-1)).mean()
    return total / (len(zs) * zs[0].shape[0])
