"""The command line shared by the run commands (``vlbert.cli.train``, ``vlbert.cli.finetune``):
``--config FILE [key=value ...]``, under ``python``, ``torchrun`` or ``deepspeed``."""

from __future__ import annotations

import argparse
import os
from typing import Optional


def parse_run_args(doc: str, config_help: str, override_example: str,
                   argv: Optional[list[str]] = None) -> argparse.Namespace:
    """``--config`` and the dotted overrides. The ``deepspeed`` launcher's ``--local_rank``
    is accepted and passed on as ``LOCAL_RANK`` (the rank is read from the environment)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; the rank is read from the environment")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {override_example}")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args
