"""Pieces of the training loop in ``repa_fast/train.py``, which stays flat:

* :mod:`.build` — a run from its config (:class:`~.build.Run`), with :mod:`.data`,
  :mod:`.encoders`, :mod:`.resume` and :mod:`.tiles`;
* :mod:`.step` — one training step (:class:`~.step.TrainStep`, shared with the benchmark);
* :mod:`.engine` / :mod:`.zero` — what updates the weights: the plain (DDP) path or DeepSpeed,
  one interface;
* :mod:`.stats` — running sums on the device, the log steps, the progress bar;
* :mod:`.checkpointer` — saves, postponed saves, the non-finite stop;
* :mod:`.samples` — EMA sample grids;
* :mod:`.config`, :mod:`.ema`, :mod:`.optim`, :mod:`.checkpoint_files`, :mod:`.metrics`,
  :mod:`.run_dir`, :mod:`.stop` — the typed config and the parts these use.
"""
