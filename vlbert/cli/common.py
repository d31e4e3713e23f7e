"""The command line every ``vlbert-*`` command shares.

- One parser shape: ``prog`` is the installed command's name, the description is the first
  line of the module's docstring and ``--help`` ends with the rest of it (the examples).
- One override style: ``--set KEY=VALUE``, repeatable, read by the same config reader in every
  command that takes a config. The older positional ``key=value`` form still works, with a
  warning, so that existing job scripts keep running.
- One spelling per flag: ``--out`` for where a command writes, ``--rows-per-shard`` for shard
  sizes. Older spellings (``--output``, ``--per-shard``) are hidden aliases that warn.
- One quick exit: a command that loads the heavy libraries skips the interpreter's last
  garbage collections (``skip_garbage_collection_at_exit``), which take seconds.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import sys
from typing import Any, Callable, Optional, Sequence


def command_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser for the command ``prog`` documented by the module docstring ``doc``: its first
    paragraph is the description, the rest (usage examples) closes ``--help``."""
    first, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=" ".join(first.split()), epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_overrides(p: argparse.ArgumentParser, example: str = "optim.lr=1e-4", positional: bool = True) -> None:
    """``--set KEY=VALUE`` (repeatable), plus the old positional form as a hidden, warning alias
    where a command took it before (``positional``)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"config override by dotted key, repeatable (e.g. --set {example})")
    if positional:
        p.add_argument("positional_overrides", nargs="*", default=[], help=argparse.SUPPRESS)


def overrides(args: argparse.Namespace) -> list[str]:
    """Every override of the command line, positional ones first (they warn), then ``--set``."""
    old = list(getattr(args, "positional_overrides", None) or [])
    if old:
        print(f"warning: positional overrides are deprecated, write --set {old[0]} (and one --set per override)",
              file=sys.stderr)
    return old + list(args.overrides)


class _RenamedFlag(argparse.Action):
    """An old flag spelling: stores into the new flag's destination and warns once."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is renamed {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed_flag(p: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden alias of ``new`` (same ``dest``, same type)."""
    p.add_argument(old, dest=dest, action=_RenamedFlag, new=new, help=argparse.SUPPRESS, **kwargs)


def console_script(main: Callable[[Optional[list[str]]], Any]) -> Callable[[], int]:
    """The console-script entry for ``main``: ``main``'s own result goes to Python callers (a
    summary dict), the shell gets an exit status (``main``'s when it returns an int, else 0)."""

    def run() -> int:
        skip_garbage_collection_at_exit()
        result = main(None)
        return result if isinstance(result, int) else 0

    run.__doc__ = f"The console script of {main.__module__}."
    return run


_EXIT_GC_SKIPPED = False


def skip_garbage_collection_at_exit() -> None:
    """Spare the process the interpreter's last full garbage collections.

    A command's heap (torch, DeepSpeed, transformers, MLflow: millions of objects) makes the
    collections Python runs while shutting down take seconds (4-6 s per trainer process on
    a busy 2-core machine, measured), after the work has ended: a job's allocation, a
    requeue and every rank wait for them. ``gc.freeze()`` at exit takes every object out of their
    reach. Nothing is lost: the other exit handlers (logging's flush, multiprocessing's
    clean-up, temporary folders) still run, objects are still freed by reference counting
    as the modules are cleared, and Python never promised finalizers of objects alive at
    exit. Registered once per process."""
    global _EXIT_GC_SKIPPED
    if not _EXIT_GC_SKIPPED:
        _EXIT_GC_SKIPPED = True
        atexit.register(gc.freeze)
