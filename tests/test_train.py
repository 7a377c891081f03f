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
from repa_fast.training.checkpoint_files import checkpoint_problem, list_checkpoints, save_atomic
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
    assert json.loads((run / "config.json").read_text())["model"] == "SiT-T/2"
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


@pytest.mark.parametrize("model", [pytest.param([], id="SiT"),
                                   pytest.param(["--model", "DiT-T/4", "--report-to", "none"],
                                                id="DiT"),
                                   pytest.param(["--preset", "demo-t2i", "--exp-name", "demo",
                                                 "--report-to", "none"], id="MMDiT")])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, model):
    assert main(demo_args(tmp_path / "a", *model)) == 0
    assert main(demo_args(tmp_path / "b", "--max-train-steps", "3", *model)) == 0
    assert main(demo_args(tmp_path / "b", "--resume", "auto", *model)) == 0
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
        return x * float("nan") if len(calls) == 2 or len(calls) > 3 else x

    monkeypatch.setattr(vae, "sample_posterior", poisoned)
    config = parse_args(demo_args(tmp_path, "--max-nonfinite-steps", "3", "--log-every", "2"))
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss"):
        train(config)
    logged = records(tmp_path)
    # step 2 skipped: its window's mean is step 1's loss; steps 4-6 skipped: stop at step 6
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert [r["skipped_steps"] for r in logged] == [1, 2, 4]
    assert logged[0]["loss"] is not None and logged[2]["loss"] is None
    ckpt_dir = str(tmp_path / "demo" / "checkpoints")
    assert list_checkpoints(ckpt_dir) == [3]  # nothing saved at step 6
    ckpt = torch.load(os.path.join(ckpt_dir, "0000003.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values())


def test_a_skipped_step_changes_nothing():
    """found_inf = 1: fused AdamW leaves weights, moments and its step count alone, and the
    EMA stays; found_inf = 0 is an ordinary step."""
    from repa_fast.training.ema import EMA
    from repa_fast.training.optim import build_optimizer, skippable_step
    model = torch.nn.Linear(5, 3)
    ema = EMA(model, 0.5)
    optimizer = build_optimizer("adamw", model.parameters(), lr=0.1, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=0.0)
    for found_inf, changes in ((0.0, True), (1.0, False), (0.0, True)):
        model(torch.randn(4, 5)).square().sum().backward()
        before = [t.clone() for t in (*model.parameters(), *ema.model.parameters())]
        moments = [v.clone() for v in optimizer.state[model.weight].values()] \
            if optimizer.state else []
        flag = torch.tensor(found_inf)
        skippable_step(optimizer, flag)
        ema.update(model, found_inf=flag)
        optimizer.zero_grad()
        after = [*model.parameters(), *ema.model.parameters()]
        assert all(not torch.equal(a, b) for a, b in zip(before, after)) == changes
        assert any(not torch.equal(a, b) for a, b in zip(before, after)) == changes
        if not changes:
            assert all(torch.equal(a, b) for a, b in
                       zip(moments, optimizer.state[model.weight].values()))
    assert int(optimizer.state[model.weight]["step"]) == 2


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
    assert sorted(os.listdir(tmp_path)) == ["0000001.pt", "0000001.pt.sha256.json"]
    assert checkpoint_problem(path) is None


def test_sigterm_saves_and_exits_143(tmp_path):
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
    assert proc.returncode == 128 + signal.SIGTERM, out
    steps = list_checkpoints(str(tmp_path / "demo" / "checkpoints"))
    assert len(steps) == 1 and steps[0] >= 2
    assert f"saved step {steps[0]} and stopped" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "SiT-Q/2"], "--model must be one of"),
    (["--preset", "fast"], "--preset must be one of demo"),
    (["--preset", "demo", "--data-dir", "/nonexistent/data"], "--data-dir '/nonexistent/data' does not exist"),
    (["--preset", "demo", "--mixed-precision", "fp8"], "--mixed-precision must be one of"),
    (["--preset", "demo", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--preset", "demo", "--num-classes", "3", "--max-train-steps", "1"],
     "holds labels in [0, 11]; pass --num-classes 12"),
    (["--preset", "demo", "--on-bad-sample", "ignore"], "--on-bad-sample must be one of error"),
    (["--preset", "demo", "--report-to", "mlflow"],
     "--report-to must be one of tensorboard, wandb, none"),
    (["--preset", "demo", "--optimizer", "sgd"], "--optimizer must be one of adamw, "
                                                 "apex-fused-adam, deepspeed"),
    (["--preset", "demo", "--optimizer", "deepspeed"], "--optimizer deepspeed builds"),
    (["--preset", "demo", "--optimizer", "apex-fused-adam"], "It is not on the package registry"),
    (["--preset", "demo", "--max-grad-norm", "0"], "--max-grad-norm must be > 0 (inf: no clip"),
    (["--preset", "demo", "--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
    (["--preset", "demo", "--max-grad-norm", "nan"], "--max-grad-norm must be > 0"),
])
def test_config_errors_exit_2(tmp_path, capsys, argv, message):
    assert main(argv + ["--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_max_grad_norm_inf_measures_the_norm_and_never_clips():
    """--max-grad-norm inf (DiT's train.py clips nothing): the step reports the true norm and
    applies the unclipped gradient; 1e-3 clips, so the two runs differ."""
    from repa_fast.training.config import parse_args
    from repa_fast.training.ema import EMA
    from repa_fast.training.engine import PlainEngine
    results = {}
    for norm in (float("inf"), 1e-3):
        config = parse_args(["--preset", "demo", "--max-grad-norm", str(norm)])
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=1.0),
                             torch.device("cpu"), config.max_grad_norm)
        loss = model(torch.ones(2, 4)).pow(2).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        before = [p.detach().clone() for p in model.parameters()]
        grad_norm, _ = engine.backward_and_step(loss, EMA(model))
        want_norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        torch.testing.assert_close(grad_norm, want_norm)
        steps = [b - p.detach() for b, p in zip(before, model.parameters())]
        results[norm] = steps
        if norm == float("inf"):
            for step, g in zip(steps, grads):
                torch.testing.assert_close(step, g)
    assert not torch.allclose(results[1e-3][0], results[float("inf")][0])


def test_batch_must_divide_across_processes():
    with pytest.raises(ValueError, match="--batch-size 10 .global. must be divisible by the "
                                         "number of processes .4."):
        TrainConfig(batch_size=10).check(world_size=4)


def test_apex_fused_adam_is_used_when_importable(tmp_path, monkeypatch):
    """apex cannot be installed here: a stand-in ``apex.optimizers.FusedAdam`` (torch's AdamW
    without found_inf support) checks the plumbing and the host-side skip."""
    import types
    made = []

    class FusedAdam(torch.optim.AdamW):
        def __init__(self, params, adam_w_mode=True, **kwargs):
            assert adam_w_mode
            super().__init__(params, foreach=False, **kwargs)
            made.append(self)

    apex = types.ModuleType("apex")
    apex.optimizers = types.SimpleNamespace(FusedAdam=FusedAdam)
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    assert main(demo_args(tmp_path, "--optimizer", "apex-fused-adam", "--max-train-steps", "2",
                          "--report-to", "none")) == 0
    assert len(made) == 1 and made[0].state  # it stepped
    from repa_fast.training.optim import skippable_step, takes_found_inf
    assert not takes_found_inf(made[0])
    weights = [p.clone() for p in made[0].param_groups[0]["params"]]
    skippable_step(made[0], torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(weights, made[0].param_groups[0]["params"]))


def test_wandb_offline_run_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = demo_args(tmp_path, "--report-to", "wandb", "--max-train-steps", "3")
    assert main(args) == 0
    run = tmp_path / "demo"
    run_id = (run / "wandb_run_id").read_text()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("*.wandb"))
    assert main(demo_args(tmp_path, "--report-to", "wandb", "--resume", "auto")) == 0
    assert (run / "wandb_run_id").read_text() == run_id  # the same wandb run continues


def test_safetensors_copies_and_export(tmp_path):
    from safetensors import safe_open
    from repa_fast.training.export import main as export
    assert main(demo_args(tmp_path, "--save-safetensors", "--keep-last", "1",
                          "--report-to", "none")) == 0
    ckpts = tmp_path / "demo" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.suffix == ".safetensors") == \
        ["0000006-ema.safetensors", "0000006-model.safetensors"]  # step 3's pruned with it
    state = torch.load(ckpts / "0000006.pt", weights_only=True)
    with safe_open(str(ckpts / "0000006-ema.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["args"])["model"] == "SiT-T/2"
        assert f.metadata()["steps"] == "6"
        assert set(f.keys()) == set(state["ema"])
        assert all(torch.equal(f.get_tensor(k), state["ema"][k]) for k in f.keys())
    assert export([str(ckpts / "0000006.pt"), "--out-dir", str(tmp_path / "x")]) == 0
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "x" / "0000006-model.safetensors"))
    assert exported.keys() == state["model"].keys()
    assert all(torch.equal(exported[k], state["model"][k]) for k in exported)
    assert export([str(tmp_path / "missing.pt")]) == 2


def test_deepspeed_optimizer_section_is_filled_and_checked():
    from repa_fast.training.zero import deepspeed_optimizer_section
    kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, path="c.json")
    ds = {}
    deepspeed_optimizer_section(ds, "deepspeed", **kw)
    assert ds["optimizer"] == {"type": "AdamW", "params": dict(
        lr=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)}
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}
    with pytest.raises(ValueError, match="optimizer.params.lr is 0.0003, but the flags give "
                                         "0.0001"):
        deepspeed_optimizer_section(ds, "deepspeed", **kw)
    with pytest.raises(ValueError, match="has an \"optimizer\" section, but --optimizer is "
                                         "adamw"):
        deepspeed_optimizer_section({"optimizer": {}}, "adamw", **kw)
    with pytest.raises(ValueError, match="optimizer.type must be AdamW or Adam"):
        deepspeed_optimizer_section({"optimizer": {"type": "Lamb"}}, "deepspeed", **kw)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """--compile (SiT and encoder under torch.compile; the fused loss without graph breaks)
    trains like eager, up to fp32 rounding."""
    assert main(demo_args(tmp_path / "eager", "--max-train-steps", "3", "--report-to",
                          "none")) == 0
    assert main(demo_args(tmp_path / "compiled", "--max-train-steps", "3", "--compile",
                          "--report-to", "none")) == 0
    eager, compiled = records(tmp_path / "eager"), records(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of writing checkpoint 2: checkpoint 1 still loads, and the
    half-written file is never listed as a checkpoint."""
    script = f"""
import sys, time, torch
from repa_fast.training.checkpoint_files import save_atomic
save_atomic({{"steps": 1, "w": torch.ones(3)}}, {str(tmp_path / "0000001.pt")!r})
def slow(obj, f):
    f.write(b"x" * 4096); f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow
save_atomic({{"steps": 2}}, {str(tmp_path / "0000002.pt")!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait(timeout=30)
    assert list_checkpoints(str(tmp_path)) == [1]
    assert torch.load(tmp_path / "0000001.pt", weights_only=True)["steps"] == 1
    # the next save replaces the leftover temporary file
    save_atomic({"steps": 2}, str(tmp_path / "0000002.pt"))
    assert list_checkpoints(str(tmp_path)) == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_on_another_device_kind_warns_that_draws_differ(tmp_path):
    assert main(demo_args(tmp_path, "--max-train-steps", "1", "--checkpointing-steps", "1",
                          "--report-to", "none")) == 0
    path = tmp_path / "demo" / "checkpoints" / "0000001.pt"
    state = torch.load(path, weights_only=True)
    assert state["draw_device"] == "cpu"
    state["draw_device"] = "NVIDIA H200"
    save_atomic(state, str(path))  # with its checksum record: an edited file must be re-saved
    with pytest.warns(UserWarning, match="trained on NVIDIA H200, this run is on cpu"):
        assert main(demo_args(tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "1",
                              "--report-to", "none", "--resume", "auto")) == 0


def test_sample_grid_is_tiled_and_a_killed_write_leaves_no_file(tmp_path, monkeypatch):
    """The EMA grid: 16 samples tiled 4×4 (pixel-space model: no VAE); a write that dies
    half-way leaves nothing at the path, so the end-of-run check does not take a torn PNG for
    a written grid."""
    import numpy as np
    from PIL import Image

    from repa_fast.models import SiT
    from repa_fast.training.samples import sample_grid

    torch.manual_seed(0)
    model = SiT(input_size=8, in_channels=3, patch_size=2, hidden_size=48, depth=2,
                num_heads=4, encoder_depth=1, num_classes=4, z_dims=[16],
                projector_dim=32).eval()
    noise, labels = torch.randn(16, 3, 8, 8), torch.arange(16) % 4
    path = tmp_path / "samples" / "0000010.png"
    grid = sample_grid(model, noise, labels, 1.0, None, str(path))
    assert tuple(grid.shape) == (3, 32, 32)
    assert np.array_equal(np.asarray(Image.open(path)), grid.permute(1, 2, 0).numpy())

    def dies_half_way(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", dies_half_way)
    torn = tmp_path / "samples" / "0000020.png"
    with pytest.raises(OSError):
        sample_grid(model, noise, labels, 1.0, None, str(torn))
    assert not torn.exists()


@pytest.mark.parametrize("model", [pytest.param([], id="SiT"),
                                   pytest.param(["--model", "DiT-T/4"], id="DiT"),
                                   pytest.param(["--preset", "demo-t2i", "--exp-name", "demo"],
                                                id="MMDiT")])
def test_gradient_accumulation_equals_the_big_batch(tmp_path, model):
    """--gradient-accumulation-steps 4: micro-batches of 2 give the losses, gradient norms and
    weights of the batch of 8 within fp32 rounding (the draws are the global batch's); the
    checkpoint resumes exactly."""
    extra = [*model, "--report-to", "none", "--max-train-steps", "4",
             "--checkpointing-steps", "2", "--sampling-steps", "100"]
    assert main(demo_args(tmp_path / "big", *extra)) == 0
    assert main(demo_args(tmp_path / "acc", *extra, "--gradient-accumulation-steps", "4")) == 0
    big, acc = records(tmp_path / "big"), records(tmp_path / "acc")
    for key in ("loss", "proj_loss", "grad_norm"):
        assert [r[key] for r in acc] == pytest.approx([r[key] for r in big], rel=1e-4), key
    wa = torch.load(tmp_path / "acc" / "demo" / "checkpoints" / "0000004.pt", weights_only=True)
    wb = torch.load(tmp_path / "big" / "demo" / "checkpoints" / "0000004.pt", weights_only=True)
    # Adam divides by √v: where a gradient is ~0, rounding moves an element by a fraction
    # of a step (lr 1e-3), so weights agree to a fraction of one step, not to 1e-5
    for k in wb["model"]:
        torch.testing.assert_close(wa["model"][k], wb["model"][k], rtol=0, atol=2e-4)
    # exact resume with accumulation
    assert main(demo_args(tmp_path / "cut", *extra, "--gradient-accumulation-steps", "4",
                          "--max-train-steps", "2")) == 0
    assert main(demo_args(tmp_path / "cut", *extra, "--gradient-accumulation-steps", "4",
                          "--resume", "auto")) == 0
    assert [r["loss"] for r in records(tmp_path / "cut")] == [r["loss"] for r in acc]


def test_gradient_accumulation_must_divide_the_batch(tmp_path, capsys):
    assert main(demo_args(tmp_path, "--batch-size", "8", "--gradient-accumulation-steps",
                          "3")) == 2
    assert "must be divisible by the number of processes × --gradient-accumulation-steps" in \
        capsys.readouterr().err
    assert main(demo_args(tmp_path, "--gradient-accumulation-steps", "0")) == 2
    assert "--gradient-accumulation-steps must be >= 1" in capsys.readouterr().err


def test_log_alignment_every_records_cknna_without_changing_training(tmp_path):
    """--log-alignment-every 2: CKNNA records at steps 2, 4, 6 (values in [-1, 1], t = 0 and
    0.5), and the training records are those of a run without it."""
    extra = ["--report-to", "none", "--sampling-steps", "100"]
    assert main(demo_args(tmp_path / "a", *extra, "--log-alignment-every", "2")) == 0
    assert main(demo_args(tmp_path / "b", *extra)) == 0
    logged = records(tmp_path / "a")
    aligned = [r for r in logged if "alignment_cknna_t0" in r]
    assert [r["step"] for r in aligned] == [2, 4, 6]
    assert all(-1 <= r[k] <= 1 for r in aligned for k in ("alignment_cknna_t0",
                                                           "alignment_cknna_t0.5"))
    train = [r["loss"] for r in logged if "loss" in r]
    assert train == [r["loss"] for r in records(tmp_path / "b")]


@pytest.mark.parametrize("argv, message", [
    (["--preset", "demo", "--log-alignment-every", "0"], "--log-alignment-every must be >= 1"),
    (["--preset", "demo-t2i", "--log-alignment-every", "5"],
     "--log-alignment-every: not available for the text-to-image"),
])
def test_log_alignment_every_errors(tmp_path, capsys, argv, message):
    assert main(argv + ["--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
