"""The CMake build of the native alignment op (CMakeLists.txt) for C++ users.

* ``test_cmake_source_lists_match_csrc`` (fast, default run): the explicit source lists in
  CMakeLists.txt name every C++/CUDA file in ``csrc/`` and every file setup.py compiles.
* ``test_cmake_build_and_ctest`` (slow, ``pytest -m slow``): configures, builds and runs
  ``ctest`` in a temporary build directory against the installed torch; then reruns the C++
  test with a perturbed reference (``REPA_FAST_TEST_PERTURB``), which must fail, to show the
  checks can fail. About 2-3 minutes on 2 cores (torch's headers make each C++ file slow to
  compile). ``REPA_FAST_CMAKE_TEST_CUDA=AUTO|ON|OFF`` (default AUTO) is passed as
  ``-DREPA_FAST_WITH_CUDA``.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKELISTS = ROOT / "CMakeLists.txt"
LIST_NAMES = ("REPA_FAST_CXX_SOURCES", "REPA_FAST_CUDA_SOURCES", "REPA_FAST_PYTHON_ONLY_SOURCES",
              "REPA_FAST_PUBLIC_HEADERS", "REPA_FAST_PRIVATE_HEADERS")


def cmake_lists() -> dict:
    """{list name: [paths]} from the ``set(NAME path ...)`` blocks of CMakeLists.txt."""
    text = re.sub(r"#[^\n]*", "", CMAKELISTS.read_text())  # drop comments
    lists = {}
    for name in LIST_NAMES:
        match = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
        assert match, f"CMakeLists.txt has no set({name} ...)"
        lists[name] = match.group(1).split()
    return lists


def test_cmake_source_lists_match_csrc():
    lists = cmake_lists()
    listed = [p for name in LIST_NAMES for p in lists[name]]
    assert len(listed) == len(set(listed)), f"a file is in two CMake source lists: {listed}"
    for path in listed:
        assert (ROOT / path).is_file(), f"CMakeLists.txt names {path}, which does not exist"
    on_disk = sorted(str(p.relative_to(ROOT)) for pattern in ("*.cpp", "*.cu", "*.h")
                     for p in (ROOT / "csrc").glob(pattern))
    unlisted = [p for p in on_disk if p not in listed]
    assert not unlisted, (f"{unlisted} in csrc/ but in no source list of CMakeLists.txt "
                          f"(REPA_FAST_CXX_SOURCES, REPA_FAST_CUDA_SOURCES, ...)")
    # Every file setup.py compiles is built by CMake too (module.cpp: Python-only).
    setup_files = set(re.findall(r"\{CSRC\}/([\w.]+)", (ROOT / "setup.py").read_text()))
    for name in setup_files:
        assert f"csrc/{name}" in listed, f"setup.py compiles csrc/{name}; CMakeLists.txt does not"
    assert all(p.endswith(".cu") for p in lists["REPA_FAST_CUDA_SOURCES"])
    assert not any(p.endswith(".cu") for p in lists["REPA_FAST_CXX_SOURCES"])
    assert (ROOT / "csrc" / "tests" / "test_alignment.cpp").is_file()


def _cxx_compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _run(cmd, step, timings, **kwargs):
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    timings[step] = time.monotonic() - start
    return proc


def _show(proc, limit=12000):
    return f"$ {' '.join(map(str, proc.args))}\n{(proc.stdout + proc.stderr)[-limit:]}"


@pytest.mark.slow
def test_cmake_build_and_ctest(tmp_path):
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    if cmake is None or ctest is None:
        pytest.skip("cmake/ctest not found on PATH")
    if _cxx_compiler() is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    torch = pytest.importorskip("torch")
    version = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)\.(\d+)", version)
    if found is None or tuple(map(int, found.groups())) < (3, 20):
        pytest.skip(f"CMake >= 3.20 needed (ctest --test-dir); found {version.splitlines()[:1]}")

    build, prefix = tmp_path / "build", tmp_path / "install"
    with_cuda = os.environ.get("REPA_FAST_CMAKE_TEST_CUDA", "AUTO")
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))
    timings = {}
    configure = _run([cmake, "-S", ROOT, "-B", build, f"-DREPA_FAST_WITH_CUDA={with_cuda}",
                      f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                      f"-DPython3_EXECUTABLE={sys.executable}"], "configure", timings,
                     timeout=600)
    assert configure.returncode == 0, _show(configure)
    summary = [line for line in configure.stdout.splitlines() if "repa_fast:" in line]
    print("\n".join(summary))

    compiled = _run([cmake, "--build", build, "--parallel", jobs], "build", timings, timeout=3600)
    assert compiled.returncode == 0, _show(compiled)

    tested = _run([ctest, "--test-dir", build, "--output-on-failure"], "ctest", timings,
                  timeout=900)
    assert tested.returncode == 0, _show(tested)
    assert "100% tests passed" in tested.stdout, _show(tested)

    # The checks can fail: a reference perturbed by 1e-6 must not pass.
    binary = build / "test_alignment"
    perturbed = subprocess.run([binary], capture_output=True, text=True, timeout=900,
                               env={**os.environ, "REPA_FAST_TEST_PERTURB": "1e-6"})
    assert perturbed.returncode == 1, _show(perturbed)
    assert "[FAIL]" in perturbed.stdout and "failed" in perturbed.stdout.splitlines()[-1]

    installed = _run([cmake, "--install", build, "--prefix", prefix], "install", timings,
                     timeout=300)
    assert installed.returncode == 0, _show(installed)
    assert (prefix / "include" / "repa_fast" / "alignment.h").is_file()
    libdirs = [prefix / "lib", prefix / "lib64"]
    assert any(any(d.glob("librepa_fast_native.*")) for d in libdirs if d.is_dir()), \
        sorted(str(p) for p in prefix.rglob("*"))
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
