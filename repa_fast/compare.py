"""REPA against no REPA on the demo: the same run twice, once with ``--proj-coeff 0``.

    python -m repa_fast.compare [--out exps/compare] [--max-train-steps N] [--seed S]
        [any other python -m repa_fast.train flag, e.g. --model SiT-T/2]

Trains ``--preset demo`` as ``OUT/repa`` (``--proj-coeff``, 0.5 by default as the paper) and
``OUT/baseline`` (``--proj-coeff 0``: the projector is built but its loss is not used), same
seed, data, steps and everything else; a finished run is reused and an interrupted one
resumed (``--resume auto``). Then measures both (:mod:`repa_fast.analysis.demo_compare`): the
denoising loss on held-out shapes, CKNNA with the demo encoder (the block the projector
reads, and the best block), the linear probe, and the shape judge's verdict on samples of
every class. Writes ``OUT/compare.json`` (every number, both analyses), ``OUT/compare.png``
(the two runs' samples, one row per class) and prints a table.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

from .cli_help import HelpFormatter
from .errors import USAGE_AND_VALUE, UsageError, run_cli

ARMS = ("repa", "baseline")
# flags compare sets itself on both runs
OWNED = ("--output-dir", "--exp-name", "--proj-coeff", "--seed", "--max-train-steps",
         "--resume", "--overwrite", "--preset")
# flags that would leave the demo's pixel-space shapes, which the shape judge reads
NOT_THE_DEMO = ("--data-dir", "--data-path", "--vae")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m repa_fast.compare",
        description="REPA against no REPA on the demo: the same run twice, once with "
        "--proj-coeff 0, then both measured (denoising loss, CKNNA, linear probes, a shape "
        "judge's verdict on samples).",
        formatter_class=HelpFormatter,
        epilog="Other flags go to both training runs (python -m repa_fast.train --help).")
    p.add_argument("--out", default=os.path.join("exps", "compare"),
                   help="folder of the two runs, compare.json and compare.png")
    p.add_argument("--proj-coeff", type=float, default=0.5,
                   help="the REPA run's coefficient (the baseline's is 0)")
    p.add_argument("--max-train-steps", type=int, default=None,
                   help="steps of each run (default: the demo preset's)")
    p.add_argument("--seed", type=int, default=0, help="both runs' seed, and the evaluation's")
    p.add_argument("--samples-per-class", type=int, default=24,
                   help="samples of each class the shape judge scores")
    p.add_argument("--loss-images", type=int, default=1200,
                   help="held-out shapes of the denoising loss (each at 16 times)")
    p.add_argument("--analysis-samples", type=int, default=10_000,
                   help="data set samples of the CKNNA and probe analysis (at most all)")
    p.add_argument("--device", default="auto", help="where the evaluation runs: auto (the "
                   "GPU when there is one), cpu, cuda, cuda:N")
    return p


def check(args: argparse.Namespace, extra: list) -> None:
    owned = [f for f in extra if f.split("=")[0] in OWNED]
    if owned:
        raise UsageError(f"{owned[0].split('=')[0]}: compare sets it on both runs itself "
                         f"(use compare's own --out, --proj-coeff, --max-train-steps, --seed)")
    other = [f for f in extra if f.split("=")[0] in NOT_THE_DEMO]
    if other:
        raise UsageError(f"{other[0].split('=')[0]}: compare trains on the demo's built-in "
                         f"shapes (pixel space), which its shape judge reads; train and "
                         f"analyze other data with python -m repa_fast.train / analyze")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default="SiT-")
    chosen = model.parse_known_args(extra)[0].model
    if not chosen.startswith("SiT-"):
        raise UsageError(f"--model {chosen}: compare measures SiT runs (the denoising loss is "
                         f"the SiT's velocity MSE); pass a SiT-* model")
    if not args.proj_coeff > 0:
        raise UsageError(f"--proj-coeff must be > 0 (the REPA run; the baseline has 0); got "
                         f"{args.proj_coeff}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise UsageError(f"--max-train-steps must be >= 1; got {args.max_train_steps}")
    if args.loss_images < 1:
        raise UsageError(f"--loss-images must be >= 1; got {args.loss_images}")
    if args.analysis_samples < 16:
        raise UsageError(f"--analysis-samples must be >= 16; got {args.analysis_samples}")
    if args.samples_per_class < 1:
        raise UsageError(f"--samples-per-class must be >= 1; got {args.samples_per_class}")
    try:
        import scipy  # noqa: F401  (the judge's Fréchet distance), checked before any training
    except ImportError:
        raise UsageError("compare needs scipy for the Fréchet distance: pip install "
                         "'repa_fast[eval]'") from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file; expected a folder")


def train_arm(args: argparse.Namespace, arm: str, extra: list) -> str:
    """Train (or resume, or reuse) one run in a child process; its final checkpoint."""
    from .training.config import PRESETS
    coeff = args.proj_coeff if arm == "repa" else 0.0
    steps = args.max_train_steps or PRESETS["demo"]["max_train_steps"]
    command = [sys.executable, "-m", "repa_fast.train", "--preset", "demo",
               "--output-dir", args.out, "--exp-name", arm, "--proj-coeff", str(coeff),
               "--seed", str(args.seed), "--max-train-steps", str(steps), "--resume", "auto",
               *extra]
    print(f"== {arm}: {' '.join(command[1:])}", flush=True)
    child = subprocess.Popen(command)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the child too: it saves a checkpoint and stops; let it finish
        child.wait()
        raise Stopped(arm) from None
    if code != 0:
        raise UsageError(f"the {arm} run stopped with exit code {code} (its messages are "
                         f"above); run compare again to resume it") if code != 2 else \
            UsageError(f"the {arm} run refused its flags (message above)")
    return os.path.join(args.out, arm, "checkpoints", f"{steps:07d}.pt")


class Stopped(Exception):
    """Ctrl-C during a run: the run saved its state; compare exits 130."""


def rows(records: dict) -> list:
    """``(what, value per arm)`` lines of the printed table."""
    def at(name, get, fmt="{:.4f}"):
        return (name, [fmt.format(get(r)) if get(r) is not None else "-"
                       for r in records.values()])

    first = next(iter(records.values()))
    depth = first["alignment"]["encoder_depth"]
    out = [at("proj-coeff", lambda r: r["proj_coeff"], "{:g}"),
           at("denoising loss (held-out, mean over t)", lambda r: r["denoising_loss"]["mean"])]
    for i, t in enumerate(first["alignment"]["times"]):
        out.append(at(f"CKNNA, block {depth} (projector's), t={t:g}",
                      lambda r, i=i: r["alignment"]["cknna_at_encoder_depth"][i]))
        out.append(at(f"CKNNA per token, block {depth}, t={t:g}",
                      lambda r, i=i: None if r["alignment"]["cknna_token_at_encoder_depth"]
                      is None else r["alignment"]["cknna_token_at_encoder_depth"][i]))
        out.append(at(f"CKNNA, best block, t={t:g}",
                      lambda r, i=i: "{:.4f} (block {})".format(
                          *r["alignment"]["cknna_best"][i]), "{}"))
        out.append(at(f"linear probe, block {depth}, t={t:g}",
                      lambda r, i=i: None if r["alignment"]["probe_at_encoder_depth"] is None
                      else r["alignment"]["probe_at_encoder_depth"][i], "{:.1%}"))
        out.append(at(f"projector cosine with the encoder, t={t:g}",
                      lambda r, i=i: None if r["alignment"]["projector_cosine"] is None
                      else r["alignment"]["projector_cosine"][i]))
    for key, name in (("class_accuracy", "samples: judge's class accuracy"),
                      ("shape_accuracy", "samples: shape accuracy"),
                      ("colour_accuracy", "samples: colour accuracy")):
        out.append(at(name, lambda r, key=key: r["samples"][key], "{:.1%}"))
    out.append(at("samples: Fréchet distance (judge features)", lambda r: r["samples"]["fd"],
                  "{:.2f}"))
    return out


def print_table(records: dict) -> None:
    table = rows(records)
    width = max(len(name) for name, _ in table)
    print(f"{'':{width}}  " + "  ".join(f"{arm:>18}" for arm in records))
    for name, values in table:
        print(f"{name:{width}}  " + "  ".join(f"{v:>18}" for v in values))


def save_figure(samples: dict, num_classes: int, path: str) -> None:
    """The runs' samples side by side, one row per class, 8 per row."""
    import numpy as np
    from .generation.output import make_grid, save_png_atomic
    panels = []
    for images in samples.values():
        per_class = len(images) // num_classes
        keep = min(per_class, 8)
        picked = images.view(num_classes, per_class, *images.shape[1:])[:, :keep]
        panels.append(make_grid(picked.reshape(-1, *images.shape[1:]).permute(0, 2, 3, 1)
                                .numpy(), num_classes, keep))
    gap = np.full((panels[0].shape[0], 8, 3), 255, dtype=np.uint8)
    save_png_atomic(np.concatenate([panels[0], gap, *panels[1:]], axis=1), path)


def compare(args: argparse.Namespace, extra: list) -> int:
    from .analysis.demo_compare import evaluate_run
    from .atomic_write import write_json_atomic
    check(args, extra)
    checkpoints = {arm: train_arm(args, arm, extra) for arm in ARMS}
    records, samples = {}, {}
    data_dir = os.path.join(args.out, "demo-data")
    for arm, ckpt in checkpoints.items():
        print(f"== measuring {arm} ({ckpt})", flush=True)
        records[arm], samples[arm] = evaluate_run(ckpt, data_dir, args.seed,
                                                  args.samples_per_class,
                                                  args.analysis_samples, args.device,
                                                  loss_images=args.loss_images)
    print_table(records)
    path = os.path.join(args.out, "compare.json")
    write_json_atomic(path, dict(settings=vars(args), train_flags=extra, runs=records))
    figure = os.path.join(args.out, "compare.png")
    save_figure(samples, records["repa"]["analysis"]["data"]["num_classes"], figure)
    print(f"wrote {path} and {figure} (left: repa, right: baseline; one row per class)")
    return 0


def main(argv: Optional[list] = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    try:
        return run_cli(lambda: compare(args, extra), usage=USAGE_AND_VALUE)
    except Stopped as stopped:
        print(f"stopped during the {stopped} run (it saved its state): run the same command "
              f"again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
