"""``deepspeed tools/train.py ...`` and slurm/pretrain.sh run this file: launchers take a script path.
The command is ``vlbert.cli.train`` (``vlbert-train``); see its ``--help``."""

import sys

from vlbert.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
