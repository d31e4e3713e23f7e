"""Compare MLflow runs of vlbert: a table of what differs and how they did, and their curves.

    vlbert-compare                                          # every run in the store
    vlbert-compare --experiment vlbert                      # all runs of an experiment
    vlbert-compare --run-ids 3f2a... 9c1e... --plot cmp.png --table-out cmp.md
    vlbert-compare --names base-lr1e-4 base-lr2e-4 --tracking-uri http://mlflow:5000
    vlbert-compare --experiment vlbert --filter "params.optim.lr = '2.56e-05'"

Store: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the
working folder (as training uses). Runs: by ``--run-ids``, or by ``--names`` and/or
``--filter`` (MLflow search syntax), within ``--experiment`` when given (else in every
experiment); with none of these, every run in the store. Runs without metrics
are left out with a warning, or are an error when asked for by id or name.

Prints a table (one row per field, one column per run): run id, status, the config
parameters whose values differ between the runs, final and best value of each loss,
accuracy, throughput, MFU, samples seen, the demo's probe figures, last step and wall time,
and the downstream scores (``downstream val/vqa_acc``: mean ± std over the finished
fine-tuning runs tagged ``vlbert.pretrain_run_id`` with that run, from any experiment).
Writes the curves
of all runs (loss vs step and vs samples seen, throughput and learning rate vs step)
to ``--plot`` (PNG) and the table to ``--table-out`` (.csv or .md). A resumed run is
one curve; runs that FAILED or are RUNNING are named so in the table and the legend.

Errors (unknown experiment or run, unreachable server, runs without metrics) print
one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Optional

from vlbert.cli.common import command_parser, skip_garbage_collection_at_exit
from vlbert.tracking.compare import (
    FETCH_KEYS,
    PRETRAIN_TAG,
    CompareError,
    RunView,
    build_table,
    continuous_curve,
    downstream_rows,
    plot_runs,
    to_text,
    write_table,
)


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = command_parser("vlbert-compare", __doc__)
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///mlflow.db in the working folder)")
    p.add_argument("--experiment", "-e", action="append", default=None,
                   help="experiment name (repeatable; default: every experiment)")
    p.add_argument("--run-ids", nargs="+", default=None, metavar="ID", help="compare exactly these runs")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME", help="runs with these run names")
    p.add_argument("--filter", default=None, metavar="EXPR",
                   help="MLflow search filter, e.g. \"params.optim.lr = '1e-4'\" or \"metrics.loss < 3\"")
    p.add_argument("--plot", default="compare.png", help="PNG of the curves (default: compare.png); "
                   "'' for none")
    p.add_argument("--table-out", default=None, help="also write the table to this .csv or .md file")
    p.add_argument("--max-points", type=int, default=1000, help="points per curve in the plot (default 1000)")
    p.add_argument("--ignore-params", nargs="+", default=(), metavar="GLOB",
                   help="parameters never shown, e.g. 'runtime.*' 'tracking.run_name'")
    p.add_argument("--server-points", type=int, default=0, metavar="N",
                   help="on a tracking server, fetch at most N (<= 2500) points per metric, sampled by the "
                        "server: faster for very long runs on slow links; best values then cover only the "
                        "sampled points and are marked '~'. Default: full histories.")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds a tracking server has to answer its health check (default 5)")
    args = p.parse_args(argv)
    if args.run_ids and (args.experiment or args.names or args.filter):
        p.error("--run-ids selects runs by itself; leave out --experiment, --names and --filter")
    if args.max_points < 4:
        p.error("--max-points must be at least 4")
    if args.table_out and not args.table_out.lower().endswith((".csv", ".md", ".markdown")):
        p.error(f"--table-out {args.table_out}: expected a .csv or .md file")
    return args


def check_store(uri: str, timeout_s: float) -> None:
    """Fail fast with a clear message for a missing SQLite file or a server that does not answer
    (MLflow itself would create an empty database, or retry for minutes)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not os.path.exists(path):
            raise CliError(f"no MLflow store at {path} (from tracking URI {uri}); pass --tracking-uri")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass  # it answered (an auth proxy may refuse /health): reachable
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CliError(f"cannot reach the MLflow tracking server at {uri} ({reason})") from None


def select_runs(tracking, uri: str, args: argparse.Namespace) -> list:
    if args.run_ids:
        return tracking.fetch_runs(uri, run_ids=args.run_ids)
    # Without --experiment every experiment is searched: after the demo a new user's runs are in
    # "vlbert-demo", a pretraining run's in "vlbert" (or whatever tracking.experiment says).
    experiments = args.experiment or None
    where = f"experiment {', '.join(experiments)}" if experiments else "any experiment"
    runs = tracking.fetch_runs(uri, experiment=experiments, names=args.names, filter_string=args.filter)
    if args.names:
        missing = sorted(set(args.names) - {r.name for r in runs})
        if missing:
            raise CliError(f"no run named {', '.join(missing)} in {where}")
    if not runs:
        what = f" matching {args.filter!r}" if args.filter else ""
        raise CliError(f"no runs in {where}{what}")
    return runs


def to_views(records: list, histories: dict, sampled_at: int) -> list[RunView]:
    """RunViews with merged curves; names made unique by a short run id where they repeat."""
    names = [r.name or r.run_id[:8] for r in records]
    views = []
    for rec, name in zip(records, names):
        hists = histories.get(rec.run_id, {})
        curves = {k: continuous_curve(h.steps, h.values, h.timestamps) for k, h in hists.items()}
        last_ms = max((max(h.timestamps) for h in hists.values() if h.timestamps), default=None)
        sampled = bool(sampled_at) and any(len(h.steps) >= sampled_at for h in hists.values())
        unique = name if names.count(name) == 1 else f"{name} ({rec.run_id[:6]})"
        views.append(RunView(run_id=rec.run_id, name=unique, status=rec.status, params=dict(rec.params),
                             curves=curves, start_ms=rec.start_ms, end_ms=rec.end_ms, last_metric_ms=last_ms,
                             sampled=sampled))
    return views


def fetch_finetunes(tracking, uri: str, records: list) -> list:
    """Fine-tuning runs (any experiment) tagged with one of ``records`` as their pretraining run."""
    out = []
    for r in records:
        out += tracking.fetch_runs(uri, filter_string=f"tags.`{PRETRAIN_TAG}` = '{r.run_id}'")
    return out


def run(args: argparse.Namespace) -> int:
    # A server that is down fails in seconds at check_store (--timeout); once it answered, a
    # long history may take a while to come, and one retry rides over a hiccup (MLflow's
    # defaults retry for minutes).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from vlbert import tracking  # imports mlflow (slow): only after the arguments are fine

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    check_store(uri, args.timeout)
    records = select_runs(tracking, uri, args)
    points = min(args.server_points, 2500) if args.server_points > 0 else 0
    wanted = {r.run_id: [k for k in FETCH_KEYS if k in r.metrics] for r in records}  # keys each run logged
    histories = tracking.fetch_metric_histories_bulk(uri, wanted, max_points=points or None)
    empty = [r for r in records if not histories.get(r.run_id)]
    if empty:
        what = "; ".join(f"run {r.name or '?'} ({r.run_id}, {r.status}) logged "
                         + (f"none of the compared metrics (only {', '.join(sorted(r.metrics)[:4])}...)"
                            if r.metrics else "no metrics") for r in empty)
        if args.run_ids or args.names or len(empty) == len(records):  # asked for by name: an error
            raise CliError(f"nothing to compare: {what}")
        print(f"warning: leaving out {what}", file=sys.stderr)
        records = [r for r in records if histories.get(r.run_id)]
    views = to_views(records, histories, points)
    table = build_table(views, ignore_params=args.ignore_params)
    table.rows += downstream_rows([r.run_id for r in records], fetch_finetunes(tracking, uri, records))
    sys.stdout.write(to_text(table))
    if args.table_out:
        write_table(table, args.table_out)
        print(f"wrote {args.table_out}", file=sys.stderr)
    if args.plot:
        plot_runs(views, args.plot, max_points=args.max_points)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point (``vlbert-compare``): exit status 0, or 1 with a one-line error."""
    from vlbert.tracking.common import TrackingError  # mlflow itself is imported only when used

    skip_garbage_collection_at_exit()
    args = parse_args(argv)
    try:
        return run(args)
    except (CliError, CompareError, TrackingError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever e carried
        return 1


if __name__ == "__main__":
    sys.exit(main())
