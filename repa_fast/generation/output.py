"""Files of a generation run: PNGs, the ADM ``.npz``, the settings record, grids.

Every file is written under a temporary name and renamed into place, so a run killed at any
moment leaves only complete files under their final names: a resumed run can trust any
``NNNNNN.png`` it finds. PNGs are not fsync'd (50 000 syncs cost more than they save): after a
crash of the machine, empty files count as missing, and a damaged one is named, with what to
do, when the ``.npz`` is packed.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

from ..atomic_write import atomic_open, atomic_path, write_json_atomic
from .errors import UsageError

SETTINGS_FILE = "settings.json"


def png_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def save_png_atomic(image: np.ndarray, path: str) -> None:
    """Write a uint8 [H, W, 3] image as PNG: to ``path.tmp``, then renamed over ``path``."""
    from PIL import Image
    with atomic_path(path, sync=False) as tmp:  # not synced: see the module docstring
        Image.fromarray(image).save(tmp, format="PNG")


def existing_indices(folder: str) -> set:
    """Indices ``i`` with a non-empty ``{i:06d}.png`` in ``folder``."""
    found = set()
    if not os.path.isdir(folder):
        return found
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext == ".png" and stem.isdigit() and entry.stat().st_size > 0:
                found.add(int(stem))
    return found


def _read_png(path: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for a damaged file
        raise UsageError(f"--sample-dir: {path} is not a readable PNG ({error}); delete it and "
                         f"run again to regenerate it") from error


def ordered_map(fn: Callable, items: Iterable, threads: int, ahead: int) -> Iterator:
    """``fn(item)`` for each item, in order, computed by ``threads`` threads at most ``ahead``
    items before the consumer (``Executor.map`` would submit every item at once and hold all
    finished results until they are consumed)."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_npz_from_pngs(folder: str, num: int, path: str, threads: int = 8,
                        extra: Optional[Mapping[str, np.ndarray]] = None) -> tuple:
    """Pack ``folder/000000.png .. {num-1}.png`` into ``path`` as ``arr_0`` (uint8 [num, H, W, 3],
    index order), the layout the ADM evaluator reads; returns the array's shape. ``extra``
    arrays (e.g. a text-to-image run's ``captions``, a str array: no pickle) are stored beside.

    The array is streamed into the (uncompressed, zip64) ``.npz`` one image at a time, so
    50 000 images at 512 px (39 GB) do not need to fit in memory: a thread pool decodes the
    PNGs, in order, at most ``4·threads`` images ahead of the writer. The file is written
    under ``path.tmp`` and renamed when complete. ``np.load(path)["arr_0"]`` gives the same
    array ``np.savez`` would write.
    """
    from numpy.lib import format as npy_format
    missing = [i for i in range(num) if not os.path.isfile(png_path(folder, i))]
    if missing:
        raise FileNotFoundError(f"cannot write {path}: {len(missing)} of {num} samples are "
                                f"missing in {folder} (first: {png_path(folder, missing[0])})")
    first = _read_png(png_path(folder, 0))
    shape = (num, *first.shape)
    header = dict(descr=npy_format.dtype_to_descr(np.dtype(np.uint8)), fortran_order=False,
                  shape=shape)
    with atomic_open(path, "wb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                npy_format.write_array_header_1_0(member, header)
                images = ordered_map(_read_png, (png_path(folder, i) for i in range(num)),
                                     threads, 4 * threads)
                for i, image in enumerate(images):
                    if image.shape != first.shape:
                        raise UsageError(f"--sample-dir: {png_path(folder, i)} is "
                                         f"{image.shape}, the first sample is {first.shape}")
                    member.write(np.ascontiguousarray(image).tobytes())
            for name, array in (extra or {}).items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    npy_format.write_array(member, np.asarray(array), allow_pickle=False)
    return shape


def check_settings(folder: str, settings: Mapping) -> Optional[str]:
    """Record ``settings`` in ``folder`` the first time; later, compare with the record.

    Returns None when they agree (or were just recorded), else a message listing the
    differences: samples made with other settings must not be mixed into one ``.npz``.
    """
    path = os.path.join(folder, SETTINGS_FILE)
    settings = json.loads(json.dumps(settings))  # the form they take on disk (lists, floats)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        write_json_atomic(path, settings, sort_keys=True)
        return None
    with open(path) as f:
        recorded = json.load(f)
    diffs = [f"{key}: {recorded.get(key)!r} there, {settings.get(key)!r} now"
             for key in sorted(set(recorded) | set(settings))
             if recorded.get(key) != settings.get(key)]
    if not diffs:
        return None
    return (f"--sample-dir: {folder} holds samples made with other settings ({'; '.join(diffs)}); "
            f"use another --sample-dir, or delete that folder to start over")


def make_grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """uint8 [rows·cols, H, W, 3] (row-major) -> one [rows·H, cols·W, 3] image."""
    n, h, w, c = images.shape
    if n != rows * cols:
        raise ValueError(f"a {rows}×{cols} grid needs {rows * cols} images; got {n}")
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(
        rows * h, cols * w, c)


def wait_all(futures: Iterable) -> None:
    """Re-raise the first error of finished background writes."""
    for future in futures:
        future.result()
