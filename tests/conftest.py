"""Test set-up: Triton's CPU interpreter where no GPU is present, fresh seeds per test."""
import os

import torch

# Must happen before any module defines a @triton.jit function (they read it at decoration).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def seed(request):
    """A fresh seed per test run, seeded into torch and reported on failure."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
