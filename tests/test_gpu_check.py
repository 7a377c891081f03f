"""benchmarks/gpu_check.sh, the one command a GPU session runs, cannot rot: its ``--dry-run``
runs every step on the CPU (tiny shapes, Triton's interpreter) and must write every result
file; its time budget must fit a 10-minute device call. Also the version lines of
``python -m repa_fast.info``."""
import json
import os
import pathlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FILES = ["env.txt", "steps.txt", "bench.json", "bench.txt", "bench.log", "tests.log",
         "tests.xml", "build.log"]
DEVICE_CALL_LIMIT_S = 600  # one command on the device machine
STEPS = 5                  # env, train, align, generate, tests (build gets what is left)


def run_script(tmp_path, *args, **env):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself in --dry-run
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)


def test_script_parses_and_its_budget_fits_one_device_call():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    limits = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A limit=\((.*)\)",
                                                             text).group(1)))
    assert set(limits) == {"env", "train", "align", "generate", "tests"}
    total = int(re.search(r"total=\$\{GPU_CHECK_TOTAL_S:-(\d+)\}", text).group(1))
    grace = int(re.search(r"grace=\$\{GPU_CHECK_GRACE_S:-(\d+)\}", text).group(1))
    assert sum(map(int, limits.values())) + STEPS * grace <= total <= DEVICE_CALL_LIMIT_S
    # what comes back from the device machine: at most 8 files, plain names
    assert len(FILES) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in FILES)
    assert f'FILES="{" ".join(FILES)}"' in text


def test_script_names_only_files_that_exist():
    """The suites and test files the steps run (renamed or merged files must be renamed here)."""
    named = set(re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.py)\b", SCRIPT.read_text()))
    assert {"benchmarks/test_bench_alignment.py", "tests/test_alignment.py"} <= named
    assert [path for path in sorted(named) if not (ROOT / path).is_file()] == []


@pytest.mark.slow
def test_dry_run_writes_every_result_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text("stale")  # an old file must not count as written
    result = run_script(tmp_path, "--dry-run")
    steps = (out / "steps.txt").read_text() if (out / "steps.txt").exists() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:] + steps
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert all((out / f).stat().st_size > 0 for f in FILES)
    assert steps.startswith("budget: ") and "dry-run" in steps.splitlines()[0]
    for name in ("env", "train", "align", "generate", "tests", "native"):
        assert f"== {name}: ok after " in steps, name
    assert "0 failed step(s), 0 missing file(s)" in steps
    # one merged JSON with all three suites, every entry complete
    data = json.loads((out / "bench.json").read_text())
    suites = {b["name"].split("[")[0] for b in data["benchmarks"]}
    assert suites == {"test_train_step", "test_alignment_op", "test_sde_sampling"}
    assert all(b["extra_info"].get("provider") for b in data["benchmarks"])
    assert "repa_fast_machine" in data
    assert "x 1.00 vs official" in (out / "bench.txt").read_text()
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 0 and suite.get("failures") == "0" \
        and suite.get("errors") == "0"
    assert "versions (minimums from the API audit" in (out / "env.txt").read_text()


@pytest.mark.slow
def test_gpu_run_without_a_gpu_stops_after_env(tmp_path):
    result = run_script(tmp_path, CUDA_VISIBLE_DEVICES="")
    steps = (tmp_path / "out" / "steps.txt").read_text()
    assert result.returncode == 2, steps
    assert "no CUDA device" in steps and "NO CUDA DEVICE" in (tmp_path / "out" / "env.txt")\
        .read_text()


def test_info_says_whether_versions_meet_the_minimums():
    from repa_fast.info import TORCH_MINIMUM, version_lines, version_status

    lines = version_lines()
    assert lines[1].startswith(f"  torch    {torch.__version__}: ok")
    assert ": ok" in lines[2] or "not installed" in lines[2]
    old = version_status("torch", "2.4.1+cu121", TORCH_MINIMUM, "x")
    assert "TOO OLD or unknown: needs >= 2.5" in old
    assert ": ok" in version_status("triton", "3.6.0", (3, 6), "x")
    assert "not installed" in version_status("triton", None, (3, 6), "x")
