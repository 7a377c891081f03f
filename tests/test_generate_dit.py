"""python -m repa_fast.generate on DiT checkpoints (facebookresearch/DiT's bare state dict and
train.py checkpoint, ours): the ADM .npz, the per-sample streams (process count, resume), the
DDPM/DDIM steps against the diffusion's own loops, and the flags of the other family — on tiny
random pixel-space DiTs."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from generate_cli import generate, run_folder
from random_weights import randomize_
from repa_fast.diffusion import create_diffusion
from repa_fast.diffusion import sampling as diffusion_sampling
from repa_fast.generate import main
from repa_fast.generation import PerSampleNoise, initial_draws, load_checkpoint
from repa_fast.generation.dit_sampling import DiTOutput, DiTSamplerConfig, sample_dit_latents
from repa_fast.models import DiT, DiT_models, SiT_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 5
SIZE = 16
SHAPE = (3, SIZE, SIZE)
# guided DDPM, 4 respaced steps, a padded last batch
FAST = ["--num-sampling-steps", "4", "--cfg-scale", "3", "--per-proc-batch-size", "3",
        "--num-fid-samples", "7"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_dit(z_dims=(), in_channels=3, input_size=SIZE, model="DiT-T/4", learn_sigma=True):
    """A random DiT (every layer drawn, the zero-initialised ones too); the same weights for
    any ``z_dims`` apart from the projectors."""
    torch.manual_seed(0)
    dit = DiT_models[model](input_size=input_size, in_channels=in_channels,
                            num_classes=NUM_CLASSES, learn_sigma=learn_sigma)
    randomize_(dit)
    if z_dims:
        with_projectors = DiT_models[model](input_size=input_size, in_channels=in_channels,
                                            num_classes=NUM_CLASSES, learn_sigma=learn_sigma,
                                            z_dims=list(z_dims), encoder_depth=2,
                                            projector_dim=32)
        with_projectors.load_state_dict(dit.state_dict(), strict=False)
        dit = with_projectors
    return dit.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The same DiT as the original's bare state dict, as its train.py checkpoint
    (model/ema/opt/args), and as one of ours (with REPA projectors, args naming the model)."""
    root = tmp_path_factory.mktemp("dit_ckpts")
    sd = tiny_dit().state_dict()
    paths = dict(bare=root / "bare.pt", original=root / "0000100.pt", ours=root / "ours.pt")
    torch.save(sd, paths["bare"])
    original_args = argparse.Namespace(model="DiT-T/4", image_size=SIZE,
                                       num_classes=NUM_CLASSES, vae="ema", global_seed=0)
    torch.save(dict(model=sd, ema=sd, opt={}, args=original_args), paths["original"])
    ours = tiny_dit(z_dims=(64,)).state_dict()
    torch.save(dict(model=ours, ema=ours, steps=100,
                    args=dict(model="DiT-T/4", num_classes=NUM_CLASSES, resolution=SIZE,
                              encoder_depth=2, projector_dim=32, path_type="linear")),
               paths["ours"])
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------- recognition

def test_dit_checkpoints_are_recognised_by_name_and_by_weights(ckpts, tmp_path):
    _, spec, _ = load_checkpoint(ckpts["bare"], "ema", dict(num_classes=NUM_CLASSES))
    assert (spec.model, spec.is_dit, spec.learn_sigma, spec.resolution, spec.pixel_space,
            spec.has_null_class, spec.path_type) == ("DiT-T/4", True, True, SIZE, True, True,
                                                     None)
    _, spec, _ = load_checkpoint(ckpts["original"], "ema", {})  # args.image_size, args.model
    assert (spec.model, spec.num_classes, spec.resolution) == ("DiT-T/4", NUM_CLASSES, SIZE)
    model, spec, _ = load_checkpoint(ckpts["ours"], "ema", {})
    assert spec.model == "DiT-T/4" and spec.z_dims == (64,) and spec.encoder_depth == 2
    assert isinstance(model, DiT) and model.learn_sigma
    # a DiT without learn_sigma looks like a SiT: its name must say DiT
    sd = tiny_dit(learn_sigma=False).state_dict()
    _, spec, _ = load_state_dict(tmp_path, sd, dict(num_classes=NUM_CLASSES, model="DiT-T/4"))
    assert spec.is_dit and spec.learn_sigma is False
    # and a SiT stays a SiT, with the same record as before
    sit = SiT_models["SiT-T/4"](input_size=SIZE, in_channels=3, num_classes=NUM_CLASSES,
                                z_dims=[], encoder_depth=2)
    _, spec, _ = load_state_dict(tmp_path, sit.state_dict(), dict(num_classes=NUM_CLASSES))
    assert not spec.is_dit and spec.model == "SiT-T/4" and "learn_sigma" not in spec.to_dict()


def load_state_dict(folder, sd, flags):
    """load_checkpoint of ``sd`` saved as a bare state dict."""
    path = os.path.join(folder, "sd.pt")
    torch.save(sd, path)
    return load_checkpoint(path, "ema", flags)


# ----------------------------------------------------------------------------- the sampler

def reference_noise(indices, global_seed, guided):
    """A stand-in for the diffusion's ``randn_like``: the per-sample streams' step noise."""
    _, _, gens = initial_draws(indices, global_seed, NUM_CLASSES, SHAPE)
    noise = PerSampleNoise(gens)

    def randn_like(x, generator):
        z = noise(x[:len(indices)])
        return torch.cat([z, z]) if guided else z
    return randn_like


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_ddpm_batch_equals_p_sample_loop_with_forward_with_cfg_on_the_same_noise(
        cfg_scale, monkeypatch):
    model = tiny_dit()
    indices = [2, 7, 3]
    config = DiTSamplerConfig(num_sampling_steps=5, cfg_scale=cfg_scale)
    diffusion = config.diffusion()
    latents, labels, gens = initial_draws(indices, 4, NUM_CLASSES, SHAPE)
    ours = sample_dit_latents(DiTOutput(model, cfg_scale=cfg_scale), diffusion, latents, labels,
                              gens, config)
    # the original sample_ddp.py loop, on the same initial and step noise
    guided = cfg_scale > 1
    monkeypatch.setattr(diffusion_sampling, "_randn_like", reference_noise(indices, 4, guided))
    diffusion = create_diffusion("5")
    if guided:
        z = torch.cat([latents, latents])
        kwargs = dict(y=torch.cat([labels, torch.full_like(labels, NUM_CLASSES)]),
                      cfg_scale=cfg_scale)
        fn = model.forward_with_cfg
    else:
        z, kwargs, fn = latents, dict(y=labels), model.predict
    direct = diffusion.p_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs)
    assert torch.equal(ours, direct[:len(indices)])


def test_ddim_batch_equals_ddim_sample_loop():
    model = tiny_dit()
    config = DiTSamplerConfig(sampler="ddim", num_sampling_steps=5, cfg_scale=2.0)
    latents, labels, gens = initial_draws([0, 1], 0, NUM_CLASSES, SHAPE)
    ours = sample_dit_latents(DiTOutput(model, cfg_scale=2.0), config.diffusion(), latents,
                              labels, gens, config)
    z = torch.cat([latents, latents])
    y = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])
    direct = create_diffusion("ddim5").ddim_sample_loop(
        model.forward_with_cfg, z.shape, z, clip_denoised=False,
        model_kwargs=dict(y=y, cfg_scale=2.0))
    assert torch.equal(ours, direct[:2])


# ----------------------------------------------------------------------------- runs

def test_npz_shape_name_and_original_checkpoints(ckpts, tmp_path):
    rc, first = generate(ckpts["original"], tmp_path / "a", *FAST)
    assert rc == 0 and first.dtype == np.uint8 and first.shape == (7, SIZE, SIZE, 3)
    assert len({first[i].tobytes() for i in range(7)}) == 7
    # sample_ddp.py's folder name, then what it leaves out where not its default
    assert os.path.basename(run_folder(tmp_path / "a")) == \
        "DiT-T-4-0000100-size-16-vae-pixel-cfg-3.0-seed-0-steps-4"
    rc, bare = generate(ckpts["bare"], tmp_path / "b", *FAST, "--num-classes", "5")
    assert rc == 0 and np.array_equal(first, bare)
    rc, ours = generate(ckpts["ours"], tmp_path / "c", *FAST)  # projectors skipped
    assert rc == 0 and np.array_equal(first, ours)
    rc, ddim = generate(ckpts["original"], tmp_path / "d", *FAST, "--sampler", "ddim")
    assert rc == 0 and ddim.shape == first.shape and not np.array_equal(first, ddim)
    assert run_folder(tmp_path / "d").endswith("-steps-4-ddim")


def test_resume_and_other_batch_split_give_the_same_npz(ckpts, tmp_path):
    rc, full = generate(ckpts["original"], tmp_path, *FAST)
    folder = run_folder(tmp_path)
    os.remove(folder + ".npz")
    os.remove(os.path.join(folder, "000004.png"))
    os.utime(os.path.join(folder, "000001.png"), (1, 1))
    rc, resumed = generate(ckpts["original"], tmp_path, *FAST)
    assert rc == 0 and np.array_equal(full, resumed)
    assert os.stat(os.path.join(folder, "000001.png")).st_mtime == 1
    # batch composition only changes rounding
    rc, other = generate(ckpts["original"], tmp_path / "b", *FAST[:-3], "1", *FAST[-2:])
    assert rc == 0 and np.abs(other.astype(int) - full).max() <= 1


def test_two_processes_write_the_same_npz_as_one(ckpts, tmp_path):
    rc, single = generate(ckpts["original"], tmp_path / "one", *FAST)
    assert rc == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "repa_fast.generate", "--ckpt", ckpts["original"], "--sample-dir",
           str(tmp_path / "two"), *FAST]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (npz,) = [f for f in os.listdir(tmp_path / "two") if f.endswith(".npz")]
    assert np.array_equal(np.load(tmp_path / "two" / npz)["arr_0"], single)


def test_grid(ckpts, tmp_path):
    out = tmp_path / "grid.png"
    rc = main(["--ckpt", ckpts["original"], "--grid", "--class-labels", "0,4", "--seeds",
               "0,1,2", "--cfg-scale", "4", "--num-sampling-steps", "3", "--out", str(out)])
    assert rc == 0
    from PIL import Image
    assert np.asarray(Image.open(out)).shape == (2 * SIZE, 3 * SIZE, 3)


def test_latent_dit_decodes_with_the_vae(tmp_path):
    pytest.importorskip("diffusers")
    from tiny_vae import save_tiny_vae
    save_tiny_vae(tmp_path / "sd-vae-ft-ema")
    ckpt = str(tmp_path / "DiT-latent.pt")
    torch.save(tiny_dit(in_channels=4, input_size=4, model="DiT-T/2").state_dict(), ckpt)
    rc, arr = generate(ckpt, tmp_path / "s", "--vae", str(tmp_path / "sd-vae-ft-ema"),
                       "--num-classes", "5", "--num-sampling-steps", "2",
                       "--num-fid-samples", "3", "--per-proc-batch-size", "2")
    assert rc == 0 and arr.shape == (3, 32, 32, 3)
    assert os.path.basename(run_folder(tmp_path / "s")) == \
        "DiT-T-2-DiT-latent-size-32-vae-ema-cfg-1.5-seed-0-steps-2"


def test_image_size_is_an_alias_of_resolution():
    """sample_ddp.py's --image-size names the same setting as --resolution."""
    from repa_fast.generate import build_parser
    args = build_parser().parse_args(["--ckpt", "x.pt", "--image-size", "512"])
    assert args.resolution == 512


def test_dit_vae_names_get_a_download_hint(ckpts, tmp_path, capsys):
    """DiT's (and REPA's) `--vae mse`, a hub name, is a usage error naming what to download."""
    ckpt = str(tmp_path / "DiT-latent.pt")
    torch.save(tiny_dit(in_channels=4, input_size=4, model="DiT-T/2").state_dict(), ckpt)
    rc = main(["--ckpt", ckpt, "--vae", "mse", "--num-classes", "5", "--sample-dir",
               str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "--vae mse" in err and "stabilityai/sd-vae-ft-mse" in err, err


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("flags, expected", [
    (["--mode", "sde"], "--mode"),
    (["--num-steps", "10"], "--num-steps"),
    (["--heun"], "--heun"),
    (["--guidance-high", "0.7"], "--guidance-high"),
    (["--path-type", "cosine"], "--path-type"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps"),
    (["--num-sampling-steps", "2000"], "--num-sampling-steps"),
    (["--sampler", "ddim", "--num-sampling-steps", "999"], "--num-sampling-steps"),
    (["--model", "SiT-T/4"], "DiT-T/4"),
    (["--model", "DiT-S/4"], "--model"),
])
def test_bad_flags_with_a_dit_exit_2_naming_the_flag(ckpts, tmp_path, capsys, flags, expected):
    rc = main(["--ckpt", ckpts["original"], "--sample-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert not os.listdir(tmp_path)


def test_dit_flags_with_a_sit_exit_2(tmp_path, capsys):
    sit = SiT_models["SiT-T/4"](input_size=SIZE, in_channels=3, num_classes=NUM_CLASSES,
                                z_dims=[], encoder_depth=2)
    ckpt = str(tmp_path / "sit.pt")
    torch.save(sit.state_dict(), ckpt)
    for flags in (["--sampler", "ddim"], ["--num-sampling-steps", "4"]):
        rc = main(["--ckpt", ckpt, "--num-classes", "5", "--sample-dir", str(tmp_path / "s"),
                   *flags])
        err = capsys.readouterr().err
        assert rc == 2 and flags[0] in err and "SiT" in err, err
