"""Pretrain VL-BERT.

    vlbert-train --config configs/demo.yaml [key=value ...]              # one process
    torchrun --nproc_per_node 8 tools/train.py --config configs/base_e2e.yaml
    deepspeed tools/train.py --config configs/base_e2e.yaml optim.lr=2e-5

Exit status: 0 when training finished or stopped cleanly on SIGTERM/SIGUSR1
(a checkpoint was written; a requeued job resumes from it), 2 for a config
error, 1 for a data error (a source with no usable sample, no batch within
data.wait_timeout_s) or any other failure.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from vlbert.config import ConfigError, load_config
from vlbert.launch import parse_run_args
from vlbert.data.mixture import DataWaitTimeout
from vlbert.data.shards import SourceUnusable

DATA_ERRORS = (SourceUnusable, DataWaitTimeout)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_run_args(__doc__, "YAML run config (configs/*.yaml)", "optim.lr=1e-4", argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from vlbert.train.loop import train

        result = train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DATA_ERRORS as e:  # a source with nothing usable, or a store that never answers
        print(f"data error: {e}", file=sys.stderr)
        return 1
    if result.preempted:
        print(f"stopped on {result.signal} at step {result.step}; checkpoint {result.checkpoint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
