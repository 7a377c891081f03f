"""The REPA paper's alignment analysis of a SiT or DiT checkpoint.

    python -m repa_fast.analyze --ckpt CKPT --data-dir DATA --out DIR [--enc-type dinov2-vit-b
        --enc-weights ckpts --times 0,0.25,0.5,0.75 --blocks all --num-samples 10000 ...]

For ``--num-samples`` samples of a prepared data set (chosen by ``--seed``) and each time t
of ``--times`` on the model's path (0: clean, 1: noise): the hidden states after every block
(or ``--blocks``) on ``x_t``, mean-pooled over tokens, compared with the frozen encoder's
features of the clean image by CKNNA (Huh et al. 2024, k = ``--knn``), and probed for the
class label by a linear classifier trained on ``--probe-train-fraction`` of the samples; the
REPA projector's output is compared with the encoder too. Writes ``DIR/analysis.json``
(every number, the settings, versions) and ``DIR/analysis.png`` (CKNNA and probe accuracy
against depth, one curve per t). Bad inputs exit with code 2, refusals of the machine with 1
(repa_fast.errors).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .cli_help import HelpFormatter
from .errors import USAGE_AND_VALUE, UsageError, run_cli

DEFAULT_TIMES = "0,0.25,0.5,0.75"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repa_fast.analyze",
                                description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("inputs and output")
    g.add_argument("--ckpt", required=True, help="official REPA / repa_fast checkpoint, or a "
                   "bare SiT/DiT state dict")
    g.add_argument("--data-dir", required=True, help="prepared data set (python -m "
                   "repa_fast.data.prepare; a demo run's <output-dir>/demo-data)")
    g.add_argument("--out", required=True, help="folder for analysis.json and analysis.png")
    g.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights of a training checkpoint")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write analysis.png (needs matplotlib)")
    g = p.add_argument_group("model (default: from the checkpoint; for bare state dicts)")
    g.add_argument("--model", help="e.g. SiT-XL/2 (default: from the checkpoint)")
    g.add_argument("--num-classes", type=int, help="class labels of the model (default: from "
                   "the checkpoint)")
    g.add_argument("--encoder-depth", type=int, help="block the projectors read (default: from "
                   "the checkpoint)")
    g.add_argument("--path-type", choices=["linear", "cosine"], help="the SiT's interpolant "
                   "(default: from the checkpoint, else linear)")
    g = p.add_argument_group("encoder (training's flags)")
    g.add_argument("--enc-type", help="encoder(s) to compare with, comma-separated; demo: the "
                   "demo run's tiny ViT (default: the checkpoint's, else dinov2-vit-b)")
    g.add_argument("--enc-weights", help="a folder of official weight files, one file per "
                   "encoder, or random (default: the checkpoint's, else ckpts)")
    g = p.add_argument_group("analysis")
    g.add_argument("--times", default=DEFAULT_TIMES, help="comma-separated times t in [0, 1] "
                   "on the model's path (0: clean data)")
    g.add_argument("--blocks", default="all", help="1-based blocks to read, e.g. 1,4,8, or all")
    g.add_argument("--num-samples", type=int, default=10_000,
                   help="samples of the data set (all of them when it holds fewer)")
    g.add_argument("--knn", type=int, default=10, help="k of CKNNA's mutual nearest neighbours")
    g.add_argument("--outlier-quantile", type=float, default=0.95, help="clamp features at "
                   "this quantile of |x| before CKNNA, as the reference pipeline; 1: no clamp")
    g.add_argument("--per-token", action=argparse.BooleanOptionalAction, default=True,
                   help="also CKNNA per token (one token per sample against the encoder's "
                   "token there); --no-per-token halves the host memory of the features")
    g.add_argument("--condition", choices=["null", "label"], default="null",
                   help="class input of the model: null (the CFG null class, so the probe "
                   "cannot read the label off the conditioning) or the true label")
    g.add_argument("--seed", type=int, default=0, help="choice of samples and noise")
    g = p.add_argument_group("linear probe")
    g.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="train a linear probe per block and time")
    g.add_argument("--probe-train-fraction", type=float, default=0.8,
                   help="samples the probe trains on; the rest measure its accuracy")
    g.add_argument("--probe-steps", type=int, default=300, help="full-batch Adam steps")
    g.add_argument("--probe-lr", type=float, default=0.01, help="Adam learning rate (cosine "
                   "decay to 0)")
    g.add_argument("--probe-weight-decay", type=float, default=1e-4,
                   help="λ of the λ·‖W‖² penalty")
    g = p.add_argument_group("speed")
    g.add_argument("--batch-size", type=int, default=64, help="samples per model call")
    g.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, "
                   "cuda, cuda:N")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars on stderr")
    return p


def _numbers(text: str, flag: str, kind) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise UsageError(f"{flag} must be comma-separated {kind.__name__}s; got {text!r}")
    return values


def settings_from_args(args: argparse.Namespace):
    from .analysis.run import AnalysisSettings
    blocks = None if args.blocks.strip() == "all" else _numbers(args.blocks, "--blocks", int)
    return AnalysisSettings(
        ckpt=args.ckpt, data_dir=args.data_dir, weights=args.weights, enc_type=args.enc_type,
        enc_weights=args.enc_weights, times=_numbers(args.times, "--times", float),
        blocks=blocks, num_samples=args.num_samples, knn=args.knn,
        outlier_quantile=args.outlier_quantile, probe=args.probe,
        probe_train_fraction=args.probe_train_fraction, probe_steps=args.probe_steps,
        probe_lr=args.probe_lr, probe_weight_decay=args.probe_weight_decay,
        condition=args.condition, per_token=args.per_token, batch_size=args.batch_size,
        device=args.device, seed=args.seed,
        model=args.model, num_classes=args.num_classes, encoder_depth=args.encoder_depth,
        path_type=args.path_type, progress=args.progress)


def check_out(out: str, plot: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a file; expected a folder")
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'repa_fast[analysis]', or "
                             "pass --no-plot") from None


def _best(row: list, blocks: list, what: str) -> str:
    found = [(v, b) for v, b in zip(row, blocks) if v is not None]
    if not found:
        return f"{what}: no finite value"
    value, block = max(found)
    return f"{what} max {value:.3f} at block {block}"


def summary_lines(record: dict) -> list:
    """One line per time: the best CKNNA (first encoder) and probe block."""
    lines = []
    for i, t in enumerate(record["times"]):
        parts = [f"t={t:g}"]
        for encoder in record["encoders"][:1]:
            parts.append(_best(encoder["cknna"][i], record["blocks"],
                               f"CKNNA with {encoder['name']}"))
        if record["probe"] is not None:
            parts.append(_best(record["probe"]["accuracy"][i], record["blocks"], "probe"))
        lines.append("  " + "; ".join(parts))
    return lines


def analyze(args: argparse.Namespace) -> int:
    from .analysis.plot import plot
    from .analysis.run import run_analysis
    from .atomic_write import write_json_atomic
    settings = settings_from_args(args)
    check_out(args.out, args.plot)
    record = run_analysis(settings)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "analysis.json")
    write_json_atomic(path, record)
    written = [path]
    if args.plot:
        written.append(os.path.join(args.out, "analysis.png"))
        plot(record, written[-1])
    print("\n".join(summary_lines(record)))
    print(f"wrote {' and '.join(written)}")
    return 0


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits with 2 on malformed flags
    return run_cli(lambda: analyze(args), usage=USAGE_AND_VALUE)


if __name__ == "__main__":
    sys.exit(main())
