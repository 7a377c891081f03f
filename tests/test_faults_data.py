"""Damaged inputs and interrupted runs of the data pipeline: symlink loops in a source folder,
16-bit images, damaged shards and samples, stale prepare locks and orphaned workers, and the
prepare command's error reports."""
import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from repa_fast.data import LoaderConfig, make_loader
from repa_fast.data.demo import make_demo_dataset
from repa_fast.data.loaders import dali_problem
from repa_fast.data.prepare import PrepareConfig, main, prepare
from repa_fast.data.samples import epoch_order
from repa_fast.data.sources import open_source

RES = 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_dali = pytest.mark.skipif(dali_problem() is not None, reason="nvidia-dali not installed")


@pytest.fixture(autouse=True)
def machine_cache(tmp_path, monkeypatch):
    """The loaders' per-machine cache (verified-shard records) of this test alone, never the
    real one in the home folder."""
    folder = tmp_path / "machine-cache"
    monkeypatch.setenv("REPA_FAST_CACHE", str(folder))
    return folder


def jpeg_bytes(rng, w, h):
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


# ---------------------------------------------------------------- 1. symlink loops in sources

def test_symlink_loops_list_each_real_file_once(tmp_path):
    """Issue: ``fish/loop -> ../fish`` and ``selfloop -> .`` turned 19 files into thousands of
    samples and a phantom class. Each real file is listed once, under its first path in
    sorted order; the loops are named in a warning; a linked class folder outside the source
    still counts."""
    rng = np.random.default_rng(0)
    src, outside = tmp_path / "src", tmp_path / "outside" / "dog"
    data = jpeg_bytes(rng, 8, 8)
    for folder, count in ((src / "fish", 10), (src / "cat", 9), (outside, 3)):
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{folder.name}{i}.jpg").write_bytes(data)
    os.symlink("../fish", src / "fish" / "loop")
    os.symlink(".", src / "selfloop")
    os.symlink(outside, src / "dog")           # a linked class folder: followed
    os.symlink("../cat", src / "fish" / "zcat")  # the same folder twice: listed under cat/
    with pytest.warns(UserWarning) as caught:
        source = open_source(str(src))
    names = [e.name for e in source.entries]
    assert len(names) == 22 and len(set(names)) == 22
    assert {n.split("/")[0] for n in names} == {"cat", "dog", "fish"}
    assert sorted({e.label for e in source.entries}) == [0, 1, 2]
    assert all(e.label == 2 for e in source.entries if e.name.startswith("fish/"))
    text = " ".join(str(w.message) for w in caught)
    assert "fish/loop" in text and "selfloop" in text and "fish/zcat" in text


def _images(folder, count, data):
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{folder.name}{i}.jpg").write_bytes(data)


def test_a_second_path_to_a_class_folder_is_refused(tmp_path):
    """Issue: with class folders a, b -> a and c, folder b was left out (a second path to the
    real folder a) with only a warning: class c got label 1 instead of 2. A top-level class
    folder that is a second path to a folder already listed is a usage error naming both;
    links to folders outside the source and loops inside a class folder still work."""
    from repa_fast.errors import UsageError
    data = jpeg_bytes(np.random.default_rng(1), 8, 8)
    src = tmp_path / "src"
    for name in ("a", "c"):
        _images(src / name, 2, data)
    os.symlink("a", src / "b")
    with pytest.raises(UsageError, match=r"class folder 'b' \(a link to a\) is a second path "
                                         r"to the folder 'a' .*two labels"):
        open_source(str(src))
    os.remove(src / "b")  # b reached first through a link inside a: b is the second path
    _images(src / "b", 2, data)
    os.symlink("../b", src / "a" / "x")
    with pytest.raises(ValueError, match=r"class folder 'b' is a second path to the folder "
                                         r"'a/x' .*two labels"):
        open_source(str(src))
    os.remove(src / "a" / "x")
    _images(tmp_path / "outside", 3, data)
    os.symlink(tmp_path / "outside", src / "d")  # two links to one folder outside the source
    os.symlink(tmp_path / "outside", src / "e")
    with pytest.raises(ValueError, match=r"'e' \(a link to .*outside\) is a second path to "
                                         r"the folder 'd'"):
        open_source(str(src))
    os.remove(src / "e")  # outside the source, once: a class of its own
    os.symlink("../outside", tmp_path / "outside" / "loop")  # a loop inside a class folder
    with pytest.warns(UserWarning, match="d/loop"):
        source = open_source(str(src))
    assert [(e.name.split("/")[0], e.label) for e in source.entries] == (
        [("a", 0)] * 2 + [("b", 1)] * 2 + [("c", 2)] * 2 + [("d", 3)] * 3)
    # labels from dataset.json: the folders define none, a second path is only cut
    labels = [[e.name, e.label] for e in source.entries]
    (src / "dataset.json").write_text(json.dumps({"labels": labels}))
    os.symlink("a", src / "z")
    with pytest.warns(UserWarning, match="z -> a"):
        again = open_source(str(src))
    assert [[e.name, e.label] for e in again.entries] == labels


# ---------------------------------------------------------------- 5. 16-bit images

def test_16bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    """Issue: a 16-bit grey PNG came out almost white (mean 254). Its 8-bit version is the
    high byte of every value (value / 257, rounded down)."""
    from repa_fast.data.encode import process_entry
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 65536, (RES, RES), dtype=np.uint16)
    folder = tmp_path / "src" / "c0"
    folder.mkdir(parents=True)
    Image.fromarray(wide).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode in ("I;16", "I")
    source = open_source(str(tmp_path / "src"))
    entry, data, pixels, error = process_entry(source, source.entries[0], RES, "png", 95)
    assert error is None
    expect = (wide >> 8).astype(np.uint8)
    assert abs(pixels.mean() - expect.mean()) < 0.5 and pixels.mean() < 200  # ~127, not 254
    assert np.array_equal(pixels[..., 0], expect) and np.array_equal(pixels[..., 2], expect)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)))[..., 1], expect)


def test_16bit_modes_convert_by_high_byte():
    from repa_fast.data.crop import to_rgb8
    wide = np.arange(RES * RES, dtype=np.uint16).reshape(RES, RES) * 257 + 3
    expect = (wide >> 8).astype(np.uint8)
    images = {"I;16": Image.frombytes("I;16", (RES, RES), wide.astype("<u2").tobytes()),
              "I;16B": Image.frombytes("I;16B", (RES, RES), wide.astype(">u2").tobytes()),
              "I;16L": Image.frombytes("I;16L", (RES, RES), wide.astype("<u2").tobytes()),
              "I": Image.fromarray(wide.astype(np.int32))}
    for mode, image in images.items():
        assert image.mode == mode
        out = np.asarray(to_rgb8(image))
        assert out.shape == (RES, RES, 3) and out.dtype == np.uint8, mode
        assert all(np.array_equal(out[..., c], expect) for c in range(3)), mode
    rgb = np.random.default_rng(0).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_rgb8(Image.fromarray(rgb))), rgb)  # 8-bit unchanged


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one): chunks written out by hand."""
    def chunk(kind, body):
        return (len(body).to_bytes(4, "big") + kind + body
                + zlib.crc32(kind + body).to_bytes(4, "big"))
    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_16bit_rgb_png_through_the_crop(tmp_path):
    from repa_fast.data.crop import center_crop_dhariwal
    wide = np.random.default_rng(4).integers(0, 65536, (RES, RES, 3), dtype=np.uint16)
    image = Image.open(io.BytesIO(_png_rgb16(wide)))
    out = center_crop_dhariwal(image, RES)
    assert np.array_equal(out, (wide >> 8).astype(np.uint8))


# ---------------------------------------------------------------- 4. damaged shards and samples

def _demo(path, num_samples=24, shard_size=6):
    make_demo_dataset(str(path), num_samples=num_samples, size=RES, shard_size=shard_size)
    return path


def _meta(root, shard):
    return json.loads((root / f"shard-{shard:06d}.json").read_text())


def _poke(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _drop_checksums(root):
    """Make the index look like one written before checksums (and label ranges) existed."""
    index = json.loads((root / "index.json").read_text())
    for shard in index["shards"]:
        shard.pop("checksum"), shard.pop("size")
    index.pop("label_range")
    (root / "index.json").write_text(json.dumps(index))


def _sample_where(root, key):
    """(shard, sample metadata) of the sample with ``key`` (an int)."""
    for shard in range(100):
        for sample in _meta(root, shard)["samples"]:
            if int(sample["key"]) == key:
                return shard, sample


def _finite_damage(root, key):
    """Overwrite the last two moments of sample ``key`` with other finite values."""
    shard, sample = _sample_where(root, key)
    offset, size = sample["latent"]
    _poke(root / f"shard-{shard:06d}.tar", offset + size - 8,
          np.array([0.5, -0.25], dtype=np.float32).tobytes())
    return shard


def _collect(loader, batches):
    return [batch for _, batch in zip(range(batches), loader)]


def _keys(batches):
    return [[int(k) for k in b[3]] for b in batches]


def _expected_keys(num, seed, bad, batch_size, epochs, world_size=1, rank=0):
    """Keys a "skip" loader yields on the demo set (key == row): each bad sample replaced by
    the next good one of the rank's epoch order, everything else in place."""
    out = []
    for epoch in range(epochs):
        order = epoch_order(num, seed, epoch, rank, world_size, True)
        keys = []
        for pos in range(len(order) // batch_size * batch_size):
            step = 0
            while int(order[(pos + step) % len(order)]) in bad:
                step += 1
            keys.append(int(order[(pos + step) % len(order)]))
        out += [keys[b:b + batch_size] for b in range(0, len(keys), batch_size)]
    return out


def _official(root, count, rng, first_label: int = 0, classes: int = 3):
    """An official REPA folder (images/ + vae-sd/ + dataset.json) of ``count`` random
    samples, labels ``first_label + i % classes``."""
    labels = []
    for i in range(count):
        img = root / "images" / "00000" / f"img{i:08d}.png"
        lat = root / "vae-sd" / "00000" / f"img-mean-std-{i:08d}.npy"
        img.parent.mkdir(parents=True, exist_ok=True)
        lat.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(img)
        np.save(lat, rng.standard_normal((8, RES // 8, RES // 8)).astype(np.float32))
        labels.append([f"00000/img-mean-std-{i:08d}.npy", first_label + i % classes])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def test_prepare_records_shard_checksums_and_label_range(tmp_path):
    from repa_fast.data import label_range
    from repa_fast.data.shards import read_index
    official = _official(tmp_path / "official", 7, np.random.default_rng(2), first_label=3,
                         classes=4)
    dest = tmp_path / "out"
    index = prepare(PrepareConfig(source=str(official), dest=str(dest), resolution=RES,
                                  workers=0, shard_size=3), progress=False)
    for shard in index["shards"]:
        data = (dest / shard["name"]).read_bytes()
        assert shard["checksum"] == f"crc32:{zlib.crc32(data):08x}"
        assert shard["size"] == len(data)
    assert index["label_range"] == [3, 6] and label_range(str(dest)) == (3, 6)
    assert read_index(str(dest)) == index
    # shards finished by an older version (no checksum in their .json) are hashed for the
    # index; a damaged index.json is rewritten by rerunning the command
    meta = json.loads((dest / "shard-000000.json").read_text())
    meta.pop("checksum"), meta.pop("size")
    (dest / "shard-000000.json").write_text(json.dumps(meta))
    (dest / "index.json").write_text("{'damaged")
    again = prepare(PrepareConfig(source=str(official), dest=str(dest), resolution=RES,
                                  workers=0, shard_size=3), progress=False)
    assert again["shards"] == index["shards"] and read_index(str(dest)) == again
    # older indexes: from class_counts, else the shards' metadata, else None
    old = dict(index)
    old.pop("label_range")
    (dest / "index.json").write_text(json.dumps(old))
    assert label_range(str(dest)) == (3, 6)
    old.pop("class_counts")
    (dest / "index.json").write_text(json.dumps(old))
    assert label_range(str(dest)) == (3, 6)
    os.remove(dest / "shard-000001.json")
    assert label_range(str(dest)) is None


def test_damaged_index_and_metadata_are_named(tmp_path):
    from repa_fast.data.shards import read_index
    root = _demo(tmp_path / "d", num_samples=12)
    (root / "shard-000001.json").write_text('{"samples": [{key: 1}]}')
    with pytest.raises(ValueError, match="shard-000001.json.*damaged"):
        make_loader(LoaderConfig(str(root), batch_size=4, backend="torch"))
    (root / "index.json").write_text("{'format'")
    with pytest.raises(ValueError, match=r"index\.json.*damaged.*Expecting property name"):
        read_index(str(root))


def test_shard_with_finite_damage_fails_its_checksum(tmp_path):
    """Issue: damage that leaves finite values trained silently. The shard's checksum is
    checked when it is first opened: "error" names the shard and the index's checksum."""
    root = _demo(tmp_path / "d")
    shard = _finite_damage(root, 7)
    recorded = json.loads((root / "index.json").read_text())["shards"][shard]["checksum"]
    loader = make_loader(LoaderConfig(str(root), batch_size=4, seed=1, num_workers=0,
                                      backend="torch"))
    with pytest.raises(ValueError, match=rf"shard-{shard:06d}\.tar.*{recorded}") as caught:
        _collect(loader, 6)
    from repa_fast.errors import exit_code
    assert exit_code(caught.value) == 2
    assert (loader.state_dict()["epoch"], loader.skipped_samples) == (0, 0)


def test_skip_replaces_a_damaged_shard_and_keeps_the_order(tmp_path):
    root = _demo(tmp_path / "d")
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    shard = _finite_damage(root, 7)
    bad = {int(s["key"]) for s in _meta(root, shard)["samples"]}  # the whole shard
    config = dict(batch_size=4, seed=1, num_workers=0, backend="torch", return_keys=True)
    with pytest.warns(UserWarning, match=rf"WHOLE SHARD.*shard-{shard:06d}\.tar") as caught:
        loader = make_loader(LoaderConfig(str(root), on_bad_sample="skip", **config))
        got = _collect(loader, 12)  # two epochs
    assert len([w for w in caught if "WHOLE SHARD" in str(w.message)]) == 1  # loud, once
    reference = _collect(make_loader(LoaderConfig(str(clean), **config)), 12)
    want = _expected_keys(24, 1, bad, 4, 2)
    assert _keys(got) == want
    replaced = sum(k in bad for b in _keys(reference) for k in b)
    assert loader.skipped_samples == replaced == 2 * len(bad)
    for g, r in zip(got, reference):  # the same sample gives the same tensors
        for j, (gk, rk) in enumerate(zip(g[3], r[3])):
            if gk == rk:
                assert torch.equal(g[0][j], r[0][j]) and torch.equal(g[1][j], r[1][j])
        assert g[0].shape == r[0].shape and g[1].shape == r[1].shape


def _damage_samples(root):
    """Per-sample damage under an index without checksums: sample 3's image header, sample
    10's moments header (numpy's parser fails: the TokenError of the issue), sample 14's
    PNG data, sample 17's moments (a NaN), and sample 20's .cls label in a shard without
    metadata (read by scanning its tar). Returns the damaged keys."""
    _drop_checksums(root)
    shard, sample = _sample_where(root, 3)
    _poke(root / f"shard-{shard:06d}.tar", sample["image"][0], bytes(16))
    shard, sample = _sample_where(root, 10)
    _poke(root / f"shard-{shard:06d}.tar", sample["latent"][0] + 10, b"{'descr': (((")
    shard, sample = _sample_where(root, 17)
    offset, size = sample["latent"]
    _poke(root / f"shard-{shard:06d}.tar", offset + size - 4,
          np.array([np.nan], dtype=np.float32).tobytes())
    shard, _ = _sample_where(root, 20)
    tar_path = root / f"shard-{shard:06d}.tar"
    with tarfile.open(tar_path) as tar:
        cls = tar.getmember("00000020.cls")
    _poke(tar_path, cls.offset_data, b"x" * cls.size)
    os.remove(root / f"shard-{shard:06d}.json")
    shard, sample = _sample_where(root, 14)  # inside the PNG's compressed data: its CRC
    offset, size = sample["image"]
    _poke(root / f"shard-{shard:06d}.tar", offset + size // 2, bytes(size // 2 - 16))
    return {3: "image", 10: "moments", 14: "broken PNG", 17: "non-finite", 20: ".cls"}


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_are_named_then_skipped_and_counted(tmp_path, workers):
    root = _demo(tmp_path / "d")
    damaged = _damage_samples(root)
    config = dict(batch_size=4, seed=2, num_workers=workers, backend="torch", return_keys=True)
    with pytest.warns(UserWarning, match="no checksum") as caught:  # old index: one warning
        loader = make_loader(LoaderConfig(str(root), **config))
    assert len(caught) == 1
    first = next(k for b in _expected_keys(24, 2, set(), 4, 1) for k in b if k in damaged)
    with pytest.raises(ValueError, match=rf"shard-\d+\.tar, sample {first:08d}: .*"
                                         rf"{damaged[first]}"):
        _collect(loader, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = make_loader(LoaderConfig(str(root), on_bad_sample="skip", **config))
        head = _collect(loader, 7)
        state = loader.state_dict()
    skipped = [str(w.message) for w in caught if "skipped a bad sample" in str(w.message)]
    assert sorted(int(m.split(", sample ")[1][:8]) for m in skipped) == sorted(damaged)
    assert all(f"sample {k:08d}: " in " ".join(skipped) for k in damaged)  # once each
    want = _expected_keys(24, 2, set(damaged), 4, 3)
    assert _keys(head) == want[:7]
    assert loader.skipped_samples == state["skipped_samples"] == sum(
        k in damaged for b in _expected_keys(24, 2, set(), 4, 2)[:7] for k in b)
    assert all(b[0].shape == (4, 3, RES, RES) and b[1].shape == (4, 6, RES, RES) for b in head)
    assert all(torch.isfinite(b[1]).all() for b in head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = make_loader(LoaderConfig(str(root), on_bad_sample="skip", **config))
        resumed.load_state_dict(state)
        tail = _collect(resumed, 5)
    assert _keys(tail) == want[7:12]
    assert resumed.skipped_samples == state["skipped_samples"] + sum(
        k in damaged for b in _expected_keys(24, 2, set(), 4, 2)[7:12] for k in b)
    old = {k: v for k, v in state.items() if k != "skipped_samples"}  # saved before the count
    resumed.load_state_dict(old)
    assert resumed.skipped_samples == 0


def _count_hashes(monkeypatch, log):
    """Log every shard hash to the file ``log`` (also from forked loader workers)."""
    import repa_fast.data.shards as shards
    real = shards.file_checksum

    def counted(path):
        with open(log, "a") as f:
            f.write(os.path.basename(path) + "\n")
        return real(path)
    monkeypatch.setattr(shards, "file_checksum", counted)

    def hashed():
        names = sorted(log.read_text().split()) if log.exists() else []
        log.unlink(missing_ok=True)
        return names
    return hashed


def test_shards_are_hashed_once_per_machine_and_file_version(tmp_path, monkeypatch,
                                                             machine_cache):
    """Issue: every rank hashed every shard it opened, in every run (the marks of a shard
    that passed lived in a temporary folder of one loader iteration): ~80 GB read per rank
    for ImageNet at each start. A shard that passes is recorded in the machine's cache, keyed
    by its path, size, mtime, inode and recorded checksum: other loaders (ranks, restarts,
    their workers) do not hash it again until the file changes."""
    root = _demo(tmp_path / "d")
    hashed = _count_hashes(monkeypatch, tmp_path / "hashes.log")
    names = [f"shard-{i:06d}.tar" for i in range(4)]
    config = dict(batch_size=4, seed=1, num_workers=0, backend="torch", return_keys=True)
    want = _expected_keys(24, 1, set(), 4, 2)
    assert _keys(_collect(make_loader(LoaderConfig(str(root), **config)), 12)) == want
    assert hashed() == names  # once each, not per sample
    for workers in (0, 1):  # a new loader, in this process and in a worker process
        got = _collect(make_loader(LoaderConfig(str(root), **{**config,
                                                              "num_workers": workers})), 12)
        assert _keys(got) == want and hashed() == []
    records = machine_cache / "verified-shards"
    assert len([p for p in records.iterdir() if not p.name.endswith(".lock")]) == 4
    # a rewritten shard (here: same size, new mtime) is hashed again, and found damaged
    shard = _finite_damage(root, 7)
    path = root / f"shard-{shard:06d}.tar"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=rf"shard-{shard:06d}\.tar is damaged.*crc32:"):
        _collect(make_loader(LoaderConfig(str(root), **config)), 12)
    assert hashed() == [path.name]
    # a replaced one (same size and mtime, another inode) too, and passes
    other = root / "shard-000003.tar"
    shutil.copy2(other, tmp_path / "copy.tar")  # copy2 keeps the mtime
    os.replace(tmp_path / "copy.tar", other)
    config.update(on_bad_sample="skip")
    with pytest.warns(UserWarning, match="WHOLE SHARD"):
        _collect(make_loader(LoaderConfig(str(root), **config)), 12)
    assert hashed() == sorted([path.name, other.name])  # the damaged one is not recorded


def test_unwritable_machine_cache_falls_back_to_each_loader(tmp_path, monkeypatch):
    """No cache folder can be made (here: REPA_FAST_CACHE is a file): no warning, and each
    loader iteration hashes each shard once, as before the cache."""
    root = _demo(tmp_path / "d")
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("REPA_FAST_CACHE", str(tmp_path / "not-a-folder"))
    hashed = _count_hashes(monkeypatch, tmp_path / "hashes.log")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _collect(make_loader(LoaderConfig(str(root), batch_size=4, num_workers=0,
                                              backend="torch")), 12)
            assert hashed() == [f"shard-{i:06d}.tar" for i in range(4)]
    assert not [w for w in caught if issubclass(w.category, UserWarning)]


def test_loaders_hashing_one_shard_take_turns(tmp_path, monkeypatch):
    """Two loaders (ranks) opening the same unrecorded shards at the same time: one hashes
    each shard, the other waits for its record (the lock is per open file, so loaders in two
    threads show it as two processes would)."""
    import threading
    import time

    import repa_fast.data.shards as shards
    root = _demo(tmp_path / "d")
    hashed = _count_hashes(monkeypatch, tmp_path / "hashes.log")
    counted = shards.file_checksum
    monkeypatch.setattr(shards, "file_checksum", lambda path: time.sleep(0.2) or counted(path))
    got = []

    def rank():
        loader = make_loader(LoaderConfig(str(root), batch_size=4, num_workers=0,
                                          backend="torch", return_keys=True))
        got.append(_keys(_collect(loader, 6)))
    threads = [threading.Thread(target=rank) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 2 and got[0] == got[1] == _expected_keys(24, 0, set(), 4, 1)
    assert hashed() == [f"shard-{i:06d}.tar" for i in range(4)]


def test_io_errors_are_raised_not_skipped_nor_remembered(tmp_path, monkeypatch):
    """Issue: an I/O error while reading (EIO, ESTALE on network storage) became a bad sample
    (a usage error, exit 2), and under "skip" the sample, or the whole shard, was dropped for
    the rest of the process, on some workers only. It is raised as an OSError naming the shard
    and the key (exit 1); nothing is remembered: once the storage answers, the same loader
    reads the same samples, none skipped. A missing shard is still damage."""
    import builtins

    import repa_fast.data.samples as samples
    import repa_fast.data.shards as shards
    from repa_fast.errors import exit_code
    root = _demo(tmp_path / "d")
    failing = {"read": True, "hash": True}

    class Flaky:
        def __init__(self, f):
            self.f = f

        def read(self, *args):
            if failing["read"]:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return self.f.read(*args)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(samples, "open", lambda *a: Flaky(builtins.open(*a)), raising=False)
    config = dict(batch_size=4, seed=1, num_workers=0, backend="torch", return_keys=True)
    want = _expected_keys(24, 1, set(), 4, 1)
    shard, _ = _sample_where(root, want[0][0])
    for mode, workers in (("skip", 0), ("error", 0), ("skip", 1)):
        loader = make_loader(LoaderConfig(str(root), on_bad_sample=mode,
                                          **{**config, "num_workers": workers}))
        with pytest.raises(OSError) as caught:
            _collect(loader, 6)
        error = caught.value
        assert not isinstance(error, ValueError) and exit_code(error) == 1
        assert error.errno == errno.EIO and f"(reading sample {want[0][0]:08d})" in str(error)
        assert error.filename == str(root / f"shard-{shard:06d}.tar")
        assert loader.skipped_samples == 0 and loader.state_dict()["batch"] == 0
    failing["read"] = False
    assert _keys(_collect(loader, 6)) == want and loader.skipped_samples == 0  # same loader

    real = shards.file_checksum

    def flaky_hash(path):
        if failing["hash"]:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real(path)
    monkeypatch.setattr(shards, "file_checksum", flaky_hash)
    monkeypatch.setenv("REPA_FAST_CACHE", str(tmp_path / "fresh"))  # no shard recorded yet
    loader = make_loader(LoaderConfig(str(root), on_bad_sample="skip", **config))
    with pytest.raises(OSError, match=r"checksum.*shard-\d{6}\.tar") as caught:
        _collect(loader, 6)
    assert caught.value.errno == errno.ESTALE and not isinstance(caught.value, ValueError)
    failing["hash"] = False
    assert _keys(_collect(loader, 6)) == want and loader.skipped_samples == 0

    os.remove(root / "shard-000002.tar")  # missing: damage, named, skipped under "skip"
    bad = {int(s["key"]) for s in _meta(root, 2)["samples"]}
    with pytest.raises(ValueError, match=r"shard-000002\.tar is missing"):
        _collect(make_loader(LoaderConfig(str(root), **config)), 6)
    with pytest.warns(UserWarning, match=r"WHOLE SHARD.*shard-000002\.tar is missing"):
        got = _collect(make_loader(LoaderConfig(str(root), on_bad_sample="skip", **config)), 6)
    assert _keys(got) == _expected_keys(24, 1, bad, 4, 1)


def test_io_error_listing_a_shard_without_metadata_is_not_damage(tmp_path, monkeypatch):
    import repa_fast.data.samples as samples
    from repa_fast.data.samples import SampleTable
    root = _demo(tmp_path / "d", num_samples=12)
    os.remove(root / "shard-000001.json")  # listed by scanning its tar

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(root / "shard-000001.tar"))
    monkeypatch.setattr(samples.tarfile, "open", failing)
    with pytest.raises(OSError) as caught:
        SampleTable(str(root))
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, ValueError)


@needs_dali
def test_dali_checks_shards_and_samples_in_its_readers(tmp_path):
    """DALI: the same replacements as the PyTorch loader (reader processes check checksums,
    moments and image headers), and the same errors."""
    root = _demo(tmp_path / "d")
    shard = _finite_damage(root, 7)
    bad = {int(s["key"]) for s in _meta(root, shard)["samples"]}
    common = dict(batch_size=4, seed=1, backend="dali", device="cpu", return_keys=True)
    with pytest.warns(UserWarning, match=rf"WHOLE SHARD.*shard-{shard:06d}\.tar.*crc32:"):
        loader = make_loader(LoaderConfig(str(root), num_workers=1, on_bad_sample="skip",
                                          **common))
        got = _collect(loader, 8)
    assert _keys(got) == _expected_keys(24, 1, bad, 4, 2)[:8]
    assert loader.skipped_samples == sum(k in bad for b in _expected_keys(24, 1, set(), 4, 2)[:8]
                                         for k in b)
    with pytest.raises(ValueError, match=rf"shard-{shard:06d}\.tar.*crc32:"):
        _collect(make_loader(LoaderConfig(str(root), num_workers=0, **common)), 8)

    root = _demo(tmp_path / "e")
    damaged = _damage_samples(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = make_loader(LoaderConfig(str(root), num_workers=1, seed=2, batch_size=4,
                                          backend="dali", device="cpu", return_keys=True,
                                          on_bad_sample="skip"))
        got = _collect(loader, 6)
    assert _keys(got) == _expected_keys(24, 2, set(damaged), 4, 1)
    skipped = " ".join(str(w.message) for w in caught if "skipped a bad" in str(w.message))
    assert all(f"sample {k:08d}: " in skipped for k in damaged)


@needs_dali
def test_dali_decode_failure_names_the_sample(tmp_path):
    """A JPEG damaged inside its compressed data passes the readers' header check and fails
    in DALI's decoder: the error names the sample (found by decoding the batches around the
    position with PIL), under "skip" too."""
    from repa_fast.data.shards import FORMAT, ShardWriter, shard_name
    root = tmp_path / "jpegs"
    root.mkdir()
    rng, shards = np.random.default_rng(5), []
    moments = io.BytesIO()
    np.save(moments, np.zeros((6, RES, RES), dtype=np.float32))
    for s in range(2):
        writer = ShardWriter(str(root), s)
        for i in range(6 * s, 6 * s + 6):
            data = jpeg_bytes(rng, RES, RES)
            if i == 5:  # cut inside the compressed data: its header reads fine
                data = data[:data.index(b"\xff\xda") + 40]
            writer.add(f"{i:08d}", data, "jpg", moments.getvalue(), i % 3)
        meta = writer.commit([])
        shards.append(dict(name=shard_name(s) + ".tar", num_samples=6, size=meta["size"],
                           checksum=meta["checksum"]))
    (root / "index.json").write_text(json.dumps(dict(
        format=FORMAT, resolution=RES, num_samples=12, num_classes=3, shards=shards,
        vae=dict(latent_channels=3, scaling_factor=1.0, fingerprint="pixel space"))))
    for mode in ("error", "skip"):
        loader = make_loader(LoaderConfig(str(root), batch_size=4, seed=0, num_workers=0,
                                          backend="dali", device="cpu", on_bad_sample=mode))
        with pytest.raises(ValueError, match=r"DALI could not decode .*shard-000000\.tar, "
                                             r"sample 00000005: its image cannot be decoded"):
            _collect(loader, 6)


# ---------------------------------------------------------------- 10. stale locks, orphans

def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    source = _official(tmp_path / "official", 4, np.random.default_rng(0))
    dest = tmp_path / "out"
    dest.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    lock = dest / ".prepare.lock"
    config = PrepareConfig(source=str(source), dest=str(dest), resolution=RES, workers=0)
    try:
        lock.write_text(json.dumps(dict(pid=live.pid, host=socket.gethostname())))
        with pytest.raises(ValueError, match=rf"pid {live.pid} .*kill {live.pid}"):
            prepare(config, progress=False)
        lock.write_text(json.dumps(dict(pid=live.pid, host="elsewhere.example")))
        with pytest.raises(ValueError, match=r"pid \d+ on elsewhere\.example.*another host"):
            prepare(config, progress=False)
    finally:
        live.kill()
        live.wait()
    for stale in (json.dumps(dict(pid=dead.pid, host=socket.gethostname())), str(dead.pid)):
        lock.write_text(stale)  # the second: a lock of an older version (the pid alone)
        assert prepare(config, progress=False)["num_samples"] == 4
        assert f"stale lock {lock} of prepare run pid {dead.pid}" in capsys.readouterr().err
        assert not lock.exists()


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_mid_run_workers_exit_and_rerun_resumes(tmp_path):
    """Issue: after ``kill -9`` of prepare its pool workers lived on for minutes and the lock
    blocked the rerun. Workers now exit within seconds of their parent, and the rerun takes
    the stale lock over and continues with the unfinished shards."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 8, 8, 8], norm_num_groups=4,
                                  down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
                                  latent_channels=4, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    small = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((768, 768), Image.Resampling.BICUBIC).save(out, format="JPEG")
    for c in range(2):  # 200 large-ish images: seconds of cropping in 2 workers
        (tmp_path / "src" / f"c{c}").mkdir(parents=True)
        for i in range(100):
            (tmp_path / "src" / f"c{c}" / f"{i:04d}.jpg").write_bytes(out.getvalue())
    dest = tmp_path / "out"
    command = [sys.executable, "-m", "repa_fast.data.prepare", "--source", str(tmp_path / "src"),
               "--dest", str(dest), "--resolution", "32", "--vae", str(tmp_path / "vae"),
               "--workers", "2", "--shard-size", "10", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp_path / "first.log", "wb")  # not a pipe: orphans would hold it open
    run = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while not (dest / "shard-000001.json").exists():
        assert run.poll() is None and time.monotonic() < deadline, (
            tmp_path / "first.log").read_text()
        time.sleep(0.01)
    workers = _children(run.pid)
    run.send_signal(signal.SIGKILL)
    run.wait()
    log.close()
    assert len(workers) >= 2 and not (dest / "index.json").exists()  # killed mid-run
    done = {p.name: p.stat().st_mtime_ns for p in dest.glob("shard-*.tar")}
    deadline = time.monotonic() + 5
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in workers if _running(p)]
    for pid in left:  # leave no orphan behind when this fails
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers outlived the killed prepare"
    assert (dest / ".prepare.lock").exists()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"stale lock {dest / '.prepare.lock'} of prepare run pid {run.pid}" in rerun.stderr
    assert "200 samples in 20 shards" in rerun.stdout
    assert all((dest / name).stat().st_mtime_ns == mtime for name, mtime in done.items())


# ---------------------------------------------------------------- prepare's error reports

def test_prepare_cli_reports_errors_in_one_line(tmp_path, capsys, monkeypatch):
    source = _official(tmp_path / "official", 2, np.random.default_rng(1))
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    dest = locked / "out"
    if os.access(locked, os.W_OK):  # root writes anyway: a folder sysfs refuses to create
        dest = "/sys/repa-fast-test-not-writable/out"
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("running as root without a read-only place to write to")
    args = ["--source", str(source), "--dest", str(dest), "--resolution", str(RES),
            "--workers", "0"]
    monkeypatch.delenv("REPA_FAST_DEBUG", raising=False)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "error: " in err and ("Permission denied" in err or "not permitted" in err)
    assert os.path.dirname(str(dest)) in err
    assert main(["--source", str(tmp_path / "missing"), "--dest", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--source" in err and "does not exist" in err
    monkeypatch.setenv("REPA_FAST_DEBUG", "1")
    assert main(args) == 1
    assert "Traceback" in capsys.readouterr().err
    os.chmod(locked, 0o700)


def test_an_error_in_a_loader_worker_does_not_hang_the_exit(tmp_path):
    """Workers ignore the group's SIGTERM (training saves first), but the parent's own
    shutdown stops them with SIGTERM: a traceback that keeps the DataLoader alive to the end
    made multiprocessing's exit handler wait forever for a worker that ignored it."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys
from repa_fast.data import loaders
from repa_fast.data.demo import make_demo_dataset
from repa_fast.data.loaders import LoaderConfig, make_loader
data = make_demo_dataset({str(tmp_path / 'data')!r}, size=32, num_samples=64, shard_size=32)
def broken(*args, **kwargs):
    raise RuntimeError("a bug in decoding")
loaders.decode_pixels = broken
loader = make_loader(LoaderConfig(data, batch_size=4, num_workers=1, backend="torch"))
try:
    next(iter(loader))
except Exception as error:
    kept = error  # its traceback keeps the DataLoader iterator and its worker alive
    print("raised", type(error).__name__, flush=True)
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items()
                                            if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0 and "raised" in proc.stdout, proc.stderr[-2000:]
