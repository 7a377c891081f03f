"""Pieces of the training loop in ``repa_fast/train.py``: typed config, EMA, checkpoints,
metrics. The loop itself stays flat in ``train.py``."""
