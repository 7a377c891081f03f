"""The analysis's record, ``analysis.json``: settings, versions, and every number.

Layout (T times, B blocks; lists indexed ``[time][block]`` follow ``times`` and ``blocks``)::

    format, versions, settings, device, checkpoint{path, weights, model{...spec}},
    data{data_dir, num_samples, num_classes, resolution, pixel_space}, times[T], blocks[B],
    encoders[{name, embed_dim, weights, cknna[T][B], cknna_token[T][B] | null,
              probe{accuracy, train_accuracy} | null}],
    projection[{projector, encoder, block, cknna[T] | null, cosine[T] | null}],
    probe{accuracy[T][B], train_accuracy[T][B], train_loss[T][B], num_train, num_test,
          num_classes, majority_accuracy, steps, lr, weight_decay} | null,
    summary{best_cknna_block[T], best_probe_block[T] | null}   (first encoder; 1-based)

``cknna``: CKNNA (k = settings.knn) between the blocks' mean-pooled hidden states on
``x_t`` and the encoder's mean-pooled features of the clean image; ``cknna_token`` (first
encoder only; null for the others, or when the grids have no common grid): the same between
one token per sample, at a seeded position, and the encoder's token there
(:mod:`.features`); ``projection``: the same
for projector k's output (block ``encoder_depth``) against encoder k, and ``cosine`` the
mean token cosine similarity REPA maximises (−proj_loss). Non-finite numbers are null.
"""
from __future__ import annotations

import math
import platform
from typing import Optional

import numpy as np
import torch

from ..version import __version__

FORMAT = "repa_fast-analysis-v1"


def number(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def table(values: torch.Tensor) -> list:
    """A tensor as nested lists of floats (None for NaN/inf)."""
    if values.dim() == 0:
        return number(values)
    return [table(v) for v in values]


def versions() -> dict:
    found = dict(repa_fast=__version__, torch=torch.__version__, numpy=np.__version__,
                 python=platform.python_version())
    try:
        import matplotlib
        found["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return found


def _majority(labels: torch.Tensor) -> Optional[float]:
    if not len(labels):
        return None
    return float(torch.bincount(labels).max()) / len(labels)


def best_blocks(values: list, blocks: list) -> list:
    """Per time, the block with the largest value (None where all are null)."""
    best = []
    for row in values:
        scored = [(v, b) for v, b in zip(row, blocks) if v is not None]
        best.append(max(scored)[1] if scored else None)
    return best


def results(*, settings: dict, spec, args: dict, enc_type: str, enc_weights: str,
            encoders: list, reader, blocks: list, features, alignment: list,
            projection: list, probes: Optional[dict], num_train: Optional[int],
            device: torch.device, token_alignment: Optional[torch.Tensor] = None) -> dict:
    """The record (module doc) of one :func:`repa_fast.analysis.run.run_analysis`."""
    weights = enc_weights.split(",")
    names = enc_type.split(",")
    records = []
    for k, (encoder, values) in enumerate(zip(encoders, alignment)):
        probe = None
        if probes is not None:
            found = probes["encoders"][k]
            probe = dict(accuracy=number(found["accuracy"]),
                         train_accuracy=number(found["train_accuracy"]))
        records.append(dict(name=names[k] if k < len(names) else encoder.name,
                            embed_dim=int(encoder.embed_dim),
                            weights=weights[k] if k < len(weights) else weights[0],
                            cknna=table(values),
                            cknna_token=table(token_alignment) if k == 0 and
                            token_alignment is not None else None, probe=probe))
    projections = []
    for k, values in enumerate(projection):
        cos = features.cosines[k]
        projections.append(dict(projector=k, encoder=records[k]["name"] if k < len(records)
                                else None, block=spec.encoder_depth,
                                cknna=None if values is None else table(values),
                                cosine=None if cos is None else table(cos.double().mean(-1))))
    probe = None
    if probes is not None:
        test = features.labels[num_train:]
        probe = dict({name: table(values) for name, values in probes["blocks"].items()},
                     num_train=num_train, num_test=len(test), num_classes=reader.num_classes,
                     majority_accuracy=_majority(test), steps=settings["probe_steps"],
                     lr=settings["probe_lr"], weight_decay=settings["probe_weight_decay"])
    summary = dict(best_cknna_block=best_blocks(records[0]["cknna"], blocks) if records
                   else None,
                   best_probe_block=best_blocks(probe["accuracy"], blocks) if probe else None)
    return dict(format=FORMAT, versions=versions(), settings=settings, device=str(device),
                checkpoint=dict(path=settings["ckpt"], weights=settings["weights"],
                                model=spec.to_dict(), trained_with=dict(
                                    enc_type=args.get("enc_type"),
                                    proj_coeff=args.get("proj_coeff"))),
                data=dict(data_dir=settings["data_dir"], num_samples=len(reader),
                          num_classes=reader.num_classes,
                          resolution=int(reader.index["resolution"]),
                          pixel_space=reader.pixel_space),
                times=[float(t) for t in settings["times"]], blocks=list(blocks),
                encoders=records, projection=projections, probe=probe, summary=summary)
