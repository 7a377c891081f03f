"""DeepSpeed ZeRO training on the CPU (gloo), launched as ``python repa_fast/train.py`` with the
launcher's environment: ZeRO-2 and ZeRO-3 save and exact resume, and bad ``--ds_config``.

Slow: DeepSpeed compiles its CPU communication op (about a minute) the first time in a venv.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "ds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out, *extra, check=True):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, str(ROOT / "repa_fast" / "train.py"), "--preset", "demo",
                           "--output-dir", str(out), "--batch-size", "8",
                           "--checkpointing-steps", "2", "--sampling-steps", "100", *extra],
                          env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out):
    with open(out / "demo" / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


DIT = ("--model", "DiT-T/4")  # DiT's Gaussian diffusion + REPA in the same loop
T2I = ("--preset", "demo-t2i", "--exp-name", "demo")  # text-to-image MMDiT, captioned shapes
ACCUMULATE = ("--gradient-accumulation-steps", "2")  # micro-batches, DDP reducing in the last


@pytest.mark.slow
@pytest.mark.parametrize("stage, model", [(2, ()), (3, ()), pytest.param(3, DIT, id="3-DiT"),
                                          pytest.param(2, T2I, id="2-MMDiT")])
def test_zero_save_and_exact_resume(tmp_path, stage, model):
    config = str(CONFIGS / f"zero{stage}.json")
    run(tmp_path / "full", "--max-train-steps", "4", "--ds_config", config, *model)
    run(tmp_path / "cut", "--max-train-steps", "2", "--ds_config", config, *model)
    run(tmp_path / "cut", "--max-train-steps", "4", "--resume", "auto", "--ds_config", config,
        *model)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    # the consolidated file holds full weights (gathered under ZeRO-3) that a plain model loads
    ckpt = torch.load(tmp_path / "full" / "demo" / "checkpoints" / "0000004.pt", weights_only=True)
    from repa_fast.training.build import build_model
    from repa_fast.training.config import TrainConfig, PRESETS
    if model == T2I:  # MMDiT-d4/4 on the demo's 64-wide caption features
        built = build_model(TrainConfig(**PRESETS["demo-t2i"]), 3, 32, [64], context_dim=64)
    else:
        demo = dict(PRESETS["demo"], **({"model": model[1]} if model else {}))
        built = build_model(TrainConfig(**demo), 3, 16, [64])  # the demo: 16 px
    assert type(built).__name__ == {(): "SiT", DIT: "DiT", T2I: "MMDiT"}[model]
    built.load_state_dict(ckpt["model"])
    assert (tmp_path / "full" / "demo" / "checkpoints" / "deepspeed" / "0000004").is_dir()
    # one process without DeepSpeed gives the same losses (fp32)
    run(tmp_path / "plain", "--max-train-steps", "4", *model)
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)


@pytest.mark.slow
def test_dit_bf16_under_zero2_follows_the_plain_bf16_run(tmp_path):
    """bf16 with DeepSpeed (its bf16 optimizer wrapper, fp32 master weights) trains DiT like a
    plain bf16-autocast run, within bf16's tolerance."""
    bf16 = ("--mixed-precision", "bf16")
    run(tmp_path / "ds", "--max-train-steps", "3", "--ds_config", str(CONFIGS / "zero2.json"),
        *DIT, *bf16)
    run(tmp_path / "plain", "--max-train-steps", "3", *DIT, *bf16)
    got, want = losses(tmp_path / "ds"), losses(tmp_path / "plain")
    assert all(torch.isfinite(torch.tensor(got)))
    assert got == pytest.approx(want, rel=3e-2)


@pytest.mark.slow
def test_bad_ds_config_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = run(tmp_path, "--max-train-steps", "1", "--ds_config", str(bad), check=False)
    assert proc.returncode == 2 and "is not valid JSON" in proc.stderr
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    proc = run(tmp_path, "--max-train-steps", "1", "--ds_config", str(wrong), check=False)
    assert proc.returncode == 2 and "train_batch_size is 64, but the flags give 8" in proc.stderr
    proc = run(tmp_path, "--max-train-steps", "1", "--ds_config", str(tmp_path / "no.json"),
               check=False)
    assert proc.returncode == 2 and "no.json' does not exist" in proc.stderr


def launch(out, launcher, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DS_ACCELERATOR"] = "cpu"
    port = str(free_port())
    cmd = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", port, str(ROOT / "repa_fast" / "train.py")]
           if launcher == "deepspeed" else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", port, "-m", "repa_fast.train"])
    proc = subprocess.run(cmd + ["--preset", "demo", "--output-dir", str(out), "--batch-size",
                                 "8", "--max-train-steps", "4", "--sampling-steps", "100",
                                 *extra], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, model", [("deepspeed", ()), ("torchrun", ()),
                                             pytest.param("torchrun", DIT, id="torchrun-DiT"),
                                             pytest.param("torchrun", T2I, id="torchrun-MMDiT"),
                                             pytest.param("torchrun", ACCUMULATE,
                                                          id="torchrun-accumulation")])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, launcher, model):
    """Random draws are made per global batch and sliced per rank, so 2 processes of 4
    samples train exactly like 1 process of 8 (up to fp32 reduction order); for DiT too (DDP,
    its timesteps drawn per global batch)."""
    run(tmp_path / "one", "--max-train-steps", "4", *(() if model == ACCUMULATE else model))
    extra = ["--ds_config", str(CONFIGS / "zero2.json")] if launcher == "deepspeed" else []
    launch(tmp_path / "two", launcher, *extra, *model)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.slow
def test_deepspeed_builds_its_own_optimizer(tmp_path):
    """--optimizer deepspeed: the engine builds AdamW from the config's optimizer section
    (filled from the flags); it trains like torch's AdamW."""
    config = str(CONFIGS / "zero2.json")
    run(tmp_path / "ds", "--max-train-steps", "3", "--ds_config", config,
        "--optimizer", "deepspeed")
    run(tmp_path / "torch", "--max-train-steps", "3", "--ds_config", config)
    assert losses(tmp_path / "ds") == pytest.approx(losses(tmp_path / "torch"), rel=1e-4)


@pytest.mark.slow
def test_zero2_with_gradient_accumulation_equals_the_plain_big_batch(tmp_path):
    """DeepSpeed's gradient_accumulation_steps is filled from the flag: 2 micro-batches of 4
    train like one plain batch of 8; the run resumes exactly."""
    config = str(CONFIGS / "zero2.json")
    run(tmp_path / "ds", "--max-train-steps", "4", "--ds_config", config, *ACCUMULATE)
    run(tmp_path / "plain", "--max-train-steps", "4")
    assert losses(tmp_path / "ds") == pytest.approx(losses(tmp_path / "plain"), rel=1e-4)
    run(tmp_path / "cut", "--max-train-steps", "2", "--ds_config", config, *ACCUMULATE)
    run(tmp_path / "cut", "--max-train-steps", "4", "--resume", "auto", "--ds_config", config,
        *ACCUMULATE)
    assert losses(tmp_path / "cut") == losses(tmp_path / "ds")
