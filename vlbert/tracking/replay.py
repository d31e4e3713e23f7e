"""Send what a training run left in its tracking spool to its MLflow store.

    vlbert-replay-tracking runs/base/mlflow_spool
    vlbert-replay-tracking runs/base/mlflow_spool --tracking-uri http://mlflow:5000 --timeout 600

Each run goes to the store it was logged for unless ``--tracking-uri`` names
another. Records go in order, once each (see ``sender.py``); a run that never
reached the store is created. Retries with backoff until ``--timeout``.
Exit status: 0 when the spool is empty, 1 when records are left, 2 on bad input
or a spool that a trainer still holds.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

from vlbert.cli.common import command_parser, skip_garbage_collection_at_exit
from vlbert.tracking.sender import Sender, StoreUnavailable
from vlbert.tracking.spool import DB_NAME, Spool, SpoolBusy, SpoolLock


def replay(spool_dir: str, tracking_uri: Optional[str] = None, timeout_s: float = 300.0,
           retry_max_s: float = 30.0) -> tuple[int, int]:
    """Send the spool in ``spool_dir``; (records sent, records left). Raises ``SpoolBusy``,
    ``FileNotFoundError``."""
    if not (Path(spool_dir) / DB_NAME).is_file():  # before the lock, which would make the folder
        raise FileNotFoundError(f"no tracking spool at {Path(spool_dir) / DB_NAME}")
    lock = SpoolLock(spool_dir)
    try:
        spool = Spool(spool_dir, create=False)
        sender = Sender(spool, uri=tracking_uri or None)
        deadline, failures = time.monotonic() + timeout_s, 0
        while True:
            try:
                if sender.send_pending(deadline=deadline):
                    break
            except StoreUnavailable as e:
                failures += 1
                pause = min(retry_max_s, 2.0 ** (failures - 1), deadline - time.monotonic())
                if pause <= 0:
                    break
                print(f"store unavailable ({e}); retrying in {pause:.0f} s", file=sys.stderr)
                time.sleep(pause)
            if time.monotonic() >= deadline:
                break
        left = spool.count()
        if left:
            print(f"still unsent: {spool.describe()}", file=sys.stderr)
        if sender.skipped or sender.rejected:
            print(f"{sender.skipped} metric records skipped (steps an earlier attempt had logged), "
                  f"{sender.rejected} rejected by the store", file=sys.stderr)
        spool.close()
        return sender.sent, left
    finally:
        lock.release()


def main(argv: Optional[list[str]] = None) -> int:
    skip_garbage_collection_at_exit()
    p = command_parser("vlbert-replay-tracking", __doc__)
    p.add_argument("spool_dir", help="the run's spool folder (default <output_dir>/mlflow_spool)")
    p.add_argument("--tracking-uri", default="", help="send every run here instead of the store it was logged for")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to keep retrying (default 300)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sent, left = replay(args.spool_dir, args.tracking_uri, args.timeout)
    except (SpoolBusy, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sent {sent} records; {left} left")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
