"""Text-to-image data: captioned shards, both loaders (caption choice, resume), damaged
members, the demo-t2i set, MS-COCO prepare (tiny CLIP text model) and U-ViT conversion."""
import contextlib
import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from repa_fast.data import (BadSampleError, BadSampleWarning, DataError, LoaderConfig,
                            caption_choice, empty_context, grid_samples, label_range,
                            make_loader, read_index)
from repa_fast.data.captions import npy_bytes, t2i_index_fields, write_empty_context
from repa_fast.data.demo import COLOURS
from repa_fast.data.demo_t2i import (SIZES, captions_of, demo_text_encoder, draw_captioned,
                                     make_demo_t2i_dataset, where)
from repa_fast.data.encode import encode_image
from repa_fast.data.loaders import dali_problem
from repa_fast.data.prepare import main
from repa_fast.data.shards import INDEX, ShardWriter, shard_name
from repa_fast.atomic_write import write_json_atomic

RES = 32
needs_dali = pytest.mark.skipif(dali_problem() is not None, reason="nvidia-dali not installed")


@pytest.fixture(autouse=True)
def machine_cache(tmp_path, monkeypatch):
    """The loaders' per-machine cache of this test alone, never the real one."""
    monkeypatch.setenv("REPA_FAST_CACHE", str(tmp_path / "machine-cache"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """48 captioned shapes in 3 shards."""
    return make_demo_t2i_dataset(str(tmp_path_factory.mktemp("demo-t2i")), num_samples=48,
                                 shard_size=16)


def members(data_dir):
    """{key: {extension: bytes}} of every shard in ``data_dir``."""
    out = {}
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(data_dir, name)) as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def collect(loader, count):
    return [batch for _, batch in zip(range(count), loader)]


def contexts_of(sample):
    return np.load(io.BytesIO(sample["ctx.npy"]))


# ------------------------------------------------------------------ shards and loaders

def test_shards_hold_captions_contexts_and_the_empty_context(demo):
    index = read_index(demo)
    assert index["kind"] == "text-to-image" and index["format"].endswith("t2i-v1")
    assert index["context"] == dict(shape=[16, 64], dtype="float32")
    assert label_range(demo) is None and index["num_classes"] == 0
    encoder = demo_text_encoder()
    found = members(demo)
    assert len(found) == 48 and sum(len(json.loads(s["txt"])) for s in found.values()) \
        == index["num_captions"]
    for key, sample in list(found.items())[:6]:
        assert set(sample) == {"png", "latent.npy", "txt", "ctx.npy"}
        captions = json.loads(sample["txt"].decode("utf-8"))
        assert 3 <= len(captions) <= 4
        np.testing.assert_array_equal(contexts_of(sample), encoder(captions))
    np.testing.assert_array_equal(empty_context(demo), encoder([""])[0])
    entry = index["empty_context"]
    assert entry["size"] == os.path.getsize(os.path.join(demo, "empty_context.npy"))


def test_torch_loader_yields_the_chosen_captions_contexts(demo):
    config = LoaderConfig(demo, batch_size=4, seed=7, num_workers=1, backend="torch",
                          return_keys=True, world_size=2, rank=1)
    loader = make_loader(config)
    assert loader.text_to_image
    found = members(demo)
    for b, (images, moments, contexts, captions, keys) in enumerate(collect(loader, 7)):
        assert images.dtype == torch.uint8 and images.shape == (4, 3, RES, RES)
        assert moments.shape == (4, 6, RES, RES) and contexts.dtype == torch.float32
        assert contexts.shape == (4, 16, 64) and captions.dtype == torch.int64
        epoch, local = divmod(b, 6)  # 24 samples per rank: 6 batches an epoch
        for slot, key in enumerate(keys):
            every = contexts_of(found[key])
            position = ((local * 4 + slot) * 2 + 1)  # rank 1 of 2: global position
            k = caption_choice(7, epoch, position, len(every))
            assert int(captions[slot]) == k
            np.testing.assert_array_equal(contexts[slot].numpy(), every[k])


def test_caption_choice_is_independent_of_the_process_count_and_resumes(demo):
    def captions(world, batch, count, **kw):
        out = {}
        for rank in range(world):
            loader = make_loader(LoaderConfig(demo, batch_size=batch, seed=3, rank=rank,
                                              world_size=world, num_workers=0, backend="torch",
                                              return_keys=True, **kw))
            for _, _, _, chosen, keys in collect(loader, count):
                out.update(zip(keys, chosen.tolist()))
        return out
    one = captions(1, 8, 6)            # one epoch
    assert one == captions(2, 4, 6) == captions(3, 2, 8)
    assert len(set(one.values())) >= 3  # the draws spread over the captions
    # another epoch draws again; another seed too
    loader = make_loader(LoaderConfig(demo, batch_size=8, seed=3, num_workers=0,
                                      backend="torch", return_keys=True))
    later = {}
    for _, _, _, chosen, keys in collect(loader, 12)[6:]:
        later.update(zip(keys, chosen.tolist()))
    assert later.keys() == one.keys() and later != one
    # exact resume mid-epoch, contexts included, through worker processes
    config = LoaderConfig(demo, batch_size=5, seed=3, num_workers=2, backend="torch",
                          return_keys=True)
    full = collect(make_loader(config), 13)  # 9 batches an epoch: crosses one
    first = make_loader(config)
    head = collect(first, 7)
    resumed = make_loader(config)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(head + collect(resumed, 6), full):
        assert a[4] == b[4] and torch.equal(a[3], b[3]) and torch.equal(a[2], b[2])


@needs_dali
def test_dali_and_torch_loaders_agree_on_captioned_batches(demo):
    runs = {}
    for backend in ("dali", "torch"):
        config = LoaderConfig(demo, batch_size=4, seed=5, rank=1, world_size=2, num_workers=1,
                              backend=backend, device="cpu", return_keys=True)
        runs[backend] = collect(make_loader(config), 8)
    for d, t in zip(runs["dali"], runs["torch"]):
        assert d[4] == t[4]
        for a, b in zip(d[:4], t[:4]):  # PNG images: both decoders exact
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.skipif(dali_problem() is not None or not torch.cuda.is_available(),
                    reason="needs nvidia-dali and a GPU")
def test_dali_contexts_on_the_gpu_equal_the_torch_loaders(demo):
    batches = {}
    for backend in ("dali", "torch"):
        loader = make_loader(LoaderConfig(demo, batch_size=4, num_workers=1, backend=backend,
                                          seed=2))
        batches[backend] = next(iter(loader))
    images, moments, contexts, captions = batches["dali"]
    assert images.is_cuda and moments.is_cuda and contexts.is_cuda  # copied by DALI
    assert not captions.is_cuda and captions.is_pinned()
    for a, b in zip(batches["dali"], batches["torch"]):
        assert torch.equal(a.cpu(), b.cpu())


def test_grid_samples_are_fixed_and_match_the_shards(demo):
    grid = grid_samples(demo, 4, caption=1)
    again = grid_samples(demo, 4, caption=1)
    assert grid.keys == again.keys == ["00000000", "00000012", "00000024", "00000036"]
    found = members(demo)
    for j, key in enumerate(grid.keys):
        captions = json.loads(found[key]["txt"])
        assert grid.caption_index[j] == 1 and grid.captions[j] == captions[1]
        np.testing.assert_array_equal(grid.contexts[j], contexts_of(found[key])[1])
        pixels = np.asarray(Image.open(io.BytesIO(found[key]["png"])))
        np.testing.assert_array_equal(grid.images[j], pixels.transpose(2, 0, 1))
    assert grid.moments.shape == (4, 6, RES, RES)


# ------------------------------------------------------------------ damaged data

def write_set(root, contexts, captions=None, num_captions=None, shard_size=4):
    """A pixel-space text-to-image set of ``len(contexts)`` samples with the given context
    arrays (written as they are: the shard checksums pass, the samples' checks must not)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for s, start in enumerate(range(0, len(contexts), shard_size)):
        writer = ShardWriter(str(root), s)
        for i in range(start, min(start + shard_size, len(contexts))):
            pixels = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
            x = pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
            n = num_captions[i] if num_captions else len(contexts[i])
            text = captions[i] if captions else [f"caption {k}" for k in range(n)]
            writer.add_captioned(f"{i:08d}", encode_image(pixels, "png", 95), "png",
                                 npy_bytes(np.concatenate([x, 0 * x])), text,
                                 npy_bytes(contexts[i]), n)
        meta = writer.commit([])
        shards.append(dict(name=shard_name(s) + ".tar", num_samples=len(meta["samples"]),
                           size=meta["size"], checksum=meta["checksum"]))
    empty = write_empty_context(str(root), np.zeros((6, 5), np.float32))
    write_json_atomic(os.path.join(root, INDEX), dict(
        resolution=RES, image_format="png", num_samples=len(contexts), shards=shards,
        vae=dict(path=None, scaling_factor=1.0, latent_channels=3, fingerprint="pixel space"),
        **t2i_index_fields(empty, dict(name="test"), 0)))
    return str(root)


def test_damaged_contexts_are_named_and_skipped(tmp_path):
    good = [np.full((2, 6, 5), i, np.float32) for i in range(12)]
    bad = list(good)
    bad[3] = good[3].astype(np.float64)                       # wrong dtype
    bad[5] = np.full((2, 6, 5), np.nan, np.float32)           # non-finite
    bad[7] = np.zeros((2, 6, 4), np.float32)                  # wrong width
    counts = [2] * 12
    counts[9] = 3                                             # 3 captions recorded, 2 stored
    data = write_set(tmp_path / "bad", bad, captions=[["a"] * n for n in counts],
                     num_captions=counts)
    config = dict(batch_size=12, num_workers=0, backend="torch", shuffle=False,
                  return_keys=True)
    with pytest.raises(BadSampleError, match=r"shard-000000\.tar, sample 00000003: its text "
                                             r"features \(\.ctx\.npy\)"):
        collect(make_loader(LoaderConfig(data, **config)), 1)
    loader = make_loader(LoaderConfig(data, on_bad_sample="skip", **config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, contexts, _, keys = collect(loader, 1)[0]
    text = " ".join(str(w.message) for w in caught if w.category is BadSampleWarning)
    for key, why in (("00000003", "float64"), ("00000005", "non-finite"),
                     ("00000007", "[2, 6, 4]"), ("00000009", "[3, 6, 5]")):
        assert f"sample {key}" in text and why in text, text
    assert loader.skipped_samples == 4 and contexts.shape == (12, 6, 5)
    assert keys == ["00000000", "00000001", "00000002", "00000004", "00000004", "00000006",
                    "00000006", "00000008", "00000008", "00000010", "00000010", "00000011"]


def test_damaged_shard_captions_and_empty_context_are_named(tmp_path):
    data = write_set(tmp_path / "set", [np.ones((2, 6, 5), np.float32)] * 8)
    # a flipped byte inside a context: the shard's checksum names the shard
    from repa_fast.data import SampleTable
    table = SampleTable(data)
    with open(os.path.join(data, "shard-000001.tar"), "r+b") as f:
        f.seek(int(table.context_offset[5]) + int(table.context_size[5]) - 3)
        f.write(b"\xff")
    loader = make_loader(LoaderConfig(data, batch_size=8, num_workers=0, backend="torch",
                                      shuffle=False))
    with pytest.raises(BadSampleError, match=r"shard-000001\.tar is damaged"):
        collect(loader, 1)
    # damaged caption text: the checksum names the shard; unhashed, the sample's check
    with open(os.path.join(data, "shard-000000.tar"), "r+b") as f:
        f.seek(int(table.captions_offset[1]))
        f.write(b"\xfe")
    with pytest.raises(BadSampleError, match=r"shard-000000\.tar is damaged"):
        table.captions(1, {})
    table = SampleTable(data)
    table.hash_shards = False  # as verify_shards=False: sizes only
    with pytest.raises(BadSampleError, match=r"sample 00000001: its captions \(\.txt\)"):
        table.captions(1, {})
    # the empty context: damaged, wrong shape, missing
    path = os.path.join(data, "empty_context.npy")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-1] + b"\x01")
    with pytest.raises(DataError, match=r"empty_context\.npy is damaged"):
        empty_context(data)
    os.remove(path)
    with pytest.raises(DataError, match=r"empty_context\.npy is missing"):
        empty_context(data)


# ------------------------------------------------------------------ the demo-t2i set

def parse(pixels):
    """(shape, colour, size, row, column) read back from a demo image's pixels."""
    mask = pixels.max(-1) > 120  # shapes are >= 0.8 x a colour of max 230+; background <= 80
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (height * width)
    shape = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
    mean = pixels[mask].mean(0)
    colour = min(COLOURS, key=lambda c: np.abs(mean / mean.max() - np.array(COLOURS[c]) /
                                               max(COLOURS[c])).sum())
    size = "large" if height >= 12 else "small"  # a small triangle is up to 12 px wide
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    row = ("top", "middle", "bottom")[min(int(cy * 3 // RES), 2)]
    column = ("left", "center", "right")[min(int(cx * 3 // RES), 2)]
    return shape, colour, size, row, column


def test_demo_captions_say_what_the_pixels_show(demo):
    found = members(demo)
    seen = set()
    for key in sorted(found)[:24]:
        pixels = np.asarray(Image.open(io.BytesIO(found[key]["png"])))
        shape, colour, size, row, column = parse(pixels)
        captions = json.loads(found[key]["txt"])
        assert captions[:3] == [f"a {colour} {shape}", f"a {colour} {shape} {where(row, column)}",
                                f"a {size} {colour} {shape} {where(row, column)}"], key
        seen.add((shape, colour))
    assert len(seen) >= 6
    # the sizes drawn keep clear of each other, so "small" and "large" can be told apart
    assert SIZES["small"][1] * 2 * RES < 11.5 < SIZES["large"][0] * 1.7 * RES


def test_demo_text_encoder_separates_every_caption():
    encoder = demo_text_encoder()
    texts = sorted({c for shape in ("circle", "square", "triangle") for colour in COLOURS
                    for size in SIZES for row in ("top", "middle", "bottom")
                    for column in ("left", "center", "right")
                    for c in captions_of(dict(shape=shape, colour=colour, size=size, row=row,
                                              column=column))})
    features = encoder(texts)
    assert features.shape == (len(texts), 16, 64) and features.dtype == np.float32
    np.testing.assert_array_equal(features, demo_text_encoder()(texts))  # deterministic
    flat = features.reshape(len(texts), -1).astype(np.float64)
    gram = flat @ flat.T
    distance = np.diag(gram)[:, None] + np.diag(gram)[None] - 2 * gram
    np.fill_diagonal(distance, np.inf)
    assert distance.min() > 0.01 * np.diag(gram).mean()   # every pair clearly apart
    # the last token (padding, attending to the whole caption) tells them apart too
    last = features[:, -1]
    assert len({tuple(np.round(v, 4)) for v in last}) == len(texts)
    long = encoder(["a " * 40 + "red circle", "a zebra circle"])  # truncated; unknown word
    assert long.shape == (2, 16, 64) and np.isfinite(long).all()
    assert encoder.tokenize(["a zebra"])[0, :4].tolist() == [1, encoder.ids["a"], 3, 2]


def test_draw_captioned_facts_follow_the_rng():
    rng = np.random.default_rng(1)
    facts = [draw_captioned(rng)[1] for _ in range(200)]
    for name in ("shape", "colour", "size", "row", "column"):
        assert len({f[name] for f in facts}) >= 2, name
    assert {f["row"] for f in facts} == {"top", "middle", "bottom"}


# ------------------------------------------------------------------ MS-COCO prepare

def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP (text width 32) with a character-level tokenizer (tests/tiny_clip.py)."""
    pytest.importorskip("transformers")
    from tiny_clip import save_tiny_clip
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny-clip"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """5 images of odd sizes (one without captions, one unreadable) and their captions."""
    root = tmp_path_factory.mktemp("coco")
    (root / "train2014").mkdir()
    rng = np.random.default_rng(2)
    sizes = {42: (40, 57), 9: (64, 33), 77: (35, 35), 13: (50, 90), 5: (45, 36)}
    images = []
    for image_id, (w, h) in sizes.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "train2014" / name, quality=95)
        images.append(dict(id=image_id, file_name=name, width=w, height=h))
    (root / "train2014" / images[1]["file_name"]).write_bytes(b"not a jpeg")  # id 9
    notes = [(42, "A cat on a mat."), (9, "broken"), (42, "a dog"), (77, "red bus, parked"),
             (5, "five"), (42, "third one for 42"), (5, "another five")]  # 13: no caption
    annotations = [dict(id=i, image_id=image_id, caption=text)
                   for i, (image_id, text) in enumerate(notes)]
    (root / "captions.json").write_text(json.dumps(dict(images=images,
                                                        annotations=annotations)))
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_vae import save_tiny_vae
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae", sample_size=RES)


def test_coco_prepare_encodes_captions_and_resumes(coco, tiny_clip, tiny_vae, tmp_path):
    from repa_fast.data import center_crop_dhariwal
    from repa_fast.data.text_encoders import CLIPTextEncoder
    from repa_fast.vae import encode_moments, load_vae
    dest = tmp_path / "coco32"
    argv = ["--source", coco / "train2014", "--captions", coco / "captions.json",
            "--text-encoder", tiny_clip, "--vae", tiny_vae, "--dest", dest, "--resolution",
            RES, "--workers", 0, "--shard-size", 2]
    code, err = run(argv)
    assert code == 0, err
    index = read_index(str(dest))
    assert index["kind"] == "text-to-image" and index["num_samples"] == 3
    assert index["context"] == dict(shape=[77, 32], dtype="float32")
    assert index["num_captions"] == 6 and index["text_encoder"]["name"] == "clip-text"
    report = json.loads((dest / "report.json").read_text())
    assert sorted((s["key"], s["error"].split(":")[0]) for s in report["skipped"]) == [
        ("00000001", "UnidentifiedImageError"),
        ("00000002", f"has no caption in {coco / 'captions.json'}")]
    # sorted by image id (5, 9, 13, 42, 77): keys 0, 3, 4 remain, captions in file order
    encoder = CLIPTextEncoder(tiny_clip)
    vae = load_vae(tiny_vae)
    found = members(str(dest))
    expect = {"00000000": ["five", "another five"],
              "00000003": ["A cat on a mat.", "a dog", "third one for 42"],
              "00000004": ["red bus, parked"]}
    names = {"00000000": 5, "00000003": 42, "00000004": 77}
    assert sorted(found) == sorted(expect)
    for key, captions in expect.items():
        assert json.loads(found[key]["txt"]) == captions
        np.testing.assert_allclose(contexts_of(found[key]), encoder(captions), atol=1e-5)
        image = Image.open(coco / "train2014" / f"COCO_train2014_{names[key]:012d}.jpg")
        crop = torch.from_numpy(center_crop_dhariwal(image, RES)).permute(2, 0, 1)[None]
        np.testing.assert_allclose(np.load(io.BytesIO(found[key]["latent.npy"])),
                                   encode_moments(vae, crop.contiguous())[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(empty_context(str(dest)), encoder([""])[0], atol=1e-5)
    loader = make_loader(LoaderConfig(str(dest), batch_size=3, num_workers=0, backend="torch"))
    images, moments, contexts, chosen = next(iter(loader))
    assert contexts.shape == (3, 77, 32) and moments.shape == (3, 8, RES // 8, RES // 8)
    # resume: a lost shard and empty context are redone, the rest kept as they were
    before = {n: (dest / n).read_bytes() for n in os.listdir(dest) if n.endswith(".tar")}
    os.remove(dest / "shard-000001.tar")
    os.remove(dest / "empty_context.npy")
    code, err = run(argv)
    assert code == 0, err
    assert {n: (dest / n).read_bytes() for n in before} == before
    np.testing.assert_allclose(empty_context(str(dest)), encoder([""])[0], atol=1e-5)
    # other settings refused; --restart deletes the empty context with the shards
    code, err = run(argv[:5] + [tmp_path / "other"] + argv[6:])
    assert code == 2 and "text_encoder" in err
    code, err = run(argv + ["--restart"])
    assert code == 0 and "--restart: deleted 10 files" in err, err  # empty context too


def test_coco_prepare_names_what_is_missing(coco, tmp_path):
    """Checked before transformers is imported: runs without it."""
    base = ["--source", coco / "train2014", "--dest", tmp_path / "d", "--resolution", RES,
            "--workers", 0, "--vae", "none"]
    code, err = run(base + ["--captions", coco / "captions.json"])
    assert code == 2 and "--captions needs --text-encoder" in err
    code, err = run(base + ["--captions", coco / "captions.json", "--text-encoder",
                            tmp_path / "nope"])
    assert code == 2 and "nope" in err and "does not exist" in err
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        (partial / name).write_text("{}")
    code, err = run(base + ["--captions", coco / "captions.json", "--text-encoder", partial])
    assert code == 2 and str(partial / "model.safetensors") in err
    (partial / "model.safetensors").write_bytes(b"")
    os.remove(partial / "merges.txt")
    code, err = run(base + ["--captions", coco / "captions.json", "--text-encoder", partial])
    assert code == 2 and str(partial / "merges.txt") in err
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    code, err = run(base + ["--captions", tmp_path / "bad.json", "--text-encoder", partial])
    assert code == 2 and "bad.json" in err and "annotations" in err
    assert not os.path.exists(tmp_path / "d" / "index.json")


# ------------------------------------------------------------------ U-ViT conversion

def uvit_folder(root, counts, length=7, width=12):
    """A U-ViT MS-COCO features layout: root/train/{i}.png, {i}.npy, {i}_{k}.npy and
    root/empty_context.npy; returns the arrays written."""
    split = root / "train"
    split.mkdir(parents=True)
    rng = np.random.default_rng(4)
    written = {}
    for i, count in enumerate(counts):
        pixels = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(split / f"{i}.png")
        moments = rng.normal(size=(8, RES // 8, RES // 8)).astype(np.float32)
        np.save(split / f"{i}.npy", moments)
        features = rng.normal(size=(count, length, width)).astype(np.float32)
        for k in range(count):
            np.save(split / f"{i}_{k}.npy", features[k])
        written[i] = ((split / f"{i}.png").read_bytes(), moments, features)
    empty = rng.normal(size=(length, width)).astype(np.float32)
    np.save(root / "empty_context.npy", empty)
    return split, written, empty


def test_uvit_folder_is_converted_without_recomputing(tmp_path):
    split, written, empty = uvit_folder(tmp_path / "coco32_features", [5, 2, 3, 1])
    os.remove(split / "2_1.npy")  # a gap: 2_0 and 2_2 without 2_1
    dest = tmp_path / "converted"
    code, err = run(["--source", split, "--dest", dest, "--resolution", RES, "--workers", 0,
                     "--shard-size", 2])
    assert code == 0, err
    index = read_index(str(dest))
    assert index["kind"] == "text-to-image" and index["num_samples"] == 3
    assert index["context"] == dict(shape=[7, 12], dtype="float32")
    assert index["vae"]["scaling_factor"] == pytest.approx(0.18215)
    report = json.loads((dest / "report.json").read_text())
    assert [(s["key"], "2_1.npy" in s["error"]) for s in report["skipped"]] == [
        ("00000002", True)]
    found = members(str(dest))
    for i in (0, 1, 3):
        sample = found[f"{i:08d}"]
        png, moments, features = written[i]
        assert sample["png"] == png                      # the stored bytes, as they were
        np.testing.assert_array_equal(np.load(io.BytesIO(sample["latent.npy"])), moments)
        np.testing.assert_array_equal(contexts_of(sample), features)
        assert json.loads(sample["txt"]) == [None] * len(features)  # U-ViT keeps no text
    np.testing.assert_array_equal(empty_context(str(dest)), empty)
    loader = make_loader(LoaderConfig(str(dest), batch_size=3, num_workers=0, backend="torch",
                                      shuffle=False, return_keys=True))
    images, moments, contexts, chosen, keys = next(iter(loader))
    assert keys == ["00000000", "00000001", "00000003"]
    for slot, i in enumerate((0, 1, 3)):
        np.testing.assert_array_equal(contexts[slot].numpy(), written[i][2][int(chosen[slot])])
    assert grid_samples(str(dest), 2).captions == [None, None]


def test_uvit_texts_from_the_captions_file_and_missing_empty_context(tmp_path):
    split, written, _ = uvit_folder(tmp_path / "features", [2, 1])
    captions = dict(images=[dict(id=30, file_name="b.jpg"), dict(id=4, file_name="a.jpg")],
                    annotations=[dict(image_id=30, caption="thirty"),
                                 dict(image_id=4, caption="four"),
                                 dict(image_id=4, caption="four again")])
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    dest = tmp_path / "with-text"
    code, err = run(["--source", split, "--dest", dest, "--resolution", RES, "--workers", 0,
                     "--captions", tmp_path / "captions.json"])
    assert code == 0, err
    found = members(str(dest))
    assert json.loads(found["00000000"]["txt"]) == ["four", "four again"]  # id 4 first
    assert json.loads(found["00000001"]["txt"]) == ["thirty"]
    os.remove(tmp_path / "features" / "empty_context.npy")
    code, err = run(["--source", split, "--dest", tmp_path / "none", "--resolution", RES])
    assert code == 2 and "empty_context.npy" in err
