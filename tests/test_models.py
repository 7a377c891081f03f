"""SiT models: registry, official checkpoint layout, equality with the official forward, errors."""
import argparse

import pytest
import torch

from official_reference import official_forward, official_keys
from random_weights import randomize_
from repa_fast.models import (
    SiT,
    SiT_models,
    create_model,
    extract_state_dict,
    load_legacy_checkpoints,
    load_pretrained,
    read_checkpoint,
    sincos_2d_pos_embed,
)

SMALL = dict(input_size=8, num_classes=10, projector_dim=32, z_dims=[24, 16], encoder_depth=3)


def tiny_sit(**overrides):
    cfg = dict(input_size=8, patch_size=2, hidden_size=48, depth=4, num_heads=4,
               encoder_depth=2, num_classes=10, z_dims=[24, 16], projector_dim=32)
    cfg.update(overrides)
    return SiT(**cfg)


def test_registry_has_official_names():
    for size in ("XL", "L", "B", "S"):
        for patch in (1, 2, 4, 8):
            assert f"SiT-{size}/{patch}" in SiT_models


@pytest.mark.parametrize("name", sorted(SiT_models))
def test_every_entry_forward_shapes_meta(name):
    # Meta tensors check shapes and dtypes of the full-size configs without the compute.
    with torch.device("meta"):
        model = SiT_models[name](input_size=16, validate_inputs=False, z_dims=[768, 32])
        x = torch.randn(2, 4, 16, 16)
        out, zs = model(x, torch.rand(2), torch.zeros(2, dtype=torch.long))
    patch = int(name.split("/")[1])
    tokens = (16 // patch) ** 2
    assert out.shape == (2, 4, 16, 16) and out.dtype == torch.float32
    assert [tuple(z.shape) for z in zs] == [(2, tokens, 768), (2, tokens, 32)]


@pytest.mark.parametrize("name", ["SiT-S/1", "SiT-S/2", "SiT-S/4", "SiT-S/8", "SiT-B/2", "SiT-B/8"])
def test_small_entries_run_on_cpu(name, seed):
    model = SiT_models[name](**SMALL).eval()
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        out, zs = model(x, torch.rand(3), torch.randint(0, 11, (3,)))
        out16, zs16 = model.to(torch.bfloat16)(x.bfloat16(), torch.rand(3).bfloat16(),
                                               torch.randint(0, 10, (3,)))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out16.dtype == torch.bfloat16 and zs16[0].dtype == torch.bfloat16
    assert [z.shape[-1] for z in zs] == [24, 16]


def test_sit_s_final_layer_matches_hidden_size():
    # The official SiT-S config leaves the final layer at 768 wide; ours follows hidden_size.
    model = SiT_models["SiT-S/2"](**SMALL)
    assert model.final_layer.linear.in_features == 384


@pytest.mark.parametrize("qk_norm", [False, True])
def test_state_dict_keys_are_official(qk_norm):
    model = tiny_sit(qk_norm=qk_norm)
    assert list(model.state_dict()) == official_keys(depth=4, n_projectors=2, qk_norm=qk_norm)


def test_strict_load_of_official_layout_and_round_trip(seed, tmp_path):
    src = randomize_(tiny_sit())
    official_sd = {k: v.clone() for k, v in src.state_dict().items()}
    assert set(official_sd) == set(official_keys(4, 2))
    dst = tiny_sit()
    dst.load_state_dict(official_sd, strict=True)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, official_sd[k]), k
    path = tmp_path / "model.pt"
    torch.save(dst.state_dict(), path)
    again = tiny_sit()
    again.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), official_sd.values()))


def test_official_training_checkpoint_loads(seed, tmp_path):
    """The file the official train.py writes: model, ema, opt, args (a Namespace), steps."""
    model, ema = randomize_(tiny_sit()), randomize_(tiny_sit())
    opt = torch.optim.AdamW(model.parameters())
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=2), "steps": 7}
    path = tmp_path / "0000007.pt"
    torch.save(ckpt, path)
    loaded = read_checkpoint(path)
    assert loaded["args"].encoder_depth == 2 and loaded["steps"] == 7
    target = tiny_sit()
    load_pretrained(target, path)  # EMA by default, like the official generate.py
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(),
                                                 ema.state_dict().values()))
    load_pretrained(target, path, which="model")
    assert torch.equal(target.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_bare_and_wrapped_state_dicts_load(seed):
    src = randomize_(tiny_sit())
    wrapped = {"module._orig_mod." + k: v for k, v in src.state_dict().items()}
    dst = tiny_sit()
    load_pretrained(dst, wrapped)
    assert torch.equal(dst.pos_embed, src.pos_embed)
    assert torch.equal(dst.final_layer.linear.weight, src.final_layer.linear.weight)


def test_legacy_decoder_blocks_checkpoint_converts(seed):
    src = randomize_(tiny_sit(encoder_depth=3))
    legacy = {}
    for k, v in src.state_dict().items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            if int(i) >= 3:
                k = f"decoder_blocks.{int(i) - 3}.{rest}"
        legacy[k] = v
    assert set(load_legacy_checkpoints(legacy, 3)) == set(src.state_dict())
    dst = tiny_sit(encoder_depth=3)
    load_pretrained(dst, {"ema": legacy})
    assert torch.equal(dst.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)
    with pytest.raises(ValueError, match="encoder_depth"):
        extract_state_dict(legacy)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="'ema'"):
        extract_state_dict({"model": {}}, which="ema")


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_forward_equals_official(seed, qk_norm, fused_attn, patch_size):
    model = randomize_(tiny_sit(qk_norm=qk_norm, fused_attn=fused_attn, patch_size=patch_size,
                                encoder_depth=3)).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    y = torch.tensor([0, 9, 10])  # 10 is the CFG null class
    with torch.no_grad():
        out, zs = model(x, t, y)
        ref_out, ref_zs = official_forward(model.state_dict(), x, t, y, patch_size=patch_size,
                                           num_heads=4, encoder_depth=3, qk_norm=qk_norm)
    assert (out - ref_out).abs().max() <= 1e-5
    for z, rz in zip(zs, ref_zs):
        assert (z - rz).abs().max() <= 1e-5


def test_forward_equals_official_can_fail(seed):
    # Guard against a vacuous comparison: another encoder_depth must give other zs.
    model = randomize_(tiny_sit(encoder_depth=3)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        _, zs = model(x, t, y)
        _, ref_zs = official_forward(model.state_dict(), x, t, y, patch_size=2, num_heads=4,
                                     encoder_depth=2)
    assert (zs[0] - ref_zs[0]).abs().max() > 1e-5  # the tolerance of the equality test


def test_forward_with_hidden_skips_projectors(seed):
    model = randomize_(tiny_sit(encoder_depth=2)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    calls = []
    handle = model.projectors[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out_h, hidden = model.forward_with_hidden(x, t, y)
        assert not calls
        out, zs = model(x, t, y)
    handle.remove()
    assert hidden.shape == (2, 16, 48)
    assert torch.equal(out_h, out)
    assert torch.allclose(model.projectors[1](hidden), zs[1])


def test_label_dropout_in_training_only(seed):
    model = tiny_sit(class_dropout_prob=1.0)
    y = torch.tensor([1, 2, 3])
    assert torch.equal(model.y_embedder.token_drop(y), torch.full_like(y, 10))
    model.eval()
    emb = model.y_embedder(y, model.training)
    assert torch.equal(emb, model.y_embedder.embedding_table.weight[y])
    no_cfg = tiny_sit(class_dropout_prob=0.0)
    assert no_cfg.y_embedder.embedding_table.num_embeddings == 10


def test_pos_embed_formula():
    d, g = 16, 3
    pe = sincos_2d_pos_embed(d, g)
    q = d // 4
    for row in range(g):
        for col in range(g):
            m = row * g + col
            for i in range(q):
                w = 10000 ** (-i / q)
                expect = [torch.sin(torch.tensor(col * w, dtype=torch.float64)),
                          torch.cos(torch.tensor(col * w, dtype=torch.float64)),
                          torch.sin(torch.tensor(row * w, dtype=torch.float64)),
                          torch.cos(torch.tensor(row * w, dtype=torch.float64))]
                got = [pe[m, i], pe[m, q + i], pe[m, 2 * q + i], pe[m, 3 * q + i]]
                for e, v in zip(expect, got):
                    assert abs(float(e) - float(v)) < 1e-6


def test_official_initialisation_zeroes_output():
    model = tiny_sit()
    assert model.final_layer.linear.weight.abs().sum() == 0
    assert all(b.adaLN_modulation[-1].weight.abs().sum() == 0 for b in model.blocks)
    assert model.pos_embed.requires_grad is False
    assert model.y_embedder.embedding_table.weight.std() < 0.03


# ---- bad input -------------------------------------------------------------------------------

def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"model must be one of .*SiT-XL/2.*got 'SiT-XXL/2'"):
        create_model("SiT-XXL/2")
    with pytest.raises(KeyError):
        SiT_models["SiT-XXL/2"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(encoder_depth=5), r"encoder_depth must be between 1 and depth=4; got 5"),
    (dict(encoder_depth=0), r"encoder_depth must be between 1 and depth=4; got 0"),
    (dict(input_size=9), r"input_size must be a multiple of patch_size=2; got 9"),
    (dict(hidden_size=50), r"hidden_size must be a multiple of num_heads=4; got 50"),
    (dict(decoder_hidden_size=768), r"decoder_hidden_size must equal hidden_size=48 .*got 768"),
    (dict(z_dims=[-1]), r"z_dims"),
    (dict(attn_backend="flash9"), r"attn_backend must be one of .*got 'flash9'"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_sit(**kwargs)


def test_bad_forward_inputs():
    model = tiny_sit().eval()
    t, y = torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"x must have shape \[N, 4, 8, 8\].*got \[2, 3, 8, 8\]"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 4, 8, 8\].*got \[2, 4, 16, 16\]"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 10\].*got values in \[1, 11\]"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 10\].*\[-1, 2\]"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"y must hold integer class labels"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"t must have shape \[2\].*got \[3\]"):
        model(torch.randn(2, 4, 8, 8), torch.rand(3), y)
    with pytest.raises(ValueError, match=r"y must have shape \[2\].*got \[3\]"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([1, 2, 3]))
    out, _ = model(torch.randn(2, 4, 8, 8), torch.tensor(0.5), y)  # a scalar t broadcasts
    assert out.shape == (2, 4, 8, 8)


def test_sit_traces_without_graph_breaks():
    model = tiny_sit().eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    explanation = torch._dynamo.explain(model)(x, t, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SiT-XL/2", "SiT-B/2"])
def test_full_size_model_equals_official_at_256px(seed, name):
    """The real configuration (latent 32×32, 256 tokens, one DINOv2-B projector)."""
    model = randomize_(SiT_models[name](input_size=32, encoder_depth=8, z_dims=[768]), std=0.02)
    model.eval()
    assert list(model.state_dict()) == official_keys(len(model.blocks), 1)
    x, t, y = torch.randn(2, 4, 32, 32), torch.rand(2), torch.tensor([207, 1000])
    with torch.no_grad():
        out, zs = model(x, t, y)
        ref_out, ref_zs = official_forward(model.state_dict(), x, t, y, patch_size=2,
                                           num_heads=model.num_heads, encoder_depth=8)
    assert (out - ref_out).abs().max() <= 1e-5 * max(1.0, ref_out.abs().max().item())
    assert (zs[0] - ref_zs[0]).abs().max() <= 1e-5 * max(1.0, ref_zs[0].abs().max().item())


def test_grad_checkpointing_gives_the_same_gradients(seed):
    from repa_fast.models import SiT
    kwargs = dict(input_size=8, hidden_size=48, depth=3, num_heads=4, encoder_depth=2,
                  num_classes=5, z_dims=[16], projector_dim=32)
    plain = SiT(**kwargs)
    ckpt = SiT(**kwargs, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 4])
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(seed)  # same label dropout
        out, zs = model(x, t, y)
        (out.square().mean() + zs[0].mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
