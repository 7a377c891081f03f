"""Training under faults: skipped steps at a checkpoint, damaged checkpoints, runs that mix,
a run killed after its last checkpoint, a full disk, signals to the whole process group."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from repa_fast.errors import UsageError
from repa_fast.train import main, train
from repa_fast.training.checkpoint_files import (checkpoint_path, checkpoint_problem,
                                                 list_checkpoints, load_checkpoint,
                                                 resolve_resume, save_atomic)
from repa_fast.training.config import parse_args

pytest.importorskip("tqdm")


def demo_args(out, *extra):
    return ["--preset", "demo", "--output-dir", str(out), "--batch-size", "8",
            "--max-train-steps", "2", "--checkpointing-steps", "2", "--sampling-steps", "2",
            "--report-to", "none", *extra]


def steps_logged(out):
    with open(out / "demo" / "metrics.jsonl") as f:
        return [json.loads(line)["step"] for line in f]


def fake_state(step: int) -> dict:
    """A small checkpoint with everything a resume looks for."""
    return dict(model={"w": torch.randn(20000)}, ema={"w": torch.zeros(3)}, args={}, steps=step,
                rng=[{}], loader={})


def poison_step(monkeypatch, bad: int) -> None:
    """Step ``bad`` (1-based) of this process draws NaN latents: its loss is not finite."""
    import repa_fast.vae as vae
    real, calls = vae.sample_posterior, []

    def poisoned(moments, *args, **kwargs):
        calls.append(1)
        x = real(moments, *args, **kwargs)
        return x * float("nan") if len(calls) == bad else x

    monkeypatch.setattr(vae, "sample_posterior", poisoned)


# --- skipped steps never reach a checkpoint -------------------------------------------------

def test_no_checkpoint_is_saved_while_the_latest_steps_are_skipped(tmp_path, capsys):
    # learning rate 1e30: step 1 leaves huge but finite weights, steps 2-4 overflow
    code = main(demo_args(tmp_path, "--learning-rate", "1e30", "--max-train-steps", "8",
                          "--max-nonfinite-steps", "3"))
    err = capsys.readouterr().err
    assert code == 3, err
    assert list_checkpoints(str(tmp_path / "demo" / "checkpoints")) == []
    assert "the first skipped step was 2" in err and "No checkpoint was saved before it" in err


@pytest.mark.slow  # ~10-15 s: two training runs
def test_a_checkpoint_due_on_a_skipped_step_waits_for_the_next_good_one(tmp_path, monkeypatch):
    poison_step(monkeypatch, 2)
    train(parse_args(demo_args(tmp_path, "--max-train-steps", "3")))
    ckpt_dir = str(tmp_path / "demo" / "checkpoints")
    assert list_checkpoints(ckpt_dir) == [3]
    assert load_checkpoint(checkpoint_path(ckpt_dir, 3))["skipped_steps"] == 1
    # the count of skipped steps carries over a resume
    monkeypatch.undo()
    train(parse_args(demo_args(tmp_path, "--max-train-steps", "4", "--resume", "auto")))
    with open(tmp_path / "demo" / "metrics.jsonl") as f:
        assert [json.loads(line)["skipped_steps"] for line in f] == [0, 1, 1, 1]


# --- damaged checkpoints --------------------------------------------------------------------

def test_resume_auto_falls_back_from_damaged_checkpoints(tmp_path):
    d = str(tmp_path)
    for step in (1, 2, 3):
        save_atomic(fake_state(step), checkpoint_path(d, step))
    with open(checkpoint_path(d, 3), "r+b") as f:  # truncated
        f.truncate(os.path.getsize(checkpoint_path(d, 3)) // 2)
    with open(checkpoint_path(d, 2), "r+b") as f:  # one flipped byte inside the tensor data
        f.seek(os.path.getsize(checkpoint_path(d, 2)) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    torch.load(checkpoint_path(d, 2), weights_only=True)  # torch alone does not notice
    with pytest.warns(UserWarning) as caught:
        path, state = resolve_resume("auto", d)
    assert path == checkpoint_path(d, 1) and state["steps"] == 1
    text = " ".join(str(w.message) for w in caught)
    for step in (2, 3):
        assert checkpoint_path(d, step) in text
    assert "SHA-256 differs" in text and "bytes, " in text
    # an explicit choice of a damaged file is an error naming it
    with pytest.raises(UsageError, match=r"--resume 3: .*0000003\.pt: it has \d+ bytes"):
        load_checkpoint(checkpoint_path(d, 3), "--resume 3:")
    with pytest.raises(UsageError, match="0000002.pt: its SHA-256 differs"):
        resolve_resume("2", d)
    os.remove(checkpoint_path(d, 1))
    with pytest.raises(UsageError, match="every checkpoint in .* is damaged"):
        resolve_resume("auto", d)


def test_checkpoints_without_a_record_and_foreign_files(tmp_path):
    legacy = str(tmp_path / "0000001.pt")
    torch.save(fake_state(1), legacy)  # written before checksum records existed
    assert checkpoint_problem(legacy) is None and load_checkpoint(legacy)["steps"] == 1
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(UsageError, match="notes.txt: it cannot be read as a checkpoint"):
        load_checkpoint(str(garbage))
    official = str(tmp_path / "official.pt")  # weights only, as the official REPA saves
    torch.save(dict(model={}, ema={}, opt={}, args={}, steps=0), official)
    with pytest.raises(UsageError, match="not a repa_fast training checkpoint .no rng, loader"):
        load_checkpoint(official)


def test_resume_from_a_bad_file_exits_2_naming_it(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    assert main(demo_args(tmp_path, "--resume", str(garbage))) == 2
    err = capsys.readouterr().err
    assert f"--resume {garbage}: it cannot be read as a checkpoint" in err
    assert "Traceback" not in err


# --- one run per folder, the log follows the run --------------------------------------------

@pytest.mark.slow  # ~10-15 s: two training runs
def test_a_new_run_refuses_a_folder_holding_a_run(tmp_path, capsys):
    assert main(demo_args(tmp_path, "--max-train-steps", "4")) == 0
    assert main(demo_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoints [2, 4], metrics.jsonl)" in err
    assert "--resume auto" in err and "--overwrite" in err
    assert main(demo_args(tmp_path, "--overwrite", "--resume", "auto")) == 2
    assert main(demo_args(tmp_path, "--overwrite")) == 0
    # the old run's later checkpoint is gone: a --resume auto cannot pick it up
    assert list_checkpoints(str(tmp_path / "demo" / "checkpoints")) == [2]
    assert steps_logged(tmp_path) == [1, 2]


def test_a_restart_rewrites_the_log_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "demo"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n\x00\x00garbage\n{"step": 3')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: not a metrics record"):
        assert main(demo_args(tmp_path, "--resume", "auto")) == 0
    assert steps_logged(tmp_path) == [1, 2]


# --- what the last step owed ----------------------------------------------------------------

@pytest.mark.slow  # ~10-15 s: two training runs
def test_a_resume_after_the_last_checkpoint_writes_the_final_grid_and_exports(tmp_path, capsys):
    assert main(demo_args(tmp_path, "--save-safetensors")) == 0
    run = tmp_path / "demo"
    owed = [run / "samples" / "0000002.png", run / "checkpoints" / "0000002-model.safetensors",
            run / "checkpoints" / "0000002-ema.safetensors"]
    grid = owed[0].read_bytes()
    for path in owed:  # killed right after the checkpoint
        path.unlink()
    capsys.readouterr()
    assert main(demo_args(tmp_path, "--save-safetensors", "--resume", "auto")) == 0
    assert all(path.exists() for path in owed)
    assert owed[0].read_bytes() == grid
    assert "nothing left to train" in capsys.readouterr().out
    assert steps_logged(tmp_path) == [1, 2]


# --- errors the user can act on -------------------------------------------------------------

def test_a_full_disk_is_one_line_naming_the_checkpoint(tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    ckpt_dir = tmp_path / "demo" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    os.symlink("/dev/full", ckpt_dir / "0000002.pt.tmp")  # every write: ENOSPC
    assert main(demo_args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"error: {ckpt_dir / '0000002.pt'}: No space left on device" in err
    assert "Traceback" not in err and "enforce fail" not in err
    assert list_checkpoints(str(ckpt_dir)) == [] and not os.path.lexists(
        ckpt_dir / "0000002.pt.tmp")


def test_an_unwritable_output_dir_exits_1(tmp_path, capsys):
    target = "/sys/repa_fast_test_output"
    try:
        os.makedirs(target)
        os.rmdir(target)
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    assert main(demo_args(target)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: /sys/repa_fast_test_output") and "not permitted" in err


# --- signals to the whole process group -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_saves_and_exits(tmp_path, signum, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = demo_args(tmp_path, "--max-train-steps", "100000", "--checkpointing-steps", "100000",
                     "--num-workers", "2", "--data-backend", backend)
    # its own session: the signal goes to every process of the group, loader workers too,
    # as Ctrl-C in a terminal, Slurm and container runtimes send it
    proc = subprocess.Popen([sys.executable, "-m", "repa_fast.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = tmp_path / "demo" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signum)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, out
    assert "Traceback" not in out and "killed by signal" not in out, out
    steps = list_checkpoints(str(tmp_path / "demo" / "checkpoints"))
    assert len(steps) == 1 and steps[0] >= 2, out
    assert f"{signal.Signals(signum).name}: saved step {steps[0]} and stopped" in out
    load_checkpoint(checkpoint_path(str(tmp_path / "demo" / "checkpoints"), steps[0]))
    assert steps_logged(tmp_path)[-1] == steps[0]


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_saves_one_agreed_step(tmp_path):
    """torchrun, DDP on gloo: every process receives SIGTERM (the group), the ranks agree on
    the step at the next log step and save it together (a rank saving alone would hang)."""
    from test_train_deepspeed import free_port
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = demo_args(tmp_path, "--max-train-steps", "100000", "--checkpointing-steps", "100000",
                     "--num-workers", "1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--master_port", str(free_port()), "-m", "repa_fast.train",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    metrics = tmp_path / "demo" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert "]: Traceback" not in out, out[-3000:]  # torchrun prefixes a rank's with [rankN]
    ckpt_dir = str(tmp_path / "demo" / "checkpoints")
    steps = list_checkpoints(ckpt_dir)
    assert len(steps) == 1 and steps[0] >= 2, out[-3000:]
    assert f"SIGTERM: saved step {steps[0]} and stopped" in out, out[-3000:]
    assert len(load_checkpoint(checkpoint_path(ckpt_dir, steps[0]))["rng"]) == 2


# --- damaged data ---------------------------------------------------------------------------

def damaged_demo_data(out) -> tuple[str, str]:
    """The demo data set with one byte flipped inside the PNG of the first sample training
    reads (seed 0); returns its shard and key."""
    from repa_fast.data import SampleTable, epoch_order
    from repa_fast.data.demo import make_demo_dataset
    from repa_fast.training.config import PRESETS
    data = make_demo_dataset(str(out / "demo-data"), size=PRESETS["demo"]["resolution"])
    table = SampleTable(data)
    first = int(epoch_order(len(table), 0, 0, 0, 1, True)[0])
    shard, key = table.shards[int(table.shard[first])], table.key_text(first)
    with open(os.path.join(data, shard), "r+b") as f:
        f.seek(int(table.image_offset[first]) + int(table.image_size[first]) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return shard, key


@pytest.mark.slow  # ~10 s each: two training runs
@pytest.mark.parametrize("verify", [True, False])
def test_damaged_data_stops_naming_the_shard_or_is_skipped_and_counted(tmp_path, capsys, verify):
    shard, key = damaged_demo_data(tmp_path)
    flags = [] if verify else ["--no-verify-shards"]
    assert main(demo_args(tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert shard in err and "Traceback" not in err
    if not verify:  # found by the PNG's own checksum, sample by sample
        assert f"sample {key}" in err
    with pytest.warns(UserWarning, match=shard):
        assert main(demo_args(tmp_path, *flags, "--on-bad-sample", "skip", "--overwrite")) == 0
    with open(tmp_path / "demo" / "metrics.jsonl") as f:
        skipped = [json.loads(line)["skipped_samples"] for line in f]
    assert skipped[-1] >= 1 and skipped == sorted(skipped)
    if not verify:
        assert skipped[-1] == 1


# --- review fixes: abandoned continuations, a skipped last step, the stop request -----------

@pytest.mark.slow  # ~10-15 s: two training runs
def test_resuming_an_earlier_step_sets_the_later_checkpoints_aside(tmp_path):
    assert main(demo_args(tmp_path, "--max-train-steps", "4", "--checkpointing-steps", "1",
                          "--save-safetensors")) == 0
    ckpt_dir = tmp_path / "demo" / "checkpoints"
    with pytest.warns(UserWarning, match="continuing from step 2; the checkpoints after it"):
        assert main(demo_args(tmp_path, "--max-train-steps", "3", "--checkpointing-steps", "1",
                              "--keep-last", "1", "--resume", "2")) == 0
    # the abandoned 3 and 4 can neither be resumed by auto nor make --keep-last drop step 3
    assert list_checkpoints(str(ckpt_dir)) == [3]
    (aside,) = (ckpt_dir / "abandoned").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == [
        "0000003-ema.safetensors", "0000003-model.safetensors", "0000003.pt",
        "0000003.pt.sha256.json", "0000004-ema.safetensors", "0000004-model.safetensors",
        "0000004.pt", "0000004.pt.sha256.json", "deepspeed"]
    assert steps_logged(tmp_path) == [1, 2, 3]


def test_a_skipped_last_step_is_not_reported_as_done(tmp_path, monkeypatch, capsys):
    poison_step(monkeypatch, 2)
    assert main(demo_args(tmp_path, "--checkpointing-steps", "1")) == 3
    assert "no checkpoint was saved at the final step 2" in capsys.readouterr().err
    assert list_checkpoints(str(tmp_path / "demo" / "checkpoints")) == [1]


def test_a_second_signal_aborts_with_its_own_exit_code():
    from repa_fast.training.stop import Aborted, StopRequest
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.poll() == signal.SIGTERM
        with pytest.raises(Aborted) as aborted:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes; it raises before this ends
    assert aborted.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are put back
