"""Benchmarks run without CUDA say that Triton rows time Triton's CPU interpreter.

On a CPU the Triton providers (``fused``, ``fused_saved``) run through ``TRITON_INTERPRET=1``
and come out hundreds to thousands of times slower than the reference; benchmarks/conftest.py
prints a note saying so in pytest's header and again under the benchmark table.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_conftest():
    spec = importlib.util.spec_from_file_location("repa_bench_conftest",
                                                  ROOT / "benchmarks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_cpu_note(text) -> bool:
    return (isinstance(text, str) and "Triton" in text and "CPU interpreter" in text
            and "nothing about GPU speed" in text)


def test_header_note_only_without_cuda(bench_conftest, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert is_cpu_note(bench_conftest.pytest_report_header(config=None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench_conftest.pytest_report_header(config=None) is None


class Reporter:
    def __init__(self):
        self.lines = []

    def write_line(self, line, **markup):
        self.lines.append(line)


@pytest.mark.parametrize("cuda, benchmarks, expected", [
    (False, [object()], True), (False, [], False), (True, [object()], False)])
def test_note_under_the_table(bench_conftest, monkeypatch, cuda, benchmarks, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    reporter = Reporter()
    config = SimpleNamespace(_benchmarksession=SimpleNamespace(benchmarks=benchmarks))
    bench_conftest.pytest_terminal_summary(terminalreporter=reporter, config=config)
    assert [is_cpu_note(line) for line in reporter.lines] == ([True] if expected else [])


def test_pytest_on_benchmarks_prints_the_note_first():
    """The real command's header (collection only: nothing is timed), CUDA hidden."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_bench_projection_loss.py",
         "--benchmark-only", "--collect-only", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    notes = [i for i, line in enumerate(lines) if is_cpu_note(line)]
    first_test = next(i for i, line in enumerate(lines) if "test_projection_loss" in line)
    assert notes and notes[0] < first_test, result.stdout


def test_benchmarks_readme_has_the_note():
    text = " ".join((ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8").split())
    assert "time Triton's CPU interpreter" in text and "say nothing about GPU speed" in text
