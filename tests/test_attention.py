"""Attention backend dispatch: equality of the CPU backends, forced/auto selection, reasons."""
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from repa_fast.ops import attention as A
from repa_fast.models import Attention


def reference_attention(q, k, v):
    """float64 softmax(q kᵀ/√d) v on [B, N, H, d]."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2)


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_backends_match_reference(seed, backend, dtype, tol):
    q, k, v = (torch.randn(3, 257, 4, 72).to(dtype) for _ in range(3))  # odd tokens, XL head dim
    out = A.attention(q, k, v, backend)
    assert out.shape == q.shape and out.dtype == dtype
    ref = reference_attention(q, k, v)
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < tol


def test_auto_uses_sdpa_on_cpu():
    q = torch.randn(1, 4, 2, 8)
    assert A.resolve_backend("auto", q) == "sdpa"
    assert A.unavailable_reason("sdpa") is None


@pytest.mark.parametrize("name", ["flash2", "flash3", "flash4", "xformers"])
def test_gpu_backends_explain_why_not_on_cpu(name):
    reason = A.unavailable_reason(name, torch.device("cpu"), torch.bfloat16, 72)
    assert reason  # either not importable here, or needs a CUDA tensor
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"attention backend '{name}' was forced but cannot run"):
        A.attention(q, q, q, name)


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(A.ENV_VAR, "math")
    assert Attention(16, 2).backend == "math"
    assert Attention(16, 2, backend="sdpa").backend == "sdpa"  # the argument wins
    monkeypatch.setenv(A.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"REPA_FAST_ATTN_BACKEND must be one of .*got 'fastest'"):
        Attention(16, 2)


def test_attention_module_matches_timm(seed):
    from timm.models.vision_transformer import Attention as TimmAttention

    ours = Attention(48, 4, qk_norm=True)
    theirs = TimmAttention(48, 4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 25, 48)
    assert (ours(x) - theirs(x)).abs().max() < 1e-5


def test_attention_compiles_without_graph_breaks():
    module = Attention(32, 4)
    x = torch.randn(2, 9, 32)
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0


def test_info_reports_backends_and_reasons():
    out = subprocess.run([sys.executable, "-m", "repa_fast.info"], capture_output=True,
                         text=True, check=True).stdout
    assert f"torch {torch.__version__}" in out
    for name in A.BACKENDS:
        assert f"\n  {name} " in out
    assert "sdpa       available" in out
    if not torch.cuda.is_available():
        assert "flash2     unavailable: " in out
    assert "reference  available" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", A.BACKENDS)
def test_every_available_backend_on_gpu(seed, name):
    q, k, v = (torch.randn(2, 257, 16, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if A.unavailable_reason(name, q.device, q.dtype, 72) is not None:
        pytest.skip(A.unavailable_reason(name, q.device, q.dtype, 72))
    out = A.attention(q, k, v, name)
    ref = reference_attention(q, k, v)
    assert (out.double() - ref).norm() / ref.norm() < 1e-2
    ref_sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert torch.allclose(out, ref_sdpa.transpose(1, 2), atol=2e-2)


@pytest.mark.parametrize("name, dtype, head_dim, match", [
    ("flash2", torch.float32, 72, "needs float16 or bfloat16 inputs, got torch.float32"),
    ("flash3", torch.bfloat16, 260, "head_dim a multiple of 8 and <= 256, got 260"),
    ("flash2", torch.float16, 36, "head_dim a multiple of 8 and <= 256, got 36"),
    ("flash4", torch.bfloat16, 72, r"supports head_dim in \(64, 96, 128\), got 72"),
    ("flash2", torch.bfloat16, 72, "needs a CUDA tensor, got device cpu"),
])
def test_flash_support_rules(name, dtype, head_dim, match):
    # The device/dtype/head-dim rules themselves, independent of what is installed here.
    device = torch.device("cpu") if "device cpu" in match else torch.device("cuda")
    reason = A.REGISTRY[name].call_problem(device, dtype, head_dim)
    assert reason is not None and re.search(match, reason)
