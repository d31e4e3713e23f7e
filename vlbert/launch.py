"""The command line shared by the run commands (``vlbert.cli.train``, ``vlbert.cli.finetune``):
``--config FILE [--set KEY=VALUE ...]``, under ``python``, ``torchrun`` or ``deepspeed``, and their
exit status: 0 finished or stopped cleanly on a signal, 2 a config error, 1 a data error
(a source with no usable sample, no batch within the wait limit), another job holding the
output folder's lease, or any other failure."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional

from vlbert.cli.common import add_overrides, command_parser, overrides, skip_garbage_collection_at_exit


def parse_run_args(prog: str, doc: str, config_help: str, override_example: str,
                   argv: Optional[list[str]] = None) -> argparse.Namespace:
    """``--config`` and the ``--set`` overrides. The ``deepspeed`` launcher's ``--local_rank``
    is accepted and passed on as ``LOCAL_RANK`` (the rank is read from the environment)."""
    p = command_parser(prog, doc)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; the rank is read from the environment")
    add_overrides(p, override_example)
    args = p.parse_args(argv)
    args.overrides = overrides(args)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def run_command(argv: Optional[list[str]], prog: str, doc: str, config_help: str, override_example: str,
                load: Callable[[str, list[str]], Any], run: Callable[[Any], Any],
                on_finished: Optional[Callable[[Any], None]] = None) -> int:
    """Parse the command line, ``load(config, overrides)``, ``run(cfg)``; returns the exit status.
    ``run``'s result has ``preempted``, ``signal``, ``step`` and ``checkpoint``; ``on_finished``
    sees the result of a run that was not stopped."""
    from vlbert.config import ConfigError
    from vlbert.data.prefetch import DataWaitTimeout
    from vlbert.data.shards import SourceUnusable
    from vlbert.train.lease import LeaseHeld

    args = parse_run_args(prog, doc, config_help, override_example, argv)
    skip_garbage_collection_at_exit()
    try:
        result = run(load(args.config, args.overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (SourceUnusable, DataWaitTimeout) as e:  # a source with nothing usable, or a store that never answers
        print(f"data error: {e}", file=sys.stderr)
        return 1
    except LeaseHeld as e:  # another job writes the same output folder
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.preempted:
        print(f"stopped on {result.signal} at step {result.step}; checkpoint {result.checkpoint}", file=sys.stderr)
    elif on_finished is not None:
        on_finished(result)
    return 0
