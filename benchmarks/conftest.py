"""Benchmark suites run Triton through its interpreter where no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
