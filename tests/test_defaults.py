"""Defaults that fit the machine: loader workers from the CPUs there are, a dashboard only when
its package is installed, and the Quick start's outputs kept out of git."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repa_fast.training.config import TrainConfig, parse_args, save_config

ROOT = Path(__file__).resolve().parents[1]


def cpus(monkeypatch, n, local_processes=None):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: n)
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if local_processes:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))


@pytest.mark.parametrize("n, local, workers", [(1, None, 0), (2, None, 1), (3, None, 2),
                                                (16, None, 4), (16, 8, 1), (96, 8, 4)])
def test_num_workers_default_fits_the_cpus(monkeypatch, n, local, workers):
    """torch warns when a DataLoader has more workers than the CPUs it may use; the default
    leaves one CPU per training process to it and keeps the official 4 where there is room."""
    cpus(monkeypatch, n, local)
    config = parse_args([])
    config.check()
    assert config.num_workers == workers


def test_explicit_num_workers_and_the_demo_preset_are_kept(monkeypatch):
    cpus(monkeypatch, 2)
    config = parse_args(["--num-workers", "3"])
    config.check()
    assert config.num_workers == 3
    config = parse_args(["--preset", "demo"])
    config.check()
    assert config.num_workers == 1


def test_report_to_auto_without_tensorboard_is_silent(monkeypatch, tmp_path, capsys):
    """The Quick-start install has no tensorboard: the default logs to metrics.jsonl only,
    without a message asking to install it."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    config = parse_args(["--preset", "demo"])
    config.check()
    assert config.report_to == "none"
    from repa_fast.training.metrics import Reporter
    Reporter(config.report_to, str(tmp_path)).close()
    assert "not installed" not in capsys.readouterr().out


def test_report_to_auto_with_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    config = parse_args([])
    config.check()
    assert config.report_to == "tensorboard"


def test_explicit_report_to_tensorboard_still_says_what_is_missing(monkeypatch, tmp_path,
                                                                   capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    config = parse_args(["--report-to", "tensorboard"])
    config.check()
    assert config.report_to == "tensorboard"
    from repa_fast.training.metrics import Reporter
    Reporter(config.report_to, str(tmp_path)).close()
    assert "pip install 'repa_fast[tensorboard]'" in capsys.readouterr().out


def test_config_json_records_the_resolved_values(monkeypatch, tmp_path):
    cpus(monkeypatch, 2)
    config = TrainConfig()
    config.check()
    config.check()  # idempotent: a second check changes nothing
    save_config(config, str(tmp_path / "config.json"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_workers"] == 1 and saved["report_to"] in ("tensorboard", "none")


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="not a git checkout")
def test_quick_start_outputs_are_ignored_by_git():
    outputs = ["exps/demo/metrics.jsonl", "exps/demo-data/index.json",
               "exps/demo/checkpoints/0001000.pt", "exps/compare/compare.json", "grid.png",
               "samples/run/000000.png",
               "data/imagenet256/index.json", "ckpts/dinov2_vitb14_pretrain.pth"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=ROOT,
                          capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(outputs), proc.stderr
    sources = ["repa_fast/data/loaders.py", "tests/test_data.py", "benchmarks/results"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *sources], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.stdout == ""
