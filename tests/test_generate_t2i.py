"""`python -m repa_fast.generate` with MMDiT (text-to-image) checkpoints: captions from the
training data set, a data set's stored features, a caption file or prompts; the .npz with its
captions, resumable and process-count independent; the CLIP score of it; flag errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from generate_cli import generate, run_folder
from repa_fast.generate import main
from repa_fast.generation import load_checkpoint
from repa_fast.generation.captions import read_caption_file
from repa_fast.train import main as train_main

pytest.importorskip("tqdm")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num-steps", "3", "--cfg-scale", "4", "--per-proc-batch-size", "3",
        "--num-fid-samples", "7"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i-train")
    assert train_main(["--preset", "demo-t2i", "--output-dir", str(out), "--batch-size", "8",
                       "--max-train-steps", "2", "--checkpointing-steps", "2",
                       "--sampling-steps", "100", "--report-to", "none"]) == 0
    return str(out / "demo-t2i" / "checkpoints" / "0000002.pt")


def test_mmdit_checkpoint_is_recognised(ckpt):
    model, spec, _ = load_checkpoint(ckpt, "ema", {})
    assert (spec.model, spec.is_t2i, spec.context_dim, spec.pixel_space) == \
        ("MMDiT-d4/4", True, 64, True)
    assert type(model).__name__ == "MMDiT" and not spec.is_dit


def test_npz_holds_the_training_sets_captions_and_resumes(ckpt, tmp_path):
    rc, first = generate(ckpt, tmp_path, *FAST)
    assert rc == 0 and first.shape == (7, 32, 32, 3) and first.dtype == np.uint8
    folder = run_folder(tmp_path)
    assert folder.endswith("-captions-train-data-steps-3")
    rc, prefixed = generate(ckpt, tmp_path / "x", *FAST, "--prefix", "coco")
    assert rc == 0 and np.array_equal(prefixed, first)
    assert os.path.basename(run_folder(tmp_path / "x")).startswith("coco-MMDiT-d4-4-")
    with np.load(folder + ".npz") as data:
        captions = [str(c) for c in data["captions"]]
    assert len(captions) == 7 and all(captions)
    os.remove(folder + ".npz")
    os.remove(os.path.join(folder, "000004.png"))
    rc, again = generate(ckpt, tmp_path, *FAST)
    assert rc == 0 and np.array_equal(first, again)
    # the training set given explicitly is the same source
    data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(ckpt))),
                            "demo-t2i-data")
    rc, explicit = generate(ckpt, tmp_path / "d", *FAST, "--data-dir", data_dir)
    assert rc == 0 and np.array_equal(first, explicit)


def test_prompts_and_caption_files_follow_the_text(ckpt, tmp_path):
    """The same caption gives the same sample for the same index; another caption changes it;
    a captions file equals the same captions as --prompt."""
    prompts = ["a red circle", "a blue square on the left", "a yellow triangle"]
    (tmp_path / "c.txt").write_text("\n".join(prompts) + "\n\n")
    flags = [*FAST[:-2], "--num-fid-samples", "3"]
    rc, from_file = generate(ckpt, tmp_path / "f", *flags, "--captions", str(tmp_path / "c.txt"))
    assert rc == 0
    rc, from_prompts = generate(ckpt, tmp_path / "p", *flags,
                                *[x for p in prompts for x in ("--prompt", p)])
    assert rc == 0 and np.array_equal(from_file, from_prompts)
    rc, other = generate(ckpt, tmp_path / "o", *flags, "--prompt", "a green square",
                         "--prompt", prompts[1], "--prompt", prompts[2])
    assert rc == 0 and not np.array_equal(other[0], from_file[0])
    assert np.array_equal(other[1:], from_file[1:])  # sample i depends on its caption only


def test_coco_captions_json_gives_each_images_first_caption(tmp_path):
    coco = {"images": [{"id": 9, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 9, "caption": "a dog"},
                            {"image_id": 3, "caption": " a cat "},
                            {"image_id": 3, "caption": "another cat"}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    assert read_caption_file(str(tmp_path / "captions_val2014.json")) == ["a cat", "a dog"]


def test_grid_rows_are_the_prompts(ckpt, tmp_path):
    out = tmp_path / "grid.png"
    rc = main(["--ckpt", ckpt, "--grid", "--prompt", "a red circle", "--prompt",
               "a green square", "--seeds", "0,1,2", "--num-steps", "3", "--out", str(out)])
    assert rc == 0
    from PIL import Image
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 32, 3 * 32, 3)
    assert not np.array_equal(grid[:32], grid[32:])


def test_two_processes_write_the_same_npz_as_one(ckpt, tmp_path):
    rc, single = generate(ckpt, tmp_path / "one", *FAST)
    assert rc == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "repa_fast.generate", "--ckpt", ckpt, "--sample-dir",
           str(tmp_path / "two"), *FAST]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (npz,) = [f for f in os.listdir(tmp_path / "two") if f.endswith(".npz")]
    assert np.array_equal(np.load(tmp_path / "two" / npz)["arr_0"], single)


def test_clip_score_of_the_generated_npz(ckpt, tmp_path, capsys):
    pytest.importorskip("transformers")
    from tiny_clip import save_tiny_clip
    from repa_fast import evaluate
    rc, _ = generate(ckpt, tmp_path / "s", *FAST)
    assert rc == 0
    capsys.readouterr()
    clip = save_tiny_clip(str(tmp_path / "clip"))
    assert evaluate.main(["--samples", run_folder(tmp_path / "s") + ".npz", "--clip-model", clip,
                          "--device", "cpu", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)["clip"]
    assert result["count"] == 7 and 0 <= result["clip_score"] <= 100


@pytest.mark.parametrize("flags, expected", [
    (["--grid", "--class-labels", "1,2"], "--class-labels: not for"),
    (["--num-sampling-steps", "10"], "--num-sampling-steps: not for"),
    (["--captions", "c.txt", "--prompt", "x"], "--captions and --prompt: give one of them"),
    (["--data-dir", "d", "--prompt", "x"], "--data-dir uses the set's own captions"),
    (["--captions", "/nonexistent/c.txt"], "--captions: file not found"),
    (["--data-dir", "/nonexistent/set"], "--data-dir '/nonexistent/set' does not exist"),
    (["--num-classes", "3"], "--num-classes: MMDiT-d4/4 is a text-to-image model"),
])
def test_bad_flags_exit_2_naming_the_flag(ckpt, tmp_path, capsys, flags, expected):
    rc = main(["--ckpt", ckpt, "--sample-dir", str(tmp_path / "s"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert not os.path.exists(tmp_path / "s")


def test_text_encoder_of_another_width_exits_2(ckpt, tmp_path, capsys):
    pytest.importorskip("transformers")
    from tiny_clip import save_tiny_clip
    from transformers import CLIPTextConfig, CLIPTextModel
    folder = str(tmp_path / "clip-text")
    save_tiny_clip(folder)  # the tokenizer files; the text model is 32 wide
    CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=77)).save_pretrained(folder)
    rc = main(["--ckpt", ckpt, "--sample-dir", str(tmp_path / "s"), "--prompt", "a cat",
               "--text-encoder", folder])
    err = capsys.readouterr().err
    assert rc == 2 and "its features are 32 wide, but the model reads 64-wide" in err, err


def test_t2i_flags_with_a_class_conditional_checkpoint_exit_2(tmp_path, capsys):
    from repa_fast.models import SiT_models
    sit = SiT_models["SiT-T/4"](input_size=32, in_channels=3, num_classes=5, z_dims=[],
                                encoder_depth=2)
    path = str(tmp_path / "sit.pt")
    torch.save(sit.state_dict(), path)
    rc = main(["--ckpt", path, "--num-classes", "5", "--sample-dir", str(tmp_path / "s"),
               "--prompt", "a cat"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt: text-to-image flags" in err, err
