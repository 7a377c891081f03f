"""The wheel ships the whole package, Triton kernels mapped to ``repa_fast.kernels``."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(out)], check=True)
    (path,) = out.glob("repa_fast-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops, "no top-level 'kernels' package may be installed"
    assert "repa_fast/kernels/__init__.py" in names
    for module in ["repa_fast/__init__.py", "repa_fast/info.py", "repa_fast/transport/samplers.py",
                   "repa_fast/models/sit.py", "repa_fast/ops/attention.py",
                   "repa_fast/transport/losses.py", "repa_fast/ops/backends.py"]:
        assert module in names
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "repa_fast").rglob("*.py")}
    assert source <= set(names), f"missing from the wheel: {sorted(source - set(names))}"


def test_unpacked_wheel_imports_everything(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = ("import importlib.util, repa_fast, repa_fast.kernels, repa_fast.models, "
            "repa_fast.transport.samplers, repa_fast.transport, repa_fast.info, repa_fast.ops.alignment_triton;"
            "assert importlib.util.find_spec('kernels') is None;"
            "assert repa_fast.__file__.startswith(%r);"
            "print(repa_fast.kernels.__name__)" % str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "repa_fast.kernels"


def test_runs_from_a_checkout_without_installing(tmp_path):
    """``python -m repa_fast.info`` in the repository root imports the source tree, kernels
    included."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", "import repa_fast, repa_fast.kernels.alignment_cosine, "
                          "repa_fast.info; print(repa_fast.__file__)"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(ROOT))
