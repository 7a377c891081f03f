"""Training fixes its Triton tiles before the first step and a resumed run launches the tiles
its checkpoint recorded (not whatever the cache or a new tuning would pick).

Runs in subprocesses: ``REPA_FAST_INTERPRET_CONFIGS=2`` (two interpreted configs, so there is
something to tune) is read when the kernels are imported.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tqdm")
# two interpreted training runs in subprocesses: a few minutes on two cores (a second process
# reusing the disk cache is tests/test_autotune.py's)
pytestmark = pytest.mark.slow

RUN = r"""
import json, sys
from repa_fast.kernels import autotune
from repa_fast.train import main
used = {}
calls = []
def hook(name, key, config):
    used[key] = dict(config)
real = __import__("repa_fast.training.step", fromlist=["TrainStep"]).TrainStep.__call__
def counted(self, *args, **kwargs):
    calls.append(autotune.tuning_count())
    return real(self, *args, **kwargs)
__import__("repa_fast.training.step", fromlist=["TrainStep"]).TrainStep.__call__ = counted
autotune.set_launch_hook(hook)
code = main(sys.argv[2:])
json.dump(dict(code=code, used=used, tuned=autotune.tuning_count(), tuned_at_steps=calls),
          open(sys.argv[1], "w"))
"""


def run(tmp_path, name, cache, *args):
    env = dict(os.environ, TRITON_INTERPRET="1", REPA_FAST_INTERPRET_CONFIGS="2",
               REPA_FAST_OPS_BACKEND="triton", REPA_FAST_TUNE_CACHE=str(tmp_path / cache))
    report = tmp_path / f"{name}.json"
    argv = ["--preset", "demo", "--output-dir", str(tmp_path), "--batch-size", "4",
            "--report-to", "none", "--num-workers", "0", "--sampling-steps", "1000", *args]
    out = subprocess.run([sys.executable, "-c", RUN, str(report), *argv], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["code"] == 0, out.stderr[-3000:]
    return result, out.stdout


def test_tiles_are_tuned_before_the_steps_and_resume_uses_the_recorded_ones(tmp_path):
    first, stdout = run(tmp_path, "first", "cache-a", "--max-train-steps", "2",
                        "--checkpointing-steps", "2")
    # tuned once, before the first step, with a one-line message; none inside the steps
    assert first["tuned"] > 0 and "triton tiles:" in stdout
    assert first["tuned_at_steps"] == [first["tuned"]] * 2
    ckpt_path = tmp_path / "demo" / "checkpoints" / "0000002.pt"
    state = torch.load(ckpt_path, weights_only=True)
    recorded = state["kernel_tiles"]
    assert set(recorded) == set(first["used"])

    # the checkpoint says: the other tile of every key (as if another card had tuned it)
    first_tile = {"BLOCK_M": 32, "BLOCK_N": 32}
    flipped = {}
    for key, config in recorded.items():
        other = dict(config)
        small = all(config[k] == v for k, v in first_tile.items())
        other.update({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16} if small
                     else {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})
        flipped[key] = other
    assert flipped != recorded
    state["kernel_tiles"] = flipped
    from repa_fast.training.checkpoint_files import save_atomic
    save_atomic(state, str(ckpt_path))  # with a new checksum record: an edit must be re-saved

    # a fresh cache directory: without the checkpoint's tiles this process would tune
    resumed, _ = run(tmp_path, "resumed", "cache-b", "--max-train-steps", "3",
                     "--checkpointing-steps", "3", "--resume", "auto")
    assert resumed["tuned"] == 0
    for key, config in resumed["used"].items():
        assert config == flipped[key], key
    assert set(resumed["used"]) == set(flipped)
    final = torch.load(tmp_path / "demo" / "checkpoints" / "0000003.pt", weights_only=True)
    assert final["kernel_tiles"] == flipped

