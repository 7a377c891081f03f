"""``python -m repa_fast.analyze``: the linear probe, the feature extraction, and the command
on a demo checkpoint (two training steps, in-process) with its demo data set and encoder."""
import json

import numpy as np
import pytest
import torch

from repa_fast.analysis.features import (BlockHooks, NoisyInput, TokenPick, check_blocks,
                                         draw_noise)
from repa_fast.analysis.probe import ProbeConfig, linear_probe
from repa_fast.analyze import build_parser, main
from repa_fast.errors import UsageError

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

TIMES = (0.0, 0.5)
FAST = ["--num-samples", "64", "--times", ",".join(map(str, TIMES)), "--probe-steps", "30",
        "--batch-size", "48", "--enc-type", "demo", "--no-progress"]


# ------------------------------------------------------------------ the probe

def blobs(n: int, d: int, classes: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 3
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, d, generator=g), labels


def test_probe_separates_separable_classes_and_not_random_labels():
    x, y = blobs(200, 16, 4, 0.5, 0)
    noise = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    result = linear_probe(torch.stack([x[:150], noise[:150]]), y[:150],
                          torch.stack([x[150:], noise[150:]]), y[150:], 4,
                          ProbeConfig(steps=60))
    assert result.test_accuracy[0] == 1.0 and result.train_accuracy[0] == 1.0
    assert result.test_accuracy[1] < 0.5  # nothing to learn: about chance (0.25)
    assert result.train_loss[0] < result.train_loss[1]


def test_probe_batched_equals_one_at_a_time():
    sets = [blobs(120, 8, 3, spread, seed) for seed, spread in enumerate((0.5, 2.0, 4.0))]
    train = torch.stack([x[:90] for x, _ in sets])
    test = torch.stack([x[90:] for x, _ in sets])
    y = sets[0][1]
    together = linear_probe(train, y[:90], test, y[90:], 3, ProbeConfig(steps=20))
    for i in range(3):
        alone = linear_probe(train[i:i + 1], y[:90], test[i:i + 1], y[90:], 3,
                             ProbeConfig(steps=20))
        assert alone.test_accuracy[0] == together.test_accuracy[i]
        assert alone.train_loss[0].item() == pytest.approx(together.train_loss[i].item(),
                                                           rel=1e-4)


@pytest.mark.parametrize("config,flag", [(ProbeConfig(steps=0), "--probe-steps"),
                                         (ProbeConfig(lr=0), "--probe-lr"),
                                         (ProbeConfig(weight_decay=-1), "--probe-weight-decay")])
def test_probe_settings_are_checked(config, flag):
    with pytest.raises(ValueError, match=flag):
        config.check()


# ------------------------------------------------------------------ features

def test_hooks_read_every_block_output():
    from repa_fast.models.sit import SiT
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2,
                num_classes=4, z_dims=[16], encoder_depth=2, projector_dim=24).eval()
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero starts blocks as identities: wake them up
            p.normal_(0, 0.2)
    x, t, y = torch.randn(5, 3, 8, 8), torch.rand(5), torch.randint(0, 4, (5,))
    hooks = BlockHooks(model, [1, 2, 3])
    with torch.no_grad():
        _, hidden = model.forward_with_hidden(x, t, y)
        h, c = model._embed(x, t, y)
        for i, block in enumerate(model.blocks):
            h = block(h, c)
            torch.testing.assert_close(hooks.pooled[i + 1], h.mean(1))
            if i + 1 == model.encoder_depth:
                torch.testing.assert_close(hidden, h)
    hooks.remove()
    assert not model.blocks[0]._forward_hooks
    assert not torch.allclose(hooks.pooled[1], hooks.pooled[3])


def test_token_pick_reads_one_token_per_sample_on_the_common_grid():
    # the model's 4x4 grid pooled 2x2 onto the encoder's 2x2 grid; position p of sample i
    model_tokens, encoder_tokens = torch.randn(3, 16, 5), torch.randn(3, 4, 7)
    fractions = torch.tensor([0.0, 0.3, 0.99])  # -> positions 0, 1, 3 of 4
    pick = TokenPick(16, 4, fractions)
    assert pick.positions.tolist() == [0, 1, 3]
    grid = model_tokens.view(3, 2, 2, 2, 2, 5).mean(dim=(2, 4)).reshape(3, 4, 5)
    torch.testing.assert_close(pick.model(model_tokens), grid[torch.arange(3), [0, 1, 3]])
    torch.testing.assert_close(pick.encoder(encoder_tokens),
                               encoder_tokens[torch.arange(3), [0, 1, 3]])
    # the encoder's grid the finer one: it is pooled instead
    swapped = TokenPick(4, 16, fractions)
    torch.testing.assert_close(swapped.encoder(model_tokens), grid[torch.arange(3), [0, 1, 3]])
    # no common grid (3x3 against 2x2), or not square: no per-token numbers
    assert TokenPick.maybe(9, 4, fractions) is None and TokenPick.maybe(8, 4, fractions) is None


def test_hooks_pick_tokens_while_asked():
    from repa_fast.models.sit import SiT
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                num_classes=4, z_dims=[16], encoder_depth=1, projector_dim=24).eval()
    x, t, y = torch.randn(5, 3, 8, 8), torch.rand(5), torch.randint(0, 4, (5,))
    hooks = BlockHooks(model, [2])
    with torch.no_grad():
        model.forward_with_hidden(x, t, y)
        assert hooks.picked == {}
        hooks.pick = TokenPick(16, 4, torch.rand(5))
        model.forward_with_hidden(x, t, y)
        h, c = model._embed(x, t, y)
        for block in model.blocks:
            h = block(h, c)
    torch.testing.assert_close(hooks.picked[2], hooks.pick.model(h))
    hooks.remove()


class Spec:
    def __init__(self, dit: bool, path_type="linear"):
        self.is_dit, self.path_type = dit, path_type


def test_noisy_inputs_on_the_path_and_the_diffusion():
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    sit = NoisyInput(Spec(False))
    for t in (0.0, 0.3, 1.0):
        x_t, time = sit(x0, noise, t)
        torch.testing.assert_close(x_t, (1 - t) * x0 + t * noise)
        assert time.shape == (4,) and float(time[0]) == pytest.approx(t)
    x_t, _ = NoisyInput(Spec(False, "cosine"))(x0, noise, 0.5)
    torch.testing.assert_close(x_t, np.cos(np.pi / 4) * x0 + np.sin(np.pi / 4) * noise)
    dit = NoisyInput(Spec(True))
    x_t, step = dit(x0, noise, 0.5)
    assert step.dtype == torch.int64 and int(step[0]) == 500
    abar = float(dit.diffusion.alphas_cumprod[500])
    torch.testing.assert_close(x_t, abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise)


class T2ISpec:
    is_t2i, model, has_null_class = True, "MMDiT-d4/4", False


def test_models_the_analysis_cannot_run_are_named():
    from repa_fast.analysis.features import check_model
    with pytest.raises(UsageError, match="--ckpt: MMDiT-d4/4 is a text-to-image MMDiT"):
        check_model(T2ISpec(), "null")
    spec = T2ISpec()
    spec.is_t2i = False
    with pytest.raises(UsageError, match="--condition null: .* no null class"):
        check_model(spec, "null")
    check_model(spec, "label")


def test_noise_is_seeded_and_blocks_checked():
    a, b = draw_noise(6, (3, 4, 4), 7)
    assert torch.equal(a, draw_noise(6, (3, 4, 4), 7)[0]) and not torch.equal(a, b)
    assert check_blocks(None, 4) == [1, 2, 3, 4] and check_blocks((3, 1, 3), 4) == [1, 3]
    with pytest.raises(UsageError, match="--blocks"):
        check_blocks((0, 2), 4)


# ------------------------------------------------------------------ the command

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A two-step demo checkpoint and its data set (the sample grid skipped: it is slow)."""
    from repa_fast.train import main as train
    from repa_fast.training.samples import SampleGrids
    out = tmp_path_factory.mktemp("analyze")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SampleGrids, "write", lambda self, step, only_missing=False: None)
        assert train(["--preset", "demo", "--output-dir", str(out), "--max-train-steps", "2",
                      "--checkpointing-steps", "2", "--sampling-steps", "100", "--batch-size",
                      "8", "--report-to", "none"]) == 0
    return out / "demo" / "checkpoints" / "0000002.pt", out / "demo-data", out


def analyze(demo, name, *extra):
    ckpt, data, root = demo
    out = root / name
    code = main(["--ckpt", str(ckpt), "--data-dir", str(data), "--out", str(out), *FAST, *extra])
    return code, out


@pytest.fixture(scope="module")
def record(demo):
    code, out = analyze(demo, "first")
    assert code == 0
    return json.loads((out / "analysis.json").read_text()), out


def test_the_record_holds_every_block_and_time(record):
    found, out = record
    blocks = list(range(1, 9))  # SiT-T/2: 8 blocks
    assert found["format"] == "repa_fast-analysis-v1"
    assert found["times"] == list(TIMES) and found["blocks"] == blocks
    assert found["checkpoint"]["model"]["model"] == "SiT-T/2"
    assert found["data"]["num_samples"] == 64 and found["data"]["num_classes"] == 12
    (encoder,) = found["encoders"]
    assert encoder["name"] == "demo" and encoder["embed_dim"] == 64
    for key in ("cknna", "cknna_token"):  # SiT-T/2's 8x8 tokens at 16 px, the encoder's 8x8
        cknna = np.array(encoder[key], dtype=float)
        assert cknna.shape == (len(TIMES), len(blocks)) and np.isfinite(cknna).all()
        assert (cknna > -0.5).all() and (cknna <= 1).all()
    assert encoder["cknna_token"] != encoder["cknna"]
    probe = found["probe"]
    for key in ("accuracy", "train_accuracy"):
        values = np.array(probe[key], dtype=float)
        assert values.shape == (len(TIMES), len(blocks))
        assert ((values >= 0) & (values <= 1)).all()
    assert probe["num_train"] + probe["num_test"] == 64 and probe["num_classes"] == 12
    assert 0 <= encoder["probe"]["accuracy"] <= 1
    (projection,) = found["projection"]
    assert projection["block"] == 2 and len(projection["cknna"]) == len(TIMES)
    # training ran two steps of REPA: the projections lean towards the targets already
    assert all(-1 <= c <= 1 for c in projection["cosine"]) and projection["cosine"][0] > 0
    assert set(found["versions"]) >= {"repa_fast", "torch", "numpy", "python", "matplotlib"}
    assert found["settings"]["knn"] == 10 and found["settings"]["seed"] == 0
    png = (out / "analysis.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_two_runs_write_the_same_numbers(demo, record):
    code, out = analyze(demo, "second", "--no-plot")
    assert code == 0
    assert json.loads((out / "analysis.json").read_text()) == record[0]
    assert not (out / "analysis.png").exists()


def test_another_seed_chooses_other_samples(demo, record):
    code, out = analyze(demo, "seed", "--no-plot", "--no-probe", "--seed", "1", "--blocks",
                        "1,8", "--no-per-token")
    assert code == 0
    found = json.loads((out / "analysis.json").read_text())
    assert found["blocks"] == [1, 8] and found["probe"] is None
    assert found["encoders"][0]["cknna_token"] is None and found["settings"]["per_token"] is False
    assert found["encoders"][0]["cknna"] != [[row[0], row[7]] for row in
                                             record[0]["encoders"][0]["cknna"]]


@pytest.mark.parametrize("flags,named", [
    (["--times", "0,2"], "--times"), (["--times", "a"], "--times"),
    (["--blocks", "0,3"], "--blocks"), (["--blocks", "9"], "--blocks"),
    (["--enc-type", "dino-x"], "--enc-type"), (["--knn", "64"], "--knn"),
    (["--num-samples", "2"], "--num-samples"), (["--probe-steps", "0"], "--probe-steps"),
    (["--probe-train-fraction", "1"], "--probe-train-fraction"), (["--device", "tpu"], "--device"),
    (["--enc-weights", "/nonexistent/enc.pth", "--enc-type", "dinov2-vit-s"], "--enc-type"),
])
def test_bad_flags_exit_2_naming_the_flag(demo, capsys, flags, named):
    code, _ = analyze(demo, "bad", *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and named in err[0], err


def test_missing_inputs_exit_2(demo, tmp_path, capsys):
    ckpt, data, _ = demo
    for argv, named in [(["--ckpt", str(tmp_path / "no.pt"), "--data-dir", str(data)], "--ckpt"),
                        (["--ckpt", str(ckpt), "--data-dir", str(tmp_path / "none")],
                         "--data-dir"),
                        (["--ckpt", str(ckpt), "--data-dir", str(tmp_path)], "--data-dir")]:
        assert main([*argv, "--out", str(tmp_path / "out"), *FAST]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err
    (tmp_path / "file").write_text("")
    assert main(["--ckpt", str(ckpt), "--data-dir", str(data), "--out", str(tmp_path / "file"),
                 *FAST]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_bare_dit_state_dict(demo, tmp_path):
    """A DiT (here random, from a bare state dict) sees its diffusion's x_s, s = round(t·999)."""
    from repa_fast.models import DiT_models
    model = DiT_models["DiT-T/4"](input_size=16, in_channels=3, num_classes=12, z_dims=[64],
                                  encoder_depth=2, class_dropout_prob=0.1)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    _, data, _ = demo
    assert main(["--ckpt", str(tmp_path / "dit.pt"), "--data-dir", str(data), "--out",
                 str(tmp_path), "--num-classes", "12", "--encoder-depth", "2", "--blocks", "1,2",
                 "--no-probe", "--no-plot", *FAST]) == 0
    found = json.loads((tmp_path / "analysis.json").read_text())
    assert found["checkpoint"]["model"]["model"] == "DiT-T/4"
    assert np.array(found["encoders"][0]["cknna"]).shape == (len(TIMES), 2)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--times", "--blocks", "--num-samples", "--knn", "--probe-steps", "--seed",
                 "--batch-size", "--enc-type", "--enc-weights", "--condition", "--device"):
        assert flag in text
    assert "(default: 0,0.25,0.5,0.75)" in text and "(default: 10)" in text
    assert "(default: the checkpoint's, else dinov2-vit-b)" in text
