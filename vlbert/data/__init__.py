"""Streaming data: shards (listing, split, cursors), caption and text samples,
masking, and the resumable pretraining mixture.

The names below are imported lazily so that ``import vlbert.data.masking``
stays light (no torch, no PIL).
"""

import importlib

_EXPORTS = {
    "PretrainStream": "vlbert.data.mixture",
    "build_pretrain_stream": "vlbert.data.mixture",
    "build_validation_stream": "vlbert.data.mixture",
    "Cursor": "vlbert.data.shards",
    "ShardStream": "vlbert.data.shards",
    "SkipCounter": "vlbert.data.shards",
    "expand_urls": "vlbert.data.shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlbert.data' has no attribute {name!r}")
