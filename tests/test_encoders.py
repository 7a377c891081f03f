"""Frozen REPA encoders: names, shapes, official preprocessing, checkpoint formats, errors.

Weights are random. Checkpoint files are written in each project's own layout (renamed from a
random timm model) and must load strictly and give the tokens of an independent, functional
forward written the way the official models compute (``ref_vit``, ``ref_openai_clip``). Large
architectures are checked on the meta device (keys and shapes only); numeric checks use small
models of the same architecture (``tiny``: the registry entry swapped for fewer/narrower layers).
"""
import argparse
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torchvision.transforms import Normalize

from repa_fast.encoders import (
    ENCODER_NAMES,
    RandomWeightsWarning,
    build_backbone,
    get_spec,
    load_encoder,
    load_encoders,
    load_state_dict_strict,
    preprocess_raw_image,
    read_checkpoint,
    to_timm_state_dict,
)
from repa_fast.encoders import registry

# name -> (grid at 256 px, embed_dim, num_prefix_tokens): the documented facts.
EXPECTED = {
    **{f"dinov2-vit-{c}": (16, d, 1) for c, d in zip("sblg", (384, 768, 1024, 1536))},
    **{f"dinov2reg-vit-{c}": (16, d, 5) for c, d in zip("sblg", (384, 768, 1024, 1536))},
    **{f"mocov3-vit-{c}": (16, d, 1) for c, d in zip("sbl", (384, 768, 1024))},
    "dinov1-vit-b": (16, 768, 1), "mae-vit-l": (16, 1024, 1), "jepa-vit-h": (16, 1280, 0),
    "clip-vit-L": (16, 1024, 1),
}
TINY = dict(embed_dim=64, depth=2, num_heads=4)


def raw(batch=2, res=256):
    return torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8)


def quiet_random(name, **kw):
    with pytest.warns(RandomWeightsWarning, match="UNTRAINED"):
        return load_encoder(name, "random", **kw)


def randomize_(model, std=0.2):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


@pytest.fixture
def tiny(monkeypatch):
    """Swap a registry entry for a small model of the same architecture; returns its spec."""
    def make(name, **arch):
        arch = {**TINY, **arch}
        spec = get_spec(name)
        small = dataclasses.replace(spec, timm_kwargs=spec.timm_kwargs + tuple(arch.items()),
                                    embed_dim=arch["embed_dim"])
        monkeypatch.setitem(registry.ENCODERS, name, small)
        return small
    return make


def source_model(spec, img_size):
    """A random timm model of ``spec`` at the checkpoint's own image size."""
    return randomize_(build_backbone(spec, 256, img_size=img_size, weight_init="skip")).eval()


# --- the official formulas, written out (train.py: preprocess_raw_image) ---------------------
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def official_preprocess(x, enc_type):
    resolution = x.shape[-1]
    if "clip" in enc_type:
        x = x / 255.
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
        x = Normalize(*CLIP)(x)
    elif "mocov3" in enc_type or "mae" in enc_type or "dinov1" in enc_type:
        x = x / 255.
        x = Normalize(*IMAGENET)(x)
    elif "dinov2" in enc_type or "jepa" in enc_type:
        x = x / 255.
        x = Normalize(*IMAGENET)(x)
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
    return x


# --- independent functional forwards in the official layouts ---------------------------------
def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _mha(x, w_qkv, b_qkv, w_out, b_out, heads):
    B, T, C = x.shape
    q, k, v = F.linear(x, w_qkv, b_qkv).view(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-1, -2) * (C // heads) ** -0.5).softmax(-1)
    return F.linear((att @ v).transpose(1, 2).reshape(B, T, C), w_out, b_out)


def ref_vit(sd, x, *, patch, heads, cls=True, final_norm=True, drop=1, eps=1e-6):
    """DINOv2-hub / MoCo v3 / MAE / DINO / I-JEPA ViT on its own state-dict names: CLS concat,
    ``+ pos_embed``, registers after CLS, pre-norm blocks (LayerScale, GELU MLP or SwiGLU)."""
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2)
    if cls:
        h = torch.cat([sd["cls_token"].expand(len(h), -1, -1), h], 1)
    h = h + sd["pos_embed"]
    if "register_tokens" in sd:
        h = torch.cat([h[:, :1], sd["register_tokens"].expand(len(h), -1, -1), h[:, 1:]], 1)
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        y = _mha(_ln(h, sd, b + "norm1", eps), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"],
                 sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"], heads)
        h = h + sd.get(b + "ls1.gamma", 1.0) * y
        y = _ln(h, sd, b + "norm2", eps)
        if b + "mlp.w12.weight" in sd:   # DINOv2 giant SwiGLU
            y1, y2 = F.linear(y, sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]).chunk(2, -1)
            y = F.linear(F.silu(y1) * y2, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        else:
            y = F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
            y = F.linear(y, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        h = h + sd.get(b + "ls2.gamma", 1.0) * y
        i += 1
    if final_norm:
        h = _ln(h, sd, "norm", eps)
    return h[:, drop:]


def ref_openai_clip(sd, x, *, heads):
    """OpenAI CLIP visual (``visual.*`` keys) as the official UpdatedVisionTransformer: ln_pre,
    QuickGELU blocks, CLS dropped, no ln_post."""
    v = {k[len("visual."):]: t.float() for k, t in sd.items() if k.startswith("visual.")}
    patch = v["conv1.weight"].shape[-1]
    h = F.conv2d(x, v["conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    h = torch.cat([v["class_embedding"].expand(len(h), 1, -1), h], 1) + v["positional_embedding"]
    h = _ln(h, v, "ln_pre", 1e-5)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in v:
        b = f"transformer.resblocks.{i}."
        h = h + _mha(_ln(h, v, b + "ln_1", 1e-5), v[b + "attn.in_proj_weight"],
                     v[b + "attn.in_proj_bias"], v[b + "attn.out_proj.weight"],
                     v[b + "attn.out_proj.bias"], heads)
        y = F.linear(_ln(h, v, b + "ln_2", 1e-5), v[b + "mlp.c_fc.weight"], v[b + "mlp.c_fc.bias"])
        h = h + F.linear(y * torch.sigmoid(1.702 * y), v[b + "mlp.c_proj.weight"],
                         v[b + "mlp.c_proj.bias"])
        i += 1
    return h[:, 1:]


# --- timm state dict -> each project's checkpoint layout --------------------------------------
def to_hub(sd):
    """DINOv2 torch-hub layout: mask_token, register_tokens, pos_embed with a CLS entry, w12/w3."""
    # timm's packed SwiGLU: fc1 holds both halves, so it is twice as wide as fc2's input.
    swiglu = sd["blocks.0.mlp.fc1.weight"].shape[0] == 2 * sd["blocks.0.mlp.fc2.weight"].shape[1]
    names = (("mlp.fc1.", "mlp.w12."), ("mlp.fc2.", "mlp.w3.")) if swiglu else ()
    out = {}
    for k, v in sd.items():
        for old, new in names:
            k = k.replace(old, new)
        out[k] = v
    if "reg_token" in out:  # timm folds the CLS position into cls_token; the hub keeps it apart
        cls_pos = torch.randn_like(out["cls_token"])
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], 1)
        out["cls_token"] = out["cls_token"] - cls_pos
    out["mask_token"] = torch.zeros_like(out["cls_token"][0])
    return out


MOCO_BUG = (("blocks.13.norm1.", "blocks.13.norm13."),
            ("blocks.13.mlp.fc1.", "blocks.13.mlp.fc13."),
            ("blocks.14.norm2.", "blocks.14.norm14."),
            ("blocks.14.mlp.fc2.", "blocks.14.mlp.fc14."))


def to_mocov3(sd):
    enc = {}
    for k, v in sd.items():
        for right, wrong in MOCO_BUG:  # the released ViT-L checkpoint's misnamed keys
            k = k.replace(right, wrong)
        enc["module.base_encoder." + k] = v
    enc["module.base_encoder.head.0.weight"] = torch.randn(8, 4)
    enc["module.momentum_encoder.cls_token"] = torch.randn_like(sd["cls_token"])
    enc["module.predictor.0.weight"] = torch.randn(8, 4)
    return {"epoch": 300, "arch": "vit_base", "state_dict": enc}


def to_jepa(sd):
    return {"epoch": 300, "encoder": {"module." + k: v for k, v in sd.items()},
            "target_encoder": {"module." + k: v + 1 for k, v in sd.items()},
            "predictor": {"module.predictor_embed.weight": torch.randn(8, 4)}}


def to_openai(sd):
    """timm CLIP ViT -> OpenAI ``visual.*`` names (fp16 as released) plus a text-tower key."""
    swaps = [("patch_embed.proj.", "conv1."), ("norm_pre.", "ln_pre."),
             ("blocks.", "transformer.resblocks."),
             ("norm1.", "ln_1."), ("norm2.", "ln_2."), ("attn.qkv.weight", "attn.in_proj_weight"),
             ("attn.qkv.bias", "attn.in_proj_bias"), ("attn.proj.", "attn.out_proj."),
             ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]
    out = {"token_embedding.weight": torch.randn(10, 4).half()}
    for k, v in sd.items():
        if k == "cls_token":
            k, v = "class_embedding", v.reshape(-1)
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        elif k.startswith("norm."):
            k = "ln_post." + k[len("norm."):]
        for old, new in swaps:
            k = k.replace(old, new)
        out["visual." + k] = v.half()
    out["visual.proj"] = torch.randn(sd["cls_token"].shape[-1], 8).half()
    return out


# --- names, shapes, attributes -------------------------------------------------------------
def test_registry_names_match_the_official_spellings():
    assert set(ENCODER_NAMES) == set(EXPECTED)
    for name in ENCODER_NAMES:  # the official loader splits on '-' into exactly three parts
        assert len(name.split("-")) == 3


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_name_builds_random_with_documented_shape(name):
    grid, dim, prefix = EXPECTED[name]
    enc = quiet_random(name, device="meta")  # shapes without memory or compute
    assert (enc.name, enc.grid, enc.embed_dim, enc.num_prefix_tokens) == (name, grid, dim, prefix)
    assert enc.backbone.num_prefix_tokens == prefix
    out = enc(torch.zeros(2, 3, 256, 256, dtype=torch.uint8, device="meta"))
    assert out.shape == (2, grid * grid, dim)


@pytest.mark.parametrize("name", ["dinov2-vit-s", "dinov2reg-vit-s", "mocov3-vit-s"])
def test_small_encoders_run_on_cpu(name):
    grid, dim, prefix = EXPECTED[name]
    enc = quiet_random(name)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()  # a parent's .train() must not unfreeze it
    assert not enc.training
    x = raw(1)
    out = enc(x)
    assert out.shape == (1, grid * grid, dim) and out.dtype == torch.float32
    assert not out.requires_grad and torch.isfinite(out).all()
    torch.testing.assert_close(enc(x.float()), out)  # float pixels in [0, 255] are accepted


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_name_runs_on_cpu_full_size(name):
    grid, dim, _ = EXPECTED[name]
    assert quiet_random(name)(raw(1)).shape == (1, grid * grid, dim)


def test_dinov2_512_gives_32x32_grid_and_others_refuse_512():
    enc = quiet_random("dinov2-vit-b", resolution=512, device="meta")
    assert enc.grid == 32
    x = torch.zeros(1, 3, 512, 512, dtype=torch.uint8, device="meta")
    assert enc(x).shape == (1, 32 * 32, 768)
    for name in ("mocov3-vit-b", "mae-vit-l", "clip-vit-L", "dinov2reg-vit-b"):
        with pytest.raises(ValueError, match="512"):
            load_encoder(name, "random", resolution=512)
    with pytest.raises(ValueError, match="resolution"):
        load_encoder("dinov2-vit-b", "random", resolution=384)


def test_dtype_and_input_checks(tiny):
    tiny("dinov2-vit-s")
    enc = quiet_random("dinov2-vit-s", dtype=torch.bfloat16)
    assert enc(raw(1)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"raw_images: expected a \[B, 3, 256, 256\]"):
        enc(raw(1, 224))
    with pytest.raises(ValueError, match="dtype"):
        load_encoder("dinov2-vit-s", "random", dtype=torch.int32)


def test_load_encoders_comma_separated():
    with pytest.warns(RandomWeightsWarning):
        encs = load_encoders("dinov2-vit-b,mae-vit-l", "random", device="meta")
    assert [e.name for e in encs] == ["dinov2-vit-b", "mae-vit-l"]
    with pytest.raises(ValueError, match="one path given for 2 encoders"):
        load_encoders("dinov2-vit-b,mae-vit-l", "a.pth")
    with pytest.raises(ValueError, match="expected 2 entries"):
        load_encoders(["dinov2-vit-b", "mae-vit-l"], ["a.pth"])


# --- preprocessing ---------------------------------------------------------------------------
@pytest.mark.parametrize("family,res", [("dinov2", 256), ("dinov2", 512), ("clip", 256),
                                        ("jepa", 256), ("mocov3", 256), ("mae", 256),
                                        ("dinov1", 256)])
def test_preprocess_equals_official_formula(family, res):
    x = raw(2, res)
    got = preprocess_raw_image(x, family)
    want = official_preprocess(x, family)
    assert got.shape == want.shape
    assert torch.equal(got, want)


# --- checkpoint formats ----------------------------------------------------------------------
def test_dinov2_hub_and_safetensors_give_the_source_models_tokens(tmp_path):
    """Full-size ViT-S/14: hub .pth (37x37 pos_embed) and timm safetensors (file and HF folder)."""
    from safetensors.torch import save_file

    spec = get_spec("dinov2-vit-s")
    src = source_model(spec, 518)
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    assert sd["pos_embed"].shape[1] == 1 + 37 * 37
    torch.save(to_hub(sd), tmp_path / "dinov2_vits14_pretrain.pth")
    save_file(sd, str(tmp_path / "vits14.safetensors"))
    (tmp_path / "hf").mkdir()
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))

    # The source timm model, its pos_embed resampled 37x37 -> 16x16 as the official loader does.
    ref_model = build_backbone(spec, 256, weight_init="skip").eval()
    ref_model.load_state_dict({**sd, "pos_embed": resample_abs_pos_embed(sd["pos_embed"],
                                                                         [16, 16])})
    x = raw(1)
    with torch.no_grad():
        want = ref_model.forward_features(official_preprocess(x, "dinov2"))[:, 1:]
    for path in ("dinov2_vits14_pretrain.pth", "vits14.safetensors", "hf"):
        enc = load_encoder("dinov2-vit-s", tmp_path / path)
        torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,res", [("dinov2-vit-g", 256), ("dinov2reg-vit-b", 256),
                                      ("dinov2-vit-b", 512)])
def test_dinov2_hub_file_matches_official_forward(tmp_path, tiny, name, res):
    """Registers (CLS position kept apart in the hub layout), SwiGLU (w12/w3), 512 px."""
    spec = tiny(name, embed_dim=96)  # ViT-g's SwiGLU needs an even width: int(96·5.33) = 512
    hub = to_hub(source_model(spec, 518).state_dict())
    path = tmp_path / "hub.pth"
    torch.save(hub, path)
    grid = 16 * res // 256
    x = raw(1, res)
    want = ref_vit({**hub, "pos_embed": resample_abs_pos_embed(hub["pos_embed"], [grid, grid])},
                   official_preprocess(x, "dinov2"), patch=14, heads=4,
                   drop=1 + (4 if spec.registers else 0))
    out = load_encoder(name, path, resolution=res)(x)
    assert out.shape == (1, grid * grid, 96)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mocov3-vit-l", "mae-vit-l", "dinov1-vit-b", "jepa-vit-h"])
def test_project_checkpoint_formats_match_official_forward(tmp_path, tiny, name):
    family = get_spec(name).family
    jepa = family == "jepa"
    spec = tiny(name, depth=15 if family == "mocov3" else 2)  # blocks 13/14 carry MoCo's bug
    sd = source_model(spec, 224).state_dict()  # released at 224 px: 14x14 (16x16 for /14)
    ckpt = {"mocov3": to_mocov3, "mae": lambda s: {"model": s}, "dinov1": dict,
            "jepa": to_jepa}[family](sd)
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    x = raw(1)
    pos = sd["pos_embed"] if jepa else resample_abs_pos_embed(sd["pos_embed"], [16, 16])
    want = ref_vit({**sd, "pos_embed": pos}, official_preprocess(x, family), patch=spec.patch_size,
                   heads=4, cls=not jepa, drop=0 if jepa else 1, final_norm=family != "mae")
    torch.testing.assert_close(load_encoder(name, path)(x), want, atol=1e-4, rtol=1e-4)


def test_openai_clip_archive_matches_official_forward(tmp_path, tiny):
    """OpenAI's ViT-L-14.pt is a TorchScript archive of fp16 weights; also a plain state dict and
    timm-layout safetensors."""
    from safetensors.torch import save_file

    tiny("clip-vit-L")
    src = source_model(get_spec("clip-vit-L"), 224)
    openai = to_openai(src.state_dict())
    x = raw(1)
    want = ref_openai_clip(openai, official_preprocess(x, "clip"), heads=4)

    torch.save(openai, tmp_path / "plain.pt")
    root = nn.Module()  # rebuild the module tree so a scripted module carries these names
    for key, value in openai.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(root).save(str(tmp_path / "ViT-L-14.pt"))
    timm_sd = {k: v.half().float() for k, v in src.state_dict().items()}  # same fp16 rounding
    save_file(timm_sd, str(tmp_path / "timm.safetensors"))
    for path in ("ViT-L-14.pt", "plain.pt", "timm.safetensors"):
        out = load_encoder("clip-vit-L", tmp_path / path)(x)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def _official_layout_meta(name):
    """Full-size official-layout state dict on the meta device, at the released image size."""
    spec = get_spec(name)
    img = {"dinov2": 518}.get(spec.family, 224)
    sd = build_backbone(spec, 256, device="meta", img_size=img).state_dict()
    return {"dinov2": to_hub, "mocov3": to_mocov3, "mae": lambda s: {"model": s}, "dinov1": dict,
            "jepa": to_jepa, "clip": to_openai}[spec.family](sd)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_size_key_mapping_loads_strictly(name):
    spec = get_spec(name)
    for res in (256, 512) if spec.supports_512 else (256,):
        grid = 16 * res // 256
        target = build_backbone(spec, res, device="meta", weight_init="skip")
        state = to_timm_state_dict(_official_layout_meta(name), spec, grid)
        load_state_dict_strict(target, state, spec, name)  # raises on any key/shape mismatch
        assert target.pos_embed.shape[1] == grid * grid + (0 if target.no_embed_class
                                                          else spec.num_prefix_tokens)


# --- errors ----------------------------------------------------------------------------------
def test_unknown_name_lists_valid_names():
    for bad in ("dinov2-vit-x", "clip-vit-l", "dinov2-reg-vit-b", "resnet50"):
        with pytest.raises(ValueError) as err:
            load_encoder(bad, "random")
        assert repr(bad) in str(err.value)
        assert "dinov2reg-vit-b" in str(err.value) and "clip-vit-L" in str(err.value)


def test_missing_file_names_path_and_source(tmp_path):
    path = tmp_path / "ckpts" / "mae_vitl.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_encoder("mae-vit-l", path)
    assert str(path) in str(err.value)
    assert "mae_pretrain_vit_large.pth" in str(err.value)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_encoder("dinov2-vit-b", tmp_path)  # a folder without HF weight files
    with pytest.raises(ValueError, match="weights: expected a checkpoint path or 'random'"):
        load_encoder("dinov2-vit-b", None)


def test_bad_checkpoints_give_clear_errors(tmp_path, tiny):
    spec = tiny("dinov2reg-vit-s")
    hub = to_hub(source_model(spec, 518).state_dict())
    torch.save(hub, tmp_path / "reg.pth")
    with pytest.raises(ValueError, match="has register tokens.*dinov2reg"):
        load_encoder("dinov2-vit-s", tmp_path / "reg.pth")  # registers checkpoint, plain name
    torch.save({"embeddings.cls_token": torch.zeros(1)}, tmp_path / "hf_transformers.pth")
    with pytest.raises(ValueError, match="transformers"):
        load_encoder("dinov2reg-vit-s", tmp_path / "hf_transformers.pth")
    odd = {**hub, "pos_embed": hub["pos_embed"][:, :8]}  # 7 entries once CLS is folded in
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="pos_embed"):
        load_encoder("dinov2reg-vit-s", tmp_path / "odd.pth")
    torch.save({k: v for k, v in hub.items() if k != "norm.weight"}, tmp_path / "short.pth")
    with pytest.raises(RuntimeError, match="norm.weight"):
        load_encoder("dinov2reg-vit-s", tmp_path / "short.pth")
    torch.save({"args": argparse.Namespace(lr=1.0), "model": {}}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(tmp_path / "pickled.pth")


def test_an_unsupported_resolution_names_the_encoder():
    with pytest.raises(ValueError, match=r"resolution: expected one of \(256, 512\) for "
                                         r"'dinov2-vit-b' .* got 64"):
        load_encoder("dinov2-vit-b", "random", resolution=64)
