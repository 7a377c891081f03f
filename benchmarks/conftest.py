"""Benchmark suites run Triton through its interpreter where no GPU is present."""
import datetime
import os
import platform
import signal

import pytest
import torch

# benchmarks/gpu_check.sh time-boxes each step with SIGINT so that pytest stops and still
# writes its JSON and XML; a job started in the background without job control inherits
# SIGINT ignored, and Python then installs no KeyboardInterrupt handler: restore it.
signal.signal(signal.SIGINT, signal.default_int_handler)


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Printed at the top of a run (and again under the benchmark table) where there is no CUDA.
CPU_TRITON_NOTE = (
    "note: no CUDA device: rows of Triton providers (fused, fused_saved) time Triton's CPU "
    "interpreter (TRITON_INTERPRET=1), typically hundreds to thousands of times slower than "
    "the reference; they only show that the kernels run and say nothing about GPU speed")


def pytest_report_header(config):
    """The CPU note in the session header (shown unless -q or --no-header)."""
    return None if torch.cuda.is_available() else CPU_TRITON_NOTE


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """The CPU note again under pytest-benchmark's table (trylast: after it), so that a
    quiet run (-q, no header) still prints it beside the rows it is about."""
    session = getattr(config, "_benchmarksession", None)
    if torch.cuda.is_available() or not getattr(session, "benchmarks", None):
        return
    terminalreporter.write_line(CPU_TRITON_NOTE, yellow=True)


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
