"""The demo's trained encoder and shape judge: they learn the shapes, are cached once per
machine (the test session's REPA_FAST_CACHE), and bad or damaged files are named or redone."""
import os

import pytest
import torch

from repa_fast.analysis.shape_judge import (accuracies, judge_features, judge_path, load_judge,
                                            reference_shapes)
from repa_fast.errors import UsageError
from repa_fast.evaluation.metrics import FeatureStats, frechet_distance
from repa_fast.training.demo_encoder import (FORMAT, VERSION, backbone, demo_encoder,
                                             draw_shapes, save_weights_file, trained_path)


@pytest.fixture(scope="module")
def encoder():
    return demo_encoder(32, "trained")


@pytest.fixture(scope="module")
def judge():
    return load_judge(32)


def head_accuracy(encoder, images, labels) -> float:
    backbone = encoder.backbone
    tokens = encoder(images)  # the REPA targets: normed patch tokens [B, 64, 64]
    logits = backbone.head(tokens.amax(dim=1))
    return float((logits.argmax(1) == labels).float().mean())


def test_the_trained_encoder_tells_the_shapes_apart(encoder):
    images, labels = draw_shapes(240, 32, seed=99)  # fresh draws, never trained on
    assert encoder(images).shape == (240, 64, 64)
    assert head_accuracy(encoder, images, labels) > 0.95
    saved = torch.load(trained_path(32), weights_only=True)
    assert saved["format"] == FORMAT and saved["version"] == VERSION and saved["accuracy"] > 0.95


def test_random_weights_are_fixed_and_know_nothing(encoder):
    images, labels = draw_shapes(240, 32, seed=98)
    first, second = demo_encoder(32, "random"), demo_encoder(32, "random")
    torch.testing.assert_close(first(images[:4]), second(images[:4]))
    assert head_accuracy(first, images, labels) < 0.4
    assert not torch.allclose(first(images[:4]), encoder(images[:4]))


def test_the_cache_is_used_and_a_damaged_one_redone(encoder, capsys):
    path = trained_path(32)
    stamp = os.stat(path).st_mtime_ns
    demo_encoder(32, "trained")
    assert os.stat(path).st_mtime_ns == stamp  # read, not trained again
    with open(path, "wb") as f:
        f.write(b"torn")
    redone = demo_encoder(32, "trained")
    out = capsys.readouterr().out
    assert f"the cached demo encoder (a tiny ViT shape classifier, 300 steps), {path}: not a " \
        f"readable repa_fast demo encoder file" in out and "; training it again" in out
    images, _ = draw_shapes(8, 32, seed=97)
    torch.testing.assert_close(redone(images), encoder(images))  # the same recipe, seeded


def test_weight_files_are_checked(tmp_path):
    with pytest.raises(UsageError, match="--enc-weights .*nothing.pt: no such file"):
        demo_encoder(32, str(tmp_path / "nothing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(UsageError, match="garbage.pt: not a readable"):
        demo_encoder(32, str(garbage))
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(UsageError, match="not a repa_fast demo encoder file"):
        demo_encoder(32, str(other))
    wrong = tmp_path / "wrong.pt"
    save_weights_file(backbone(64), FORMAT, VERSION, 64, 0.5, str(wrong))
    with pytest.raises(UsageError, match="at 64 px; expected version 1 at 32 px"):
        demo_encoder(32, str(wrong))
    with pytest.raises(UsageError, match="--resolution 30: .*multiple of 8, at least 16"):
        backbone(30)
    # a file the demo wrote loads as the one it is
    mine = tmp_path / "mine.pt"
    save_weights_file(backbone(32), FORMAT, VERSION, 32, 0.1, str(mine))
    assert demo_encoder(32, str(mine)).embed_dim == 64


def test_the_judge_sees_the_class_of_real_shapes(judge):
    images, labels = reference_shapes(240, 32)
    feats, predicted = judge_features(judge, images)
    assert feats.shape == (240, 64)
    scores = accuracies(predicted, labels)
    assert scores["class_accuracy"] > 0.95 and scores["shape_accuracy"] > 0.95
    assert scores["colour_accuracy"] > 0.95
    assert os.path.exists(judge_path(32))


def test_accuracies_split_shape_and_colour():
    labels = torch.tensor([0, 1, 2, 3])       # red disc, red square, red triangle, green disc
    predicted = torch.tensor([0, 2, 5, 3])    # right, wrong shape, wrong colour, right
    assert accuracies(predicted, labels) == dict(class_accuracy=0.5, shape_accuracy=0.75,
                                                 colour_accuracy=0.75)


def test_the_judge_distance_orders_real_noise_and_blobs(judge):
    real, _ = reference_shapes(600, 32)
    others, labels = draw_shapes(600, 32, seed=96)
    noise = torch.randint(0, 256, others.shape, dtype=torch.uint8)
    # blobs: every shape blurred into a soft disc of its colour
    blobs = torch.nn.functional.avg_pool2d(others.float(), 9, 1, 4).round().to(torch.uint8)

    def fd(images):
        stats = [FeatureStats.from_activations(judge_features(judge, x)[0])
                 for x in (real, images)]
        return frechet_distance(*stats)

    assert fd(others) < fd(blobs) < fd(noise)
    assert accuracies(judge_features(judge, noise)[1], labels)["class_accuracy"] < 0.3
