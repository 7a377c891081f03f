"""Sample-quality metrics with ADM's definitions: FID, sFID, Inception Score, precision, recall.

``python -m repa_fast.evaluate`` is the command line; :func:`compute_metrics` the Python API.
Modules: :mod:`.npz` (loading/checking batches), :mod:`.inception` (torch-fidelity features),
:mod:`.metrics` (the maths), :mod:`.cache` (optional activation cache), :mod:`.pipeline`.
Importing this package loads neither torch-fidelity nor scipy; they are needed when used
(``pip install 'repa_fast[eval]'``).
"""
from .errors import EvaluationInputError
from .features import Activations
from .inception import (DEFAULT_WEIGHTS, WEIGHTS_ENV, WEIGHTS_URL, InceptionFeatureExtractor,
                        resolve_weights_path, write_random_inception_weights)
from .metrics import (FeatureStats, frechet_distance, inception_score, manifold_radii,
                      precision_recall)
from .pipeline import compute_metrics, format_summary

__all__ = [
    "Activations", "DEFAULT_WEIGHTS", "EvaluationInputError", "FeatureStats",
    "InceptionFeatureExtractor", "WEIGHTS_ENV", "WEIGHTS_URL", "compute_metrics",
    "format_summary", "frechet_distance", "inception_score", "manifold_radii",
    "precision_recall", "resolve_weights_path", "write_random_inception_weights",
]
