"""Which samples each step consumed: one JSON line per step per rank, for audits.

``<output_dir>/sample_keys/rank<r>.jsonl``, each line
``{"step": s, "captions": [key, ...], "text": [key, ...], "partitions": [p, ...]}``
over the step's micro-batches in order (keys as in ``vlbert.batch``; ``partitions``: the
canonical data partition of each micro-batch). A resumed attempt
first drops the lines after the step it resumes from (the crashed attempt may
have written steps that the checkpoint does not hold), so the file always
describes one history: every step once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from vlbert.batch import PretrainBatch


def sample_keys_path(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / "sample_keys" / f"rank{rank}.jsonl"


class SampleKeyLog:
    """Appends one line per step; ``resume_step`` trims what a crashed attempt wrote past it."""

    def __init__(self, output_dir: Path, rank: int, resume_step: int = 0):
        self.path = sample_keys_path(output_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in read_lines(self.path) if line["step"] <= resume_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a killed run loses no whole line

    def write(self, step: int, batches: list[PretrainBatch]) -> None:
        keys: dict[str, list] = {"captions": [], "text": [], "partitions": []}
        for batch in batches:
            for kind, ks in batch.keys.items():
                keys[kind].extend(ks)
            keys["partitions"].append(batch.partition)
        self._file.write(json.dumps({"step": step, **keys}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_lines(path: Path) -> list[dict]:
    """The lines of one rank's file; a last line cut off by a kill is ignored."""
    if not Path(path).exists():
        return []
    out = []
    for raw in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            break
    return out


def read_sample_keys(output_dir: Path, rank: Optional[int] = None) -> dict[int, list[dict]]:
    """``{rank: [line, ...]}`` of a run (one rank if given)."""
    root = Path(output_dir) / "sample_keys"
    ranks = [rank] if rank is not None else sorted(int(p.stem[4:]) for p in root.glob("rank*.jsonl"))
    return {r: read_lines(sample_keys_path(output_dir, r)) for r in ranks}
