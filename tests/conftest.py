"""Test set-up: Triton's CPU interpreter where no GPU is present, an Inductor cache per
version of the custom ops, a machine cache per session, fresh seeds per test."""
import hashlib
import os
import pathlib
import signal
import tempfile

import torch

# Must happen before any module defines a @triton.jit function (they read it at decoration).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# benchmarks/gpu_check.sh time-boxes each step with SIGINT so that pytest stops and still
# writes its JSON and XML; a job started in the background without job control inherits
# SIGINT ignored, and Python then installs no KeyboardInterrupt handler: restore it.
signal.signal(signal.SIGINT, signal.default_int_handler)

# Inductor's FX-graph cache does not see edits to a custom op's fake implementation: a warm
# cache from an older checkout fails with "mismatch in length of strides and shape". One cache
# directory per content of repa_fast/ops keeps the cache without going stale.
_OPS = pathlib.Path(__file__).resolve().parents[1] / "repa_fast" / "ops"
_digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_OPS.glob("*.py"))))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_repa_fast_{_digest.hexdigest()[:12]}"))

# the per-machine cache (shards already verified, tuned tiles) of a test session is its own:
# tests never read or fill the user's ~/.cache/repa_fast
os.environ.setdefault("REPA_FAST_CACHE", tempfile.mkdtemp(prefix="repa_fast_test_cache_"))


@pytest.fixture
def seed(request):
    """A fresh seed per test run, seeded into torch and reported on failure."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
