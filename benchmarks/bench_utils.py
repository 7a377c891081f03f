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
    return result

