"""Pretrain VL-BERT.

    vlbert-train --config configs/demo.yaml [--set KEY=VALUE ...]        # one process
    torchrun --nproc_per_node 8 tools/train.py --config configs/base_e2e.yaml
    deepspeed tools/train.py --config configs/base_e2e.yaml --set optim.lr=2e-5

Exit status: 0 when training finished or stopped cleanly on SIGTERM/SIGUSR1
(a checkpoint was written; a requeued job resumes from it), 2 for a config
error, 1 for a data error (a source with no usable sample, no batch within
data.wait_timeout_s), another job holding the output folder (its lease) or any other
failure.
"""

from __future__ import annotations

import sys
from typing import Optional

from vlbert.config import load_config
from vlbert.launch import run_command


def _train(cfg):
    from vlbert.train.loop import train

    return train(cfg)


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(argv, "vlbert-train", __doc__, "YAML run config (configs/*.yaml)", "optim.lr=1e-4", load_config, _train)


if __name__ == "__main__":
    sys.exit(main())
