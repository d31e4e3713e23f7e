"""The run comparison tool on a long run: MLflow's client (baseline) vs the bulk path (ours).

    PYTHONPATH=. python bench/compare_runs.py [--steps 20000] [--server]

Logs one run of ``--steps`` steps with the tool's main metrics through vlbert's tracker into a
fresh SQLite store, then times, on the same store:
- fetch: ``tracking.fetch_metric_histories`` (MlflowClient.get_metric_history per key) vs
  ``tracking.fetch_metric_histories_bulk``; with ``--server`` also through a local
  ``mlflow server`` on that store (full histories, and the server-sampled 2500 points);
- plot: every point vs downsampled to 1000 points per curve;
- the whole CLI (``python -m vlbert.cli.compare``) as a subprocess, Python and mlflow imports included.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the baseline is slow on a busy machine

from vlbert.tracking.compare import FETCH_KEYS, RunView, continuous_curve, plot_runs
from vlbert.config import TrackingConfig
from vlbert import tracking

KEYS = [k for k in FETCH_KEYS if not k.startswith("val_")]


def log_run(uri: str, steps: int) -> str:
    t = tracking.MlflowTracker(TrackingConfig(experiment="bench", run_name="long", tracking_uri=uri,
                                              system_metrics=False), queue_size=steps + 10)
    for s in range(steps):
        t.log_metrics({k: 1.0 / (s + 1) + (s % 7) * 1e-3 for k in KEYS}, s)
    t.close("FINISHED", timeout_s=600)
    return t.run_id


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def views(hists: dict) -> list[RunView]:
    return [RunView(rid, "long", "FINISHED", curves={k: continuous_curve(h.steps, h.values, h.timestamps)
                                                    for k, h in hs.items()}) for rid, hs in hists.items()]


def report(name: str, base: float, ours: float) -> None:
    print(f"{name:<34} baseline {base:7.2f} s   ours {ours:7.2f} s   ratio {base / max(ours, 1e-9):6.1f}x")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--server", action="store_true", help="also time the REST path through a local mlflow server")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_compare_"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    dt, rid = timed(lambda: log_run(uri, a.steps))
    print(f"logged {a.steps} steps x {len(KEYS)} metrics through the tracker in {dt:.1f} s ({tmp})")

    base_t, base = timed(lambda: {rid: tracking.fetch_metric_histories(uri, rid, KEYS)})
    ours_t, ours = timed(lambda: tracking.fetch_metric_histories_bulk(uri, {rid: KEYS}))
    assert {k: h.values for k, h in base[rid].items()} == {k: h.values for k, h in ours[rid].items()}
    report("fetch, SQLite store", base_t, ours_t)

    v = views(ours)
    full_t, _ = timed(lambda: plot_runs(v, str(tmp / "full.png"), max_points=10**9))
    down_t, _ = timed(lambda: plot_runs(v, str(tmp / "down.png"), max_points=1000))
    report("plot, 4 panels", full_t, down_t)

    cli_t, res = timed(lambda: subprocess.run([sys.executable, "-m", "vlbert.cli.compare", "--tracking-uri",
                                               uri, "-e", "bench", "--plot", str(tmp / "cli.png")],
                                              capture_output=True, text=True))
    assert res.returncode == 0, res.stderr
    print(f"{'whole CLI (subprocess), SQLite':<34} {cli_t:.2f} s")

    if a.server:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
                                "--host", "127.0.0.1", "--port", str(port), "--workers", "4"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        http = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(http + "/health", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
            base_t, _ = timed(lambda: tracking.fetch_metric_histories(http, rid, KEYS))
            ours_t, _ = timed(lambda: tracking.fetch_metric_histories_bulk(http, {rid: KEYS}))
            samp_t, _ = timed(lambda: tracking.fetch_metric_histories_bulk(http, {rid: KEYS}, max_points=2500))
            report("fetch, server, full history", base_t, ours_t)
            report("fetch, server, sampled 2500", base_t, samp_t)
            cli_t, res = timed(lambda: subprocess.run([sys.executable, "-m", "vlbert.cli.compare",
                                                       "--tracking-uri", http, "-e", "bench", "--plot", ""],
                                                      capture_output=True, text=True))
            assert res.returncode == 0, res.stderr
            print(f"{'whole CLI (subprocess), server':<34} {cli_t:.2f} s")
        finally:
            os.killpg(srv.pid, signal.SIGKILL)
            srv.wait()


if __name__ == "__main__":
    main()
