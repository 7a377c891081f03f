"""Training data: preparation into WebDataset shards, and DALI / PyTorch loaders.

* :mod:`repa_fast.data.prepare`: ``python -m repa_fast.data.prepare --source ... --dest ...``
  (ADM center crop, SD-VAE moments, resumable, parallel);
* :func:`make_loader`: batches ``(images uint8 [B,3,H,W], moments, labels)`` with one sample
  order for both backends, sharded by rank, resumable mid-epoch; for a text-to-image set
  (:func:`is_text_to_image` of its index, ``loader.text_to_image``) ``(images, moments,
  contexts [B, L, D], caption int64 [B])``, the caption drawn from (seed, epoch, position);
* text-to-image sets: :func:`empty_context` (the empty caption's features [L, D], for
  classifier-free guidance), :func:`grid_samples` (fixed samples' captions, contexts and
  images for sample grids), :func:`caption_choice`; made by ``prepare --captions`` (MS-COCO +
  CLIP), from U-ViT folders, or :func:`repa_fast.data.demo_t2i.make_demo_t2i_dataset`;
* :func:`center_crop_dhariwal`: the official crop;
* :func:`label_range`: ``(min, max)`` class label of a prepared set (train's --num-classes
  check); :class:`DataError` / :class:`BadSampleError`: damaged data, named.

Names are imported on first use: the DALI loader's reader processes import
:mod:`repa_fast.data.samples` and start faster without the loaders' torch.
"""
import importlib

_WHERE = {"center_crop_dhariwal": ".crop", "read_index": ".shards", "LoaderConfig": ".loaders",
          "SampleTable": ".samples", "TorchLoader": ".loaders", "DALILoader": ".loaders",
          "epoch_order": ".samples", "make_loader": ".loaders", "label_range": ".shards",
          "BadSampleError": ".samples", "BadSampleWarning": ".samples", "DataError": ".shards",
          "is_text_to_image": ".shards", "empty_context": ".captions",
          "caption_choice": ".captions", "grid_samples": ".samples", "GridSamples": ".samples"}

__all__ = ["BadSampleError", "BadSampleWarning", "DALILoader", "DataError", "GridSamples",
           "LoaderConfig", "SampleTable", "TorchLoader", "caption_choice", "center_crop_dhariwal",
           "empty_context", "epoch_order", "grid_samples", "is_text_to_image", "label_range",
           "make_loader", "read_index"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
