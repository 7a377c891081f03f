"""Dataset preparation (crop, VAE moments, shards, resume, report) and the two loaders."""
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from repa_fast.data import LoaderConfig, center_crop_dhariwal, epoch_order, make_loader
from repa_fast.data.loaders import dali_problem
from repa_fast.data.prepare import PrepareConfig, main, prepare
from repa_fast.data.shards import read_index

diffusers = pytest.importorskip("diffusers")
RES = 32  # small images keep the tiny VAE fast; latents are [8, 4, 4]
SIZES = [(37, 53), (64, 41), (90, 33), (33, 33), (120, 70)]


@pytest.fixture(autouse=True)
def machine_cache(tmp_path, monkeypatch):
    """The loaders' per-machine cache (verified-shard records) of this test alone, never the
    real one in the home folder."""
    monkeypatch.setenv("REPA_FAST_CACHE", str(tmp_path / "machine-cache"))


def official_crop(arr, image_size):
    """The official center_crop_imagenet, written out from ADM's description."""
    pil = Image.fromarray(arr)
    while min(*pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
    out = np.array(pil)
    y, x = (out.shape[0] - image_size) // 2, (out.shape[1] - image_size) // 2
    return out[y:y + image_size, x:x + image_size]


def random_image(rng, w, h):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes x 4 JPEGs of odd sizes, plus one truncated JPEG."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["n01", "n02", "n03"]):
        os.makedirs(root / name)
        for i in range(4):
            w, h = SIZES[(c + i) % len(SIZES)]
            Image.fromarray(random_image(rng, w, h)).save(root / name / f"img{i}.JPEG", quality=90)
    good = (root / "n02" / "img0.JPEG").read_bytes()
    (root / "n02" / "broken.jpg").write_bytes(good[:len(good) // 3])
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random AutoencoderKL with the SD-VAE's 8x downsampling and 4 latent channels."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 8, 8, 8], norm_num_groups=4,
                                  down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
                                  latent_channels=4, sample_size=RES)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prepared(image_folder, tiny_vae, tmp_path_factory):
    dest = tmp_path_factory.mktemp("shards")
    index = prepare(PrepareConfig(source=str(image_folder), dest=str(dest), resolution=RES,
                                  vae=tiny_vae, shard_size=4, workers=0), progress=False)
    return dest, index


def test_center_crop_equals_official_on_odd_sizes():
    rng = np.random.default_rng(1)
    for w, h in [(1001, 703), (257, 513), (33, 97), (512, 512), (600, 255)]:
        arr = random_image(rng, w, h)
        for size in (32, 256):
            out = center_crop_dhariwal(arr, size)
            assert out.shape == (size, size, 3) and out.dtype == np.uint8
            assert np.array_equal(out, official_crop(arr, size)), (w, h, size)


def test_prepare_writes_shards_index_and_report(prepared, image_folder, tiny_vae):
    dest, index = prepared
    assert index["num_samples"] == 12 and index["num_skipped"] == 1
    assert index["num_classes"] == 3 and index["class_counts"] == {"0": 4, "1": 4, "2": 4}
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert index["resolution"] == RES and index["image_format"] == "jpg"
    assert index["vae"]["scaling_factor"] == pytest.approx(0.18215)
    report = json.loads((dest / "report.json").read_text())
    assert [s["name"] for s in report["skipped"]] == ["n02/broken.jpg"]
    assert read_index(str(dest)) == index
    # every sample: image, moments of the un-compressed crop, label
    from repa_fast.vae import encode_moments, load_vae
    vae = load_vae(tiny_vae)
    with tarfile.open(dest / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["00000000.jpg", "00000000.latent.npy", "00000000.cls"]
        latent = np.load(io.BytesIO(tar.extractfile("00000000.latent.npy").read()))
        label = int(tar.extractfile("00000000.cls").read())
    crop = center_crop_dhariwal(Image.open(image_folder / "n01" / "img0.JPEG"), RES)
    expect = encode_moments(vae, torch.from_numpy(crop).permute(2, 0, 1)[None].contiguous())[0]
    assert latent.shape == (8, RES // 8, RES // 8) and label == 0
    assert np.allclose(latent, expect.numpy(), atol=1e-5)


def test_resume_redoes_only_missing_shards(prepared, image_folder, tiny_vae):
    dest, _ = prepared
    before = {p: (dest / p).read_bytes() for p in os.listdir(dest) if p.endswith(".tar")}
    mtimes = {p: os.stat(dest / p).st_mtime_ns for p in before}
    os.remove(dest / "shard-000002.tar")
    prepare(PrepareConfig(source=str(image_folder), dest=str(dest), resolution=RES, vae=tiny_vae,
                          shard_size=4, workers=0), progress=False)
    for p, data in before.items():
        assert (dest / p).read_bytes() == data  # deterministic bytes
        if p != "shard-000002.tar":
            assert os.stat(dest / p).st_mtime_ns == mtimes[p]  # not rewritten


def test_crash_mid_shard_leaves_no_finished_looking_shard(image_folder, tiny_vae, tmp_path,
                                                          monkeypatch):
    import repa_fast.data.prepare as prep
    real, calls = prep._flush, []

    def crash_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prep, "_flush", crash_on_third)
    config = PrepareConfig(source=str(image_folder), dest=str(tmp_path), resolution=RES,
                           vae=tiny_vae, shard_size=4, workers=0, vae_batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        prepare(config, progress=False)
    left = sorted(os.listdir(tmp_path))
    assert not any(name.endswith(".tmp") for name in left)
    assert "index.json" not in left and "shard-000001.tar" not in left
    monkeypatch.setattr(prep, "_flush", real)
    assert prepare(config, progress=False)["num_samples"] == 12


def test_official_folder_and_zip_sources(tmp_path, image_folder, tiny_vae):
    rng = np.random.default_rng(2)
    official = tmp_path / "official"
    labels = []
    for i in range(5):
        img = tmp_path / "official" / "images" / "00000" / f"img{i:08d}.png"
        lat = tmp_path / "official" / "vae-sd" / "00000" / f"img-mean-std-{i:08d}.npy"
        img.parent.mkdir(parents=True, exist_ok=True)
        lat.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(rng, RES, RES)).save(img)
        np.save(lat, rng.standard_normal((8, RES // 8, RES // 8)).astype(np.float32))
        labels.append([f"00000/img-mean-std-{i:08d}.npy", i % 2])
    (official / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    index = prepare(PrepareConfig(source=str(official), dest=str(tmp_path / "a"),
                                  resolution=RES, workers=0), progress=False)
    assert index["source_kind"] == "official" and index["image_format"] == "png"
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        assert tar.extractfile("00000003.png").read() == (
            official / "images" / "00000" / "img00000003.png").read_bytes()
        assert tar.extractfile("00000003.latent.npy").read() == (
            official / "vae-sd" / "00000" / "img-mean-std-00000003.npy").read_bytes()
        assert tar.extractfile("00000003.cls").read() == b"1"
    archive = tmp_path / "in.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(image_folder.rglob("*.JPEG")):
            z.write(p, p.relative_to(image_folder).as_posix())
    index = prepare(PrepareConfig(source=str(archive), dest=str(tmp_path / "b"), resolution=RES,
                                  vae=tiny_vae, workers=0, image_format="png"), progress=False)
    assert index["source_kind"] == "zip" and index["num_samples"] == 12
    assert index["class_counts"] == {"0": 4, "1": 4, "2": 4}


def test_command_line_in_worker_processes(image_folder, tiny_vae, tmp_path, capsys):
    assert main(["--source", str(image_folder), "--dest", str(tmp_path), "--resolution",
                 str(RES), "--vae", tiny_vae, "--workers", "2", "--shard-size", "5"]) == 0
    assert "12 samples in 3 shards" in capsys.readouterr().out
    assert main(["--source", str(image_folder), "--dest", str(tmp_path / "x"),
                 "--resolution", "30"]) == 2
    assert "--resolution must be a positive multiple of 8" in capsys.readouterr().err
    assert main(["--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_vae_file_is_named(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope/vae.*huggingface.co/stabilityai"):
        prepare(PrepareConfig(source=str(image_folder), dest=str(tmp_path), resolution=RES,
                              vae="nope/vae", workers=0), progress=False)


def collect(loader, batches):
    out = []
    for n, batch in zip(range(batches), loader):
        out.append(batch)
    return out


def test_rank_sharding_covers_every_sample_each_epoch():
    n, world = 10, 3
    for epoch in range(3):
        parts = [epoch_order(n, 7, epoch, r, world, True) for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # equal counts: no rank waits
        assert set(np.concatenate(parts)) == set(range(n))
    assert not np.array_equal(epoch_order(n, 7, 0, 0, 1, True), epoch_order(n, 7, 1, 0, 1, True))
    assert np.array_equal(epoch_order(n, 7, 0, 0, 1, False), np.arange(n))


def test_torch_loader_batches_and_resume(prepared):
    dest, _ = prepared
    config = LoaderConfig(str(dest), batch_size=3, seed=5, num_workers=2, backend="torch",
                          return_keys=True)
    full = collect(make_loader(config), 10)  # 4 batches per epoch: crosses two epochs
    images, moments, labels, keys = full[0]
    assert images.dtype == torch.uint8 and images.shape == (3, 3, RES, RES)
    assert moments.dtype == torch.float32 and moments.shape == (3, 8, RES // 8, RES // 8)
    assert labels.dtype == torch.int64
    epoch0 = sorted(k for b in full[:4] for k in b[3])
    assert len(epoch0) == 12 and len(set(epoch0)) == 12
    first = make_loader(config)
    head = collect(first, 6)
    state = first.state_dict()
    resumed = make_loader(config)
    resumed.load_state_dict(state)
    tail = collect(resumed, 4)
    assert [b[3] for b in head + tail] == [b[3] for b in full]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(head + tail, full))
    with pytest.raises(ValueError, match="saved loader had seed=5, this one has 6"):
        make_loader(LoaderConfig(str(dest), batch_size=3, seed=6)).load_state_dict(state)


@pytest.mark.skipif(dali_problem() is not None, reason="nvidia-dali not installed")
@pytest.mark.parametrize("world_size", [1, 2])
def test_dali_and_torch_loaders_agree(prepared, world_size):
    dest, _ = prepared
    runs = {}
    for backend in ("dali", "torch"):
        config = LoaderConfig(str(dest), batch_size=2, seed=3, rank=world_size - 1,
                              world_size=world_size, num_workers=1, backend=backend,
                              device="cpu", return_keys=True)
        runs[backend] = collect(make_loader(config), 7)
    for d, t in zip(runs["dali"], runs["torch"]):
        assert d[3] == t[3]                      # same keys, same order
        assert torch.equal(d[2], t[2])           # labels
        assert torch.equal(d[1], t[1])           # moments
        assert d[0].shape == t[0].shape and d[0].dtype == torch.uint8
        assert (d[0].int() - t[0].int()).abs().max() <= 2  # two JPEG decoders


@pytest.mark.skipif(dali_problem() is not None, reason="nvidia-dali not installed")
def test_dali_reads_files_in_reader_processes_only(prepared):
    """The parallel external source: no sample file is read by the training process; with
    num_workers=0 (no reader processes) the same counter sees the reads on the main thread."""
    from repa_fast.data.samples import read_counts
    dest, _ = prepared
    for workers in (1, 0):
        config = LoaderConfig(str(dest), batch_size=3, seed=2, num_workers=workers,
                              backend="dali", device="cpu")
        loader = make_loader(config)
        before = read_counts()
        batches = collect(loader, 5)  # crosses an epoch
        after = read_counts()
        reads = after["reads"] - before["reads"]
        main_thread = after["main_thread_reads"] - before["main_thread_reads"]
        if workers:
            assert reads == 0 and main_thread == 0
            assert loader.reader_pids and os.getpid() not in loader.reader_pids
        else:
            assert main_thread >= 5 * 3 and loader.reader_pids == {os.getpid()}
        assert len(batches) == 5 and batches[0][1].shape == (3, 8, RES // 8, RES // 8)


@pytest.mark.skipif(dali_problem() is not None, reason="nvidia-dali not installed")
def test_dali_parallel_reading_same_batches_and_exact_resume(prepared):
    """Reader processes (2 of them, sample-mode parallel external source) yield the batches
    of in-process reading: same keys in the same order, same pixels, moments and labels; a
    parallel loader resumed from a state saved mid-epoch continues with exactly the rest."""
    dest, _ = prepared

    def config(workers):
        return LoaderConfig(str(dest), batch_size=3, seed=5, num_workers=workers,
                            backend="dali", device="cpu", return_keys=True)

    full = collect(make_loader(config(2)), 10)  # 4 batches per epoch: crosses two epochs
    first = make_loader(config(0))
    head = collect(first, 6)
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    resumed = make_loader(config(1))
    resumed.load_state_dict(state)
    tail = collect(resumed, 4)
    assert [b[3] for b in head + tail] == [b[3] for b in full]
    for got, want in zip(head + tail, full):
        assert all(torch.equal(g, w) for g, w in zip(got[:3], want[:3]))  # same decoder
    epoch0 = sorted(k for b in full[:4] for k in b[3])
    assert len(set(epoch0)) == 12


@pytest.mark.skipif(dali_problem() is not None or not torch.cuda.is_available(),
                    reason="needs nvidia-dali and a GPU")
def test_dali_outputs_on_the_gpu_or_pinned(prepared):
    dest, _ = prepared
    loader = make_loader(LoaderConfig(str(dest), batch_size=3, num_workers=1, backend="dali"))
    images, moments, labels = next(iter(loader))
    assert images.is_cuda and moments.is_cuda  # nvJPEG output, moments copied by DALI
    assert not labels.is_cuda and labels.is_pinned()  # host: read without a sync
    cpu = make_loader(LoaderConfig(str(dest), batch_size=3, num_workers=1, backend="dali",
                                   device="cpu"))
    assert all(t.is_pinned() for t in next(iter(cpu)))


def test_resume_with_other_settings_is_refused(prepared, image_folder, tiny_vae):
    dest, _ = prepared
    for change, name in ((dict(resolution=64), "resolution"), (dict(shard_size=5), "shard_size"),
                         (dict(max_images=7), "entries")):
        config = dict(source=str(image_folder), dest=str(dest), resolution=RES, vae=tiny_vae,
                      shard_size=4, workers=0)
        config.update(change)
        with pytest.raises(ValueError, match=f"other settings .*{name}"):
            prepare(PrepareConfig(**config), progress=False)
    import subprocess
    holder = subprocess.Popen(["sleep", "60"])  # a live process named by the lock
    (dest / ".prepare.lock").write_text(str(holder.pid))
    try:
        with pytest.raises(ValueError, match=f"another prepare run is writing.*pid {holder.pid}"):
            prepare(PrepareConfig(source=str(image_folder), dest=str(dest), resolution=RES,
                                  vae=tiny_vae, shard_size=4, workers=0), progress=False)
    finally:
        holder.kill()
        holder.wait()
        os.remove(dest / ".prepare.lock")


def test_linked_class_folders_are_followed(image_folder, tmp_path):
    from repa_fast.data.sources import open_source
    root = tmp_path / "linked"
    root.mkdir()
    for name in ("n01", "n02"):
        os.symlink(image_folder / name, root / name)
    source = open_source(str(root))
    assert len(source.entries) == 9 and {e.label for e in source.entries} == {0, 1}


def test_few_open_files_and_tiny_datasets(prepared, monkeypatch):
    import repa_fast.data.samples as samples
    dest, _ = prepared
    monkeypatch.setattr(samples, "MAX_OPEN", 1)  # every shard switch closes a file
    config = LoaderConfig(str(dest), batch_size=4, seed=1, num_workers=0, backend="torch",
                          return_keys=True)
    keys = [k for batch in collect(make_loader(config), 3) for k in batch[3]]
    assert sorted(keys) == sorted({*keys}) and len(keys) == 12
    for world in (5, 7):  # more ranks than samples: every rank still gets its share
        parts = [epoch_order(2, 0, 0, r, world, True) for r in range(world)]
        assert all(len(p) == 1 for p in parts)
