"""python -m repa_fast.generate: per-sample seeding, process-count independence, resume, the
ADM .npz, grids, checkpoint formats and input errors — on tiny random pixel-space SiTs."""
import argparse
import json
import os
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from generate_cli import generate, run_folder
from repa_fast.generate import main
from repa_fast.generation import (PerSampleNoise, SamplerConfig, UsageError, Velocity,
                                  index_seed, initial_draws, load_checkpoint, sample_latents,
                                  write_npz_from_pngs)
from repa_fast.generation.output import ordered_map, save_png_atomic
from repa_fast.models import SiT_models
from repa_fast.transport.samplers import euler_maruyama_sampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 5
SIZE = 16
ARGS = dict(model="SiT-T/4", num_classes=NUM_CLASSES, encoder_depth=2, projector_dim=32,
            resolution=SIZE, cfg_prob=0.1, qk_norm=False, fused_attn=True, path_type="linear",
            enc_type="demo")
# a short SDE run with guidance inside an interval: both model-call shapes occur
FAST = ["--num-steps", "4", "--mode", "sde", "--cfg-scale", "3", "--guidance-high", "0.7",
        "--per-proc-batch-size", "3", "--num-fid-samples", "7"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared CPU run far faster on one thread than on contended OpenMP."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sit(in_channels=3, input_size=SIZE, model="SiT-T/4", cfg_prob=0.1, seed=0):
    """A random SiT whose output depends on x, t and y (the zero-initialised layers too)."""
    torch.manual_seed(seed)
    sit = SiT_models[model](input_size=input_size, in_channels=in_channels,
                            num_classes=NUM_CLASSES, class_dropout_prob=cfg_prob, z_dims=[64],
                            encoder_depth=2, projector_dim=32)
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return sit.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The same weights as our checkpoint, an official one (argparse args), a bare state dict;
    plus one without the CFG null class."""
    root = tmp_path_factory.mktemp("ckpts")
    sd = tiny_sit().state_dict()
    paths = dict(ours=root / "exp" / "checkpoints" / "0000010.pt", official=root / "official.pt",
                 bare=root / "bare.pt", nonull=root / "nonull.pt")
    paths["ours"].parent.mkdir(parents=True)
    torch.save(dict(model=sd, ema=sd, args=ARGS, steps=10), paths["ours"])
    torch.save(dict(model=sd, ema=sd, args=argparse.Namespace(**ARGS), steps=10),
               paths["official"])
    torch.save(sd, paths["bare"])
    torch.save(dict(ema=tiny_sit(cfg_prob=0.0).state_dict(), args=dict(ARGS, cfg_prob=0.0)),
               paths["nonull"])
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------- seeding

def test_index_seeds_are_distinct_32_bit_and_depend_on_the_global_seed():
    seeds = [index_seed(0, i) for i in range(20000)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 32 for s in seeds)
    assert index_seed(1, 0) != index_seed(0, 0) and index_seed(2 ** 32, 0) != index_seed(0, 0)
    assert index_seed(7, 123) == index_seed(7, 123)


def test_sde_noise_of_one_sample_is_the_official_sampler_with_its_stream_as_global_rng():
    """By construction: a batch of one, the global CPU RNG set to the sample's generator after
    its initial draws, gives exactly the unchanged euler_maruyama_sampler's result."""
    model = tiny_sit()
    config = SamplerConfig(mode="sde", num_steps=5, cfg_scale=2.5, guidance_high=0.6)
    latents, labels, gens = initial_draws([11], 3, NUM_CLASSES, (3, SIZE, SIZE))
    state = gens[0].get_state()
    ours = sample_latents(Velocity(model), latents, labels, gens, config)
    torch.set_rng_state(state)
    direct = euler_maruyama_sampler(model, latents, labels, num_steps=5, cfg_scale=2.5,
                                    guidance_high=0.6)
    assert torch.equal(ours, direct)


def test_batched_sde_equals_a_per_sample_loop():
    model = Velocity(tiny_sit())
    config = SamplerConfig(mode="sde", num_steps=4, cfg_scale=3.0, guidance_high=0.7)
    indices = [0, 5, 9]
    batched = sample_latents(model, *initial_draws(indices, 0, NUM_CLASSES, (3, SIZE, SIZE)),
                             config)
    for row, index in enumerate(indices):
        alone = sample_latents(model, *initial_draws([index], 0, NUM_CLASSES, (3, SIZE, SIZE)),
                               config)
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_per_sample_noise_rejects_a_batch_of_the_wrong_size():
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(RuntimeError, match="2 streams"):
        PerSampleNoise(gens)(torch.zeros(3, 4))


# ----------------------------------------------------------------------------- runs

def test_npz_is_deterministic_index_ordered_uint8(ckpts, tmp_path):
    rc, first = generate(ckpts["ours"], tmp_path / "a", *FAST)
    assert rc == 0
    assert first.dtype == np.uint8 and first.shape == (7, SIZE, SIZE, 3)
    rc, second = generate(ckpts["ours"], tmp_path / "b", *FAST)
    assert rc == 0 and np.array_equal(first, second)
    folder = run_folder(tmp_path / "a")
    # the official name, then what it leaves out where not the official default
    assert os.path.basename(folder) == \
        "SiT-T-4-0000010-size-16-vae-pixel-cfg-3.0-seed-0-sde-steps-4-interval-0.0-0.7"
    from PIL import Image
    for i in (0, 3, 6):  # arr_0[i] is sample i's PNG
        assert np.array_equal(np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))),
                              first[i])
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(7)] + ["settings.json"]
    assert len({first[i].tobytes() for i in range(7)}) == 7
    rc, other_seed = generate(ckpts["ours"], tmp_path / "c", *FAST, "--global-seed", "1")
    assert rc == 0 and not np.array_equal(first, other_seed)


def test_resume_regenerates_only_missing_batches_and_gives_the_same_npz(ckpts, tmp_path):
    rc, full = generate(ckpts["ours"], tmp_path, *FAST)
    folder = run_folder(tmp_path)
    os.remove(folder + ".npz")
    os.remove(os.path.join(folder, "000004.png"))                 # batch 1 (3, 4, 5)
    open(os.path.join(folder, "000006.png"), "w").close()          # batch 2: an empty file
    open(os.path.join(folder, "000005.png.tmp"), "w").close()     # a write cut short
    untouched = [os.path.join(folder, f"{i:06d}.png") for i in (1, 3)]  # batch 0 is complete;
    for path in untouched:                                               # 3 exists in batch 1
        os.utime(path, (1, 1))
    rc, resumed = generate(ckpts["ours"], tmp_path, *FAST)
    assert rc == 0 and np.array_equal(full, resumed)
    assert all(os.stat(path).st_mtime == 1 for path in untouched)  # only missing PNGs written
    assert os.path.getsize(os.path.join(folder, "000006.png")) > 0
    # more samples later: the first 7 stay, 3 more come (7, 8 from the padded batch 2)
    untouched.append(os.path.join(folder, "000006.png"))
    os.utime(untouched[-1], (1, 1))
    rc, more = generate(ckpts["ours"], tmp_path, *FAST[:-1], "10")
    assert rc == 0 and more.shape[0] == 10 and np.array_equal(more[:7], full)
    assert all(os.stat(path).st_mtime == 1 for path in untouched)


def test_resume_with_other_settings_is_refused(ckpts, tmp_path, capsys):
    assert generate(ckpts["ours"], tmp_path, *FAST)[0] == 0
    rc, _ = generate(ckpts["ours"], tmp_path, *FAST, "--path-type", "cosine")
    err = capsys.readouterr().err
    assert rc == 2 and "--sample-dir" in err and "path_type" in err


def test_ode_sde_and_heun_all_run_and_differ(ckpts, tmp_path):
    common = ["--num-steps", "3", "--per-proc-batch-size", "2", "--num-fid-samples", "2"]
    results = [generate(ckpts["ours"], tmp_path / mode, *common, *extra)
               for mode, extra in [("sde", ["--mode", "sde"]), ("ode", ["--mode", "ode"]),
                                   ("heun", ["--mode", "ode", "--heun"])]]
    assert all(rc == 0 and arr.shape == (2, SIZE, SIZE, 3) for rc, arr in results)
    arrays = [arr for _, arr in results]
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])


def test_official_and_bare_checkpoints_give_the_same_samples(ckpts, tmp_path, capsys):
    rc, ours = generate(ckpts["ours"], tmp_path / "ours", *FAST)
    rc_official, official = generate(ckpts["official"], tmp_path / "official", *FAST)
    assert rc == rc_official == 0 and np.array_equal(ours, official)
    # a bare state dict cannot say how many classes it has (6 rows: 5 + null, or 6)
    rc, _ = generate(ckpts["bare"], tmp_path / "bare", *FAST)
    assert rc == 2 and "--num-classes" in capsys.readouterr().err
    rc, bare = generate(ckpts["bare"], tmp_path / "bare", *FAST, "--num-classes", "5")
    assert rc == 0 and np.array_equal(ours, bare)


def test_checkpoint_configuration_is_read_from_args_and_weights(ckpts):
    _, spec, _ = load_checkpoint(ckpts["official"], "ema", {})
    assert (spec.model, spec.num_classes, spec.z_dims, spec.projector_dim, spec.resolution,
            spec.pixel_space, spec.has_null_class) == ("SiT-T/4", 5, (64,), 32, 16, True, True)
    _, bare, _ = load_checkpoint(ckpts["bare"], "ema", dict(num_classes=5))
    assert (bare.model, bare.encoder_depth, bare.z_dims) == ("SiT-T/4", 8, (64,))
    _, nonull, _ = load_checkpoint(ckpts["nonull"], "ema", {})
    assert not nonull.has_null_class


def test_old_torch_file_format_is_read_whole(ckpts, tmp_path):
    """Zip-format checkpoints are memory-mapped; the pre-1.6 format cannot be and is read."""
    path = str(tmp_path / "old-format.pt")
    torch.save(torch.load(ckpts["official"], weights_only=False), path,
               _use_new_zipfile_serialization=False)
    model, spec, _ = load_checkpoint(path, "ema", {})
    reference, reference_spec, _ = load_checkpoint(ckpts["official"], "ema", {})
    assert spec == reference_spec
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values()))


def test_legacy_decoder_blocks_layout_loads_with_its_encoder_depth(ckpts, tmp_path, capsys):
    """The early REPA layout: blocks.0-1 (encoder_depth 2), then decoder_blocks.0-5."""
    legacy = {}
    for key, value in torch.load(ckpts["bare"], weights_only=True).items():
        if key.startswith("blocks.") and int(key.split(".")[1]) >= 2:
            _, index, rest = key.split(".", 2)
            key = f"decoder_blocks.{int(index) - 2}.{rest}"
        legacy[f"module.{key}"] = value  # saved from a DDP wrapper
    path = str(tmp_path / "legacy.pt")
    torch.save(legacy, path)
    rc, ours = generate(ckpts["ours"], tmp_path / "ours", *FAST)
    rc_legacy, converted = generate(path, tmp_path / "legacy", *FAST, "--num-classes", "5",
                                    "--legacy")
    assert rc == rc_legacy == 0 and np.array_equal(ours, converted)
    _, spec, _ = load_checkpoint(path, "ema", dict(num_classes=5))
    assert spec.encoder_depth == 2
    rc, _ = generate(path, tmp_path / "bad", *FAST, "--num-classes", "5", "--encoder-depth", "3")
    err = capsys.readouterr().err
    assert rc == 2 and "--encoder-depth 3" in err and "2 encoder blocks" in err


def test_an_internal_error_is_not_reported_as_a_usage_error(ckpts, monkeypatch):
    import repa_fast.generate as cli

    def broken(args, procs):
        raise ValueError("a bug")
    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(ValueError, match="a bug"):  # its traceback, not "error: ..." and 2
        main(["--ckpt", ckpts["ours"]])


def test_grid_png_has_one_row_per_label_and_one_column_per_seed(ckpts, tmp_path):
    out = tmp_path / "grid.png"
    rc = main(["--ckpt", ckpts["ours"], "--grid", "--class-labels", "0,1,4", "--seeds", "0,1",
               "--cfg-scale", "4", "--num-steps", "3", "--out", str(out)])
    assert rc == 0
    from PIL import Image
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * SIZE, 2 * SIZE, 3)
    cells = grid.reshape(3, SIZE, 2, SIZE, 3).transpose(0, 2, 1, 3, 4)
    assert not np.array_equal(cells[0, 0], cells[1, 0])  # same noise, other class
    assert not np.array_equal(cells[0, 0], cells[0, 1])  # same class, other noise


@pytest.mark.parametrize("flags, expected", [
    (["--model", "SiT-Q/2"], "--model"),
    (["--model", "SiT-B/2"], "--model"),
    (["--num-fid-samples", "0"], "--num-fid-samples"),
    (["--per-proc-batch-size", "0"], "--per-proc-batch-size"),
    (["--cfg-scale", "0.5"], "--cfg-scale"),
    (["--guidance-low", "0.8", "--guidance-high", "0.2"], "--guidance-low"),
    (["--guidance-high", "1.5"], "--guidance-high"),
    (["--num-steps", "0"], "--num-steps"),
    (["--resolution", "64"], "--resolution"),
    (["--projector-embed-dims", "768"], "--projector-embed-dims"),
    (["--qk-norm"], "--qk-norm"),
    (["--num-classes", "9"], "--num-classes"),
    (["--encoder-depth", "12"], "--encoder-depth"),
    (["--seeds", "0,1"], "--seeds"),
    (["--grid", "--class-labels", "5"], "--class-labels"),
])
def test_bad_inputs_exit_2_naming_the_flag(ckpts, tmp_path, capsys, flags, expected):
    rc = main(["--ckpt", ckpts["ours"], "--sample-dir", str(tmp_path), "--num-steps", "2",
               *flags])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert not any(f.endswith(".npz") for f in os.listdir(tmp_path))


def test_missing_checkpoint_and_missing_null_class_exit_2(ckpts, tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "nope.pt")]) == 2
    assert "--ckpt" in capsys.readouterr().err
    assert main(["--ckpt", ckpts["nonull"], "--sample-dir", str(tmp_path)]) == 2  # cfg 1.5
    assert "--cfg-scale" in capsys.readouterr().err
    rc, arr = generate(ckpts["nonull"], tmp_path, "--cfg-scale", "1", "--num-steps", "2",
                       "--num-fid-samples", "2")
    assert rc == 0 and arr.shape == (2, SIZE, SIZE, 3)


def test_malformed_flags_exit_2_through_argparse(ckpts, capsys):
    for flags in (["--mode", "fast"], ["--class-labels", "a,b", "--grid"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--ckpt", ckpts["ours"], *flags])
        assert exit_info.value.code == 2
        assert flags[0] in capsys.readouterr().err


def test_npz_writer_streams_what_np_savez_writes(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        save_png_atomic(image, str(tmp_path / f"{i:06d}.png"))
    path = str(tmp_path / "out.npz")
    assert write_npz_from_pngs(str(tmp_path), 4, path) == (4, 8, 6, 3)
    assert np.array_equal(np.load(path)["arr_0"], images[:4])
    # the ADM evaluator reads the member's header and streams the rest
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    assert (shape, fortran, dtype) == ((4, 8, 6, 3), False, np.dtype(np.uint8))
    with pytest.raises(FileNotFoundError, match="missing"):
        write_npz_from_pngs(str(tmp_path), 6, path)
    # a damaged PNG (a machine crash) is named, and no partial .npz is left
    with open(tmp_path / "000002.png", "r+b") as f:
        f.truncate(20)
    with pytest.raises(UsageError, match="000002.png is not a readable PNG.*delete it"):
        write_npz_from_pngs(str(tmp_path), 4, str(tmp_path / "new.npz"))
    assert sorted(p.name for p in tmp_path.glob("*.npz*")) == ["out.npz"]


def test_npz_reader_threads_stay_a_bounded_window_ahead():
    started = []
    results = ordered_map(lambda i: started.append(i) or i * i, range(100), threads=4, ahead=6)
    for consumed, value in enumerate(results):
        assert value == consumed * consumed
        assert len(started) <= consumed + 1 + 6  # never more than 6 past what was read


def test_latent_checkpoint_decodes_with_the_vae_and_needs_it(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from tiny_vae import save_tiny_vae
    save_tiny_vae(tmp_path / "sd-vae-ft-mse")  # what the official --vae mse names
    sd = tiny_sit(in_channels=4, input_size=4, model="SiT-T/2").state_dict()
    ckpt = str(tmp_path / "latent.pt")
    torch.save(dict(ema=sd, args=dict(ARGS, model="SiT-T/2", resolution=32)), ckpt)
    assert main(["--ckpt", ckpt, "--sample-dir", str(tmp_path / "s")]) == 2
    assert "--vae" in capsys.readouterr().err
    rc, arr = generate(ckpt, tmp_path / "s", "--vae", str(tmp_path / "sd-vae-ft-mse"),
                       "--num-steps", "2", "--num-fid-samples", "3", "--per-proc-batch-size", "2")
    assert rc == 0 and arr.shape == (3, 32, 32, 3)
    assert os.path.basename(run_folder(tmp_path / "s")) == \
        "SiT-T-2-latent-size-32-vae-mse-cfg-1.5-seed-0-ode-steps-2"
    assert json.load(open(os.path.join(run_folder(tmp_path / "s"), "settings.json")))["vae"]


def launch_two(launcher, ckpt, sample_dir):
    """Two processes on the CPU (gloo) under torchrun or the deepspeed launcher; the .npz."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(free_port()), "--module", "repa_fast.generate"]
           if launcher == "deepspeed" else  # --standalone: torchrun picks a free port itself
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "repa_fast.generate"])
    proc = subprocess.run(cmd + ["--ckpt", ckpt, "--sample-dir", str(sample_dir), *FAST],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (npz,) = [f for f in os.listdir(sample_dir) if f.endswith(".npz")]
    return np.load(os.path.join(sample_dir, npz))["arr_0"]


def test_two_processes_write_the_same_npz_as_one(ckpts, tmp_path):
    rc, single = generate(ckpts["ours"], tmp_path / "one", *FAST)
    assert rc == 0
    assert np.array_equal(launch_two("torchrun", ckpts["ours"], tmp_path / "two"), single)


@pytest.mark.slow
def test_compiled_model_call_matches_eager(ckpts, tmp_path):
    rc, eager = generate(ckpts["ours"], tmp_path / "eager", *FAST)
    rc_compiled, compiled = generate(ckpts["ours"], tmp_path / "compiled", *FAST, "--compile")
    assert rc == rc_compiled == 0
    assert np.abs(eager.astype(int) - compiled).max() <= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_launcher_writes_the_same_npz_as_one_process(ckpts, tmp_path):
    pytest.importorskip("deepspeed")
    rc, single = generate(ckpts["ours"], tmp_path / "one", *FAST)
    assert rc == 0
    assert np.array_equal(launch_two("deepspeed", ckpts["ours"], tmp_path / "two"), single)


def test_a_truncated_training_checkpoint_is_named(ckpts, tmp_path, capsys):
    from repa_fast.training.checkpoint_files import save_atomic
    path = tmp_path / "0000010.pt"
    save_atomic(torch.load(ckpts["ours"], weights_only=True), str(path))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    rc, _ = generate(str(path), tmp_path / "samples")
    assert rc == 2
    assert f"--ckpt {path}: it has" in capsys.readouterr().err
