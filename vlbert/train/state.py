"""The run's counters: one object that every checkpoint saves and every resume restores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class TrainState:
    """Counters of the whole run (all attempts), the same on every rank.

    step:          optimizer steps completed
    samples_seen:  captioned images + text segments consumed, all ranks
    tokens_seen:   sequence elements (words, RoIs) consumed, all ranks
    mlflow_run_id: the MLflow run this run logs to (None until one exists)
    mlflow_run_key: the tracker's client-side key of that run (known before the run exists)
    layout:        the attempt that saved it (``layout.Layout.to_dict()``: world size, workers,
                   accumulation, micro-batch, data partitions, global batch)
    """

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    mlflow_run_id: Optional[str] = None
    mlflow_run_key: Optional[str] = None
    layout: dict[str, int] = field(default_factory=dict)

    def advance(self, samples: int, tokens: int) -> None:
        """One optimizer step that consumed ``samples`` and ``tokens`` on all ranks together."""
        self.step += 1
        self.samples_seen += samples
        self.tokens_seen += tokens

    def to_meta(self) -> dict[str, Any]:
        """The checkpoint's metadata keys (``step`` is written by the checkpointer itself)."""
        meta = asdict(self)
        meta.pop("step")
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "TrainState":
        return cls(step=int(meta["step"]), samples_seen=int(meta.get("samples_seen", 0)),
                   tokens_seen=int(meta.get("tokens_seen", 0)), mlflow_run_id=meta.get("mlflow_run_id"),
                   mlflow_run_key=meta.get("mlflow_run_key"), layout=dict(meta.get("layout", {})))
