"""Build script for repa_fast.

The Triton device code is the sub-package ``repa_fast.kernels`` (``repa_fast/kernels/``), an
ordinary folder of the package; no top-level module named ``kernels`` is ever installed.

The optional native extension ``repa_fast._C`` (C++ and CUDA sources in ``csrc/``, the
``native`` backend of the alignment op) is built with torch's ``BuildExtension``, so torch must
be importable at build time (``pip install --no-build-isolation .``). Environment:

* ``REPA_FAST_BUILD_EXT=auto|0|1`` (default auto): auto builds it when torch and a C++ compiler
  are present and, if that fails, prints a warning and installs the package without it; 1
  makes any failure an error; 0 skips it (a pure-Python install).
* ``REPA_FAST_BUILD_CUDA=auto|0|1`` (default auto): the CUDA kernels are compiled when torch is
  a CUDA build and nvcc is found (``CUDA_HOME``); in auto mode a failed CUDA build falls back
  to the CPU-only extension. ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0+PTX`` (A100, H100,
  and PTX that newer GPUs compile at load) when unset and no GPU is visible, to bound the build
  time; with a visible GPU torch builds for that GPU.
* ``MAX_JOBS``: parallel compile jobs; when unset, min(cores, available memory in GiB / 2).

What was built (or why not) is written to ``repa_fast/_build_info.py`` and shown by
``python -m repa_fast.info``. Metadata commands (``python setup.py --version``, ``egg_info``)
never import torch.
"""
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = "csrc"
EXT_NAME = "repa_fast._C"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# commands that only read or write metadata: torch is not imported for them
METADATA_COMMANDS = {"egg_info", "dist_info", "check", "clean", "--version", "--name",
                     "--fullname", "--help", "-h", "--help-commands"}


def read_version() -> str:
    text = (ROOT / "repa_fast" / "version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


# Ranges admit the CUDA builds of torch users already have; CI pins exact versions in
# requirements/ci.txt.
INSTALL_REQUIRES = [
    "torch>=2.5",
    "timm>=0.9.16",
    "numpy>=1.24",
]

EXTRAS = {
    "deepspeed": ["deepspeed>=0.15"],
    "dali": ["nvidia-dali-cuda130>=2.0"],
    "data": ["diffusers>=0.30", "pillow>=10", "tqdm>=4.66"],
    "tensorboard": ["tensorboard>=2.14"],
    "wandb": ["wandb>=0.17"],
    "flash": ["flash-attn>=2.6"],
    "flash4": ["flash-attn-4>=4.0.0b1"],
    "xformers": ["xformers>=0.0.28"],
    "eval": ["scipy>=1.10", "torch-fidelity>=0.4", "pillow>=10", "tqdm>=4.66"],
    # text-to-image: CLIP text features (data preparation) and the CLIP score (evaluate)
    "t2i": ["transformers>=4.40"],
    # python -m repa_fast.analyze's figure (analysis.png)
    "analysis": ["matplotlib>=3.7"],
    "dev": ["pytest>=8", "pytest-benchmark>=4"],
}

packages = find_packages(include=["repa_fast", "repa_fast.*"])


# ----------------------------------------------------------------------------- native extension

def build_mode(variable: str) -> str:
    value = (os.environ.get(variable) or "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{variable} must be auto, 0 or 1; got {value!r}")
    return value


def say(message: str) -> None:
    print(f"repa_fast setup: {message}", file=sys.stderr, flush=True)


def metadata_only(argv) -> bool:
    """Whether every command on the line only handles metadata (no build needs torch)."""
    words = [a.split("=")[0] for a in argv[1:]]
    commands = [w for w in words if not w.startswith("-") or w in METADATA_COMMANDS]
    return bool(commands) and all(c in METADATA_COMMANDS for c in commands)


def default_max_jobs() -> int:
    """min(cores, available GiB / 2): nvcc and g++ on ATen headers take 1-2 GiB per job."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = cores or 1
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available_gib = int(fields["MemAvailable"].split()[0]) / 2 ** 20
        jobs = min(jobs, int(available_gib // 2))
    except (OSError, KeyError, ValueError):
        pass  # no /proc/meminfo (not Linux): cores only
    return max(1, jobs)


def cuda_plan(torch, cpp_extension):
    """(build the CUDA kernels?, why not) from REPA_FAST_BUILD_CUDA and what is installed."""
    mode = build_mode("REPA_FAST_BUILD_CUDA")
    if mode == "0":
        return False, "REPA_FAST_BUILD_CUDA=0"
    problem = None
    if getattr(torch.version, "hip", None):
        problem = f"torch {torch.__version__} is a ROCm build; the CUDA kernels are NVIDIA-only"
    elif torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None:
        problem = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    elif not Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists():
        problem = f"CUDA_HOME={cpp_extension.CUDA_HOME} has no bin/nvcc"
    elif not (Path(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h").exists()
              and any(Path(cpp_extension.CUDA_HOME, lib, "libcudart.so").exists()
                      for lib in ("lib64", "lib"))):
        # torch derives CUDA_HOME from the nvcc on PATH when unset, which misleads when that
        # nvcc is a wrapper script outside the toolkit (linking then fails on -lcudart)
        problem = (f"CUDA_HOME={cpp_extension.CUDA_HOME} has no include/cuda_runtime.h and "
                   f"lib64/libcudart.so (set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda)")
    if problem is not None and mode == "1":
        raise SystemExit(f"REPA_FAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    return problem is None, problem


def make_extension(cpp_extension, torch, with_cuda: bool):
    sources = [f"{CSRC}/alignment.cpp", f"{CSRC}/alignment_cpu.cpp", f"{CSRC}/ops.cpp",
               f"{CSRC}/module.cpp"]
    depends = [f"{CSRC}/alignment.h", f"{CSRC}/alignment_detail.h"]
    # -fopenmp: at::parallel_for is an inline template whose `omp parallel` must be compiled
    # into this library; the OpenMP runtime is the one torch already loaded (libgomp).
    cxx = ["-O3", "-fopenmp"]
    kwargs = dict(depends=depends, extra_compile_args={"cxx": cxx})
    # the stable-ABI (abi3) module needs torch's py_limited_api support (torch >= 2.6)
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    if (major, minor) >= (2, 6):
        kwargs["py_limited_api"] = True
    if with_cuda:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        kwargs["define_macros"] = [("REPA_FAST_WITH_CUDA", None)]
        ext = cpp_extension.CUDAExtension(EXT_NAME, sources + [f"{CSRC}/alignment_cuda.cu"],
                                          **kwargs)
    else:
        ext = cpp_extension.CppExtension(EXT_NAME, sources, **kwargs)
    ext.repa_fast_with_cuda = with_cuda
    return ext


def native_extension():
    """(ext_modules, cmdclass, reason none was made)."""
    mode = build_mode("REPA_FAST_BUILD_EXT")
    if mode == "0":
        return [], {}, "REPA_FAST_BUILD_EXT=0"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        if mode == "1":
            raise SystemExit(f"REPA_FAST_BUILD_EXT=1 but torch cannot be imported ({error}): "
                             f"install torch first, then pip install --no-build-isolation .")
        reason = (f"torch was not importable at build time ({error}); install torch, then "
                  f"pip install --no-build-isolation .")
        say(f"WARNING: not building the native extension: {reason}")
        return [], {}, reason
    with_cuda, cuda_problem = cuda_plan(torch, cpp_extension)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    ext = make_extension(cpp_extension, torch, with_cuda)
    fallback = make_extension(cpp_extension, torch, False) if with_cuda else None
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "of the visible GPUs")
    kernels = f"CPU + CUDA {torch.version.cuda} (arch {arch})" if with_cuda \
        else f"CPU only ({cuda_problem})"
    say(f"building {EXT_NAME} for torch {torch.__version__}: {kernels}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}")
    build_native = make_build_command(cpp_extension.BuildExtension, torch, mode, fallback,
                                      cuda_problem)
    return [ext], {"build_ext": build_native}, None


def build_record(built: bool, reason, torch_version, cuda_version, with_cuda, arch) -> str:
    return (
        '"""What setup.py built of the native extension repa_fast._C (written at build time)."""\n'
        f"BUILT = {built!r}\n"
        f"REASON = {reason!r}  # why it was not built, when it was not\n"
        f"TORCH_VERSION = {torch_version!r}\n"
        f"CUDA_VERSION = {cuda_version!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {arch!r}\n")


def make_build_command(base, torch, mode, fallback, cuda_problem):
    """torch's BuildExtension, made optional (auto mode) and writing the build record."""

    def c_string(value) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    class BuildNative(base):
        def build_extension(self, ext):
            # the build record compiled into the module (module.cpp includes build_info.h)
            with_cuda = getattr(ext, "repa_fast_with_cuda", False)
            cuda_version = torch.version.cuda if with_cuda else ""
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
            generated = Path(self.build_temp, "repa_fast_generated").resolve()
            generated.mkdir(parents=True, exist_ok=True)
            (generated / "build_info.h").write_text(
                "// generated by setup.py\n#pragma once\n"
                f"#define REPA_FAST_BUILD_TORCH_VERSION {c_string(torch.__version__)}\n"
                f"#define REPA_FAST_BUILD_CUDA_VERSION {c_string(cuda_version)}\n"
                f"#define REPA_FAST_BUILD_CUDA_ARCH_LIST {c_string(arch)}\n"
                f"#define REPA_FAST_BUILD_WITH_CUDA {int(with_cuda)}\n")
            if str(generated) not in ext.include_dirs:
                ext.include_dirs.append(str(generated))
            super().build_extension(ext)

        def run(self):
            ext = self.extensions[0] if self.extensions else None
            compiler_name = self.compiler  # run() replaces it by the compiler object
            try:
                super().run()
            except Exception as error:  # noqa: BLE001  (compiler errors come in many types)
                first = _summary(error)
                if fallback is not None and getattr(ext, "repa_fast_with_cuda", False) \
                        and build_mode("REPA_FAST_BUILD_CUDA") == "auto":
                    say(f"WARNING: the CUDA build of {EXT_NAME} failed ({first}); building the "
                        f"CPU-only extension instead (REPA_FAST_BUILD_CUDA=1 makes this an error)")
                    cuda_failure = f"the CUDA build failed: {first}"
                    _become(ext, fallback)
                    self.compiler = compiler_name  # a fresh compiler, without torch's patches
                    try:
                        super().run()
                    except Exception as second:  # noqa: BLE001
                        self._failed(second)
                        return
                    self._record(True, None, with_cuda=False, cuda_reason=cuda_failure)
                    return
                self._failed(error)
                return
            with_cuda = bool(getattr(ext, "repa_fast_with_cuda", False))
            self._record(True, None, with_cuda=with_cuda, cuda_reason=cuda_problem)

        def _failed(self, error):
            if mode == "1":
                raise error
            reason = f"the build failed at install time: {_summary(error)}"
            say(f"WARNING: {EXT_NAME} was not built ({reason}); installing repa_fast without the "
                f"native backend. Set REPA_FAST_BUILD_EXT=1 to see the error and stop instead.")
            self.extensions = []  # nothing to install or list as an output
            self._record(False, reason + " (rebuild with REPA_FAST_BUILD_EXT=1 pip install "
                         "--no-build-isolation . to see it)", with_cuda=False, cuda_reason=None)

        def _record(self, built, reason, *, with_cuda, cuda_reason):
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None
            text = build_record(built, reason, torch.__version__,
                                torch.version.cuda if with_cuda else None, with_cuda, arch)
            if built and not with_cuda:
                text += f"CUDA_REASON = {cuda_reason!r}  # why the CUDA kernels were not built\n"
            else:
                text += "CUDA_REASON = None\n"
            root = ROOT if self.inplace else Path(self.build_lib)
            target = root / "repa_fast" / "_build_info.py"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

    return BuildNative


def _become(ext, other) -> None:
    """Turn ext into other (same name) in place: setuptools keeps per-extension state on the
    object it finalized, so the CPU-only fallback must reuse that object."""
    for field in ("sources", "include_dirs", "define_macros", "undef_macros", "library_dirs",
                  "libraries", "runtime_library_dirs", "extra_objects", "extra_compile_args",
                  "extra_link_args", "depends", "language", "repa_fast_with_cuda"):
        setattr(ext, field, getattr(other, field))


def _summary(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]


if metadata_only(sys.argv):
    EXT_MODULES, CMDCLASS = [], {}
else:
    EXT_MODULES, CMDCLASS, _ = native_extension()

setup(
    name="repa_fast",
    version=read_version(),
    description="Fast REPA (representation alignment) training of SiT diffusion transformers",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=packages,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={"console_scripts": ["repa-fast-info=repa_fast.info:main",
                                      "repa-fast-prepare=repa_fast.data.prepare:main",
                                      "repa-fast-generate=repa_fast.generate:main",
                                      "repa-fast-evaluate=repa_fast.evaluate:main",
                                      "repa-fast-analyze=repa_fast.analyze:main",
                                      "repa-fast-compare=repa_fast.compare:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
