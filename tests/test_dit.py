"""DiT models: registry, the original (facebookresearch/DiT) checkpoint layout and forward,
classifier-free guidance, the REPA projector path, gradient checkpointing, tracing."""
import argparse
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

from random_weights import randomize_
from repa_fast.models import DiT, DiT_models, load_pretrained, read_checkpoint
from repa_fast.ops.alignment_reference import repa_alignment_loss_reference

# name -> (depth, hidden_size, num_heads, patch_size) of the original models.py (T is ours)
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
         "T": (8, 128, 2)}
NAMES = [f"DiT-{s}/{p}" for s in SIZES for p in (2, 4, 8)]


def tiny_dit(**overrides):
    cfg = dict(input_size=8, patch_size=2, hidden_size=48, depth=4, num_heads=4, num_classes=10)
    cfg.update(overrides)
    return DiT(**cfg)




def original_keys(depth, n_projectors=0):
    """State-dict keys of the original DiT (pos_embed, then modules in definition order), with
    REPA projectors between the blocks and the final layer, where SiT has them."""
    keys = ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
            "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
            "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight"]
    for i in range(depth):
        keys += [f"blocks.{i}.{name}.{kind}"
                 for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
                 for kind in ("weight", "bias")]
    keys += [f"projectors.{k}.{j}.{kind}" for k in range(n_projectors) for j in (0, 2, 4)
             for kind in ("weight", "bias")]
    keys += [f"final_layer.{name}.{kind}" for name in ("linear", "adaLN_modulation.1")
             for kind in ("weight", "bias")]
    return keys


def original_shapes(depth, hidden, patch, num_classes=1000, in_channels=4, learn_sigma=True,
                    input_size=32, mlp_ratio=4.0, dropout=0.1):
    out_ch = in_channels * (2 if learn_sigma else 1)
    mlp = int(hidden * mlp_ratio)
    shapes = {"pos_embed": (1, (input_size // patch) ** 2, hidden),
              "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
              "x_embedder.proj.bias": (hidden,),
              "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
              "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
              "y_embedder.embedding_table.weight": (num_classes + (dropout > 0), hidden),
              "final_layer.linear.weight": (patch * patch * out_ch, hidden),
              "final_layer.linear.bias": (patch * patch * out_ch,),
              "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
              "final_layer.adaLN_modulation.1.bias": (2 * hidden,)}
    for i in range(depth):
        for name, (rows, cols) in {"attn.qkv": (3 * hidden, hidden), "attn.proj": (hidden, hidden),
                                   "mlp.fc1": (mlp, hidden), "mlp.fc2": (hidden, mlp),
                                   "adaLN_modulation.1": (6 * hidden, hidden)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{i}.{name}.bias"] = (rows,)
    return shapes


def reference_forward(sd, x, t, y, *, patch_size, num_heads, encoder_depth=None):
    """The original ``DiT.forward`` (eval mode) from timm blocks and plain ops on the state dict
    ``sd``: ``(output [N, out_channels, H, W], hidden states after block encoder_depth)``."""
    n, c_in, size, _ = x.shape
    d = sd["pos_embed"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_ch = sd["final_layer.linear.bias"].shape[0] // patch_size ** 2

    def lin(name, v):
        return F.linear(v, sd[name + ".weight"], sd[name + ".bias"])

    def sub(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    embed = PatchEmbed(size, patch_size, c_in, d, bias=True)
    embed.load_state_dict(sub("x_embedder."))
    h = embed(x) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = lin("t_embedder.mlp.2", F.silu(lin("t_embedder.mlp.0", t_freq)))
    c = c + F.embedding(y, sd["y_embedder.embedding_table.weight"])

    def norm_mod(v, shift, scale):
        return F.layer_norm(v, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    hidden = None
    for i in range(depth):
        attn = Attention(d, num_heads=num_heads, qkv_bias=True)
        attn.load_state_dict(sub(f"blocks.{i}.attn."))
        mlp = Mlp(d, int(4 * d), act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        mlp.load_state_dict(sub(f"blocks.{i}.mlp."))
        mods = lin(f"blocks.{i}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        h = h + mods[2][:, None] * attn(norm_mod(h, mods[0], mods[1]))
        h = h + mods[5][:, None] * mlp(norm_mod(h, mods[3], mods[4]))
        if i + 1 == encoder_depth:
            hidden = h
    shift, scale = lin("final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = lin("final_layer.linear", norm_mod(h, shift, scale))  # [N, T, p·p·C]
    g, p = size // patch_size, patch_size
    out = out.reshape(n, g, g, p, p, out_ch).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, out_ch, size, size), hidden


def reference_projector(sd, k, h):
    for j in (0, 2):
        h = F.silu(F.linear(h, sd[f"projectors.{k}.{j}.weight"], sd[f"projectors.{k}.{j}.bias"]))
    return F.linear(h, sd[f"projectors.{k}.4.weight"], sd[f"projectors.{k}.4.bias"])


# ---- registry and layout ---------------------------------------------------------------------

def test_registry_has_the_original_names():
    assert sorted(DiT_models) == sorted(NAMES)
    assert "DiT-XL/2" in DiT_models and "DiT-S/8" in DiT_models


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_the_original_layout(name):
    size, patch = name[4:].split("/")
    depth, hidden, heads = SIZES[size]
    with torch.device("meta"):
        model = DiT_models[name]()
    assert (model.patch_size, model.num_heads, len(model.blocks)) == (int(patch), heads, depth)
    assert model.out_channels == 8 and model.learn_sigma
    sd = model.state_dict()
    assert list(sd) == original_keys(depth)
    want = original_shapes(depth, hidden, int(patch))
    assert {k: tuple(v.shape) for k, v in sd.items()} == want


def test_unknown_name_raises_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"model must be one of .*DiT-XL/2.*got 'DiT-XXL/2'"):
        DiT_models["DiT-XXL/2"]
    with pytest.raises(KeyError):
        DiT_models["SiT-XL/2"]


def test_constructor_defaults_and_positional_order_are_the_originals():
    model = DiT(8, 4, 3, 32, 2, 2, 2.0, 0.0, 7, False)  # the original's positional order
    assert (model.input_size, model.patch_size, model.in_channels) == (8, 4, 3)
    assert (model.hidden_size, len(model.blocks), model.num_heads) == (32, 2, 2)
    assert model.blocks[0].mlp.fc1.out_features == 64
    assert model.y_embedder.embedding_table.num_embeddings == 7  # no null class without dropout
    assert model.out_channels == 3 and not model.projectors
    with torch.device("meta"):
        default = DiT()
    assert (default.input_size, default.patch_size, default.in_channels, default.hidden_size,
            len(default.blocks), default.num_heads, default.num_classes) == \
        (32, 2, 4, 1152, 28, 16, 1000)
    assert default.y_embedder.dropout_prob == 0.1 and default.out_channels == 8
    assert default.z_dims == [] and default.encoder_depth == 8
    assert tiny_dit(depth=3).encoder_depth == 3


@pytest.mark.parametrize("learn_sigma, channels", [(True, 8), (False, 4)])
def test_learn_sigma_output_channels(seed, learn_sigma, channels):
    model = tiny_dit(learn_sigma=learn_sigma).eval()
    x = torch.randn(3, 4, 8, 8)
    out = model.predict(x, torch.randint(0, 1000, (3,)), torch.tensor([0, 9, 10]))
    assert out.shape == (3, channels, 8, 8)
    assert model.final_layer.linear.out_features == 4 * channels


def test_original_initialisation():
    model = tiny_dit()
    assert model.pos_embed.requires_grad is False
    assert "pos_embed" in model.state_dict()
    assert all(p.abs().sum() == 0 for p in model.final_layer.parameters())
    assert all(b.adaLN_modulation[-1].weight.abs().sum() == 0 and
               b.adaLN_modulation[-1].bias.abs().sum() == 0 for b in model.blocks)
    assert model.y_embedder.embedding_table.weight.std() < 0.03
    assert model.t_embedder.mlp[0].weight.std() < 0.03
    # the original leaves the patch embedding's bias at Conv2d's default U(±1/√fan_in)
    bias = model.x_embedder.proj.bias
    assert bias.abs().max() <= (4 * 2 * 2) ** -0.5 and bias.abs().sum() > 0
    assert all(b.attn.qkv.bias.abs().sum() == 0 for b in model.blocks)  # Xavier, zero bias
    # a fresh model predicts zeros, as the original at step 0
    out = model.eval().predict(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3]))
    assert out.abs().max() == 0


# ---- checkpoints ---------------------------------------------------------------------------

def original_state_dict(depth=4, hidden=48, patch=2, num_classes=10, input_size=8):
    """A random state dict with the original key names and shapes, built without the model."""
    shapes = original_shapes(depth, hidden, patch, num_classes=num_classes, input_size=input_size)
    return {k: torch.randn(shapes[k]) * 0.05 for k in original_keys(depth)}


def test_strict_load_of_an_original_state_dict(seed, tmp_path):
    sd = original_state_dict()
    path = tmp_path / "DiT-T-2-8x8.pt"  # the released files are bare state dicts
    torch.save(sd, path)
    model = tiny_dit()
    load_pretrained(model, path)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="projectors"):
        tiny_dit(z_dims=[16], projector_dim=32).load_state_dict(sd, strict=True)


def test_original_training_checkpoint_loads(seed, tmp_path):
    """The original train.py's checkpoint: model, ema, opt, args (a Namespace)."""
    model, ema = randomize_(tiny_dit()), randomize_(tiny_dit())
    opt = torch.optim.AdamW(model.parameters())
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}
    path = tmp_path / "0050000.pt"
    torch.save(ckpt, path)
    assert read_checkpoint(path)["args"].model == "DiT-XL/2"
    target = tiny_dit()
    load_pretrained(target, path)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(),
                                                 ema.state_dict().values()))


# ---- forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("patch_size", [2, 4])
@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("integer_t", [True, False])
def test_forward_equals_the_original(seed, patch_size, fused_attn, integer_t):
    model = tiny_dit(patch_size=patch_size, fused_attn=fused_attn)
    model.load_state_dict(original_state_dict(patch=patch_size), strict=True)
    model.eval()
    x = torch.randn(3, 4, 8, 8)
    t = torch.randint(0, 1000, (3,)) if integer_t else torch.rand(3) * 999
    y = torch.tensor([0, 9, 10])  # 10 is the CFG null class
    with torch.no_grad():
        out = model.predict(x, t, y)
        ref, _ = reference_forward(model.state_dict(), x, t, y, patch_size=patch_size,
                                   num_heads=4)
        out_tuple, zs = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(out_tuple, out) and zs == []


def test_forward_comparison_can_fail(seed):
    # Guard against a vacuous comparison: another patch order must give another output.
    model = randomize_(tiny_dit()).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    with torch.no_grad():
        ref, _ = reference_forward(model.state_dict(), x, t, y, patch_size=2, num_heads=4)
        out = model.predict(x.transpose(2, 3), t, y).transpose(2, 3)
    assert (out - ref).abs().max() > 1e-5


@pytest.mark.parametrize("cfg_channels", [3, 4])
def test_forward_with_cfg_is_the_originals(seed, cfg_channels):
    model = randomize_(tiny_dit()).eval()
    cond = torch.randn(3, 4, 8, 8)
    x = torch.cat([cond, torch.randn(3, 4, 8, 8)])  # the second half is ignored, as there
    t = torch.randint(0, 1000, (3,)).repeat(2)
    y = torch.cat([torch.tensor([0, 4, 9]), torch.full((3,), 10)])
    scale = 4.0
    with torch.no_grad():
        kwargs = {} if cfg_channels == 3 else {"cfg_channels": cfg_channels}
        got = model.forward_with_cfg(x, t, y, scale, **kwargs)
        ref, _ = reference_forward(model.state_dict(), torch.cat([cond, cond]), t, y,
                                   patch_size=2, num_heads=4)
    c_out, u_out = ref[:3], ref[3:]
    guided = u_out[:, :cfg_channels] + scale * (c_out[:, :cfg_channels] - u_out[:, :cfg_channels])
    assert got.shape == (6, 8, 8, 8)
    assert (got[:3, :cfg_channels] - guided).abs().max() <= 1e-4
    assert (got[3:, :cfg_channels] - guided).abs().max() <= 1e-4
    assert (got[:, cfg_channels:] - ref[:, cfg_channels:]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:5], t[:5], y[:5], scale)


# ---- REPA ----------------------------------------------------------------------------------

def test_projectors_match_the_reference(seed):
    model = randomize_(tiny_dit(z_dims=[24, 16], projector_dim=32, encoder_depth=3)).eval()
    assert list(model.state_dict()) == original_keys(4, n_projectors=2)
    x, t, y = torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,)), torch.tensor([1, 5, 10])
    sd = model.state_dict()
    with torch.no_grad():
        out, zs = model(x, t, y)
        ref, hidden = reference_forward(sd, x, t, y, patch_size=2, num_heads=4, encoder_depth=3)
        _, hidden_other = reference_forward(sd, x, t, y, patch_size=2, num_heads=4,
                                            encoder_depth=2)
    assert (out - ref).abs().max() <= 1e-5
    for k, z in enumerate(zs):
        assert (z - reference_projector(sd, k, hidden)).abs().max() <= 1e-5
    assert (zs[0] - reference_projector(sd, 0, hidden_other)).abs().max() > 1e-5

    # with align_to: (out, mean over encoders of −cos(projected token, encoder token))
    targets = [torch.randn(3, 16, 24), torch.randn(3, 16, 16)]
    with torch.no_grad():
        out2, loss = model(x, t, y, align_to=targets)
    want = sum(-F.cosine_similarity(reference_projector(sd, k, hidden), z, dim=-1, eps=1e-12)
               .mean() for k, z in enumerate(targets)) / 2
    assert torch.equal(out2, out)
    assert abs(loss.item() - want.item()) <= 1e-5
    ops_ref = sum(repa_alignment_loss_reference(hidden, z, *model.projectors[k].weights())
                  for k, z in enumerate(targets)) / 2
    assert abs(loss.item() - ops_ref.item()) <= 1e-5


def test_align_to_without_projectors_is_refused():
    model = tiny_dit().eval()
    with pytest.raises(ValueError, match="no projectors"):
        model(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3]),
              align_to=[torch.randn(3, 16, 8)])


def test_grad_checkpointing_gives_the_same_gradients(seed):
    kwargs = dict(depth=3, encoder_depth=2, z_dims=[16], projector_dim=32)
    plain = randomize_(tiny_dit(**kwargs))
    ckpt = tiny_dit(**kwargs, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,)), torch.tensor([1, 4, 10])
    target = torch.randn(3, 16, 16)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(seed)  # same label dropout
        out, loss = model(x, t, y, align_to=[target])
        (out.square().mean() + loss).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_dit_traces_without_graph_breaks():
    model = tiny_dit(z_dims=[16], projector_dim=32, encoder_depth=2).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,)), torch.tensor([1, 2, 3])
    for fn in (model, model.predict):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(fn)(x, t, y)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.forward_with_cfg)(
        torch.cat([x, x]), t.repeat(2), torch.cat([y, torch.full((3,), 10)]), 1.5)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_full_size_xl_equals_the_original_at_256px(seed):
    """DiT-XL/2 at 256×256 (latent 32×32): the released model's configuration."""
    model = randomize_(DiT_models["DiT-XL/2"](), std=0.02).eval()
    assert list(model.state_dict()) == original_keys(28)
    x, t, y = torch.randn(2, 4, 32, 32), torch.randint(0, 1000, (2,)), torch.tensor([207, 1000])
    with torch.no_grad():
        out = model.predict(x, t, y)
        ref, _ = reference_forward(model.state_dict(), x, t, y, patch_size=2, num_heads=16)
    assert out.shape == (2, 8, 32, 32)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
