"""Reading and checking the ``.npz`` batches the evaluator takes (ADM's format).

* Images: key ``arr_0``, ``uint8``, ``N × H × W × 3`` (RGB, 0-255), as ADM's and REPA's sample
  scripts write them. They are read in batches straight out of the zip (stored or deflated),
  so a 50 000-image batch is never in memory whole.
* Reference statistics (ADM's reference batches, e.g. ``VIRTUAL_imagenet256_labeled.npz``):
  ``mu`` (2048) / ``sigma`` (2048 × 2048) for the pool features and ``mu_s`` (2023) /
  ``sigma_s`` (2023 × 2023) for the spatial features.

Every check raises :class:`EvaluationInputError` naming the argument, expected and given.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import IO, Iterator, Optional, Union

import numpy as np

from .errors import EvaluationInputError
from .features import POOL_DIM, SPATIAL_DIM
from .metrics import FeatureStats

IMAGES_KEY = "arr_0"
STATS_KEYS = {"pool": ("mu", "sigma", POOL_DIM), "spatial": ("mu_s", "sigma_s", SPATIAL_DIM)}

PathLike = Union[str, os.PathLike]


def check_file(path: PathLike, argument: str) -> Path:
    """``path`` as a ``Path``; an error naming ``argument`` when it is not an existing file."""
    p = Path(path)
    if not p.exists():
        raise EvaluationInputError(f"{argument}: file not found: {p}")
    if not p.is_file():
        raise EvaluationInputError(f"{argument}: expected a .npz file, got a directory: {p}")
    return p


def npz_keys(path: PathLike, argument: str) -> list[str]:
    """The array names in an ``.npz`` (``np.savez`` / ``np.savez_compressed``) file."""
    p = check_file(path, argument)
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        raise EvaluationInputError(f"{argument}: expected a .npz file (a zip archive written by "
                                   f"np.savez), got something else: {p}") from None
    return [n[:-len(".npy")] for n in names if n.endswith(".npy")]


def check_image_array(shape: tuple, dtype: np.dtype, argument: str, what: str) -> None:
    """An error unless ``shape``/``dtype`` are those of a uint8 ``N × H × W × 3`` image batch."""
    problems = []
    if len(shape) != 4 or shape[-1] != 3:
        hint = (" (channels first? the evaluator takes channels last, N×H×W×3)"
                if len(shape) == 4 and shape[1] == 3 else "")
        problems.append(f"shape N×H×W×3, got {tuple(shape)}{hint}")
    elif min(shape) == 0:
        problems.append(f"a non-empty array, got shape {tuple(shape)}")
    if np.dtype(dtype) != np.uint8:
        problems.append(f"dtype uint8 (0-255), got {np.dtype(dtype)}")
    if problems:
        raise EvaluationInputError(f"{argument}: {what} must be uint8 images of shape N×H×W×3; "
                                   f"expected " + "; expected ".join(problems))


def _read_exact(f: IO[bytes], out: np.ndarray) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise EvaluationInputError(f"truncated array data: expected {len(view)} bytes, "
                                       f"read {done}")
        done += got


class ImageBatches:
    """A uint8 ``N × H × W × 3`` image batch from an ``.npz`` entry or an in-memory array.

    Opening only reads the ``.npy`` header, so shape and dtype are checked before any pixel
    data is read; :meth:`batches` then streams the rows.
    """

    def __init__(self, source: Union[PathLike, np.ndarray], argument: str,
                 key: str = IMAGES_KEY) -> None:
        self.argument = argument
        self.key = key
        self.array: Optional[np.ndarray] = None
        self.path: Optional[Path] = None
        if isinstance(source, np.ndarray):
            check_image_array(source.shape, source.dtype, argument, "the array")
            self.array = source
            self.shape = tuple(source.shape)
            return
        self.path = check_file(source, argument)
        keys = npz_keys(self.path, argument)
        if key not in keys:
            raise EvaluationInputError(f"{argument}: {self.path} has no '{key}' array (the "
                                       f"images); its keys are {keys}")
        what = f"'{key}' in {self.path.name}"
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{key}.npy") as f:
            header = self._read_header(f)
        if header is not None:  # checked before any data is read (object arrays included)
            shape, fortran, dtype = header
            check_image_array(shape, dtype, argument, what)
            self.shape = shape
        if header is None or fortran:  # an .npy layout that cannot be streamed: load it whole
            try:
                arr = np.load(self.path)[key]
            except ValueError as error:  # e.g. an object array (pickles are not loaded)
                raise EvaluationInputError(f"{argument}: {what}: {error}") from None
            self.shape = tuple(arr.shape)
            check_image_array(self.shape, arr.dtype, argument, what)
            self.array = arr

    @staticmethod
    def _read_header(f: IO[bytes]) -> Optional[tuple[tuple, bool, np.dtype]]:
        """``(shape, fortran_order, dtype)`` with ``f`` left at the first data byte, or
        ``None`` for a header version we do not parse."""
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        return tuple(shape), fortran, dtype

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "<array>"

    def batches(self, batch_size: int, limit: Optional[int] = None) -> Iterator[np.ndarray]:
        """Consecutive ``≤ batch_size``-row uint8 arrays, the first ``limit`` rows (all by
        default)."""
        total = len(self) if limit is None else min(limit, len(self))
        if self.array is not None:
            for start in range(0, total, batch_size):
                yield np.ascontiguousarray(self.array[start:min(start + batch_size, total)])
            return
        assert self.path is not None
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            self._read_header(f)
            for start in range(0, total, batch_size):
                out = np.empty((min(batch_size, total - start), *self.shape[1:]), np.uint8)
                try:
                    _read_exact(f, out)
                except EvaluationInputError as error:
                    raise EvaluationInputError(f"{self.argument}: {self.path}: {error}") from None
                yield out


def read_reference_stats(path: PathLike, argument: str) -> dict[str, FeatureStats]:
    """The stored statistics of a reference ``.npz``: ``{"pool": ..., "spatial": ...}``, each
    present only when both of its keys are (``mu``+``sigma``, ``mu_s``+``sigma_s``)."""
    keys = set(npz_keys(path, argument))
    found: dict[str, FeatureStats] = {}
    wanted = {k for mu_key, sigma_key, _ in STATS_KEYS.values() for k in (mu_key, sigma_key)}
    if not keys & wanted:
        return found
    with np.load(path, allow_pickle=False) as data:
        for kind, (mu_key, sigma_key, dim) in STATS_KEYS.items():
            have = [k for k in (mu_key, sigma_key) if k in keys]
            if not have:
                continue
            if len(have) == 1:
                missing = sigma_key if have == [mu_key] else mu_key
                raise EvaluationInputError(f"{argument}: {path} has '{have[0]}' but not "
                                           f"'{missing}'; stored {kind} statistics need both")
            mu, sigma = data[mu_key], data[sigma_key]
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise EvaluationInputError(
                    f"{argument}: {path}: expected '{mu_key}' of shape ({dim},) and "
                    f"'{sigma_key}' of shape ({dim}, {dim}), got {mu.shape} and {sigma.shape}")
            if not (np.issubdtype(mu.dtype, np.floating)
                    and np.issubdtype(sigma.dtype, np.floating)):
                raise EvaluationInputError(f"{argument}: {path}: expected floating-point "
                                           f"'{mu_key}'/'{sigma_key}', got {mu.dtype} and "
                                           f"{sigma.dtype}")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise EvaluationInputError(f"{argument}: {path}: '{mu_key}'/'{sigma_key}' hold "
                                           "non-finite values")
            found[kind] = FeatureStats(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64))
    return found
