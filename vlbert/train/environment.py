"""What a run ran on: git commit, package versions, world size and hardware (as MLflow tag values)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "transformers", "mmdet", "mmcv", "mmengine", "mlflow", "fsspec", "vlbert")


def environment_tags(world_size: int) -> dict[str, str]:
    """Git commit, package versions, world size and hardware, as tag values."""
    tags = {"vlbert.world_size": str(world_size), "vlbert.host": platform.node(),
            "vlbert.python": platform.python_version(), "vlbert.cpu_count": str(os.cpu_count())}
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["vlbert.git_dirty"] = str(bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in PACKAGES:
        try:
            tags[f"vlbert.version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                tags["vlbert.cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        tags["vlbert.gpu"] = ", ".join(sorted(set(names)))
        tags["vlbert.gpus_per_node"] = str(len(names))
    return tags
