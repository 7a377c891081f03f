"""The prepare command line: settings recorded with the first shard, --restart, pixel space
(--vae none, as the demo's data), its --help, and the resolution warning."""
import contextlib
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from repa_fast.data import LoaderConfig, center_crop_dhariwal, make_loader
from repa_fast.data import prepare as prep
from repa_fast.data.prepare import MANIFEST, main

RES = 32
SIZES = [(37, 53), (64, 41), (90, 33), (33, 33), (45, 70)]


@pytest.fixture(autouse=True)
def machine_cache(tmp_path, monkeypatch):
    """The loaders' per-machine cache of this test alone, never the real one."""
    monkeypatch.setenv("REPA_FAST_CACHE", str(tmp_path / "machine-cache"))


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """2 classes x 3 generated PNGs of odd sizes; {relative name: HWC uint8 pixels}."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    images = {}
    for c, name in enumerate(["cat", "dog"]):
        os.makedirs(root / name)
        for i in range(3):
            w, h = SIZES[(c + i) % len(SIZES)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
            images[f"{name}/img{i}.png"] = pixels
    return root, images


def run(argv):
    """``main(argv)``: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def base(source, dest, *extra):
    return ["--source", source, "--dest", dest, "--resolution", RES, "--workers", 0, *extra]


def shard_samples(dest):
    """{key: (moments, label)} of every shard in ``dest``."""
    out = {}
    for name in sorted(os.listdir(dest)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(dest / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for member, data in members.items():
            if member.endswith(".latent.npy"):
                key = member[:-len(".latent.npy")]
                out[key] = (np.load(io.BytesIO(data)), int(members[key + ".cls"]))
    return out


def test_a_usage_error_leaves_no_settings_behind(png_folder, tmp_path):
    root, _ = png_folder
    dest = tmp_path / "out"
    code, err = run(base(root, dest, "--shard-size", 4))  # no --vae
    assert code == 2 and len(err.strip().splitlines()) <= 2, err
    assert "--vae none" in err and "pixel space" in err
    assert not (dest / MANIFEST).exists()
    code, err = run(base(root, dest, "--shard-size", 4, "--vae", tmp_path / "no-such-vae"))
    assert code == 2 and "no-such-vae" in err, err
    assert not (dest / MANIFEST).exists()
    # settings a run left without finishing a shard (an older version, a crash) bind nothing
    dest.mkdir(exist_ok=True)
    (dest / MANIFEST).write_text(json.dumps(dict(source="elsewhere", shard_size=9, vae=None)))
    code, err = run(base(root, dest, "--shard-size", 4, "--vae", "none"))
    assert code == 0, err
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["shard_size"] == 4 and manifest["vae"] == "none"


def test_other_settings_are_refused_naming_restart_which_starts_over(png_folder, tmp_path):
    root, _ = png_folder
    dest = tmp_path / "out"
    assert run(base(root, dest, "--shard-size", 4, "--vae", "none"))[0] == 0
    assert sorted(n for n in os.listdir(dest) if n.startswith("shard-")) == [
        "shard-000000.json", "shard-000000.tar", "shard-000001.json", "shard-000001.tar"]
    (dest / "notes.txt").write_text("mine")
    code, err = run(base(root, dest, "--shard-size", 3, "--vae", "none"))
    assert code == 2 and "other settings" in err and "shard_size: 4 before, 3 now" in err
    assert "--restart" in err
    code, err = run(base(root, dest, "--shard-size", 3, "--vae", "none", "--restart"))
    assert code == 0, err
    index = json.loads((dest / "index.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [3, 3]
    assert (dest / "notes.txt").read_text() == "mine"  # not prepare's: kept
    assert json.loads((dest / MANIFEST).read_text())["shard_size"] == 3
    # a file under prepare's names that prepare did not write: refused, nothing deleted
    (dest / "shard-000007.tar").write_text("not a tar")
    before = sorted(os.listdir(dest))
    code, err = run(base(root, dest, "--shard-size", 3, "--vae", "none", "--restart"))
    assert code == 2 and "shard-000007.tar" in err and "nothing was deleted" in err
    assert sorted(os.listdir(dest)) == before


def test_pixel_space_is_the_demo_convention_and_loads(png_folder, tmp_path):
    from repa_fast.data.demo import make_demo_dataset
    root, images = png_folder
    dest = tmp_path / "pixels"
    code, err = run(base(root, dest, "--vae", "none", "--image-format", "png",
                         "--shard-size", 4))
    assert code == 0, err
    index = json.loads((dest / "index.json").read_text())
    make_demo_dataset(str(tmp_path / "demo"), num_samples=4, size=RES, shard_size=4)
    demo = json.loads((tmp_path / "demo" / "index.json").read_text())
    assert index["vae"] == demo["vae"] == dict(path=None, scaling_factor=1.0, latent_channels=3,
                                               fingerprint="pixel space")
    assert index["num_samples"] == 6 and index["resolution"] == RES
    samples = shard_samples(dest)
    demo_moments = next(iter(shard_samples(tmp_path / "demo").values()))[0]
    names = sorted(images)  # keys follow the source's order
    assert len(samples) == len(names)
    for key, name in zip(sorted(samples), names):
        moments, label = samples[key]
        x = center_crop_dhariwal(images[name], RES).transpose(2, 0, 1).astype(np.float32)
        x = x / 127.5 - 1
        assert moments.dtype == np.float32 == demo_moments.dtype
        assert moments.shape == (6, RES, RES) == demo_moments.shape
        np.testing.assert_array_equal(moments, np.concatenate([x, np.zeros_like(x)]))
        assert label == (0 if name.startswith("cat") else 1)
    loader = make_loader(LoaderConfig(str(dest), batch_size=3, num_workers=0, backend="torch",
                                      shuffle=False))
    images_batch, moments_batch, labels = next(iter(loader))
    assert tuple(images_batch.shape) == (3, 3, RES, RES)
    assert tuple(moments_batch.shape) == (3, 6, RES, RES)
    # lossless PNG: the stored image is the crop the moments came from
    np.testing.assert_allclose(moments_batch[:, :3].float().numpy(),
                               images_batch.float().numpy() / 127.5 - 1, atol=1e-6)


def test_vae_none_refused_for_an_official_folder(tmp_path):
    official = tmp_path / "official"
    (official / "images" / "00000").mkdir(parents=True)
    (official / "vae-sd" / "00000").mkdir(parents=True)
    Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(
        official / "images" / "00000" / "img00000000.png")
    np.save(official / "vae-sd" / "00000" / "img-mean-std-00000000.npy",
            np.zeros((8, RES // 8, RES // 8), np.float32))
    (official / "vae-sd" / "dataset.json").write_text(
        json.dumps({"labels": [["00000/img-mean-std-00000000.npy", 0]]}))
    code, err = run(base(official, tmp_path / "out", "--vae", "none"))
    assert code == 2 and "--vae none" in err and "official" in err


def help_text(monkeypatch):
    monkeypatch.setenv("COLUMNS", "3000")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        prep.parse_args(["--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def test_help_explains_every_flag_with_its_default(monkeypatch):
    text = help_text(monkeypatch)
    flags = {m.group(1): m.group(2) for m in
             re.finditer(r"^  (--[\w-]+)[^\n]*?\s{2,}(\S[^\n]*)$", text, re.M)}
    expected = {"--resolution": "(default: 256)", "--image-format": "(default: jpg",
                "--jpeg-quality": "(default: 95)", "--shard-size": "(default: 1000)",
                "--vae-batch-size": "(default: 32)", "--max-images": "(default: all)",
                "--vae": "required unless", "--device": "(default: auto)",
                "--workers": f"(default: {prep.default_workers()}",
                "--restart": "(default: off"}
    for flag, shown in expected.items():
        assert shown in flags.get(flag, ""), f"{flag}: {flags.get(flag)!r}"
        assert len(flags[flag].split("(default")[0].split("(no default")[0]) > 15, flag
    assert "--vae none" in flags["--vae"] or "'none'" in flags["--vae"]


def test_workers_default_follows_cpu_affinity(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
        monkeypatch.setattr(os, "cpu_count", lambda: 64)
        assert prep.default_workers() == 3
        assert prep.PrepareConfig(source="", dest="").workers == 3
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
        assert prep.default_workers() == 8
    else:
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        assert prep.default_workers() == 2


def test_resolutions_other_than_256_and_512_warn_without_refusing(png_folder, tmp_path):
    root, _ = png_folder
    code, err = run(base(root, tmp_path / "a", "--vae", "none", "--max-images", 2))
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "--resolution 32" in warning[0]
    assert "256" in warning[0] and "512" in warning[0] and "--enc-type" in warning[0]
    argv = base(root, tmp_path / "b", "--vae", "none", "--max-images", 1)
    argv[argv.index("--resolution") + 1] = 256
    code, err = run(argv)
    assert code == 0, err
    assert "warning" not in err
