"""Build script for repa_fast.

The Triton device code lives in the top-level ``kernels/`` folder; ``repa_fast/kernels`` is a
symlink to it, so it ships as the sub-package ``repa_fast.kernels`` and also imports when the
package runs straight from a checkout (``python -m repa_fast.info`` in the repository root).
No top-level module named ``kernels`` is ever installed.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


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
    "dev": ["pytest>=8", "pytest-benchmark>=4"],
}

packages = find_packages(include=["repa_fast", "repa_fast.*"])  # follows the kernels symlink

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
    entry_points={"console_scripts": ["repa-fast-info=repa_fast.info:main",
                                      "repa-fast-prepare=repa_fast.data.prepare:main",
                                      "repa-fast-generate=repa_fast.generate:main",
                                      "repa-fast-evaluate=repa_fast.evaluate:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
