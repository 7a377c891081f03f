"""The training step reads nothing back from the device between log and checkpoint steps.

A ``TorchDispatchMode`` records every op that makes the host wait for device data
(``.item()``/``int()``/``bool()`` of a tensor, ``nonzero``, ``equal``, boolean-mask indexing,
device-to-host copies, ...) while the real training loop (``repa_fast.train.train``) runs the
demo. The loop is counted through ``TrainStep.__call__``: any such op from the first step until
the last step's logging is a host synchronisation in the steady state. On the CPU the ops are
what a GPU would wait on; the cross-device copy rule only fires on a GPU.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from repa_fast.train import train
from repa_fast.training.config import parse_args
from repa_fast.training.engine import PlainEngine
from repa_fast.training.step import TrainStep, step_draws

pytest.importorskip("tqdm")

# ops whose result the host must read: every one waits for the device's queue
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static",
              "equal", "allclose", "masked_select", "_unique", "_unique2", "unique_dim",
              "unique_consecutive", "bincount", "histc", "repeat_interleave", "tolist",
              "_assert_scalar"}


def _devices(values):
    found = set()
    for value in values:
        if isinstance(value, torch.Tensor):
            found.add(value.device.type)
        elif isinstance(value, (list, tuple)):
            found |= _devices(value)
    return found


class HostReads(TorchDispatchMode):
    """Records (phase, op name) of every op in HOST_READS and of copies from a device to the
    host; ``phase`` is set by the test."""

    def __init__(self):
        super().__init__()
        self.phase = "setup"
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in HOST_READS or (
                name in ("_to_copy", "copy_", "to", "_copy_from")
                and _devices(args) - {"cpu", "meta"} and _devices([out]) == {"cpu"}):
            self.events.append((self.phase, str(func)))
        return out


# the Triton kernels on the CPU interpreter under the recorder: minutes, so slow, and with
# two steps (step 1, what follows it and step 2's body are checked; step 2 logs)
@pytest.mark.parametrize("backend, steps, micro_steps", [
    ("reference", 4, 1), ("reference", 4, 2),  # with gradient accumulation: none per micro-step
    pytest.param("triton", 2, 1, marks=pytest.mark.slow)])
def test_no_host_read_between_log_steps(tmp_path, monkeypatch, backend, steps, micro_steps):
    monkeypatch.setenv("REPA_FAST_OPS_BACKEND", backend)
    config = parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--batch-size", "4",
                         "--max-train-steps", str(steps), "--log-every", str(steps),
                         "--checkpointing-steps", str(steps), "--sampling-steps", str(steps),
                         "--report-to", "none", "--num-workers", "0",
                         "--gradient-accumulation-steps", str(micro_steps)])
    mode = HostReads()
    real_call = TrainStep.__call__
    calls = []

    def counted(self, step, *args, **kwargs):
        calls.append(step)
        mode.phase = f"step {step + 1}"
        out = real_call(self, step, *args, **kwargs)
        # after the last step comes its logging and checkpoint: allowed to read
        mode.phase = "last log" if len(calls) == steps else f"after step {step + 1}"
        return out

    monkeypatch.setattr(TrainStep, "__call__", counted)
    with mode:
        logged = train(config)
    assert calls == list(range(steps)) and logged["step"] == steps
    bad = [event for event in mode.events if event[0] not in ("setup", "last log")]
    assert not bad, f"host reads inside the training steps: {bad}"
    # the recorder works: the last step's logging reads the sums
    assert any(phase == "last log" for phase, _ in mode.events)


def test_the_recorder_sees_a_hidden_sync(tmp_path, monkeypatch):
    """A step that reads its loss (as ``float(loss)`` would) is caught: the test can fail."""
    real_update = PlainEngine.step

    def reading(self, total, ema):
        float(total.detach())
        return real_update(self, total, ema)

    monkeypatch.setattr(PlainEngine, "step", reading)
    with pytest.raises(AssertionError, match="host reads inside the training steps"):
        test_no_host_read_between_log_steps(tmp_path, monkeypatch, "reference", 3, 1)


def test_draws_do_not_depend_on_the_process_count_or_a_restart():
    config = parse_args(["--preset", "demo", "--cfg-prob", "0.5"])
    shape = (3, 8, 8)
    whole = step_draws(config, 7, 6, shape, rank=0, world_size=1)
    parts = [step_draws(config, 7, 2, shape, rank=r, world_size=3) for r in range(3)]
    for field in range(4):
        for r in range(3):
            assert torch.equal(parts[r][field], whole[field][r::3])
    again = step_draws(config, 7, 6, shape, rank=0, world_size=1)  # e.g. after a resume
    assert all(torch.equal(a, b) for a, b in zip(whole, again))
    other = step_draws(config, 8, 6, shape, rank=0, world_size=1)
    assert not torch.equal(whole.noise, other.noise)
    assert whole.time.shape == (6, 1, 1, 1) and whole.drop.dtype == torch.bool



def test_compile_defaults_on_for_cuda_only_and_stays_opt_in_under_deepspeed():
    from repa_fast.training.step import resolve_compile
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_compile(parse_args([]), cuda) is True
    assert resolve_compile(parse_args([]), cpu) is False
    assert resolve_compile(parse_args(["--no-compile"]), cuda) is False
    assert resolve_compile(parse_args(["--compile"]), cpu) is True
    assert resolve_compile(parse_args(["--ds_config", "x.json"]), cuda) is False
    assert resolve_compile(parse_args(["--ds_config", "x.json", "--compile"]), cuda) is True


def test_unusable_checkpoint_tiles_warn_and_are_chosen_anew():
    from repa_fast.distributed import Distributed
    from repa_fast.training.tiles import warm_kernels
    config = parse_args(["--preset", "demo", "--no-fused-loss"])
    with pytest.warns(UserWarning, match="kernel_tiles cannot be used"):
        warm_kernels(config, None, [], torch.device("cpu"), 4, Distributed(),
                     tiles={"no_such_kernel|M_BUCKET=64": {"BLOCK_M": 32}})
