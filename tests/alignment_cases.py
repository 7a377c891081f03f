"""Shared inputs and the float64 loop the alignment-op tests compare every backend with."""
import torch

# Where the Triton tests run their kernels: the GPU when there is one (Triton has no CPU
# backend), else the CPU through Triton's interpreter (tests/conftest.py sets it up).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def loop_loss(h, z, w1, b1, w2, b2, w3, b3, prefix=0):
    """float64, sample by sample and patch by patch, as the formula is written."""
    h, z = h.double(), z.double()[:, prefix:]
    w1, b1, w2, b2, w3, b3 = (t.double() for t in (w1, b1, w2, b2, w3, b3))
    silu = torch.nn.functional.silu
    hg, tg = int(h.shape[1] ** 0.5), int(z.shape[1] ** 0.5)
    g = min(hg, tg)
    kh, kt = hg // g, tg // g
    total, count = 0.0, 0
    for b in range(h.shape[0]):
        p = silu(h[b] @ w1.T + b1)
        p = silu(p @ w2.T + b2)
        p = p @ w3.T + b3  # [T, Z]
        for r in range(g):
            for c in range(g):
                pp = torch.stack([p[(r * kh + i) * hg + c * kh + j]
                                  for i in range(kh) for j in range(kh)]).mean(0)
                zz = torch.stack([z[b, (r * kt + i) * tg + c * kt + j]
                                  for i in range(kt) for j in range(kt)]).mean(0)
                cos = (pp / pp.norm().clamp_min(1e-12)) @ (zz / zz.norm().clamp_min(1e-12))
                total, count = total - cos, count + 1
    return total / count


def make_inputs(B, T, T_target, D=48, P=80, Z=40, dtype=torch.float32, target_grad=False,
                device="cpu"):
    """Hidden states [B, T, D], target [B, T_target, Z] and projector weights, all leaves on
    ``device`` (drawn on the CPU, so a seed gives the same numbers on every device)."""
    h = torch.randn(B, T, D, dtype=dtype)
    z = torch.randn(B, T_target, Z, dtype=dtype)
    ws = [torch.randn(P, D) / D ** 0.5, torch.randn(P) * 0.1, torch.randn(P, P) / P ** 0.5,
          torch.randn(P) * 0.1, torch.randn(Z, P) / P ** 0.5, torch.randn(Z) * 0.1]
    ws = [w.to(device, dtype).requires_grad_(True) for w in ws]
    return h.to(device).requires_grad_(True), z.to(device).requires_grad_(target_grad), ws


def cuda_peak_extra_bytes(projector, h, z, backend):
    """Peak CUDA memory one forward + backward of ``projector.alignment_loss`` adds above what
    exists before it (inputs, weights, .grad buffers), after two calls that allocate the .grad
    buffers and let Triton autotune."""
    for _ in range(2):
        projector.zero_grad(set_to_none=False)
        projector.alignment_loss(h, z, backend=backend).backward()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    projector.alignment_loss(h, z, backend=backend).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
