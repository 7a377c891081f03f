"""DiT in the training loop (--model DiT-*): the Gaussian diffusion's hybrid loss + REPA, the
demo on the CPU, the step against an independent computation, DiT's flag names, SiT-only flags
refused. Exact resume of DiT runs: test_train.py's resume test, parametrized over both."""
import copy
import json

import pytest
import torch

from repa_fast.diffusion import create_diffusion
from repa_fast.train import main
from repa_fast.training.build import build_model
from repa_fast.training.checkpoint_files import list_checkpoints
from repa_fast.training.config import TrainConfig, parse_args
from repa_fast.training.encoders import build_encoders
from repa_fast.training.step import TrainStep, step_draws
from repa_fast.vae import sample_posterior

pytest.importorskip("tqdm")


def dit_args(out, *extra):
    return ["--preset", "demo", "--model", "DiT-T/4", "--output-dir", str(out),
            "--batch-size", "8", "--max-train-steps", "6", "--checkpointing-steps", "3",
            "--sampling-steps", "6", "--report-to", "none", *extra]


def records(out):
    with open(out / "demo" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_dit_demo_trains_checkpoints_and_samples(tmp_path):
    assert main(dit_args(tmp_path, "--max-train-steps", "12", "--checkpointing-steps", "12",
                         "--sampling-steps", "12")) == 0
    run = tmp_path / "demo"
    losses = [r["loss"] for r in records(tmp_path)]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])  # falling
    assert list_checkpoints(str(run / "checkpoints")) == [12]
    ckpt = torch.load(run / "checkpoints" / "0000012.pt", weights_only=True)
    assert ckpt["args"]["model"] == "DiT-T/4"
    # learned σ: the final layer maps to 2·3 channels per pixel of a 4x4 patch
    assert ckpt["model"]["final_layer.linear.weight"].shape[0] == 4 * 4 * 6
    assert (run / "samples" / "0000012.png").exists()


def test_dit_step_loss_equals_an_independent_computation():
    config = parse_args(["--preset", "demo", "--model", "DiT-T/4", "--batch-size", "4"])
    torch.manual_seed(0)
    encoders = build_encoders(config, torch.device("cpu"), torch.float32)
    model = build_model(config, 3, 16, [e.embed_dim for e in encoders]).train()
    reference = copy.deepcopy(model)
    step = TrainStep.build(config, model, encoders, torch.device("cpu"), x_shape=(3, 16, 16))
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=gen)
    moments = torch.cat([torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1,
                         torch.full((4, 3, 16, 16), 0.01)], dim=1)
    labels = torch.randint(0, config.num_classes, (4,), generator=gen)
    out = step(5, images, moments, labels)

    draws = step_draws(config, 5, 4, (3, 16, 16), 0, 1)
    assert draws.time.dtype == torch.int64 and 0 <= draws.time.min() <= draws.time.max() < 1000
    x = sample_posterior(moments, 1.0, noise=draws.eps)
    with torch.no_grad():
        zs = [encoder(images) for encoder in encoders]
    found = []

    def eps_model(x_t, t, **kwargs):  # the model's alignment path, as for SiT
        output, proj_loss = reference(x_t, t, **kwargs, align_to=zs)
        found.append(proj_loss)
        return output

    kwargs = dict(y=labels, force_drop_ids=draws.drop.to(torch.int64))
    terms = create_diffusion(timestep_respacing="").training_losses(
        eps_model, x, draws.time, kwargs, noise=draws.noise)
    assert "vb" in terms  # the hybrid loss of the learned σ
    torch.testing.assert_close(out.loss, terms["loss"].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.proj_loss, found[0], rtol=1e-5, atol=1e-6)


def test_dit_train_py_flag_names_are_aliases():
    config = parse_args(["--model", "DiT-XL/2", "--global-batch-size", "64", "--global-seed",
                         "3", "--ckpt-every", "500", "--results-dir", "res", "--data-path",
                         "data/x", "--image-size", "512", "--log-every", "7"])
    assert (config.model, config.batch_size, config.seed, config.checkpointing_steps) == \
           ("DiT-XL/2", 64, 3, 500)
    assert (config.output_dir, config.data_dir, config.resolution, config.log_every) == \
           ("res", "data/x", 512, 7)
    config.check()  # a DiT name is a --model choice


@pytest.mark.parametrize("flag", [["--path-type", "cosine"], ["--weighting", "lognormal"]])
def test_sit_only_flags_are_refused_for_dit(flag):
    config = TrainConfig(**{**vars(parse_args(["--model", "DiT-B/4", *flag]))})
    with pytest.raises(ValueError, match=f"{flag[0]} {flag[1]}: SiT only"):
        config.check()
    parse_args(["--model", "SiT-B/2", *flag]).check()  # SiT takes them


def test_sit_only_flag_with_dit_exits_2(tmp_path, capsys):
    assert main(dit_args(tmp_path, "--path-type", "cosine")) == 2
    assert "SiT only" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_dit_bf16_autocast_trains_close_to_fp32(tmp_path):
    """--mixed-precision bf16: the model under bf16 autocast, the diffusion's maths in float32;
    the first steps' losses follow the fp32 run's within bf16's tolerance."""
    assert main(dit_args(tmp_path / "bf16", "--max-train-steps", "3", "--checkpointing-steps",
                         "3", "--mixed-precision", "bf16")) == 0
    assert main(dit_args(tmp_path / "fp32", "--max-train-steps", "3", "--checkpointing-steps",
                         "3", "--mixed-precision", "no")) == 0
    got, want = records(tmp_path / "bf16"), records(tmp_path / "fp32")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=3e-2)
    assert [r["proj_loss"] for r in got] == pytest.approx([r["proj_loss"] for r in want],
                                                          rel=3e-2)
    assert [r["loss"] for r in got] != [r["loss"] for r in want]  # bf16 did run


def test_dit_loss_maths_run_in_float32_under_autocast():
    """The model's bf16 output reaches the diffusion as float32: the hybrid loss equals the one
    computed from that output upcast by hand, and is float32."""
    from repa_fast.training.dit_loss import DiTLoss
    torch.manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 400, 999])
    weight = torch.randn(4, 2, 1, 1)

    def model(x, tt, **kwargs):
        out = torch.nn.functional.conv2d(x, weight)
        return out, []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = DiTLoss(fused=False)(model, x0, {}, [], time=t, noise=noise)
        out_bf16 = torch.nn.functional.conv2d(create_diffusion("").q_sample(x0, t, noise), weight)
    assert loss.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    want = create_diffusion("").training_losses(lambda *a, **k: out_bf16.float(), x0, t,
                                                noise=noise)["loss"]
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
