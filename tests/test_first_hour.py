"""The first hour of a new user: each mistake a newcomer makes ends in one line that names the
flag, what was expected, what was given and the way out; the training run says what it does."""
import os

import pytest
import torch

from repa_fast.train import main as train_main

pytest.importorskip("tqdm")


def demo_args(out, *extra):
    return ["--preset", "demo", "--output-dir", str(out), "--batch-size", "8",
            "--max-train-steps", "2", "--checkpointing-steps", "2", "--sampling-steps", "1",
            "--log-every", "1", "--report-to", "none", *extra]


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_resolution_the_encoder_cannot_take_names_flag_encoder_and_way_out(tmp_path, capsys):
    code = train_main(["--data-dir", str(tmp_path / "data64"), "--resolution", "64",
                       "--output-dir", str(tmp_path)])
    assert code == 2
    line = error_line(capsys)
    assert line.startswith("error: --resolution 64:")
    assert "--enc-type dinov2-vit-b" in line and "256 or 512" in line
    assert "--enc-type demo" in line and "--enc-weights random" in line


def test_512_with_an_encoder_that_runs_at_256_only(tmp_path, capsys):
    code = train_main(["--resolution", "512", "--enc-type", "mae-vit-l",
                       "--output-dir", str(tmp_path)])
    assert code == 2
    line = error_line(capsys)
    assert "--resolution 512" in line and "--enc-type mae-vit-l" in line and "256 px only" in line
    assert "dinov2-vit-b" in line


def test_missing_default_encoder_weights_name_the_file_and_random(tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ckpts/ folder here
    code = train_main(["--output-dir", str(tmp_path)])
    assert code == 2
    line = error_line(capsys)
    assert line.startswith("error: --enc-weights ckpts:")
    assert "dinov2_vitb14_pretrain.pth" in line and "--enc-weights random" in line
    assert "--enc-type dinov2-vit-b" in line


def test_ds_config_without_deepspeed_says_which_extra(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    code = train_main(demo_args(tmp_path, "--ds_config", "configs/ds/zero2.json"))
    assert code == 2
    line = error_line(capsys)
    assert "--ds_config" in line and "pip install 'repa_fast[deepspeed]'" in line


def test_missing_data_dir_with_the_demo_preset_does_not_suggest_the_demo_preset(tmp_path,
                                                                              capsys):
    code = train_main(demo_args(tmp_path, "--data-dir", str(tmp_path / "nope")))
    assert code == 2
    line = error_line(capsys)
    assert "does not exist" in line and "use --preset demo" not in line
    assert "leave out --data-dir" in line


def test_missing_data_dir_without_a_preset_suggests_the_demo(tmp_path, capsys):
    code = train_main(["--data-dir", str(tmp_path / "nope"), "--enc-weights", "random",
                       "--output-dir", str(tmp_path)])
    assert code == 2
    assert "--preset demo" in error_line(capsys)


def test_batch_size_larger_than_the_data_set_is_refused_naming_the_flag(tmp_path, capsys):
    code = train_main(demo_args(tmp_path, "--batch-size", "5000"))
    assert code == 2
    line = error_line(capsys)
    assert line.startswith("error: --batch-size 5000:") and "2400 samples" in line


def test_fewer_classes_in_the_data_than_num_classes_warns_naming_both(tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"--num-classes 20: .* has 12 classes"):
        assert train_main(demo_args(tmp_path, "--num-classes", "20", "--max-train-steps",
                                    "1", "--checkpointing-steps", "1")) == 0


def test_the_run_says_what_it_does(tmp_path, capsys):
    assert train_main(demo_args(tmp_path, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    ckpt_dir = os.path.join(str(tmp_path), "demo", "checkpoints")
    assert f"--resume auto: no checkpoint in {ckpt_dir}: starting at step 0" in out
    # every grid is announced, the last one included
    assert "writing the sample grid of step 1 (50 sampling steps)..." in out
    assert "writing the sample grid of step 2 (50 sampling steps)..." in out
    assert train_main(demo_args(tmp_path, "--resume", "auto", "--max-train-steps", "3")) == 0
    out = capsys.readouterr().out
    assert (f"--resume auto: resuming from {os.path.join(ckpt_dir, '0000002.pt')} at step 2"
            in out)


# ------------------------------------------------------------------ evaluate, info, generate

def test_inception_weights_that_are_a_text_file_are_called_a_text_file(tmp_path, capsys):
    pytest.importorskip("torch_fidelity")
    from repa_fast.evaluate import main as evaluate_main
    weights = tmp_path / "pt_inception.pth"
    weights.write_text("Not Found\n")  # what a failed download often leaves
    images = tmp_path / "s.npz"
    import numpy as np
    np.savez(images, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    code = evaluate_main(["--samples", str(images), "--ref", str(images), "--inception-weights",
                          str(weights), "--quiet", "--device", "cpu"])
    assert code == 2
    line = error_line(capsys)
    assert "--inception-weights" in line and "a text file (starting 'Not Found')" in line


def test_describe_file_names_html_binary_and_empty_files(tmp_path):
    from repa_fast.evaluation.inception import describe_file
    (tmp_path / "a").write_bytes(b"<!DOCTYPE html><html>")
    (tmp_path / "b").write_bytes(b"\x00\x01\x02\xff\xfe")
    (tmp_path / "c").write_bytes(b"")
    assert describe_file(tmp_path / "a").startswith("an HTML page")
    assert describe_file(tmp_path / "b") == \
        "neither a zip nor a pickle (first bytes 00 01 02 ff fe)"
    assert describe_file(tmp_path / "c") == "an empty file"


def test_info_tells_never_built_from_fails_to_load(monkeypatch):
    import importlib.util

    from repa_fast import info
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "repa_fast._C" else real(name, *a))
    line = info.native_extension_line()
    assert line.startswith("not built (optional") and "rebuild" not in line
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(info, "native_import_problem", lambda: "the extension does not load")
    if real("repa_fast._C") is not None:
        assert info.native_extension_line().startswith("built (")
        assert "but fails to load: the extension does not load" in info.native_extension_line()


def test_info_has_help(capsys):
    from repa_fast import info
    with pytest.raises(SystemExit) as exit_info:
        info.main(["--help"])
    assert exit_info.value.code == 0
    assert "which attention" in capsys.readouterr().out


def test_generate_takes_the_checkpoints_vae_when_none_is_given(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from tiny_vae import save_tiny_vae

    from repa_fast.generate import main as generate_main
    from repa_fast.models import SiT_models
    save_tiny_vae(tmp_path / "my-vae")
    sit = SiT_models["SiT-T/2"](input_size=4, in_channels=4, num_classes=5,
                                class_dropout_prob=0.1, z_dims=[64], encoder_depth=2,
                                projector_dim=32)
    args = dict(model="SiT-T/2", num_classes=5, encoder_depth=2, projector_dim=32,
                resolution=32, cfg_prob=0.1, qk_norm=False, fused_attn=True,
                path_type="linear", enc_type="demo", vae=str(tmp_path / "my-vae"))
    ckpt = tmp_path / "latent.pt"
    torch.save(dict(ema=sit.state_dict(), args=args), ckpt)
    code = generate_main(["--ckpt", str(ckpt), "--sample-dir", str(tmp_path / "s"), "--grid",
                          "--class-labels", "1", "--seeds", "0", "--num-steps", "1",
                          "--out", str(tmp_path / "g.png")])
    assert code == 0 and (tmp_path / "g.png").exists()
    out = capsys.readouterr().out
    assert f"--vae not given: decoding with the training run's VAE {tmp_path / 'my-vae'}" in out


def test_an_older_demo_set_is_written_again_and_a_foreign_one_refused(tmp_path, capsys):
    """A demo folder from before the 16 px demo (or of another size) is replaced by the
    current one; a folder holding someone's own data set is never touched."""
    import json

    from repa_fast.data.demo import DATA_VERSION, make_demo_dataset
    from repa_fast.data.shards import INDEX
    from repa_fast.errors import UsageError
    dest = tmp_path / "demo-data"
    make_demo_dataset(str(dest), num_samples=24, size=32, shard_size=12)
    index = json.loads((dest / INDEX).read_text())
    del index["demo_version"]  # as the first demo wrote it
    (dest / INDEX).write_text(json.dumps(index))
    make_demo_dataset(str(dest), num_samples=24, size=16, shard_size=12)
    assert "an older or other-sized demo set (version 1, 32 px): written again" in \
        capsys.readouterr().out
    index = json.loads((dest / INDEX).read_text())
    assert (index["resolution"], index["demo_version"]) == (16, DATA_VERSION)
    stamp = (dest / INDEX).stat().st_mtime_ns
    make_demo_dataset(str(dest), num_samples=24, size=16, shard_size=12)  # reused as it is
    assert (dest / INDEX).stat().st_mtime_ns == stamp
    index["tool"], index["source_kind"] = "repa_fast prepare", "folder"
    (dest / INDEX).write_text(json.dumps(index))
    with pytest.raises(UsageError, match="not the built-in demo's"):
        make_demo_dataset(str(dest), num_samples=24, size=32, shard_size=12)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["index.json", "shard-000000.json", "shard-000000.tar", "shard-000001.json",
         "shard-000001.tar"])
