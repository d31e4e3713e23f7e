"""``deepspeed tools/finetune.py ...`` and slurm/finetune.sh run this file: launchers take a script path.
The command is ``vlbert.cli.finetune`` (``vlbert-finetune``); see its ``--help``."""

import sys

from vlbert.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
