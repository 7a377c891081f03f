"""Text-to-image training (--model MMDiT-*, the official train_t2i.py): the demo-t2i preset on
the CPU, contexts and the CFG dropout to the empty caption, grids with their captions, and the
model / data-set kind checks. Exact resume: test_train.py's resume test, parametrized."""
import json

import numpy as np
import pytest
import torch

from repa_fast.train import main
from repa_fast.training.checkpoint_files import list_checkpoints
from repa_fast.training.config import parse_args
from repa_fast.training.step import TrainStep, step_draws

pytest.importorskip("tqdm")


def t2i_args(out, *extra):
    return ["--preset", "demo-t2i", "--output-dir", str(out), "--batch-size", "8",
            "--max-train-steps", "6", "--checkpointing-steps", "6", "--sampling-steps", "6",
            "--report-to", "none", *extra]


def records(out):
    with open(out / "demo-t2i" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_demo_t2i_trains_checkpoints_and_writes_captioned_grids(tmp_path):
    assert main(t2i_args(tmp_path, "--max-train-steps", "12", "--checkpointing-steps", "12",
                         "--sampling-steps", "12")) == 0
    run = tmp_path / "demo-t2i"
    losses = [r["loss"] for r in records(tmp_path)]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert sum(losses[-3:]) < sum(losses[:3])  # falling
    assert list_checkpoints(str(run / "checkpoints")) == [12]
    ckpt = torch.load(run / "checkpoints" / "0000012.pt", weights_only=True)
    assert ckpt["args"]["model"] == "MMDiT-d4/4"
    # the official MMDiT layout: joint blocks, a context embedder from the 64-wide demo features
    assert ckpt["model"]["context_embedder.weight"].shape == (128, 64)
    assert (run / "samples" / "0000012.png").exists()
    lines = (run / "samples" / "captions.txt").read_text().splitlines()
    assert len(lines) == 16 and lines[0].startswith("row 1, column 1: ")


def test_condition_drops_contexts_to_the_empty_caption():
    """Dropped rows (the step's CFG draws) take the empty caption's context, the others keep
    theirs; class-conditional models get labels and force_drop_ids instead."""
    config = parse_args(["--preset", "demo-t2i", "--cfg-prob", "0.5"])
    empty = torch.full((16, 64), 7.0)
    step = TrainStep(config, torch.device("cpu"), None, None, [], None, None, (3, 32, 32),
                     empty_context=empty)
    contexts = torch.randn(8, 16, 64)
    drop = step_draws(config, 5, 8, (3, 32, 32), 0, 1).drop
    assert 0 < int(drop.sum()) < 8  # both kinds of rows are present
    got = step.condition(contexts, drop)["context"]
    assert torch.equal(got[drop], empty.expand(int(drop.sum()), 16, 64))
    assert torch.equal(got[~drop], contexts[~drop])
    no_cfg = TrainStep(parse_args(["--preset", "demo-t2i", "--cfg-prob", "0"]),
                       torch.device("cpu"), None, None, [], None, None, (3, 32, 32),
                       empty_context=empty)
    assert torch.equal(no_cfg.condition(contexts, drop)["context"], contexts)
    labels = TrainStep(parse_args(["--preset", "demo"]), torch.device("cpu"), None, None, [],
                       None, None, (3, 32, 32)).condition(torch.arange(8), drop)
    assert torch.equal(labels["force_drop_ids"], drop.long()) and "context" not in labels


def test_the_model_receives_the_batch_contexts(tmp_path, monkeypatch):
    """What reaches MMDiT.forward is the loader's contexts (CFG off), under context=."""
    from repa_fast.models.mmdit import MMDiT
    seen = []
    real = MMDiT.forward

    def spy(self, x, t, y=None, context=None, *args, **kwargs):
        seen.append(context.detach().clone())
        return real(self, x, t, y, context, *args, **kwargs)
    monkeypatch.setattr(MMDiT, "forward", spy)
    assert main(t2i_args(tmp_path, "--max-train-steps", "1", "--cfg-prob", "0",
                         "--sampling-steps", "100", "--checkpointing-steps", "100")) == 0
    from repa_fast.data import LoaderConfig, make_loader
    loader = make_loader(LoaderConfig(str(tmp_path / "demo-t2i-data"), batch_size=8, seed=0,
                                      num_workers=0))
    _, _, contexts, captions = next(iter(loader))
    assert captions.dtype == torch.int64 and contexts.shape == (8, 16, 64)
    torch.testing.assert_close(seen[0], contexts.float())


@pytest.mark.parametrize("argv, message", [
    (["--model", "SiT-T/4"], "is class-conditional, but the data set"),
    (["--preset", "demo", "--model", "MMDiT-d4/4", "--encoder-depth", "2"],
     "is a text-to-image model, but the data set"),
    (["--model", "MMDiT-d4/4", "--encoder-depth", "6"], "encoder_depth"),
])
def test_model_and_data_of_different_kinds_exit_2(tmp_path, capsys, argv, message):
    assert main(t2i_args(tmp_path, *argv)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_demo_t2i_grid_follows_the_caption_colours(tmp_path):
    """After the preset's 400 steps (about a minute), each grid cell's brightest pixels have the
    colour its caption names."""
    assert main(["--preset", "demo-t2i", "--output-dir", str(tmp_path), "--report-to",
                 "none"]) == 0
    from PIL import Image
    run = tmp_path / "demo-t2i" / "samples"
    grid = np.asarray(Image.open(run / "0000400.png")).astype(float)
    captions = [line.split(": ", 1)[1] for line in
                (run / "captions.txt").read_text().splitlines()]
    colours = {"red": 0, "green": 1, "blue": 2}
    right = total = 0
    for i, caption in enumerate(captions):
        word = next((w for w in colours if w in caption.split()), None)
        if word is None:
            continue  # yellow: two channels
        cell = grid[(i // 4) * 32:(i // 4 + 1) * 32, (i % 4) * 32:(i % 4 + 1) * 32]
        bright = cell[cell.sum(-1) > np.percentile(cell.sum(-1), 80)]
        right += int(np.argmax(bright.mean(0)) == colours[word])
        total += 1
    assert total >= 8 and right >= total - 1, (right, total)
