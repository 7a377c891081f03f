"""Inception-v3 features for FID / sFID / IS / precision-recall, via torch-fidelity.

torch-fidelity's ``FeatureExtractorInceptionV3`` is a PyTorch port of the TensorFlow graph
``classify_image_graph_def.pb`` (Inception, 2015-12-05) that ADM's evaluator runs: the same
weights, TensorFlow-1.x bilinear resizing to 299 × 299 (``align_corners=False``) and the
``(x − 128) / 128`` input scaling of that graph. It is built here from a local weights file
only (``feature_extractor_weights_path``); nothing is downloaded.

Per image it yields (see :mod:`.features`):

* ``pool`` — torch-fidelity's ``"2048"`` feature, ADM's ``pool_3``.
* ``logits`` — torch-fidelity's ``"logits_unbiased"``: ``pool_3 · Wᵀ`` of the 1008-way
  ``softmax`` layer without its bias. ADM's IS takes the softmax of exactly this
  (``softmax/logits/MatMul`` with the weights only), and so does torch-fidelity's ISC; the
  biased ``"logits"`` would give different IS values.
* ``spatial`` — ADM's ``mixed_6/conv``: the ReLU output of the first 1×1 convolution branch
  (192 channels, 17 × 17) of the 7th mixed block, torch-fidelity's ``Mixed_6d.branch1x1``
  (torch-fidelity's weight converter maps ``mixed_6/conv/*`` to that module). A forward hook
  takes its output; like ADM we keep channels 0-6 and flatten in TensorFlow's H, W, C order,
  so stored ADM ``mu_s``/``sigma_s`` line up with ours element by element.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from .errors import EvaluationInputError
from .features import (NUM_LOGITS, POOL_DIM, SPATIAL_CHANNELS, SPATIAL_DIM, SPATIAL_SIZE,
                       Activations)

# torch-fidelity's release of the converted weights (``URL_INCEPTION_V3`` in
# torch_fidelity.feature_extractor_inceptionv3; a test keeps the two equal).
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
DEFAULT_WEIGHTS = os.path.join("ckpts", "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "REPA_FAST_INCEPTION_WEIGHTS"
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # ADM's mixed_6/conv


def resolve_weights_path(path: Union[str, os.PathLike, None] = None) -> Path:
    """The Inception weights file: ``path`` if given, else ``$REPA_FAST_INCEPTION_WEIGHTS``,
    else ``ckpts/pt_inception-2015-12-05-6726825d.pth``; an error when it does not exist."""
    chosen = path if path is not None else os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS
    p = Path(chosen).expanduser()
    if not p.is_file():
        source = ("--inception-weights" if path is not None
                  else WEIGHTS_ENV if os.environ.get(WEIGHTS_ENV) else "the default")
        raise EvaluationInputError(
            f"--inception-weights: Inception weights file not found: {p} (from {source}). "
            f"Download {WEIGHTS_URL} and save it as {p}, or pass --inception-weights PATH / set "
            f"{WEIGHTS_ENV}; nothing is downloaded automatically")
    return p


def _torch_fidelity_inception():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise ImportError("the evaluator needs torch-fidelity and scipy: "
                          "pip install 'repa_fast[eval]'") from error
    return FeatureExtractorInceptionV3


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _full_fp32() -> Iterator[None]:
    """TF32 off for convolutions and matmuls: cuDNN allows it by default, and its 10-bit
    mantissa moves the features (and FID) measurably; restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; a CUDA request without CUDA is an
    input error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvaluationInputError(f"--device: expected auto, cpu, cuda or cuda:N, got "
                                   f"{device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationInputError(f"--device: {device} was asked for but CUDA is not available")
    return dev


def describe_file(path) -> str:
    """What a file that torch.load refused looks like: empty, a text file (its first words),
    HTML, or binary that is neither a zip nor a pickle (its first bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    if not head:
        return "an empty file"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a download that saved a web page?)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the file itself was not downloaded)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = " ".join(text.split())[:40]
        return f"a text file (starting {first!r})"
    kind = ("a zip archive" if head.startswith(b"PK") else
            "a pickle" if head[:1] == b"\x80" else "neither a zip nor a pickle")
    return f"{kind} (first bytes {head[:8].hex(' ')})"


class InceptionFeatureExtractor:
    """torch-fidelity's Inception-v3 loaded from a local file, giving :class:`Activations`.

    ``weights``: path (see :func:`resolve_weights_path`). The file is first opened with
    ``torch.load(weights_only=True)``, which unpickles only tensors and plain containers, so
    a file that is not a plain state dict is refused before torch-fidelity unpickles it with
    ``weights_only=False`` (which could run code from a hostile file).
    """

    def __init__(self, weights: Union[str, os.PathLike, None] = None,
                 device: Union[str, torch.device, None] = None) -> None:
        self.weights_path = resolve_weights_path(weights)
        self.device = resolve_device(device)
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle/zip errors come in many types
            kind = describe_file(self.weights_path)
            # torch's own words help only for zips and pickles (its weights_only advice
            # misleads for a text or HTML file)
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            why = f" (torch.load: {first})" if kind.startswith(("a zip", "a pickle")) else ""
            raise EvaluationInputError(f"--inception-weights: {self.weights_path} is {kind}, "
                                       f"not a PyTorch state dict of tensors{why}; download "
                                       f"the file from {WEIGHTS_URL}") from None
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise EvaluationInputError(f"--inception-weights: {self.weights_path} is not an "
                                       f"Inception-v3 state dict (no 'fc.weight'); expected the "
                                       f"file from {WEIGHTS_URL}")
        del state
        extractor_cls = _torch_fidelity_inception()
        try:
            model = extractor_cls("inception-v3-compat", ["2048", "logits_unbiased"],
                                  feature_extractor_weights_path=str(self.weights_path))
        except RuntimeError as error:  # load_state_dict: missing/unexpected keys, bad shapes
            raise EvaluationInputError(f"--inception-weights: {self.weights_path} does not fit "
                                       f"torch-fidelity's Inception-v3: {error}") from None
        self.model = model.to(self.device)
        if self.device.type == "cpu":
            # oneDNN convolutions run ~1.6× faster in NHWC here; results move by ~1e-6 only.
            # (GPUs keep torch-fidelity's layout: not measured there.)
            self.model.to(memory_format=torch.channels_last)
        self._spatial: Optional[torch.Tensor] = None
        self.model.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # N×192×17×17 → first 7 channels → N×17×17×7 (TensorFlow's NHWC) → N×2023.
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> Activations:
        """Activations of one batch of uint8 ``N × H × W × 3`` images (any H, W)."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise EvaluationInputError(f"images: expected uint8 N×H×W×3, got {images.dtype} "
                                       f"{images.shape}")
        if not images.flags.writeable:  # torch.from_numpy warns on read-only memory
            images = images.copy()
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)
        with _full_fp32():
            pool, logits = self.model(x)
        spatial, self._spatial = self._spatial, None
        assert spatial is not None and spatial.shape[1] == SPATIAL_DIM, (
            f"{SPATIAL_MODULE} gave {None if spatial is None else tuple(spatial.shape)}; "
            f"expected N×{SPATIAL_DIM} ({SPATIAL_CHANNELS} channels of {SPATIAL_SIZE}×{SPATIAL_SIZE})")
        return Activations(pool=pool.float().cpu().numpy(),
                           spatial=spatial.float().cpu().numpy(),
                           logits=logits.float().cpu().numpy())

    def extract(self, batches: Iterable[np.ndarray],
                progress: Optional[Callable[[int], None]] = None) -> Activations:
        """Activations of all images in ``batches``; ``progress(n_done)`` after each batch."""
        parts, done = [], 0
        for batch in batches:
            parts.append(self(batch))
            done += len(batch)
            if progress is not None:
                progress(done)
        return Activations.concatenate(parts)


def write_random_inception_weights(path: Union[str, os.PathLike], seed: int = 0) -> Path:
    """Write a randomly initialised state dict for torch-fidelity's Inception-v3 to ``path``.

    For tests and smoke runs of the whole pipeline where the real weights are not at hand:
    it loads through the same local-file path. Metrics from it mean nothing. Convolutions get
    He-normal weights (so activations keep their scale through ~90 layers, instead of
    decaying as with PyTorch's default init), batch norms are identities, ``fc`` is normal
    with variance 1/2048 and a random bias (so biased and unbiased logits differ).
    """
    extractor_cls = _torch_fidelity_inception()

    class _Unloaded(extractor_cls):  # type: ignore[misc, valid-type]
        # torch-fidelity's constructor always loads a file; give it an empty one and skip it.
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ANN001
            return super().load_state_dict(state_dict, strict=False)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        skeleton = _Unloaded("random-init", ["2048"], feature_extractor_weights_path=empty)
        state = skeleton.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if name.endswith("conv.weight"):
            fan_in = tensor[0].numel()
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        elif name == "fc.weight":
            tensor.copy_(torch.randn(tensor.shape, generator=gen) / POOL_DIM ** 0.5)
        elif name == "fc.bias":
            tensor.copy_(torch.randn(tensor.shape, generator=gen))
    assert state["fc.weight"].shape == (NUM_LOGITS, POOL_DIM)
    torch.save(state, out)
    return out
