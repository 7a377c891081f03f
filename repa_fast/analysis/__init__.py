"""The REPA paper's alignment analysis of a checkpoint (``python -m repa_fast.analyze``).

* :mod:`.cknna` — CKNNA (Huh et al. 2024), batched, float64;
* :mod:`.probe` — linear probes (multinomial logistic regression), batched over feature sets;
* :mod:`.samples` — the seeded choice of samples of a prepared data set, read in batches;
* :mod:`.features` — hidden states of every block on noisy inputs, projections, encoder
  features;
* :mod:`.metrics` — CKNNA and probe tables within a memory budget;
* :mod:`.run` — one analysis from its settings; :mod:`.report` — its JSON record;
  :mod:`.plot` — its figure.
"""
from .cknna import KernelStats, cknna, hsic_biased, hsic_unbiased, knn_mask, prepare_features
from .probe import ProbeConfig, ProbeResult, linear_probe

__all__ = ["KernelStats", "ProbeConfig", "ProbeResult", "cknna", "hsic_biased",
           "hsic_unbiased", "knn_mask", "linear_probe", "prepare_features"]
