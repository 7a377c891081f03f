"""MMDiT (the official REPA ``models/mmdit.py``): registry, the official parameter layout and
strict loading, equality with an independent forward written from the official maths, the REPA
projector path and its fused loss, gradient checkpointing, tracing, and argument errors."""
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from random_weights import randomize_
from repa_fast.models import MMDiT, MMDiT_models, UnknownModelError

# the official constructor, in order: (name, default)
OFFICIAL_SIGNATURE = [
    ("input_size", 32), ("patch_size", 2), ("in_channels", 4), ("depth", 24),
    ("mlp_ratio", 4.0), ("learn_sigma", False), ("adm_in_channels", None),
    ("context_embedder_config", None), ("register_length", 0), ("attn_mode", "torch"),
    ("rmsnorm", False), ("scale_mod_only", False), ("swiglu", False), ("out_channels", None),
    ("pos_embed_scaling_factor", None), ("pos_embed_offset", None),
    ("pos_embed_max_size", None), ("num_patches", None), ("qk_norm", None), ("qkv_bias", True),
    ("dtype", None), ("device", None), ("encoder_depth", 8), ("z_dims", [768]),
    ("projector_dim", 2048),
]
NAMES = [f"MMDiT-d{d}/{p}" for d in (24, 12, 4) for p in (2, 4)]
# options of the forward comparisons (each with the d4 model: hidden 128, 4 heads of 32)
OPTIONS = {
    "default": {},
    "rmsnorm": dict(rmsnorm=True),
    "qk_ln": dict(qk_norm="ln"),
    "qk_rms": dict(qk_norm="rms"),
    "scale_mod_only": dict(scale_mod_only=True),
    "swiglu": dict(swiglu=True),
    "registers": dict(register_length=3),
    "adm_sigma_nobias": dict(adm_in_channels=7, learn_sigma=True, qkv_bias=False),
    "all": dict(rmsnorm=True, qk_norm="rms", scale_mod_only=True, swiglu=True,
                register_length=2, mlp_ratio=2.0),
    "math_attention": dict(fused_attn=False),
}


def tiny(**overrides):
    cfg = dict(input_size=16, depth=4, encoder_depth=2, z_dims=[24, 16], projector_dim=32)
    cfg.update(overrides)
    return MMDiT(**cfg)


def official_shapes(depth, patch, *, input_size=32, in_channels=4, context_dim=768,
                    z_dims=(768,), projector_dim=2048, learn_sigma=False, register_length=0,
                    adm_in_channels=None, qk_norm=None, swiglu=False, scale_mod_only=False,
                    qkv_bias=True, mlp_ratio=4.0, **_):
    """State-dict keys (in order) and shapes of the official MMDiT, from its module structure:
    own parameter/buffer first, then x/t/y/context embedders, joint blocks, final layer,
    projectors."""
    d, head = 32 * depth, 32
    out = in_channels * (2 if learn_sigma else 1)
    s = {}
    if register_length:
        s["register"] = (1, register_length, d)
    s["pos_embed"] = (1, (input_size // patch) ** 2, d)
    s["x_embedder.proj.weight"], s["x_embedder.proj.bias"] = (d, in_channels, patch, patch), (d,)

    def linear(name, rows, cols, bias=True):
        s[name + ".weight"] = (rows, cols)
        if bias:
            s[name + ".bias"] = (rows,)

    linear("t_embedder.mlp.0", d, 256)
    linear("t_embedder.mlp.2", d, d)
    if adm_in_channels:
        linear("y_embedder.mlp.0", d, adm_in_channels)
        linear("y_embedder.mlp.2", d, d)
    linear("context_embedder", d, context_dim)
    for i in range(depth):
        for half in ("context_block", "x_block"):
            pre = f"joint_blocks.{i}.{half}."
            pre_only = half == "context_block" and i == depth - 1
            linear(pre + "attn.qkv", 3 * d, d, bias=qkv_bias)
            if not pre_only:
                linear(pre + "attn.proj", d, d)
            for norm in ("ln_q", "ln_k"):
                if qk_norm in ("ln", "rms"):
                    s[pre + f"attn.{norm}.weight"] = (head,)
                if qk_norm == "ln":
                    s[pre + f"attn.{norm}.bias"] = (head,)
            if not pre_only:
                inner = int(d * mlp_ratio)
                if swiglu:
                    inner = 256 * math.ceil(int(2 * inner / 3) / 256)
                    linear(pre + "mlp.w1", inner, d, bias=False)
                    linear(pre + "mlp.w2", d, inner, bias=False)
                    linear(pre + "mlp.w3", inner, d, bias=False)
                else:
                    linear(pre + "mlp.fc1", inner, d)
                    linear(pre + "mlp.fc2", d, inner)
            mods = (1 if pre_only else 4) if scale_mod_only else (2 if pre_only else 6)
            linear(pre + "adaLN_modulation.1", mods * d, d)
    linear("final_layer.linear", patch * patch * out, d)
    linear("final_layer.adaLN_modulation.1", 2 * d, d)
    for k, z in enumerate(z_dims):
        linear(f"projectors.{k}.0", projector_dim, d)
        linear(f"projectors.{k}.2", projector_dim, projector_dim)
        linear(f"projectors.{k}.4", z, projector_dim)
    return s


def official_pos_embed(dim, grid):
    """The MAE 2-D sin-cos table as the official computes it (numpy, float64 -> float32)."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_d(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_d(gw), one_d(gh)], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def reference_forward(sd, x, t, context, y=None, *, patch, encoder_depth, opts):
    """The official ``MMDiT.forward`` from plain ops on the state dict ``sd``:
    ``(output [N, C_out, H, W], image tokens after joint block encoder_depth)``."""
    rms, smo = opts.get("rmsnorm", False), opts.get("scale_mod_only", False)
    qk_norm, swiglu = opts.get("qk_norm"), opts.get("swiglu", False)
    n, _, height, width = x.shape
    d = sd["pos_embed"].shape[-1]
    heads = depth = d // 32
    g = math.isqrt(sd["pos_embed"].shape[1])
    out_ch = sd["final_layer.linear.bias"].shape[0] // patch ** 2

    def lin(name, v):
        return F.linear(v, sd[name + ".weight"], sd.get(name + ".bias"))

    def norm(v):
        if rms:
            return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        return F.layer_norm(v, (v.shape[-1],), eps=1e-6)

    def mod(v, shift, scale):
        v = v * (1 + scale[:, None])
        return v if shift is None else v + shift[:, None]

    # embeddings
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2)
    gh, gw = height // patch, width // patch
    top, left = (g - gh) // 2, (g - gw) // 2
    pos = sd["pos_embed"].reshape(1, g, g, d)[:, top:top + gh, left:left + gw]
    h = h + pos.reshape(1, gh * gw, d)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    c = lin("t_embedder.mlp.2", F.silu(lin("t_embedder.mlp.0",
                                           torch.cat([torch.cos(args), torch.sin(args)], 1))))
    if y is not None:
        c = c + lin("y_embedder.mlp.2", F.silu(lin("y_embedder.mlp.0", y)))
    ctx = lin("context_embedder", context)
    if "register" in sd:
        ctx = torch.cat([sd["register"].expand(n, -1, -1), ctx], dim=1)

    def names(pre_only):
        if pre_only:
            return ["scale_msa"] if smo else ["shift_msa", "scale_msa"]
        return (["scale_msa", "gate_msa", "scale_mlp", "gate_mlp"] if smo else
                ["shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp"])

    def qk(prefix, name, val):  # per-head q/k norm, [N, H, L, 32]
        wt, bs = sd.get(f"{prefix}attn.{name}.weight"), sd.get(f"{prefix}attn.{name}.bias")
        if qk_norm == "ln":
            return F.layer_norm(val, (32,), wt, bs, eps=1e-6)
        if qk_norm == "rms":
            return val * torch.rsqrt(val.pow(2).mean(-1, keepdim=True) + 1e-6) * wt
        return val

    def pre_attention(prefix, v, pre_only):
        chunks = lin(prefix + "adaLN_modulation.1", F.silu(c)).chunk(len(names(pre_only)), 1)
        m = dict(zip(names(pre_only), chunks))
        qkv = lin(prefix + "attn.qkv", mod(norm(v), m.get("shift_msa"), m["scale_msa"]))
        q, k, w = qkv.reshape(n, v.shape[1], 3, heads, 32).permute(2, 0, 3, 1, 4)
        return (qk(prefix, "ln_q", q), qk(prefix, "ln_k", k), w), m

    def post_attention(prefix, a, v, m):
        v = v + m["gate_msa"][:, None] * lin(prefix + "attn.proj", a)
        u = mod(norm(v), m.get("shift_mlp"), m["scale_mlp"])
        if swiglu:
            gate = F.silu(lin(prefix + "mlp.w1", u))
            u = lin(prefix + "mlp.w2", gate * lin(prefix + "mlp.w3", u))
        else:
            u = lin(prefix + "mlp.fc2", F.gelu(lin(prefix + "mlp.fc1", u), approximate="tanh"))
        return v + m["gate_mlp"][:, None] * u

    hidden = None
    for i in range(depth):
        last = i == depth - 1
        cqkv, cm = pre_attention(f"joint_blocks.{i}.context_block.", ctx, last)
        xqkv, xm = pre_attention(f"joint_blocks.{i}.x_block.", h, False)
        q, k, w = (torch.cat([a, b], dim=2) for a, b in zip(cqkv, xqkv))
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(32)).softmax(-1) @ w  # [N, H, L, 32]
        att = att.transpose(1, 2).reshape(n, -1, d)
        L = ctx.shape[1]
        if not last:
            ctx = post_attention(f"joint_blocks.{i}.context_block.", att[:, :L], ctx, cm)
        h = post_attention(f"joint_blocks.{i}.x_block.", att[:, L:], h, xm)
        if i + 1 == encoder_depth:
            hidden = h
    shift, scale = lin("final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = lin("final_layer.linear", mod(F.layer_norm(h, (d,), eps=1e-6), shift, scale))
    out = out.reshape(n, gh, gw, patch, patch, out_ch).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, out_ch, height, width), hidden


def reference_projector(sd, k, h):
    for j in (0, 2):
        h = F.silu(F.linear(h, sd[f"projectors.{k}.{j}.weight"], sd[f"projectors.{k}.{j}.bias"]))
    return F.linear(h, sd[f"projectors.{k}.4.weight"], sd[f"projectors.{k}.4.bias"])


def official_proj_loss(zs, zs_tilde):
    """The official ``SILoss`` projection loss: −cos per token, mean over encoders, batch
    and tokens."""
    loss = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, zt_j in zip(z, z_tilde):
            loss = loss + (-(F.normalize(z_j, dim=-1) * F.normalize(zt_j, dim=-1)).sum(-1)).mean()
    return loss / (len(zs) * zs[0].shape[0])


def inputs(n=3, size=16, length=77, width=768, adm=None):
    x, t, ctx = torch.randn(n, 4, size, size), torch.rand(n), torch.randn(n, length, width)
    return x, t, ctx, (torch.randn(n, adm) if adm else None)


# ---- registry and layout ---------------------------------------------------------------------

def test_registry_names_and_sizes():
    assert sorted(MMDiT_models) == sorted(NAMES)
    for name in NAMES:
        depth, patch = int(name[7:].split("/")[0]), int(name.split("/")[1])
        with torch.device("meta"):
            model = MMDiT_models[name]()
        assert (model.hidden_size, model.num_heads, model.patch_size, len(model.joint_blocks)) \
            == (32 * depth, depth, patch, depth)
        assert model.encoder_depth == min(8, depth)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
            official_shapes(depth, patch)
        assert list(model.state_dict()) == list(official_shapes(depth, patch))
    with pytest.raises(UnknownModelError, match=r"model must be one of .*MMDiT-d24/2.*'MMDiT-L/2'"):
        MMDiT_models["MMDiT-L/2"]


def test_constructor_signature_and_defaults_are_the_officials():
    params = list(inspect.signature(MMDiT).parameters.values())
    positional = [(p.name, p.default) for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [(n, list(d) if n == "z_dims" else d) for n, d in positional] == OFFICIAL_SIGNATURE
    assert all(p.kind == p.KEYWORD_ONLY for p in params[len(positional):])
    with torch.device("meta"):
        model = MMDiT()  # the official train_t2i.py model at 256 px: latent 32, patch 2
    assert (model.hidden_size, model.num_heads, model.input_size, model.out_channels) == \
        (768, 24, 32, 4)
    assert (model.context_dim, model.z_dims, model.encoder_depth) == (768, [768], 8)
    assert model.pos_embed_max_size == 16 and model.projectors[0][0].out_features == 2048
    assert "pos_embed" in dict(model.named_buffers())
    # positional order: (input_size, patch_size, in_channels, depth, mlp_ratio, learn_sigma)
    small = MMDiT(8, 4, 3, 2, 2.0, True, None, None, 0, "math", encoder_depth=1, z_dims=[5],
                  projector_dim=8)
    assert (small.input_size, small.patch_size, small.in_channels, small.out_channels) == \
        (8, 4, 3, 6)
    assert small.joint_blocks[0].x_block.mlp.fc1.out_features == 128


@pytest.mark.parametrize("opts", ["registers", "adm_sigma_nobias", "qk_ln", "all"])
def test_option_layouts_are_the_officials(opts):
    kwargs = {k: v for k, v in OPTIONS[opts].items() if k != "fused_attn"}
    model = tiny(**kwargs)
    want = official_shapes(4, 2, input_size=16, z_dims=(24, 16), projector_dim=32, **kwargs)
    assert list(model.state_dict()) == list(want)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want


def test_strict_load_of_an_official_state_dict(seed):
    shapes = official_shapes(4, 2, input_size=16, z_dims=(24, 16), projector_dim=32,
                             register_length=2)
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    model = tiny(register_length=2)
    model.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    del sd["joint_blocks.3.context_block.adaLN_modulation.1.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(sd, strict=True)


def test_fresh_model_is_the_officials_initialisation(capsys):
    model = tiny(qk_norm="rms", register_length=4, input_size=32)
    assert capsys.readouterr().out == ""  # the official prints its arguments; we do not
    assert torch.equal(model.pos_embed, official_pos_embed(128, 16))
    assert model.pos_embed.requires_grad is False
    ln_q = model.joint_blocks[1].x_block.attn.ln_q.weight
    assert torch.equal(ln_q, torch.ones(32))  # the official leaves torch.empty memory here
    assert model.register.std() > 0.5  # randn, as the official
    # PyTorch's default init, no adaLN-Zero: a fresh model's output is not zero
    x, t, ctx, _ = inputs(size=32, length=5)
    with torch.no_grad():
        out, _ = model(x, t, context=ctx)
    assert out.abs().mean() > 1e-3


def test_context_width_and_embedder_config(seed):
    hidden = 128
    linear = tiny(context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 32, "out_features": hidden}})
    assert linear.context_dim == 32 and linear.context_embedder.in_features == 32
    assert tiny(context_dim=40).context_embedder.in_features == 40
    identity = tiny(context_embedder_config={"target": "torch.nn.Identity"})
    assert identity.context_dim == hidden and "context_embedder.weight" not in \
        identity.state_dict()
    for model, width in ((linear, 32), (identity, hidden)):
        x, t, ctx, _ = inputs(length=5, width=width)
        assert model(x, t, context=ctx)[0].shape == x.shape
    with pytest.raises(ValueError, match=r"out_features'\] must be the hidden size 128.*got 64"):
        tiny(context_embedder_config={"target": "torch.nn.Linear",
                                      "params": {"in_features": 32, "out_features": 64}})
    with pytest.raises(ValueError, match=r"context_dim must match .*width 32\); got 16"):
        tiny(context_dim=16, context_embedder_config={
            "target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": hidden}})
    with pytest.raises(ValueError, match="context_embedder_config must be None or"):
        tiny(context_embedder_config={"target": "torch.nn.Conv1d"})


def test_dtype_applies_to_every_parameter(seed):
    model = tiny(dtype=torch.float64, swiglu=True, qk_norm="rms", register_length=1)
    assert {p.dtype for p in model.parameters()} | {model.pos_embed.dtype} == {torch.float64}
    x, t, ctx, _ = inputs(length=5)
    out, zs = model(x.double(), t.double(), context=ctx.double())
    assert out.dtype == zs[0].dtype == torch.float64


# ---- forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("patch", [2, 4])
def test_forward_equals_the_official_maths(seed, opts, patch):
    kwargs = OPTIONS[opts]
    model = randomize_(tiny(patch_size=patch, **kwargs)).eval()
    length = 77 if patch == 2 else 5
    x, t, ctx, y = inputs(length=length, adm=kwargs.get("adm_in_channels"))
    sd = model.state_dict()
    with torch.no_grad():
        out, zs = model(x, t, y, context=ctx)
        ref, hidden = reference_forward(sd, x, t, ctx, y, patch=patch, encoder_depth=2,
                                        opts=kwargs)
    assert out.shape == (3, model.out_channels, 16, 16)
    assert (out - ref).abs().max() <= 1e-5
    assert out.abs().mean() > 1e-2  # a non-vacuous comparison
    for k, z in enumerate(zs):
        assert z.shape == (3, (16 // patch) ** 2, (24, 16)[k])
        assert (z - reference_projector(sd, k, hidden)).abs().max() <= 1e-5


def test_smaller_inputs_are_cropped_from_the_position_table(seed):
    model = randomize_(tiny(register_length=1)).eval()
    x = torch.randn(3, 4, 12, 8)  # a 6×4 patch grid inside the 8×8 table
    _, t, ctx, _ = inputs(length=5)
    with torch.no_grad():
        out, zs = model(x, t, context=ctx)
        ref, hidden = reference_forward(model.state_dict(), x, t, ctx, patch=2, encoder_depth=2,
                                        opts={})
    assert out.shape == (3, 4, 12, 8) and zs[0].shape == (3, 24, 24)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("row, changes", [(0, False), (128, True)])
def test_forward_comparison_can_fail(seed, row, changes):
    # The last context half is pre_only: its queries (qkv rows < 128) are computed and
    # dropped, its keys (rows 128..255) feed the image tokens' attention.
    model = randomize_(tiny()).eval()
    x, t, ctx, _ = inputs(length=5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["joint_blocks.3.context_block.attn.qkv.weight"][row] += 0.5
    with torch.no_grad():
        out, _ = model(x, t, context=ctx)
        ref, _ = reference_forward(sd, x, t, ctx, patch=2, encoder_depth=2, opts={})
    assert ((out - ref).abs().max() > 1e-5) == changes


def test_align_to_is_the_official_projection_loss_with_its_gradients(seed):
    model = randomize_(tiny(register_length=2))
    x, t, ctx, _ = inputs(length=5)
    targets = [torch.randn(3, 64, 24), torch.randn(3, 64, 16)]
    out, loss = model(x, t, context=ctx, align_to=targets)
    (out.square().mean() + loss).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out2, zs = model(x, t, context=ctx)
    want = official_proj_loss(targets, zs)
    (out2.square().mean() + want).backward()
    assert torch.equal(out, out2)
    assert abs(loss.item() - want.item()) <= 1e-5
    with torch.no_grad():
        _, hidden = reference_forward(model.state_dict(), x, t, ctx, patch=2, encoder_depth=2,
                                      opts={})
        ref = official_proj_loss(targets, [reference_projector(model.state_dict(), k, hidden)
                                           for k in range(2)])
    assert abs(loss.item() - ref.item()) <= 1e-5
    for name, p in model.named_parameters():
        assert torch.allclose(fused[name], p.grad, atol=1e-6, rtol=1e-4), name
    assert fused["joint_blocks.0.x_block.attn.qkv.weight"].abs().sum() > 0


def test_detach_stops_the_projection_gradient_at_the_projectors(seed):
    model = randomize_(tiny())
    x, t, ctx, _ = inputs(length=5)
    targets = [torch.randn(3, 64, 24), torch.randn(3, 64, 16)]
    _, zs = model(x, t, context=ctx, detach=True)
    official_proj_loss(targets, zs).backward()
    assert model.projectors[0][0].weight.grad.abs().sum() > 0
    assert model.joint_blocks[0].x_block.attn.qkv.weight.grad is None
    model.zero_grad()
    _, loss = model(x, t, None, ctx, True, align_to=targets)
    loss.backward()
    assert model.projectors[1][4].weight.grad.abs().sum() > 0
    assert model.joint_blocks[0].x_block.attn.qkv.weight.grad is None


def test_grad_checkpointing_gives_the_same_gradients(seed):
    kwargs = dict(register_length=2, qk_norm="ln")
    plain = randomize_(tiny(**kwargs))
    ckpt = tiny(**kwargs, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx, _ = inputs(length=5)
    targets = [torch.randn(3, 64, 24), torch.randn(3, 64, 16)]
    grads = []
    for model in (plain, ckpt):
        out, loss = model(x, t, context=ctx, align_to=targets)
        (out.square().mean() + loss).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_mmdit_traces_without_graph_breaks():
    model = tiny(register_length=2, qk_norm="rms", input_size=8).eval()
    x, t, ctx, _ = inputs(size=8, length=5)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x, t, context=ctx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


# ---- errors ----------------------------------------------------------------------------------

def test_bad_forward_inputs():
    model = tiny().eval()
    x, t, ctx, _ = inputs(n=2, length=5)
    with pytest.raises(ValueError, match=r"context must be the text tokens \[N, L, 768\].*None"):
        model(x, t)
    with pytest.raises(ValueError, match=r"context must have shape \[2, L, 768\].*\[2, 5, 512\]"):
        model(x, t, context=torch.randn(2, 5, 512))
    with pytest.raises(ValueError, match=r"context must have shape \[2, L, 768\].*\[3, 5, 768\]"):
        model(x, t, context=torch.randn(3, 5, 768))
    shape = r"x must have shape \[N, 4, 16, 16\]"
    with pytest.raises(ValueError, match=shape + r".*got \[2, 3, 16, 16\]"):
        model(torch.randn(2, 3, 16, 16), t, context=ctx)
    with pytest.raises(ValueError, match=shape + r".*got \[2, 4, 32, 32\]"):
        model(torch.randn(2, 4, 32, 32), t, context=ctx)
    with pytest.raises(ValueError, match=r"patch_size=2.*got \[2, 4, 15, 16\]"):
        model(torch.randn(2, 4, 15, 16), t, context=ctx)
    with pytest.raises(ValueError, match=r"t must have shape \[2\].*got \[3\]"):
        model(x, torch.rand(3), context=ctx)
    with pytest.raises(ValueError, match=r"y must be None.*adm_in_channels=None"):
        model(x, t, torch.randn(2, 7), context=ctx)
    with pytest.raises(ValueError, match=r"y must have shape \[2, 7\].*got \[2, 6\]"):
        tiny(adm_in_channels=7)(x, t, torch.randn(2, 6), context=ctx)
    with pytest.raises(ValueError, match=r"align_to must hold one target per projector \(2"):
        model(x, t, context=ctx, align_to=[torch.randn(2, 64, 24)])
    out, _ = model(x, torch.tensor(0.5), context=ctx)  # a scalar t broadcasts
    assert out.shape == x.shape


@pytest.mark.parametrize("kwargs, match", [
    (dict(encoder_depth=5), r"encoder_depth must be between 1 and depth=4; got 5"),
    (dict(encoder_depth=0), r"encoder_depth must be between 1 and depth=4; got 0"),
    (dict(input_size=15), r"input_size must be a multiple of patch_size=2; got 15"),
    (dict(qk_norm="l2"), r"qk_norm must be one of \(None, 'ln', 'rms'\); got 'l2'"),
    (dict(attn_mode="flash"), r"attn_mode must be one of .*got 'flash'"),
    (dict(attn_backend="flash9"), r"attn_backend must be one of .*got 'flash9'"),
    (dict(z_dims=[-1]), r"z_dims must be a list of non-negative integers"),
    (dict(register_length=-1), r"register_length must be a non-negative integer; got -1"),
    (dict(depth=0), r"depth must be a positive integer; got 0"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)
