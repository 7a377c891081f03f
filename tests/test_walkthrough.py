"""The README's "Your own images" walk-through runs as written, at tiny sizes.

The fenced bash block under ``<!-- walkthrough: your-own-images ... -->`` is read from
README.md, the sizes in :data:`TINY` are swapped for tiny ones (each must occur in the
block, so an edit of the README cannot silently disable one), and the block runs as one
``bash -e`` script in a temporary folder holding what a newcomer would have there:

* ``my_images/``: 24 small PNGs of odd sizes in 3 class folders;
* ``ckpts/sd-vae-ft-ema``: a random diffusers ``AutoencoderKL`` with the SD-VAE's 8×
  downsampling and 4 latent channels, in the real one's folder layout;
* ``ckpts/pt_inception-2015-12-05-6726825d.pth``: random Inception weights in
  torch-fidelity's format, at the default path ``evaluate`` reads (numbers meaningless).

Paths, flags and file names are the README's own; only the sizes below change.
"""
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("scipy")
pytest.importorskip("torch_fidelity")

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- walkthrough: your-own-images"

# (README text, what the test runs instead). Everything else runs verbatim.
TINY = [
    # a tiny SiT: SiT-T/4 has 8x8 tokens on the 32x32 latents (DINOv2's 16x16 grid is pooled
    # onto them); SiT-S/2's final 16-image sample grid alone takes minutes on 2 CPU cores
    ("--model SiT-S/2", "--model SiT-T/4"),
    ("samples/SiT-S-2-", "samples/SiT-T-4-"),      # the model in generate's .npz name
    ("--batch-size 64", "--batch-size 4"),
    ("--max-train-steps 20000", "--max-train-steps 2"),
    ("--checkpointing-steps 5000", "--checkpointing-steps 2"),
    ("checkpoints/0020000.pt", "checkpoints/0000002.pt"),
    ("-0020000-size-", "-0000002-size-"),          # the step in the .npz name
    # one batch of 6 (generate samples whole batches, 32 by default)
    ("--num-fid-samples 1000", "--num-fid-samples 6 --per-proc-batch-size 6"),
]
CLASSES, PER_CLASS = ("cat", "dog", "fox"), 8
SIZES = [(40, 56), (64, 48), (33, 33), (90, 45)]


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(re.escape(MARKER) + r"[^\n]*-->\n```bash\n(.*?)```", text, re.S)
    assert match, "README.md lost its 'Your own images' walk-through block"
    return match.group(1)


def commands(script: str) -> list:
    """The block's commands: continuation lines joined, heredoc bodies left out."""
    out, pending, heredoc = [], "", None
    for line in script.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command, pending = (pending + line).strip(), ""
        if command:
            out.append(command)
            found = re.search(r"<<-?\s*['\"]?(\w+)", command)
            heredoc = found.group(1) if found else None
    return out


def tiny(script: str) -> str:
    for readme, test in TINY:
        assert readme in script, f"the walk-through no longer contains {readme!r}: update TINY"
        script = script.replace(readme, test)
    return script


def test_block_is_the_five_steps():
    """Fast (default run): the block's shape, and every size TINY replaces is still there."""
    tiny(readme_block())
    steps = [" ".join(shlex.split(c, comments=True)) for c in commands(readme_block())]
    expected = ["python -m repa_fast.data.prepare", "python -m repa_fast.train",
                "python -m repa_fast.generate", "python -", "python -m repa_fast.evaluate"]
    assert len(steps) == len(expected) and all(
        step.startswith(start + " ") for step, start in zip(steps, expected)), steps


def make_newcomer_folder(root: pathlib.Path) -> None:
    import diffusers
    from PIL import Image

    from repa_fast.evaluation import write_random_inception_weights

    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / "my_images" / name)
        for i in range(PER_CLASS):
            w, h = SIZES[(c + i) % len(SIZES)]
            image = np.empty((h, w, 3), np.uint8)
            image[:] = rng.integers(0, 120, 3)
            image[h // 4:3 * h // 4, w // 4:3 * w // 4, c] = 255   # a class-coloured square
            Image.fromarray(image).save(root / "my_images" / name / f"{i:03d}.png")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 8, 8, 8], norm_num_groups=4,
                                  down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
                                  latent_channels=4, sample_size=256)
    vae.save_pretrained(root / "ckpts" / "sd-vae-ft-ema")
    write_random_inception_weights(root / "ckpts" / "pt_inception-2015-12-05-6726825d.pth")


@pytest.mark.slow
def test_walkthrough_runs(tmp_path):
    script = tiny(readme_block())
    make_newcomer_folder(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")])))
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.pop("REPA_FAST_INCEPTION_WEIGHTS", None)  # the README's default path is used
    traced = "PS4='+ [${SECONDS}s] '\nset -x\n" + script  # each command with its start time
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", traced], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1200)
    log = f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    assert result.returncode == 0, log
    print("\n".join(line for line in result.stderr.splitlines() if line.startswith("+ [")))

    index = json.loads((tmp_path / "data" / "mine256" / "index.json").read_text())
    assert index["num_samples"] == len(CLASSES) * PER_CLASS and index["num_classes"] == 3
    assert index["resolution"] == 256 and index["num_skipped"] == 0
    assert (tmp_path / "exps" / "mine" / "checkpoints" / "0000002.pt").exists()
    assert (tmp_path / "exps" / "mine" / "samples" / "0000002.png").exists()
    npz = tmp_path / "samples" / "SiT-T-4-0000002-size-256-vae-ema-cfg-1.5-seed-0-ode.npz"
    samples = np.load(npz)["arr_0"]
    assert samples.shape == (6, 256, 256, 3) and samples.dtype == np.uint8
    ref = np.load(tmp_path / "my_images_ref.npz")["arr_0"]
    assert ref.shape == (len(CLASSES) * PER_CLASS, 256, 256, 3) and ref.dtype == np.uint8
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_samples"] == 6 and results["num_ref_images"] == len(ref)
    assert all(math.isfinite(results[k]) for k in ("fid", "sfid", "inception_score"))
    assert re.search(r"FID \d+\.\d+ +sFID", result.stdout), log
