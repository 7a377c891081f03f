"""The training loop on the CPU: the demo, exact resume, non-finite steps, faults, config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from repa_fast.train import main, train
from repa_fast.training.checkpoint import list_checkpoints, save_atomic
from repa_fast.training.config import TrainConfig, parse_args

pytest.importorskip("tqdm")


def demo_args(out, *extra):
    return ["--preset", "demo", "--output-dir", str(out), "--batch-size", "8",
            "--max-train-steps", "6", "--checkpointing-steps", "3", "--sampling-steps", "6",
            *extra]


def records(out, name="demo"):
    with open(out / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_demo_trains_logs_checkpoints_and_samples(tmp_path):
    assert main(demo_args(tmp_path)) == 0
    run = tmp_path / "demo"
    logged = records(tmp_path)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "proj_loss", "grad_norm", "images_per_sec"} <= logged[0].keys()
    assert list_checkpoints(str(run / "checkpoints")) == [3, 6]
    assert (run / "samples" / "0000006.png").exists()
    assert json.loads((run / "config.json").read_text())["model"] == "SiT-T/4"
    # the consolidated file loads like an official checkpoint
    ckpt = torch.load(run / "checkpoints" / "0000006.pt", weights_only=True)
    assert {"model", "ema", "args", "steps", "opt"} <= ckpt.keys() and ckpt["steps"] == 6
    assert isinstance(ckpt["args"], dict)
    tensorboard = pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert events.Tags()["images"] == ["samples/ema"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    assert main(demo_args(tmp_path / "a")) == 0
    assert main(demo_args(tmp_path / "b", "--max-train-steps", "3")) == 0
    assert main(demo_args(tmp_path / "b", "--resume", "auto")) == 0
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["proj_loss"], ra["grad_norm"]) == \
               (rb["loss"], rb["proj_loss"], rb["grad_norm"])
    ea = torch.load(tmp_path / "a" / "demo" / "checkpoints" / "0000006.pt", weights_only=True)
    eb = torch.load(tmp_path / "b" / "demo" / "checkpoints" / "0000006.pt", weights_only=True)
    assert all(torch.equal(ea["ema"][k], eb["ema"][k]) for k in ea["ema"])


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import repa_fast.vae as vae
    real, calls = vae.sample_posterior, []

    def poisoned(moments, *args, **kwargs):
        calls.append(1)
        x = real(moments, *args, **kwargs)
        return x * float("nan") if len(calls) == 2 or len(calls) > 6 else x

    monkeypatch.setattr(vae, "sample_posterior", poisoned)
    config = parse_args(demo_args(tmp_path, "--max-nonfinite-steps", "3"))
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss"):
        train(config)
    logged = records(tmp_path)
    assert logged[-1]["step"] == 5 and logged[-1]["skipped_steps"] == 1
    ckpt_dir = str(tmp_path / "demo" / "checkpoints")
    assert list_checkpoints(ckpt_dir) == [3]
    torch.load(os.path.join(ckpt_dir, "0000003.pt"), weights_only=True)  # intact


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "0000001.pt")
    save_atomic({"steps": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_atomic({"steps": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"steps": 1}
    assert os.listdir(tmp_path) == ["0000001.pt"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "repa_fast.train",
                             *demo_args(tmp_path, "--max-train-steps", "100000",
                                        "--checkpointing-steps", "100000")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "demo" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    steps = list_checkpoints(str(tmp_path / "demo" / "checkpoints"))
    assert len(steps) == 1 and steps[0] >= 2
    assert f"saved step {steps[0]} and stopped" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "SiT-Q/2"], "--model must be one of"),
    (["--preset", "fast"], "--preset must be one of demo"),
    (["--preset", "demo", "--data-dir", "/nonexistent/data"], "--data-dir '/nonexistent/data' does not exist"),
    (["--preset", "demo", "--mixed-precision", "fp8"], "--mixed-precision must be one of"),
    (["--preset", "demo", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--preset", "demo", "--report-to", "wandb"], "--report-to must be one of tensorboard, none"),
])
def test_config_errors_exit_2(tmp_path, capsys, argv, message):
    assert main(argv + ["--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_batch_must_divide_across_processes():
    with pytest.raises(ValueError, match="--batch-size 10 .global. must be divisible by the "
                                         "number of processes .4."):
        TrainConfig(batch_size=10).check(world_size=4)
