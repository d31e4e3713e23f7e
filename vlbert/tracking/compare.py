"""Compare tracked runs: the pure logic behind ``vlbert-compare`` (``vlbert/cli/compare.py``).

Nothing here talks to MLflow (only ``vlbert/tracking`` does); the CLI
fetches runs and metric histories and hands them over as :class:`RunView`.

- :func:`continuous_curve` merges a resumed run's history (the same MLflow run,
  steps logged again after a crash) into one curve: last value per step, sorted.
- :func:`differing_params` keeps the parameters whose values are not the same in
  every run (a run config flattens to hundreds of parameters).
- :func:`build_table` / :func:`to_csv` / :func:`to_markdown` / :func:`to_text`
  make the comparison table: one row per field, one column per run.
- :func:`downsample` (min/max buckets) and :func:`plot_runs` draw the curves of
  all runs on shared axes into a PNG (matplotlib, a bare Agg figure: no pyplot state).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Optional, Sequence

import numpy as np


class CompareError(ValueError):
    """Input that cannot be compared (no runs, no metrics); the message says which."""


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """One metric of one run: ``steps`` int64 [n] strictly increasing, ``values`` float64 [n]."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.steps.shape[0])


def continuous_curve(steps: Sequence[int], values: Sequence[float],
                     timestamps: Optional[Sequence[int]] = None) -> Curve:
    """Merge a metric history into one curve: the last logged value per step, sorted by step.

    A resumed run logs the steps between its last checkpoint and the crash a
    second time; the later value (larger timestamp; on equal timestamps, later
    in the input) is the one that belongs to the surviving trajectory.
    Non-finite values are kept (a NaN loss is information), ordering is by step.
    """
    s = np.asarray(steps, dtype=np.int64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.shape != v.shape:
        raise CompareError(f"steps and values differ in length: {s.shape[0]} vs {v.shape[0]}")
    if s.size == 0:
        return Curve(s, v)
    order_in_input = np.arange(s.size)
    ts = np.zeros(s.size, np.int64) if timestamps is None else np.asarray(timestamps, np.int64).reshape(-1)
    # lexsort: last key is primary -> sorted by step, then timestamp, then input order.
    order = np.lexsort((order_in_input, ts, s))
    s, v = s[order], v[order]
    last_of_step = np.ones(s.size, dtype=bool)
    last_of_step[:-1] = s[1:] != s[:-1]
    return Curve(s[last_of_step], v[last_of_step])


def downsample(x: np.ndarray, y: np.ndarray, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Reduce a curve to at most ``max_points`` points for plotting, keeping its envelope.

    Min/max buckets: the points are split into ``max_points // 2`` equal buckets and
    the minimum and maximum of each are kept in their original order, so loss
    spikes and throughput dips survive (plain striding would drop them). The
    first and last points are always kept. NaNs are ignored when choosing.
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    if n <= max_points or max_points < 4:
        return x, y
    n_buckets = max(1, (max_points - 2) // 2)
    yi = y[1:-1]  # the inner points; first and last are added back below
    width = -(-yi.size // n_buckets)  # ceil: equal buckets, the last one padded
    pad = n_buckets * width - yi.size
    finite = np.isfinite(yi)
    lo = np.concatenate([np.where(finite, yi, np.inf), np.full(pad, np.inf)]).reshape(n_buckets, width)
    hi = np.concatenate([np.where(finite, yi, -np.inf), np.full(pad, -np.inf)]).reshape(n_buckets, width)
    base = np.arange(n_buckets) * width
    keep = np.unique(np.concatenate([base + lo.argmin(axis=1), base + hi.argmax(axis=1)]))
    keep = keep[keep < yi.size] + 1  # drop padding; back to indices into x
    keep = np.concatenate([[0], keep, [n - 1]])
    return x[keep], y[keep]


# --------------------------------------------------------------------------- runs


@dataclass
class RunView:
    """What the comparison needs of one run (built by the CLI from the tracking store).

    ``start_ms``/``end_ms`` are epoch milliseconds; ``end_ms`` is None while running.
    ``curves`` maps metric key -> merged :class:`Curve`.
    """

    run_id: str
    name: str
    status: str  # FINISHED, RUNNING, FAILED, KILLED, SCHEDULED
    params: dict[str, str] = field(default_factory=dict)
    curves: dict[str, Curve] = field(default_factory=dict)
    start_ms: Optional[int] = None
    end_ms: Optional[int] = None
    last_metric_ms: Optional[int] = None  # newest metric timestamp: the end of a run still RUNNING
    sampled: bool = False  # curves hold a server-side sample: best values are approximate ("~")

    @property
    def label(self) -> str:
        """Legend/column label: the name, with the status when the run did not finish cleanly."""
        name = self.name or self.run_id[:8]
        return name if self.status == "FINISHED" else f"{name} [{self.status}]"

    @property
    def wall_time_s(self) -> Optional[float]:
        end = self.end_ms if self.end_ms else self.last_metric_ms
        if self.start_ms is None or end is None:
            return None
        return max(0.0, (end - self.start_ms) / 1000.0)


@dataclass(frozen=True)
class MetricSpec:
    """A metric in the table: ``best`` is "min", "max" or None (only the final value is shown)."""

    key: str
    best: Optional[str] = None


# Metric names as vlbert/train/loop.py logs them through the tracker (val_*: validation means).
LOSSES = ("loss", "mlm_caption_loss", "roi_loss", "mlm_text_loss")
ACCURACIES = ("mlm_caption_acc", "mlm_text_acc", "roi_acc")
THROUGHPUT = ("samples_per_s", "tokens_per_s", "images_per_s")
MAIN_METRICS: tuple[MetricSpec, ...] = (
    *(MetricSpec(k, "min") for k in LOSSES),
    *(MetricSpec("val_" + k, "min") for k in LOSSES),
    *(MetricSpec(k, "max") for k in ACCURACIES),
    *(MetricSpec("val_" + k, "max") for k in ACCURACIES),
    *(MetricSpec(k, "max") for k in THROUGHPUT),
    MetricSpec("mfu", "max"),
    MetricSpec("peak_gpu_mem_gb", "max"),
    MetricSpec("samples_seen"),
    MetricSpec("tokens_seen"),
    # Figures logged after training (vlbert.demo.probe_colours on the demo).
    MetricSpec("probe_colour_acc_with_image"),
    MetricSpec("probe_colour_acc_blanked"),
    # Fine-tuning runs (vlbert.tasks.finetune): training accuracy, then the final evaluation.
    MetricSpec("soft_acc", "max"),
    MetricSpec("acc", "max"),
    *(MetricSpec(f"val/vqa_acc{part}") for part in ("", "/yes/no", "/number", "/other")),
    *(MetricSpec(f"{split}/refcoco_acc") for split in ("val", "testA", "testB")),
)
# Metrics the tool fetches in full for every run (the table, and the x axis of "loss vs samples").
FETCH_KEYS: tuple[str, ...] = tuple(dict.fromkeys([m.key for m in MAIN_METRICS] + ["lr"]))


def differing_params(params: Sequence[dict[str, str]], ignore: Iterable[str] = ()) -> list[str]:
    """Keys whose value is not the same in every run (a key missing from some runs differs).

    ``ignore`` holds glob patterns (``tracking.*``) of keys never shown. With one
    run nothing differs. Sorted by key, so sections of the config stay together.
    """
    patterns = list(ignore)
    keys = sorted(set().union(*params)) if params else []
    out = []
    for k in keys:
        if any(fnmatchcase(k, p) for p in patterns):
            continue
        vals = {p.get(k) for p in params}
        if len(vals) > 1:
            out.append(k)
    return out


def final_value(curve: Curve) -> float:
    """The value at the last step (after merging resumed segments)."""
    return float(curve.values[-1])


def best_value(curve: Curve, mode: str) -> float:
    """min or max over the finite values; NaN when there are none."""
    v = curve.values[np.isfinite(curve.values)]
    if v.size == 0:
        return math.nan
    return float(v.min() if mode == "min" else v.max())


# --------------------------------------------------------------------------- table


@dataclass
class Table:
    """Rows of strings: ``header`` = ["field", run labels...], one row per field."""

    header: list[str]
    rows: list[list[str]]

    def row(self, name: str) -> list[str]:
        """The cells (one per run) of the row called ``name``; KeyError when absent."""
        for r in self.rows:
            if r[0] == name:
                return r[1:]
        raise KeyError(name)


def fmt_number(x: Optional[float]) -> str:
    """Short, exact enough for comparing: 4 significant digits, integers as integers."""
    if x is None:
        return "-"
    if math.isnan(x):  # a diverged run's last loss: worth seeing
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if abs(x) >= 1000 and abs(x) < 1e15:  # throughput, counters: whole numbers read better
        return f"{x:.0f}"
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.4g}"


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def build_table(runs: Sequence[RunView], metrics: Sequence[MetricSpec] = MAIN_METRICS,
                ignore_params: Iterable[str] = ()) -> Table:
    """The comparison table: run id, status, the differing params, final/best of each metric
    logged by at least one run, steps, wall time. Raises CompareError when no run has metrics."""
    if not runs:
        raise CompareError("no runs to compare")
    if all(not r.curves for r in runs):
        names = ", ".join(r.label for r in runs)
        raise CompareError(f"none of the selected runs has logged metrics ({names})")
    header = ["field"] + [r.label for r in runs]
    rows: list[list[str]] = [
        ["run_id"] + [r.run_id for r in runs],
        ["status"] + [r.status for r in runs],
    ]
    for key in differing_params([r.params for r in runs], ignore_params):
        rows.append([f"param {key}"] + [r.params.get(key, "-") for r in runs])
    for spec in metrics:
        curves = [r.curves.get(spec.key) for r in runs]
        if all(c is None or len(c) == 0 for c in curves):
            continue
        rows.append([f"{spec.key} final"] + [fmt_number(final_value(c)) if c is not None and len(c) else "-"
                                             for c in curves])
        if spec.best:
            rows.append([f"{spec.key} best ({spec.best})"] + [
                ("~" if r.sampled else "") + fmt_number(best_value(c, spec.best)) if c is not None and len(c)
                else "-" for r, c in zip(runs, curves)])
    rows.append(["last step"] + [fmt_number(_last_step(r)) for r in runs])
    rows.append(["wall time"] + [fmt_duration(r.wall_time_s) for r in runs])
    return Table(header, rows)


def _last_step(run: RunView) -> Optional[float]:
    steps = [int(c.steps[-1]) for c in run.curves.values() if len(c)]
    return max(steps) if steps else None


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.header)
    w.writerows(table.rows)
    return buf.getvalue()


def to_markdown(table: Table) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in table.header) + " |",
             "|" + "|".join(" --- " for _ in table.header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in table.rows]
    return "\n".join(lines) + "\n"


def to_text(table: Table, max_cell: int = 40) -> str:
    """Aligned plain text for the terminal; long cells are shortened in the middle."""
    def short(s: str) -> str:
        return s if len(s) <= max_cell else s[: max_cell // 2 - 1] + "..." + s[-(max_cell // 2 - 2):]

    grid = [[short(c) for c in table.header]] + [[short(c) for c in r] for r in table.rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(table.header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def write_table(table: Table, path: str) -> None:
    """Write CSV (``.csv``) or Markdown (``.md``/``.markdown``), chosen by the suffix."""
    lower = path.lower()
    if lower.endswith(".csv"):
        text = to_csv(table)
    elif lower.endswith((".md", ".markdown")):
        text = to_markdown(table)
    else:
        raise CompareError(f"--table-out {path}: expected a .csv or .md file")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------- plot


@dataclass(frozen=True)
class Panel:
    """One subplot: ``y`` metric against ``x`` ("step" or another metric, e.g. "samples_seen")."""

    y: str
    x: str = "step"
    title: str = ""
    log_y: bool = False


PANELS: tuple[Panel, ...] = (
    # Log scale: a diverging run does not flatten the others into a line at the bottom.
    Panel("loss", "step", "loss vs step", log_y=True),
    Panel("loss", "samples_seen", "loss vs samples seen", log_y=True),
    Panel("samples_per_s", "step", "throughput (samples/s) vs step"),
    Panel("lr", "step", "learning rate vs step"),
)


_END_MARKERS = {"FAILED": "X", "KILLED": "X", "RUNNING": ">"}


def panel_xy(run: RunView, panel: Panel) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The (x, y) points of ``run`` for ``panel``, or None when the run lacks the metrics.

    For x = another metric, y's steps are mapped through that metric's curve by
    linear interpolation (samples_seen is monotone in step), so it works when
    the two are logged at different steps.
    """
    yc = run.curves.get(panel.y)
    if yc is None or len(yc) == 0:
        return None
    if panel.x == "step":
        return yc.steps.astype(np.float64), yc.values
    xc = run.curves.get(panel.x)
    if xc is None or len(xc) == 0:
        return None
    return np.interp(yc.steps, xc.steps, xc.values), yc.values


def plot_runs(runs: Sequence[RunView], path: str, panels: Sequence[Panel] = PANELS,
              max_points: int = 1000, dpi: int = 110) -> None:
    """Draw every panel with one line per run (same colour per run in every panel) into a PNG.

    Runs that did not finish cleanly are drawn dashed and named with their status
    in the legend. Each line has at most ``max_points`` points (:func:`downsample`).
    """
    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    import matplotlib
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 4.0 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        drawn, positive = 0, True
        for i, run in enumerate(runs):
            xy = panel_xy(run, panel)
            if xy is None:
                continue
            x, y = downsample(*xy, max_points=max_points)
            positive = positive and not np.any(y <= 0)
            color = colors[i % len(colors)]
            ax.plot(x, y, color=color, linewidth=1.2, linestyle="-" if run.status == "FINISHED" else "--",
                    label=run.label)
            finite = np.flatnonzero(np.isfinite(y))
            if run.status in _END_MARKERS and finite.size:  # where a failed run stopped / a running one is
                last = finite[-1]
                ax.plot(x[last:last + 1], y[last:last + 1], linestyle="none", marker=_END_MARKERS[run.status],
                        color=color, markersize=8)
            drawn += 1
        ax.set_title(panel.title or f"{panel.y} vs {panel.x}")
        ax.set_xlabel(panel.x.replace("_", " "))
        ax.set_ylabel(panel.y)
        ax.grid(True, alpha=0.3)
        if drawn == 0:
            ax.text(0.5, 0.5, f"no run logged {panel.y}", ha="center", va="center", transform=ax.transAxes)
        else:
            if panel.log_y and positive:
                ax.set_yscale("log")
                plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 2, 5, 10; not 2x10^0
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
            ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


# --------------------------------------------------------------------------- downstream scores

# Fine-tuning runs (vlbert-finetune) carry this tag: the MLflow id of the pretraining run they started from.
PRETRAIN_TAG = "vlbert.pretrain_run_id"
DOWNSTREAM_SUFFIXES = ("vqa_acc", "refcoco_acc")  # "val/vqa_acc", "testA/refcoco_acc", ...


def downstream_rows(pretrain_ids: Sequence[str], finetunes: Sequence) -> list[list[str]]:
    """Table rows with each pretraining run's downstream scores: for every accuracy key the
    finished fine-tuning runs tagged with its id logged (``val/vqa_acc`` overall; per answer
    type keys are left out), ``mean ± std (n runs)`` per pretraining run, "-" where none.

    ``finetunes``: records with ``status``, ``tags`` and ``metrics`` (latest values).
    """
    by_parent: dict[str, list] = {rid: [] for rid in pretrain_ids}
    for f in finetunes:
        parent = f.tags.get(PRETRAIN_TAG)
        if parent in by_parent and f.status == "FINISHED":
            by_parent[parent].append(f)
    keys = sorted({k for fs in by_parent.values() for f in fs for k in f.metrics
                   if k.split("/")[-1] in DOWNSTREAM_SUFFIXES})
    rows = []
    for key in keys:
        cells = []
        for rid in pretrain_ids:
            values = [f.metrics[key] for f in by_parent[rid] if key in f.metrics]
            if not values:
                cells.append("-")
                continue
            mean = float(np.mean(values))
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            cells.append(f"{mean:.2f} ± {std:.2f} ({len(values)})")
        rows.append([f"downstream {key}"] + cells)
    return rows
