"""SILoss's projection term alone (``transport.projection_loss``, after the projector; the
fused alignment op is benchmarked in test_bench_alignment.py): the official per-sample loop vs
the vectorised reference, forward + backward. Memory-bound: it reads z and z̃ once (2·B·T·Z
elements)."""
import pytest
import torch

from bench_utils import DEVICE, DTYPE, ON_GPU, official_projection_loss, timed
from repa_fast.transport import projection_loss

B, T, Z = (32, 256, 768) if ON_GPU else (8, 64, 96)


official_loop = official_projection_loss


@pytest.mark.parametrize("impl", ["official_loop", "vectorised", "compiled"])
def test_projection_loss_fwd_bwd(benchmark, impl):
    if impl == "compiled" and not ON_GPU:
        pytest.skip("torch.compile of the reference is benchmarked on GPU only (CPU compile "
                    "takes longer than the suite should)")
    fn = {"official_loop": official_loop, "vectorised": projection_loss,
          "compiled": torch.compile(projection_loss)}[impl]
    z = torch.randn(B, T, Z, device=DEVICE, dtype=DTYPE)
    z_tilde = torch.randn(B, T, Z, device=DEVICE, dtype=DTYPE, requires_grad=True)

    def step():
        loss = fn([z], [z_tilde])
        loss.backward()
        return loss

    timed(benchmark, step)
    benchmark.extra_info["gbytes_min"] = 3 * B * T * Z * z.element_size() / 1e9
