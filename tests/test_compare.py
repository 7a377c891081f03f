"""``python -m repa_fast.compare``: REPA against ``--proj-coeff 0`` on the demo. Two short
runs (child processes, as a user runs it), then both measured; a second call reuses them."""
import json

import numpy as np
import pytest
import torch

from repa_fast.analysis.demo_compare import EVAL_TIMES, denoising_loss
from repa_fast.compare import main

pytest.importorskip("tqdm")

TINY = ["--max-train-steps", "2", "--samples-per-class", "2", "--analysis-samples", "48",
        "--loss-images", "24",
        "--device", "cpu", "--batch-size", "8", "--checkpointing-steps", "2",
        "--sampling-steps", "100", "--report-to", "none"]


@pytest.mark.parametrize("flags, named", [
    (["--exp-name", "x"], "--exp-name: compare sets it"),
    (["--proj-coeff=0"], "--proj-coeff must be > 0"),
    (["--output-dir", "x"], "--output-dir: compare sets it"),
    (["--max-train-steps", "0"], "--max-train-steps must be >= 1"),
    (["--samples-per-class", "0"], "--samples-per-class must be >= 1"),
    (["--analysis-samples", "3"], "--analysis-samples must be >= 16"),
    (["--loss-images", "0"], "--loss-images must be >= 1"),
    (["--model", "DiT-T/2"], "--model DiT-T/2: compare measures SiT runs"),
    (["--model=MMDiT-d4/4"], "--model MMDiT-d4/4: compare measures SiT runs"),
    (["--data-dir", "data/imagenet256"], "--data-dir: compare trains on the demo's"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, named):
    assert main(["--out", str(tmp_path / "c"), *flags]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything ran


def test_without_scipy_it_stops_before_training(tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy raises ImportError
    assert main(["--out", str(tmp_path / "c")]) == 2
    assert "compare needs scipy" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_bad_train_flag_stops_with_the_run_named(tmp_path, capfd):
    assert main(["--out", str(tmp_path / "c"), "--no-such-flag"]) == 2
    err = capfd.readouterr().err
    assert "--no-such-flag" in err and "the repa run refused its flags" in err


class Zero(torch.nn.Module):
    """v = 0 everywhere: the loss is then E|dα·x₀ + dσ·ε|² = E|x₀|² + E|ε|² (linear path)."""

    def forward(self, x, t, y, force_drop_ids=None):
        return torch.zeros_like(x)


def test_the_denoising_loss_is_the_velocity_mse():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.int64)
    found = denoising_loss(Zero(), images, labels, "linear", seed=0, batch=24)
    x0 = images.float() / 127.5 - 1
    assert len(found["per_time"]) == EVAL_TIMES
    # same noise at every time: the per-time values differ only through the path, not here
    expected = float((x0 ** 2).mean()) + 1.0
    assert found["mean"] == pytest.approx(expected, rel=0.05)
    again = denoising_loss(Zero(), images, labels, "linear", seed=0, batch=64)
    assert again["per_time"] == pytest.approx(found["per_time"], rel=1e-12)  # nor batching


def test_compare_trains_both_measures_both_and_reuses_them(tmp_path, capfd):
    out = tmp_path / "c"
    assert main(["--out", str(out), *TINY]) == 0
    printed = capfd.readouterr().out
    record = json.loads((out / "compare.json").read_text())
    repa, baseline = record["runs"]["repa"], record["runs"]["baseline"]
    assert repa["proj_coeff"] == 0.5 and baseline["proj_coeff"] == 0.0
    for run in (repa, baseline):
        assert run["steps"] == 2
        assert np.isfinite(run["denoising_loss"]["mean"])
        assert len(run["alignment"]["cknna_at_encoder_depth"]) == 2
        assert run["alignment"]["encoder_depth"] == 2
        assert 0 <= run["samples"]["class_accuracy"] <= 1 and run["samples"]["fd"] > 0
        assert run["analysis"]["data"]["num_samples"] == 48
    # same seed, same data, same initial weights: the runs differ by the projection loss only
    assert repa["denoising_loss"] != baseline["denoising_loss"]
    assert "denoising loss (held-out" in printed and "shape accuracy" in printed
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # again: both runs are reused (nothing left to train), the same numbers come out
    assert main(["--out", str(out), *TINY]) == 0
    assert capfd.readouterr().out.count("nothing left to train") == 2
    again = json.loads((out / "compare.json").read_text())
    assert again["runs"]["repa"]["denoising_loss"] == repa["denoising_loss"]
    assert again["runs"]["baseline"]["samples"] == baseline["samples"]


def test_ctrl_c_stops_the_run_after_it_saved_and_a_second_call_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "c"
    flags = [*TINY]
    flags[flags.index("--max-train-steps") + 1] = "400"
    proc = subprocess.Popen([sys.executable, "-m", "repa_fast.compare", "--out", str(out),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    metrics = out / "repa" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: compare and its run
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "stopped during the repa run (it saved its state)" in err
    saved = sorted((out / "repa" / "checkpoints").glob("*.pt"))
    assert saved, err  # the run wrote its state on the way out
    assert not (out / "baseline").exists()
