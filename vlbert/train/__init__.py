"""Training: DeepSpeed engine, checkpoints and the loop (tracking: ``vlbert.tracking``).

``train`` and friends are imported lazily so that ``import vlbert.train.checkpoint``
does not pull in DeepSpeed or MLflow.
"""

import importlib

_EXPORTS = {
    "train": "vlbert.train.loop",
    "TrainResult": "vlbert.train.loop",
    "Engine": "vlbert.train.engine",
    "init_distributed": "vlbert.train.engine",
    "Checkpointer": "vlbert.train.checkpoint",
    "build_tracker": "vlbert.tracking",
    "fetch_runs": "vlbert.tracking",
    "fetch_metric_histories": "vlbert.tracking",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlbert.train' has no attribute {name!r}")
