"""Evaluate generated samples: FID, sFID, Inception Score, precision and recall.

    python -m repa_fast.evaluate --samples samples.npz \\
        --ref VIRTUAL_imagenet256_labeled.npz --out results.json

``--samples``: ``.npz`` with ``arr_0``, uint8 images ``N × H × W × 3`` (what ADM's and REPA's
sampling scripts write). ``--ref``: ``.npz`` with reference images ``arr_0`` and/or stored
statistics ``mu``/``sigma``/``mu_s``/``sigma_s`` (ADM's reference batches have both; stored
statistics are then used for FID/sFID, images for precision/recall). The Inception weights
come from a local file only: ``--inception-weights``, else ``$REPA_FAST_INCEPTION_WEIGHTS``,
else ``ckpts/pt_inception-2015-12-05-6726825d.pth`` (download it from
:data:`repa_fast.evaluation.WEIGHTS_URL`). Writes JSON (``--out``, or stdout) and prints a
one-line summary. Exit code 2 for bad input (files, keys, shapes, dtypes, counts, weights).

Definitions follow ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``):
With ``--clip-model DIR`` (a local transformers CLIP folder) it also computes the CLIP score of
text-to-image samples against their captions (:mod:`repa_fast.evaluation.clip_score`); the
captions come from ``--captions`` or the ``captions`` array ``generate`` stores in the
``.npz``, and ``--ref`` may then be left out.

FID on ``pool_3`` (2048), sFID on the first 7 channels of ``mixed_6/conv`` (17·17·7 = 2023),
IS from the softmax of the bias-free 1008-way logits in splits of 5000, precision/recall with
k = 3 nearest-neighbour balls on ``pool_3``, reference = manifold of the reference images.

Expected to agree closely with ADM's TensorFlow evaluator but not bit for bit (how closely:
the README's status table); the known sources of difference are:

* Network: the same 2015-12-05 FID Inception graph, its weights ported to PyTorch by
  torch-fidelity, but run with PyTorch/cuDNN kernels instead of TensorFlow's (TF32 is turned
  off here while extracting features).
* Resize: TensorFlow resizes inside the graph (``ResizeBilinear``, TF 1.x semantics);
  torch-fidelity reimplements that resize (its "slow" method: bit-exact on CPU, ~1e-4
  max error on GPU by its own account).
* Statistics: the mean is accumulated in float64 here (ADM: float32), the covariance in
  float64 in both.
* Precision/recall: ADM computes distances in float16 on the GPU; here the inputs, norms,
  products and results are rounded to float16 in the same order (``--pr-distance-dtype``),
  products accumulated in float32; TensorFlow's accumulation order differs.
* ``--fid-method eigh`` is an exact alternative to ADM's ``scipy.linalg.sqrtm``; it differs
  only by round-off, but for comparisons with published numbers keep the default ``sqrtm``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from .atomic_write import atomic_open
from .errors import run_cli
from .evaluation.errors import EvaluationInputError
from .evaluation.inception import DEFAULT_WEIGHTS, WEIGHTS_ENV
from .evaluation.metrics import DISTANCE_DTYPES, FID_METHODS
from .evaluation.pipeline import compute_metrics, format_summary


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repa_fast.evaluate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", required=True, help=".npz with arr_0: uint8 N×H×W×3 samples")
    p.add_argument("--ref", default=None,
                   help=".npz with reference images arr_0 and/or stored mu/sigma/mu_s/sigma_s "
                        "(no default: required unless only the CLIP score is asked for)")
    p.add_argument("--out", default=None, help="write the JSON results here (default: stdout)")
    p.add_argument("--inception-weights", default=None,
                   help=f"local Inception weights file (default: ${WEIGHTS_ENV}, else "
                        f"{DEFAULT_WEIGHTS})")
    p.add_argument("--batch-size", type=_positive_int, default=128,
                   help="images per Inception forward pass (default: 128)")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--num-samples", type=_positive_int, default=None,
                   help="evaluate the first N samples; an error if the file has fewer "
                        "(default: all of them)")
    p.add_argument("--exact-count", action="store_true",
                   help="also an error if the file has more than --num-samples (default: off)")
    p.add_argument("--fid-method", choices=FID_METHODS, default="sqrtm",
                   help="sqrtm (default): ADM's scipy.linalg.sqrtm; eigh: exact "
                        "symmetric-eigenvalue route (faster; differs by round-off)")
    p.add_argument("--pr-distance-dtype", choices=DISTANCE_DTYPES, default="float16",
                   help="precision/recall distances: float16 as ADM (default), or float32")
    p.add_argument("--cache", action="store_true",
                   help="reuse/write Inception activations beside each .npz "
                        "(NAME.inception-acts.npz; default: off)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress messages on stderr (default: off)")
    p.add_argument("--clip-model", default=None,
                   help="local transformers CLIP folder: also compute the CLIP score of the "
                        "samples against their captions (100·mean max(cos, 0); default: off)")
    p.add_argument("--captions", default=None,
                   help="with --clip-model: a text file, one caption per sample in order "
                        "(default: the 'captions' array that generate stores in the .npz)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ref is None and args.clip_model is None:
        parser.error("--ref is required (the reference batch or statistics), unless only the "
                     "CLIP score is asked for (--clip-model)")

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    return run_cli(lambda: _evaluate(args, log))


def _evaluate(args, log) -> int:
    if args.captions is not None and args.clip_model is None:
        raise EvaluationInputError("--captions is for the CLIP score: pass --clip-model too")
    result, summaries = {}, []
    if args.ref is not None:
        result = compute_metrics(
            args.samples, args.ref, weights=args.inception_weights, device=args.device,
            batch_size=args.batch_size, num_samples=args.num_samples,
            exact_count=args.exact_count, fid_method=args.fid_method,
            pr_distance_dtype=args.pr_distance_dtype, cache=args.cache, log=log)
        summaries.append(format_summary(result))
    if args.clip_model is not None:
        result["clip"] = _clip(args, log)
        summaries.append(f"CLIP score {result['clip']['clip_score']:.2f} "
                         f"({result['clip']['count']} samples, {args.clip_model})")
    text = json.dumps(result, indent=2)
    summary = "\n".join(summaries)
    if args.out is None:
        print(text)
        print(summary, file=sys.stderr)  # stdout stays pure JSON
    else:
        directory = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(directory, exist_ok=True)
        # complete or absent: a killed run leaves no half-written JSON
        with atomic_open(args.out, "w", sync=False) as f:
            f.write(text + "\n")
        print(summary)
        print(f"results written to {args.out}")
    return 0


def _clip(args, log) -> dict:
    """The CLIP score of the (first ``--num-samples``) samples against their captions."""
    from .evaluation.clip_score import CLIPScorer, clip_score, read_captions
    from .evaluation.inception import resolve_device
    from .evaluation.npz import ImageBatches
    images = ImageBatches(args.samples, "--samples")
    count = len(images) if args.num_samples is None else args.num_samples
    if count > len(images):
        raise EvaluationInputError(f"--num-samples {count}: {args.samples} holds only "
                                   f"{len(images)} samples")
    captions = read_captions(args.samples, args.captions)
    if len(captions) < count or (args.num_samples is None and len(captions) != count):
        raise EvaluationInputError(f"--captions: {len(captions)} captions for {count} images; "
                                   f"give one caption per sample, in sample order")
    captions = captions[:count]
    scorer = CLIPScorer(args.clip_model, resolve_device(args.device))
    log(f"CLIP score of {count} samples with {args.clip_model}")
    return clip_score(scorer, images.batches(args.batch_size, count), captions)


if __name__ == "__main__":
    sys.exit(main())
