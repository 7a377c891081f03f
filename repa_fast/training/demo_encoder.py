"""The demo's frozen encoder (``--enc-type demo``): a tiny ViT that has learned the shapes.

REPA pulls the SiT's hidden states towards a *pretrained* encoder's patch tokens; a random
encoder's tokens say nothing about the image, so aligning to them cannot help. The demo's
stand-in for DINOv2 is a ViT small enough to train in seconds on the CPU, as a classifier of
the built-in shapes (:mod:`repa_fast.data.demo`, 12 classes = shape × colour)::

    tokens = LayerNorm(blocks(patch_embed(x) + pos))      [B, 8·8, 64]   (patch r/8, no CLS)
    logits = W · max_tokens(tokens) + b                    the training head, unused by REPA

(max over tokens, per channel: a shape is told by local evidence, a corner or a curve, found
anywhere; a mean pool learns far slower) so the patch tokens say what each part of the image
shows. ``--enc-weights`` picks its
weights: ``trained`` (trained on first use, on freshly drawn shapes at ``--resolution``, and
kept in the machine cache: :func:`trained_path`), ``random`` (untrained, as before: fast
tests), or such a file (:func:`save_weights_file`).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic_write import atomic_path
from ..data.demo import NUM_CLASSES, draw
from ..errors import UsageError
from ..machine_cache import cache_root

FORMAT = "repa_fast demo encoder"
VERSION = 1  # bump when the architecture or the recipe changes: a new cache file
GRID, WIDTH, DEPTH, HEADS = 8, 64, 2, 2  # an 8×8 token grid at every resolution (patch r/8)
SEED = 1234
# the recipe: fresh images per step, so no epoch of a fixed set is overfitted
TRAIN_STEPS, BATCH, LR, HELD_OUT = 300, 64, 3e-3, 600
WEIGHT_CHOICES = ("trained", "random")


def backbone(resolution: int) -> torch.nn.Module:
    """The tiny ViT (timm), untrained."""
    from timm.models.vision_transformer import VisionTransformer
    if resolution % GRID or resolution < 2 * GRID:
        raise UsageError(f"--resolution {resolution}: the demo encoder reads an {GRID}×{GRID} "
                         f"grid of patches of at least 2 px, so the resolution must be a "
                         f"multiple of {GRID}, at least {2 * GRID}")
    return VisionTransformer(img_size=resolution, patch_size=resolution // GRID, embed_dim=WIDTH,
                             depth=DEPTH,
                             num_heads=HEADS, num_classes=NUM_CLASSES, global_pool="max",
                             class_token=False, fc_norm=False)


def spec(resolution: int):
    from ..encoders import EncoderSpec
    return EncoderSpec(name="demo", family="mae", timm_model="vit_demo", timm_kwargs=(),
                       patch_size=resolution // GRID, embed_dim=WIDTH, num_prefix_tokens=0,
                       final_norm=True,
                       checkpoint=os.path.basename(trained_path(resolution)),
                       url="trained on first use by repa_fast.training.demo_encoder")


def trained_path(resolution: int) -> str:
    """Where ``--enc-weights trained`` keeps the encoder of ``resolution`` px."""
    return os.path.join(cache_root(), "demo", f"encoder_v{VERSION}_{resolution}px.pt")


def draw_shapes(count: int, resolution: int, seed: int) -> tuple:
    """``(images uint8 [count, 3, r, r], labels int64 [count])``: the demo's shapes, classes
    in turn, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % NUM_CLASSES
    images = np.stack([draw(int(c), rng, resolution) for c in labels]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def fit_classifier(model: torch.nn.Module, logits: Callable, resolution: int, seed: int,
                   steps: int = TRAIN_STEPS, batch: int = BATCH, lr: float = LR) -> float:
    """Train ``model`` (``logits(uint8 images)`` its class scores) to classify the demo's shapes on
    ``steps`` batches of fresh ones (AdamW, cosine decay), on the CPU; returns its accuracy on
    ``HELD_OUT`` others. Seeded: the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images, labels = draw_shapes(steps * batch, resolution, seed)
        test_images, test_labels = draw_shapes(HELD_OUT, resolution, seed + 1)
        order = torch.randperm(len(labels))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for step in range(steps):
            pick = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(logits(images[pick]), labels[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([logits(x).argmax(1) for x in test_images.split(200)])
    model.requires_grad_(False)
    return float((predicted == test_labels).float().mean())


def train_demo_encoder(resolution: int) -> tuple:
    """``(backbone, held-out accuracy)``: the tiny ViT trained as a shape classifier."""
    from ..encoders import preprocess_raw_image
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = backbone(resolution)
    accuracy = fit_classifier(model, lambda x: model(preprocess_raw_image(x, "mae")),
                              resolution, SEED)
    return model, accuracy


def save_weights_file(model: torch.nn.Module, kind: str, version: int, resolution: int,
                      accuracy: float, path: str) -> None:
    """``model``'s weights and what they are, atomically (ranks or runs may fill the cache
    at once)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, unique=True) as tmp:
        torch.save(dict(format=kind, version=version, resolution=resolution,
                        accuracy=accuracy, state_dict=model.state_dict()), tmp)


def load_weights_file(path: str, kind: str, version: int, resolution: int, name: str) -> dict:
    """The state dict of a file :func:`save_weights_file` wrote with ``kind``, ``version`` and
    ``resolution``; errors start with ``name`` (the flag or the file's role) and say what is
    wrong."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{name} {path}: no such file") from None
    except Exception as error:  # a torn or foreign file: pickle, zip and EOF errors alike
        raise UsageError(f"{name} {path}: not a readable {kind} file "
                         f"({type(error).__name__}: {error})") from None
    if not isinstance(saved, dict) or saved.get("format") != kind:
        raise UsageError(f"{name} {path}: not a {kind} file")
    if saved.get("version") != version or saved.get("resolution") != resolution:
        raise UsageError(f"{name} {path}: a {kind} of version {saved.get('version')} at "
                         f"{saved.get('resolution')} px; expected version {version} at "
                         f"{resolution} px")
    return saved["state_dict"]


def cached_weights(path: str, kind: str, resolution: int, train: Callable, what: str,
                   version: int = VERSION, log: Optional[Callable] = print) -> dict:
    """The state dict of ``kind`` cached in ``path``; when missing or unreadable, ``train()``
    (-> ``(model, held-out accuracy)``) makes it first and it is saved there."""
    if os.path.exists(path):
        try:
            return load_weights_file(path, kind, version, resolution, f"the cached {what},")
        except UsageError as error:  # a damaged cache is redone, not a reason to stop
            if log:
                log(f"{error}; training it again")
    if log:
        log(f"training the {what} (on the CPU, once per machine; cached as {path})")
    start = time.perf_counter()
    model, accuracy = train()
    save_weights_file(model, kind, version, resolution, accuracy, path)
    if log:
        log(f"the {what}: trained in {time.perf_counter() - start:.0f} s, held-out accuracy "
            f"{accuracy:.1%}")
    return model.state_dict()


def trained_state(resolution: int) -> dict:
    """The trained demo encoder's weights (trained and cached first when needed)."""
    return cached_weights(trained_path(resolution), FORMAT, resolution,
                          lambda: train_demo_encoder(resolution),
                          f"demo encoder (a tiny ViT shape classifier, {TRAIN_STEPS} steps)")


def demo_encoder(resolution: int, weights: str = "trained"):
    """The :class:`~repa_fast.encoders.FrozenEncoder` of ``--enc-type demo``."""
    from ..encoders import FrozenEncoder
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)  # the same targets in every run
            model = backbone(resolution)
    elif weights == "trained":
        model = backbone(resolution)
        model.load_state_dict(trained_state(resolution))
    else:
        if not os.path.exists(weights):
            raise UsageError(f"--enc-weights {weights}: no such file; for --enc-type demo pass "
                             f"trained (trained on first use and cached), random, or a file "
                             f"the demo wrote ({trained_path(resolution)})")
        model = backbone(resolution)
        model.load_state_dict(load_weights_file(weights, FORMAT, VERSION, resolution,
                                                "--enc-weights"))
    return FrozenEncoder(spec(resolution), model, resolution)
