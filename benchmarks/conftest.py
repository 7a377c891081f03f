"""Benchmark suites run Triton through its interpreter where no GPU is present."""
import datetime
import os
import platform

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Put the card, the versions and the date in every saved JSON (benchmarks/results/)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from bench_utils import bf16_matmul_peak_tflops, cpu_fp32_matmul_peak_tflops, device_name

    output_json["repa_fast_machine"] = dict(
        device=device_name(),
        torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version,
        python=platform.python_version(), date=datetime.date.today().isoformat(),
        bf16_matmul_peak_tflops=bf16_matmul_peak_tflops())
    if not torch.cuda.is_available():
        output_json["repa_fast_machine"]["fp32_matmul_peak_tflops"] = cpu_fp32_matmul_peak_tflops()
