"""SiT forward + backward on each attention backend (eager). FLOPs from the model config:
per token and block 24·D² (qkv, proj, 4× MLP) + 4·N·D (attention), times 3 for fwd + bwd."""
import pytest
import torch

from bench_utils import DEVICE, DTYPE, ON_GPU, timed
from repa_fast.ops import attention as A
from repa_fast.models import SiT_models

NAME, BATCH, SIZE = ("SiT-XL/2", 32, 32) if ON_GPU else ("SiT-S/2", 2, 8)


def sit_flops(model, batch: int) -> float:
    d, n = model.hidden_size, model.num_patches
    per_block = batch * n * (24 * d * d + 4 * n * d)
    return 3.0 * len(model.blocks) * per_block


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_sit_fwd_bwd(benchmark, backend):
    if backend == "auto" and A.resolve_backend("auto", torch.empty(1, 1, 1, 72, device=DEVICE,
                                                                      dtype=DTYPE)) == "sdpa":
        pytest.skip("auto resolves to sdpa here")
    model = SiT_models[NAME](input_size=SIZE, attn_backend=backend, validate_inputs=False)
    model = model.to(DEVICE, DTYPE).train()
    x = torch.randn(BATCH, 4, SIZE, SIZE, device=DEVICE, dtype=DTYPE)
    t = torch.rand(BATCH, device=DEVICE, dtype=DTYPE)
    y = torch.randint(0, 1000, (BATCH,), device=DEVICE)

    def step():
        out, zs = model(x, t, y)
        (out.float().square().mean() + zs[0].float().mean()).backward()
        return out

    timed(benchmark, step, flops=sit_flops(model, BATCH), rounds=5 if not ON_GPU else 20)
    benchmark.extra_info["model"] = NAME
