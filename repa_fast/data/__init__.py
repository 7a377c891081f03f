"""Training data: preparation into WebDataset shards, and DALI / PyTorch loaders.

* :mod:`repa_fast.data.prepare`: ``python -m repa_fast.data.prepare --source ... --dest ...``
  (ADM center crop, SD-VAE moments, resumable, parallel);
* :func:`make_loader`: batches ``(images uint8 [B,3,H,W], moments, labels)`` with one sample
  order for both backends, sharded by rank, resumable mid-epoch;
* :func:`center_crop_dhariwal`: the official crop.
"""
from .crop import center_crop_dhariwal
from .loaders import LoaderConfig, SampleTable, TorchLoader, DALILoader, epoch_order, make_loader
from .shards import read_index

__all__ = ["DALILoader", "LoaderConfig", "SampleTable", "TorchLoader", "center_crop_dhariwal",
           "epoch_order", "make_loader", "read_index"]
