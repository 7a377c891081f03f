"""Text-to-image sets: which caption a sample trains with, and reading text features.

No torch here (the DALI loader's reader processes import it through
:mod:`repa_fast.data.samples`).

**Caption choice.** The official ``MSCOCOFeatureDataset`` draws one of an image's captions
at random per sample (``random.randint``, unseeded across processes). Here the draw is a
function of (seed, epoch, position of the sample in the epoch's global order)::

    caption = splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ position) mod n_captions

``position`` is the place in the padded epoch permutation that every rank slices
(:func:`repa_fast.data.samples.epoch_order`): rank r's j-th sample sits at ``j·world + r``.
The choice therefore does not depend on the number of processes or loader workers, and a
resumed run draws exactly what an uninterrupted one would. A bad sample replaced by the next
good one (``on_bad_sample="skip"``) takes the draw of the position it fills.

**Features.** ``{key}.ctx.npy`` holds all of a sample's captions' features [n, L, D]; a
loader reads only the ``.npy`` header and the chosen caption's [L, D] slice (CLIP ViT-L/14:
236 KB instead of 1.2 MB for COCO's five captions), and checks the header (dtype and shape
as ``index.json`` records, C order, the member's size) and that the slice is finite.
"""
from __future__ import annotations

import io
import json
import os
import zlib
from typing import Optional

import numpy as np
from numpy.lib import format as npy

from .shards import (EMPTY_CONTEXT, FORMAT_T2I, KIND_T2I, REDO_INDEX, DataError,
                     crc32_text, is_text_to_image, read_index, write_file_atomic)

_MASK = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 ``x`` (wrapping arithmetic), elementwise."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def caption_draws(seed: int, epoch: int, positions) -> np.ndarray:
    """uint64 draws for global epoch ``positions`` (module doc); caption = draw mod n."""
    base = _splitmix64(np.array([int(seed) & _MASK], dtype=np.uint64))
    base = _splitmix64(base ^ np.uint64(int(epoch) & _MASK))
    return _splitmix64(base ^ np.asarray(positions, dtype=np.int64).astype(np.uint64))


def batch_draws(seed: int, epoch: int, rank: int, world_size: int, start: int,
                count: int) -> np.ndarray:
    """Draws of rank ``rank``'s samples ``start .. start + count - 1`` of ``epoch``."""
    local = np.arange(start, start + count, dtype=np.int64)
    return caption_draws(seed, epoch, local * world_size + rank)


def caption_choice(seed: int, epoch: int, position: int, num_captions: int) -> int:
    """The caption the sample at global ``position`` of ``epoch`` trains with."""
    return int(caption_draws(seed, epoch, [position])[0] % np.uint64(num_captions))


def context_spec(index: dict) -> tuple[tuple[int, int], np.dtype]:
    """``((L, D), dtype)`` of the text features of a text-to-image ``index``."""
    try:
        spec = index["context"]
        length, width = (int(v) for v in spec["shape"])
        dtype = np.dtype(spec["dtype"])
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"index.json of a text-to-image set lacks a valid 'context' entry "
                        f"(shape [L, D] and dtype): {error!r}; {REDO_INDEX}") from None
    return (length, width), dtype


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array))
    return out.getvalue()


HEADER_PROBE = 4096  # bytes read to find a .ctx.npy member's header (np.save's: 128)


def check_context_header(prefix: bytes, member_size: int, num_captions: int, spec) -> int:
    """The length of the ``.npy`` header at the start of ``prefix`` (the first bytes of a
    ``.ctx.npy`` member of ``member_size`` bytes), once it describes C-ordered ``dtype``
    [num_captions, L, D] data (``spec``: ``((L, D), dtype)``) that fills the rest of the
    member; ValueError naming what differs."""
    (length, width), dtype = spec
    f = io.BytesIO(prefix)
    try:
        version = npy.read_magic(f)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, found = read(f)
    except (ValueError, EOFError, SyntaxError) as error:
        raise ValueError(f"they are not a readable .npy array ({error})") from None
    want = (num_captions, length, width)
    if found != dtype or tuple(shape) != want or fortran:
        raise ValueError(f"they are {found} {list(shape)}{' (Fortran order)' if fortran else ''},"
                         f" not {dtype} {list(want)} (index.json's context shape and the "
                         f"sample's {num_captions} captions)")
    header = f.tell()
    if header + num_captions * length * width * dtype.itemsize != member_size:
        raise ValueError(f"the member is {member_size} bytes, not the {header}-byte header "
                         f"plus {num_captions} contexts: truncated or padded")
    return header


def decode_context(data: bytes, spec) -> np.ndarray:
    """One caption's context [L, D] from its bytes, checked finite (ValueError)."""
    (length, width), dtype = spec
    if len(data) != length * width * dtype.itemsize:
        raise ValueError(f"its data is truncated ({len(data)} bytes for one caption, "
                         f"{length * width * dtype.itemsize} expected)")
    context = np.frombuffer(data, dtype=dtype).reshape(length, width)
    if not np.isfinite(context).all():
        raise ValueError("they hold non-finite values")
    return context


def decode_captions(data: bytes, num_captions: int) -> list:
    """The captions of a ``.txt`` member: a JSON list of ``num_captions`` strings or nulls."""
    captions = json.loads(data.decode("utf-8"))
    if not isinstance(captions, list) or len(captions) != num_captions or not all(
            c is None or isinstance(c, str) for c in captions):
        raise ValueError(f"they are not a JSON list of {num_captions} strings")
    return captions


def write_empty_context(directory: str, context: np.ndarray) -> dict:
    """``empty_context.npy`` (the empty caption's features [L, D]) in ``directory``,
    atomically; its ``index.json`` entry (name, size, CRC-32, shape, dtype)."""
    context = np.asarray(context)
    if context.ndim != 2:
        raise ValueError(f"the empty context must be [L, D]; got {list(context.shape)}")
    entry = write_file_atomic(directory, EMPTY_CONTEXT, npy_bytes(context))
    return dict(entry, shape=list(context.shape), dtype=str(context.dtype))


def empty_context_entry(directory: str) -> dict:
    """The ``index.json`` entry of the ``empty_context.npy`` already in ``directory``."""
    path = os.path.join(directory, EMPTY_CONTEXT)
    with open(path, "rb") as f:
        data = f.read()
    context = np.load(io.BytesIO(data))
    return dict(name=EMPTY_CONTEXT, size=len(data), checksum=crc32_text(zlib.crc32(data)),
                shape=list(context.shape), dtype=str(context.dtype))


def t2i_index_fields(empty: dict, text_encoder: dict, num_captions: int) -> dict:
    """What a text-to-image ``index.json`` holds beyond an image set's (module doc of
    :mod:`repa_fast.data.shards`); ``empty``: :func:`write_empty_context`'s entry."""
    return dict(format=FORMAT_T2I, kind=KIND_T2I, num_classes=0, label_range=None,
                context=dict(shape=list(empty["shape"]), dtype=empty["dtype"]),
                empty_context=empty, text_encoder=text_encoder, num_captions=num_captions)


def empty_context(data_dir: str, index: Optional[dict] = None) -> np.ndarray:
    """The empty caption's features [L, D] of the text-to-image set in ``data_dir`` (the
    unconditional context of classifier-free guidance: the trainer swaps it in for a
    caption with probability ``p_uncond``, and samples with it as ``y_null``). Checked
    against ``index.json`` (size, CRC-32, shape, dtype) and finite; a :class:`DataError`
    naming the file otherwise."""
    index = index if index is not None else read_index(data_dir)
    if not is_text_to_image(index):
        raise DataError(f"{data_dir} is not a text-to-image set (its index.json has no kind "
                        f"{KIND_T2I!r}): it has no empty context")
    (length, width), dtype = context_spec(index)
    entry = index.get("empty_context") or {}
    path = os.path.join(data_dir, entry.get("name", EMPTY_CONTEXT))
    fix = ("recreate it: rerun the prepare command that made this data set (it rewrites "
           "the empty context when it is missing)")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path} is missing (index.json lists it); {fix}") from None
    got = crc32_text(zlib.crc32(data))
    if entry.get("checksum") and (got != entry["checksum"] or len(data) != entry.get("size")):
        raise DataError(f"{path} is damaged: index.json records checksum {entry['checksum']} "
                        f"({entry.get('size')} bytes), the file has {got} ({len(data)} "
                        f"bytes); {fix}")
    try:
        context = np.load(io.BytesIO(data))
    except Exception as error:  # numpy's header parser raises several kinds
        raise DataError(f"{path} cannot be read: {type(error).__name__}: {error}; {fix}"
                        ) from None
    if context.dtype != dtype or context.shape != (length, width):
        raise DataError(f"{path} is {context.dtype} {list(context.shape)}, not the set's "
                        f"{dtype} [{length}, {width}]; {fix}")
    if not np.isfinite(context).all():
        raise DataError(f"{path} holds non-finite values; {fix}")
    return context
