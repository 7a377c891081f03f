"""CLIP score (`evaluate --clip-model`): 100·mean max(cos, 0) of the image and caption
embeddings of a local CLIP, checked against CLIPModel's own logits, and its input errors."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from tiny_clip import save_tiny_clip  # noqa: E402

from repa_fast import evaluate as cli  # noqa: E402
from repa_fast.evaluation.clip_score import CLIPScorer  # noqa: E402

CAPTIONS = ["a red circle on the left", "a small blue square", "", "a yellow triangle at the top",
            "two green discs"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def samples_npz(path, n=5, seed=0, captions=CAPTIONS):
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    arrays = {"arr_0": images}
    if captions is not None:
        arrays["captions"] = np.array(captions[:n])
    np.savez(path, **arrays)
    return images


def expected_score(clip_dir, images, captions):
    """From CLIPModel.forward's logits: logits_per_image = exp(logit_scale)·cos, so the
    diagonal over exp(logit_scale) is each pair's cosine."""
    from transformers import CLIPModel
    scorer = CLIPScorer(clip_dir)  # only for its tokenizer and processor
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    pixels = scorer.processor(images=list(images), return_tensors="pt")["pixel_values"]
    tokens = scorer.tokenizer(list(captions), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    cos = out.logits_per_image.diagonal().double() / model.logit_scale.exp().double()
    return float(100 * cos.clamp(min=0).mean())


def run(argv, capsys):
    code = cli.main(argv + ["--quiet", "--device", "cpu"])
    out = capsys.readouterr()
    return code, out


def test_clip_score_equals_the_models_own_logits(clip_dir, tmp_path, capsys):
    images = samples_npz(tmp_path / "s.npz")
    code, out = run(["--samples", str(tmp_path / "s.npz"), "--clip-model", clip_dir,
                     "--batch-size", "2"], capsys)
    assert code == 0, out.err
    result = json.loads(out.out)["clip"]
    assert result["count"] == 5 and result["projection_dim"] == 16
    assert result["clip_score"] == pytest.approx(expected_score(clip_dir, images, CAPTIONS),
                                                 rel=1e-5, abs=1e-6)


def test_captions_file_and_a_wrong_pairing_change_the_score(clip_dir, tmp_path, capsys):
    samples_npz(tmp_path / "s.npz", captions=None)
    scores = []
    for order in (CAPTIONS, CAPTIONS[::-1]):
        (tmp_path / "c.txt").write_text("\n".join(c or "-" for c in order) + "\n")
        code, out = run(["--samples", str(tmp_path / "s.npz"), "--clip-model", clip_dir,
                         "--captions", str(tmp_path / "c.txt")], capsys)
        assert code == 0, out.err
        scores.append(json.loads(out.out)["clip"]["clip_score"])
    assert scores[0] != pytest.approx(scores[1])


def test_num_samples_scores_the_first_n(clip_dir, tmp_path, capsys):
    images = samples_npz(tmp_path / "s.npz")
    code, out = run(["--samples", str(tmp_path / "s.npz"), "--clip-model", clip_dir,
                     "--num-samples", "3"], capsys)
    assert code == 0, out.err
    assert json.loads(out.out)["clip"]["clip_score"] == pytest.approx(
        expected_score(clip_dir, images[:3], CAPTIONS[:3]), rel=1e-5, abs=1e-6)


def test_ref_is_required_without_clip_model(tmp_path, capsys):
    samples_npz(tmp_path / "s.npz")
    with pytest.raises(SystemExit) as info:
        cli.main(["--samples", str(tmp_path / "s.npz")])
    assert info.value.code == 2 and "--ref is required" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("captions_alone", "--captions is for the CLIP score"),
    ("missing_folder", "--clip-model: expected a local transformers CLIP folder"),
    ("no_weights", "missing model.safetensors or pytorch_model.bin"),
    ("no_captions_array", "holds no 'captions' array; pass --captions"),
    ("count_mismatch", "3 captions for 5 images"),
])
def test_bad_inputs_exit_2_naming_the_argument(clip_dir, tmp_path, capsys, case, message):
    samples_npz(tmp_path / "s.npz", captions=None if case == "no_captions_array" else CAPTIONS)
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    argv = {"captions_alone": ["--ref", str(tmp_path / "s.npz"), "--captions",
                               str(tmp_path / "three.txt")],
            "missing_folder": ["--clip-model", str(tmp_path / "nope")],
            "no_weights": ["--clip-model", str(tmp_path / "empty")],
            "no_captions_array": ["--clip-model", clip_dir],
            "count_mismatch": ["--clip-model", clip_dir, "--captions",
                               str(tmp_path / "three.txt")]}[case]
    code, out = run(["--samples", str(tmp_path / "s.npz"), *argv], capsys)
    assert code == 2 and message in out.err, out.err
