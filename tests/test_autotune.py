"""The Triton tile tuner (``repa_fast.kernels.autotune``) on the CPU interpreter.

Two interpreted configs per kernel (``REPA_FAST_INTERPRET_CONFIGS=2``, read at import, so the
scenarios run in subprocesses) make the tuner time configs for real with ``perf_counter``:

* process 1 starts with a garbage cache file: it warns naming the file, tunes every key and
  rewrites the file;
* process 2 with the same cache directory tunes nothing and launches the same configs with
  bitwise the same results; then, for each interpreted config in turn, it installs that config
  for every key (``install_tiles``) and checks every launch used it, nothing was tuned and the
  results agree (fp32 tolerance) whichever config ran.

Bad ``install_tiles`` input is checked in this process.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
TESTS = pathlib.Path(__file__).parent

SCENARIO = r"""
import hashlib, json, sys
import torch
sys.path.insert(0, sys.argv[2])
from alignment_cases import loop_loss, make_inputs
from repa_fast.kernels import autotune, tuning
from repa_fast.ops.alignment import repa_alignment_loss

launches = []
autotune.set_launch_hook(lambda name, key, config: launches.append([key, config]))
torch.manual_seed(0)
h, z, ws = make_inputs(2, 16, 5, target_grad=True)  # 4x4 SiT grid pooled to 2x2, 1 prefix


def step():
    loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=1, backend="triton")
    return [loss, *torch.autograd.grad(loss, [h, z, *ws])]


def digest(tensors):
    return hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in tensors)).hexdigest()


box = {}
out = {"message": autotune.warmup(lambda: box.update(r=step())), "tuned": autotune.tuning_count(),
       "launches": launches[:], "digest": digest(box["r"]),
       "export": autotune.export_tiles(used_only=True)}
if sys.argv[1] == "install":
    reference = box["r"]
    out["forced"] = []
    for tile in tuning.INTERPRETED_TILES:
        forced = {key: dict(config, BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_K=tile[2])
                  for key, config in out["export"].items()}
        autotune.install_tiles(forced)
        launches.clear()
        result = step()
        out["forced"].append({
            "all_forced": all(config == forced[key] for key, config in launches),
            "keys": sorted({key for key, _ in launches}) == sorted(forced),
            "close": all(torch.allclose(a, b, rtol=1e-5, atol=1e-7)
                         for a, b in zip(result, reference)),
            "loss_error": abs(result[0].item() - loop_loss(h, z, *ws, prefix=1).item())})
    out["tuned_after_install"] = autotune.tuning_count()
print("RESULT " + json.dumps(out))
"""


def run_scenario(mode, cache_dir):
    env = dict(os.environ, TRITON_INTERPRET="1", REPA_FAST_INTERPRET_CONFIGS="2",
               REPA_FAST_TUNE_CACHE=str(cache_dir), PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-c", SCENARIO, mode, str(TESTS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("tiles")
    cache_file = cache_dir / f"tiles-cpu-interpreter-triton{__import__('triton').__version__}.json"
    cache_file.write_text("{not json")  # a garbage cache file: warn, tune, rewrite
    first, first_err = run_scenario("run", cache_dir)
    written = json.loads(cache_file.read_text())
    second, second_err = run_scenario("install", cache_dir)
    return dict(first=first, first_err=first_err, written=written, second=second,
                second_err=second_err, cache_file=cache_file)


def test_first_process_tunes_and_writes_the_cache(runs):
    first, written = runs["first"], runs["written"]
    keys = {key for key, _ in first["launches"]}
    assert first["tuned"] == len(keys) >= 6  # every key of the forward + backward, once
    assert written["format"] == "repa_fast-tiles/1" and written["card"] == "cpu-interpreter"
    assert written["tiles"] == first["export"]
    assert f"{len(keys)} tuned" in first["message"] and str(runs["cache_file"]) in first["message"]
    # each launch of a key used the config recorded for it
    assert all(config == first["export"][key] for key, config in first["launches"])


def test_corrupt_cache_file_warns_once_and_is_retuned(runs):
    warnings = [line for line in runs["first_err"].splitlines() if "corrupt" in line]
    assert len(warnings) == 1 and str(runs["cache_file"]) in warnings[0], runs["first_err"]
    assert runs["first"]["tuned"] > 0
    assert "corrupt" not in runs["second_err"]


def test_second_process_reuses_the_cache_without_tuning(runs):
    first, second = runs["first"], runs["second"]
    assert second["tuned"] == 0
    assert second["launches"] == first["launches"]  # same keys, same configs, same order
    assert second["digest"] == first["digest"]  # bitwise: the tuning trials left no trace
    assert "0 tuned" in second["message"] and f"{len(first['export'])} from cache" in \
        second["message"]


def test_installed_tiles_are_used_and_never_tuned(runs):
    forced = runs["second"]["forced"]
    assert len(forced) == 2 and runs["second"]["tuned_after_install"] == 0
    for case in forced:
        assert case["all_forced"] and case["keys"], case


def test_results_agree_whichever_config_runs(runs):
    for case in runs["second"]["forced"]:
        assert case["close"], case
        assert case["loss_error"] < 1e-5, case


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="interpreter tiles (the GPU's partial-sum buffers fit its own list)")
def test_tuning_trials_leave_no_stale_partial_sums(seed, monkeypatch):
    """The tuner zeroes the ``reset_to_zero`` buffers before every trial and once more before
    the real launch: here the first config (larger blocks, fewer partial-sum slots) wins after
    the smaller one wrote more slots, as can happen on a GPU."""
    import triton
    import torch
    from alignment_cases import make_inputs
    from repa_fast.kernels import alignment_cosine, alignment_linear_silu, autotune
    from repa_fast.ops.alignment import repa_alignment_loss

    def config(bm, bn):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 4})

    def bench(kernel_call, quantiles=None):
        kernel_call()
        bench.calls += 1
        return [float(bench.calls)] * 3  # the first config looks fastest

    bench.calls = 0
    for kernel in (alignment_cosine.project_cosine_fwd_kernel,
                   alignment_cosine.project_cosine_bwd_kernel,
                   alignment_linear_silu.linear_grad_silu_kernel,
                   alignment_linear_silu.linear_bias_silu_kernel):
        monkeypatch.setattr(kernel, "configs", [config(64, 64), config(32, 32)])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", bench)
    before = autotune.tuning_count()
    h, z, ws = make_inputs(2, 36, 36, Z=72, target_grad=True)  # 3 vs 2 blocks of rows, of Z
    inputs = [h, z, *ws]
    loss = repa_alignment_loss(*inputs, backend="triton")
    grads = torch.autograd.grad(loss, inputs)
    assert autotune.tuning_count() - before == bench.calls // 2 >= 6  # two trials a key
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = repa_alignment_loss(*leaves, backend="reference")
    for g, r in zip([loss, *grads], [ref, *torch.autograd.grad(ref, leaves)]):
        assert (g.double() - r).norm() <= 1e-5 * r.norm()


def _valid_entry():
    from repa_fast.kernels import alignment_linear_silu, autotune
    kernel = alignment_linear_silu.linear_bias_silu_kernel
    key = ("linear_bias_silu_kernel|M_BUCKET=64|N=80|K=48|STORE_PRE=False|STORE_ACT=True|"
           "PRECISION=ieee|dtypes=float32,float32,float32,float32,float32")
    return key, autotune.config_dict(kernel.configs[0])


@pytest.mark.parametrize("change, message", [
    (lambda k, c: ["not", "a", "dict"], "must be a dict"),
    (lambda k, c: {1: c}, "must be a string"),
    (lambda k, c: {k.replace("linear_bias_silu", "nope"): c}, "unknown kernel 'nope_kernel'"),
    (lambda k, c: {k.replace("|K=48", ""): c}, "key fields"),
    (lambda k, c: {k.replace("K=48", "K=4.8"): c}, "bad value"),
    (lambda k, c: {k.replace("float32,float32,", "float33,float32,"): c}, "unknown dtype"),
    (lambda k, c: {k.replace("float32,float32,", "float32,"): c}, "needs 5 dtypes"),
    (lambda k, c: {k: "BLOCK_M=32"}, "config must be a dict"),
    (lambda k, c: {k: {n: v for n, v in c.items() if n != "num_stages"}}, "config fields"),
    (lambda k, c: {k: dict(c, BLOCK_M=48)}, "BLOCK_M=48 must be a power of two"),
    (lambda k, c: {k: dict(c, BLOCK_N=16)}, "BLOCK_N=16 is below"),
    (lambda k, c: {k: dict(c, num_warps="4")}, "num_warps='4' must be a positive int"),
    (lambda k, c: {k: dict(c, num_warps=64)}, "num_warps=64 must be at most 32"),
])
def test_bad_install_input_is_refused(change, message):
    from repa_fast.kernels import autotune
    key, config = _valid_entry()
    other = key.replace("K=48", "K=4096")  # a valid entry beside the bad one: not installed
    tiles = change(key, config)
    if isinstance(tiles, dict):
        tiles = {other: dict(config), **tiles}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
        autotune.install_tiles(tiles)
    assert "key" in str(info.value) or "dict" in str(info.value)
    assert other not in autotune.export_tiles()
