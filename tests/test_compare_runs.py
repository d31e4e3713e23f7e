"""The run comparison tool: pure logic (vlbert/tracking/compare.py) and, against a real
``mlflow server`` on loopback, the CLI end to end (vlbert-compare, vlbert/cli/compare.py)."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from vlbert.tracking.compare import (
    CompareError,
    Curve,
    RunView,
    build_table,
    continuous_curve,
    differing_params,
    downsample,
    plot_runs,
    to_csv,
    to_markdown,
    fmt_number,
    write_table,
)

# --------------------------------------------------------------------------- pure logic


def test_continuous_curve_keeps_last_value_per_step_sorted():
    # First session logs steps 0..5, crashes; the resumed session restarts from step 3.
    steps = [0, 1, 2, 3, 4, 5, 3, 4, 5, 6]
    values = [10, 9, 8, 7, 6, 5, 7.5, 6.5, 5.5, 4.5]
    ts = [0, 1, 2, 3, 4, 5, 100, 101, 102, 103]
    c = continuous_curve(steps, values, ts)
    assert c.steps.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert c.values.tolist() == [10, 9, 8, 7.5, 6.5, 5.5, 4.5]
    # Input order does not matter when timestamps are given (a store returns any order).
    perm = np.random.default_rng(0).permutation(len(steps))
    c2 = continuous_curve(np.array(steps)[perm], np.array(values)[perm], np.array(ts)[perm])
    assert c2.steps.tolist() == c.steps.tolist() and c2.values.tolist() == c.values.tolist()
    # Same timestamp: the later one in the input wins.
    c3 = continuous_curve([1, 1], [1.0, 2.0], [5, 5])
    assert c3.values.tolist() == [2.0]
    with pytest.raises(CompareError, match="length"):
        continuous_curve([1, 2], [1.0])


def test_downsample_bounds_points_and_keeps_extremes():
    rng = np.random.default_rng(0)
    x = np.arange(20_000)
    y = rng.normal(size=x.size)
    y[12_345] = 50.0  # a loss spike
    y[777] = -30.0
    y[100] = np.nan
    xs, ys = downsample(x, y, max_points=1000)
    assert len(xs) <= 1000 and len(xs) > 900
    assert np.all(np.diff(xs) > 0)  # order preserved, no duplicates
    assert xs[0] == 0 and xs[-1] == x[-1]
    assert np.nanmax(ys) == 50.0 and np.nanmin(ys) == -30.0
    np.testing.assert_array_equal(ys, y[xs])  # only original points
    # Short curves pass through unchanged.
    xs2, ys2 = downsample(x[:50], y[:50], max_points=1000)
    assert len(xs2) == 50


def test_differing_params_only_keys_that_differ():
    params = [
        {"optim.lr": "1e-4", "model.hidden_size": "32", "data.seed": "0", "only_a": "x"},
        {"optim.lr": "2e-4", "model.hidden_size": "32", "data.seed": "0"},
        {"optim.lr": "1e-4", "model.hidden_size": "32", "data.seed": "0"},
    ]
    assert differing_params(params) == ["only_a", "optim.lr"]
    assert differing_params(params, ignore=["only_*"]) == ["optim.lr"]
    assert differing_params(params[:1]) == []


def _run(name, status, params, curves, start=0, end=60_000):
    return RunView(run_id=name * 4, name=name, status=status, params=params,
                   curves={k: continuous_curve(*v) for k, v in curves.items()}, start_ms=start, end_ms=end)


def test_table_final_best_status_and_formats(tmp_path):
    a = _run("a", "FINISHED", {"optim.lr": "1e-4", "same": "1"},
             {"loss": ([0, 1, 2], [3.0, 1.0, 2.0]), "mlm_caption_acc": ([0, 2], [0.1, 0.3]),
              "samples_seen": ([0, 1, 2], [256, 512, 768])}, end=3_723_000)
    b = _run("b", "FAILED", {"optim.lr": "2e-4", "same": "1"}, {"loss": ([0, 1], [4.0, 3.5])})
    table = build_table([a, b])
    assert table.header == ["field", "a", "b [FAILED]"]
    assert table.row("status") == ["FINISHED", "FAILED"]
    assert table.row("param optim.lr") == ["1e-4", "2e-4"]
    assert not any(r[0] == "param same" for r in table.rows)
    assert table.row("loss final") == ["2", "3.5"]
    assert table.row("loss best (min)") == ["1", "3.5"]
    assert table.row("mlm_caption_acc best (max)") == ["0.3", "-"]
    assert table.row("samples_seen final") == ["768", "-"]
    assert table.row("wall time") == ["1:02:03", "0:01:00"]
    with pytest.raises(KeyError):
        table.row("roi_loss final")  # logged by no run: no row

    rows = list(csv.reader(io.StringIO(to_csv(table))))
    assert rows[0] == table.header and rows[1:] == table.rows
    md = to_markdown(table).splitlines()
    assert md[0] == "| field | a | b [FAILED] |" and md[1].count("---") == 3
    write_table(table, str(tmp_path / "t.md"))
    assert (tmp_path / "t.md").read_text().startswith("| field |")
    with pytest.raises(CompareError, match=".csv or .md"):
        write_table(table, str(tmp_path / "t.txt"))


def test_number_format():
    assert [fmt_number(v) for v in (36034.4, 768.0, 0.000123456, 2.5, float("nan"), None, float("inf"))] == [
        "36034", "768", "0.0001235", "2.5", "nan", "-", "inf"]


def test_table_needs_metrics():
    with pytest.raises(CompareError, match="no runs"):
        build_table([])
    with pytest.raises(CompareError, match="has logged metrics"):
        build_table([_run("a", "RUNNING", {}, {})])


def test_plot_writes_nonblank_png(tmp_path):
    from PIL import Image

    n = 5000
    steps = np.arange(n)
    a = _run("a", "FINISHED", {}, {"loss": (steps, 5 * np.exp(-steps / 800)),
                                   "samples_seen": (steps, steps * 256.0),
                                   "samples_per_s": (steps, 100 + np.sin(steps))})
    b = _run("b", "RUNNING", {}, {"loss": (steps[:2000], 5 * np.exp(-steps[:2000] / 400))})
    path = tmp_path / "curves.png"
    import matplotlib

    backend = matplotlib.get_backend()
    plot_runs([a, b], str(path))
    assert matplotlib.get_backend() == backend  # no global pyplot state touched
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.width > 500 and im.height > 300
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5  # not a blank canvas


def test_cli_rejects_run_ids_with_experiment():
    from vlbert.cli.compare import main

    with pytest.raises(SystemExit) as e:
        main(["--run-ids", "x", "--experiment", "y"])  # argparse rejects the mix
    assert e.value.code == 2


# --------------------------------------------------------------------------- end to end (real server)

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from mlflow_server import MlflowServer, free_port  # noqa: E402

from vlbert.config import Config, TrackingConfig, flatten  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, "-m", "vlbert.cli.compare"]
KEYS = ("loss", "mlm_caption_loss", "roi_loss", "mlm_text_loss", "mlm_caption_acc", "mlm_text_acc", "roi_acc",
        "lr", "grad_norm", "samples_per_s", "tokens_per_s", "images_per_s", "mfu", "samples_seen")
LONG_STEPS = 20_000


def _metrics(step: int, scale: float, offset: float = 0.0) -> dict[str, float]:
    """Fake but distinct per-step values: losses fall, accuracies rise, throughput wobbles."""
    loss = scale * 5.0 / (1 + step / 10) + offset
    return {"loss": loss, "mlm_caption_loss": 0.5 * loss, "roi_loss": 0.3 * loss, "mlm_text_loss": 0.2 * loss,
            "mlm_caption_acc": 1 - 1 / (2 + step), "mlm_text_acc": 0.5 - 1 / (4 + step), "roi_acc": 0.25,
            "lr": 1e-4 * min(1.0, (step + 1) / 10), "grad_norm": 1.0, "samples_per_s": 100 + step % 7,
            "tokens_per_s": 6400.0 + step % 5, "images_per_s": 50.0 + step % 3, "mfu": 0.3 + 0.001 * (step % 11),
            "samples_seen": 256.0 * (step + 1)}


def _tracker(uri: str, experiment: str, name: str = "", run_id=None, queue_size: int = 10000):
    from vlbert.tracking import MlflowTracker

    cfg = TrackingConfig(experiment=experiment, run_name=name, tracking_uri=uri, system_metrics=False)
    tracker = MlflowTracker(cfg, run_id=run_id, queue_size=queue_size)
    assert tracker.run_id, f"tracker could not open {uri}"
    return tracker


def _log_config(tracker, name: str, **overrides) -> None:
    cfg = Config()
    cfg.tracking.run_name = name
    for key, value in overrides.items():
        section, field_name = key.split(".")
        setattr(getattr(cfg, section), field_name, value)
    tracker.log_params(flatten(cfg.to_dict()))


def _start_tool(*args: str) -> subprocess.Popen:
    return subprocess.Popen(TOOL + list(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A real ``mlflow server`` on loopback with runs logged through vlbert's tracker, an
    embedded SQLite store with one long run (20k steps), and the tool's invocations on them.

    The tool runs as subprocesses started as soon as their store is ready, so that their
    imports overlap with the server's start and the logging (the tests read the results).
    """
    tmp = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(tmp).start()
    uri = server.uri
    procs: dict[str, subprocess.Popen] = {}
    try:
        # While the server starts: a closed port, and the long run in its own SQLite store.
        procs["unreachable"] = _start_tool("--tracking-uri", f"http://127.0.0.1:{free_port()}", "--experiment",
                                           "cmp", "--timeout", "3", "--plot", "")
        sqlite_uri = f"sqlite:///{tmp}/long.db"
        t = _tracker(sqlite_uri, "long", "long-run", queue_size=LONG_STEPS + 10)
        _log_config(t, "long-run")
        for step in range(LONG_STEPS):
            m = _metrics(step, 1.0)
            t.log_metrics({k: m[k] for k in ("loss", "samples_per_s", "samples_seen")}, step)
        t.close("FINISHED", timeout_s=120)
        procs["long"] = _start_tool("--tracking-uri", sqlite_uri, "--experiment", "long", "--plot",
                                    str(tmp / "long.png"), "--table-out", str(tmp / "long.md"))
        server.wait()

        ids = {}
        base = _tracker(uri, "cmp", "base")
        _log_config(base, "base", **{"optim.lr": 1e-4})
        for step in range(100):
            base.log_metrics(_metrics(step, 1.0), step)
        base.close("FINISHED")
        ids["base"] = base.run_id

        # Resumed: the first attempt logs steps 0..59 and dies (never closed); the second
        # continues the same run from its step-40 checkpoint. Its tracker logs
        # steps 40..59 again as summaries (never de-duplicated, as a naive tracker would), so the store
        # holds repeated steps; the first attempt's values there include the lowest loss
        # (0.01 at step 50), which must NOT survive: the last value per step wins.
        first = _tracker(uri, "cmp", "resumed")
        _log_config(first, "resumed", **{"optim.lr": 2e-4})
        for step in range(60):
            m = _metrics(step, 2.0)
            if step == 50:
                m["loss"] = 0.01
            first.log_metrics(m, step)
        assert first.flush(60)
        time.sleep(0.01)  # later timestamps for the second attempt
        second = _tracker(uri, "cmp", "resumed", run_id=first.run_id)
        assert second.run_id == first.run_id
        _log_config(second, "resumed", **{"optim.lr": 2e-4})
        for step in range(40, 100):  # 40..59 as summaries: never de-duplicated
            (second.log_summary if step < 60 else second.log_metrics)(_metrics(step, 2.0), step)
        second.close("FINISHED")
        ids["resumed"] = second.run_id

        failed = _tracker(uri, "cmp", "failed")
        _log_config(failed, "failed", **{"optim.lr": 1e-4, "data.seed": 7})
        for step in range(30):
            m = _metrics(step, 1.5)
            if step == 29:
                m["loss"] = float("nan")  # it diverged
            failed.log_metrics(m, step)
        failed.close("FAILED")
        ids["failed"] = failed.run_id

        running = _tracker(uri, "cmp", "running")  # never closed: stays RUNNING
        _log_config(running, "running", **{"optim.lr": 1e-4})
        for step in range(20):
            running.log_metrics(_metrics(step, 1.2), step)
        assert running.flush(60)
        ids["running"] = running.run_id

        empty = _tracker(uri, "cmp", "empty")
        _log_config(empty, "empty", **{"optim.lr": 3e-4})
        empty.close("FINISHED")
        ids["empty"] = empty.run_id

        procs["main"] = _start_tool("--tracking-uri", uri, "--experiment", "cmp", "--plot", str(tmp / "cmp.png"),
                                    "--table-out", str(tmp / "cmp.csv"))
        procs["unknown experiment"] = _start_tool("--tracking-uri", uri, "--experiment", "nope", "--plot", "")
        procs["no metrics"] = _start_tool("--tracking-uri", uri, "--run-ids", ids["empty"], "--plot", "")
        results = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=240)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        yield {"tmp": tmp, "ids": ids, "results": results}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop()


def _csv_table(path: Path) -> dict[str, dict[str, str]]:
    """{row field: {column label: cell}}"""
    rows = list(csv.reader(path.open()))
    header = rows[0]
    return {r[0]: dict(zip(header[1:], r[1:])) for r in rows[1:]}


def _expected(values: dict[int, dict[str, float]], key: str):
    steps = sorted(values)
    series = [values[s][key] for s in steps]
    return series[-1], min(series), max(series)


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.stat().st_size > 0
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5, "the plot is blank"


@pytest.mark.integration
@pytest.mark.mlflow_server
def test_cli_compares_runs_on_a_server(jobs):
    res, ids = jobs["results"]["main"], jobs["ids"]
    assert res.returncode == 0, res.stderr
    assert f"leaving out run empty ({ids['empty']}, FINISHED) logged no metrics" in res.stderr
    _assert_png(jobs["tmp"] / "cmp.png")
    table = _csv_table(jobs["tmp"] / "cmp.csv")
    cols = {"base": "base", "resumed": "resumed", "failed": "failed [FAILED]", "running": "running [RUNNING]"}
    assert table["status"] == {"base": "FINISHED", "resumed": "FINISHED", "failed [FAILED]": "FAILED",
                               "running [RUNNING]": "RUNNING"}
    assert {table["run_id"][cols[k]] for k in cols} == {ids[k] for k in cols}
    assert "running [RUNNING]" in res.stdout and "failed [FAILED]" in res.stdout  # the printed table

    # Only the params that differ (of the ~90 logged), with their values.
    params = sorted(k for k in table if k.startswith("param "))
    assert params == ["param data.seed", "param optim.lr", "param tracking.run_name"]
    assert table["param optim.lr"] == {"base": "0.0001", "resumed": "0.0002", "failed [FAILED]": "0.0001",
                                       "running [RUNNING]": "0.0001"}
    assert table["param data.seed"]["failed [FAILED]"] == "7" and table["param data.seed"]["base"] == "0"

    # Final and best values equal what was logged (the resumed run: last value per step).
    logged = {
        "base": {s: _metrics(s, 1.0) for s in range(100)},
        "resumed": {s: _metrics(s, 2.0) for s in range(100)},
        "failed": {s: _metrics(s, 1.5) for s in range(30)},
        "running": {s: _metrics(s, 1.2) for s in range(20)},
    }
    logged["failed"][29]["loss"] = float("nan")
    for run, values in logged.items():
        col = cols[run]
        for key, best in (("loss", "min"), ("roi_loss", "min"), ("mlm_caption_acc", "max"), ("mfu", "max"),
                          ("samples_per_s", "max")):
            final, lo, hi = _expected(values, key)
            if math.isnan(final):
                assert table[f"{key} final"][col] == "nan"
                lo = min(v[key] for v in values.values() if not math.isnan(v[key]))  # best skips NaN
            else:
                assert float(table[f"{key} final"][col]) == pytest.approx(final, rel=1e-3), (run, key)
            assert float(table[f"{key} best ({best})"][col]) == pytest.approx(lo if best == "min" else hi,
                                                                             rel=1e-3), (run, key)
        assert float(table["samples_seen final"][col]) == 256 * len(values)
        assert table["last step"][col] == str(len(values) - 1)
    assert float(table["loss best (min)"]["resumed"]) > 0.05  # the crashed attempt's 0.01 is gone


@pytest.mark.integration
@pytest.mark.mlflow_server
@pytest.mark.parametrize("case, message", [
    ("unknown experiment", "experiment 'nope' not found"),
    ("unreachable server", "cannot reach the MLflow tracking server"),
    ("no metrics", "nothing to compare: run empty ("),
])
def test_cli_errors_are_one_line(jobs, case, message):
    res = jobs["results"]["unreachable" if case == "unreachable server" else case]
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    if case == "no metrics":
        assert lines[0].endswith("logged no metrics"), res.stderr


@pytest.mark.integration
@pytest.mark.mlflow_server
def test_cli_long_run_in_embedded_store(jobs):
    """20k points per metric: fetched in bulk, drawn downsampled (bench/compare_runs.py times it)."""
    res = jobs["results"]["long"]
    assert res.returncode == 0, res.stderr
    _assert_png(jobs["tmp"] / "long.png")
    text = (jobs["tmp"] / "long.md").read_text()
    final, lo, _ = _expected({s: _metrics(s, 1.0) for s in (0, LONG_STEPS - 1)}, "loss")
    row = next(line for line in text.splitlines() if line.startswith("| loss final |"))
    assert float(row.split("|")[2]) == pytest.approx(final, rel=1e-3)
    row = next(line for line in text.splitlines() if line.startswith("| samples_seen final |"))
    assert float(row.split("|")[2]) == 256 * LONG_STEPS
    row = next(line for line in text.splitlines() if line.startswith("| last step |"))
    assert row.split("|")[2].strip() == str(LONG_STEPS - 1)
    assert "| param " not in text  # a single run: nothing differs


@pytest.mark.timeout(180)
def test_default_finds_the_demo_run_and_shows_its_probe_figures(tmp_path, capsys):
    """The first comparison command after the demo (docs/tracking.md): no --experiment given."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = _tracker(uri, "vlbert-demo", "demo")
    _log_config(t, "demo")
    for step in range(1, 4):
        t.log_metrics(_metrics(step, 1.0), step)
    t.log_summary({"probe_colour_acc_with_image": 0.956, "probe_colour_acc_blanked": 0.204}, 3)
    t.close("FINISHED", timeout_s=60)
    from vlbert.cli.compare import main

    assert main(["--tracking-uri", uri, "--plot", ""]) == 0
    out = capsys.readouterr().out
    assert "demo" in out
    row = next(line for line in out.splitlines() if "probe_colour_acc_with_image" in line)
    assert "0.956" in row
    assert "0.204" in next(line for line in out.splitlines() if "probe_colour_acc_blanked" in line)
    # A wrong experiment name: the error lists the ones there are.
    assert main(["--tracking-uri", uri, "--experiment", "vlbert", "--plot", ""]) == 1
    err = capsys.readouterr().err
    assert "experiment 'vlbert' not found" in err and "experiments there: Default, vlbert-demo" in err, err
