"""What tracking costs the training thread per logged step: the spooling tracker vs logging straight
to the server (baseline), in the same process, against the same local ``mlflow server``.

    PYTHONPATH=. python bench/tracking_spool.py [--steps 300] [--keys 30] [--work-ms 5]

A fake training loop: each step does ``--work-ms`` of matrix products (torch, which releases
the GIL like a real step's kernels) and then logs ``--keys`` metrics. Modes, one after another:
- none: no logging (the loop's own time);
- direct: ``MlflowClient.log_batch`` on the training thread, as a synchronous tracker would;
- spool: ``MlflowTracker`` (queue -> on-disk spool -> sender thread), server up;
- spool, server down: the same with nothing listening (everything goes to the spool on disk).
Per mode: the time inside the logging call and the loop's extra time per step over ``none``
(which includes the background threads' share of the GIL). The spool's drain at ``close`` is
not in the loop (it is the end of training); it is printed apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch


from vlbert.config import TrackingConfig
from vlbert.tracking import MlflowTracker


REPO = Path(__file__).resolve().parents[1]


def _tests_helper(name: str):
    """``tests/<name>.py`` (a test helper such as the MLflow server on loopback), loaded from its path."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calibrate(work_ms: float) -> tuple[torch.Tensor, int]:
    a = torch.randn(256, 256)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.5:
        a @ a
        n += 1
    return a, max(1, round(work_ms / 1000 / (0.5 / n)))


def loop(steps: int, keys: int, work: tuple[torch.Tensor, int], log) -> tuple[float, float]:
    """(loop seconds, seconds inside ``log``)."""
    a, reps = work
    inside = 0.0
    start = time.perf_counter()
    for step in range(steps):
        for _ in range(reps):
            a @ a
        metrics = {f"metric_{k}": 1.0 / (step + 1) + k for k in range(keys)}
        if log is not None:
            t0 = time.perf_counter()
            log(metrics, step)
            inside += time.perf_counter() - t0
    return time.perf_counter() - start, inside


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--keys", type=int, default=30, help="metrics per logged step (the trainer logs ~30)")
    p.add_argument("--work-ms", type=float, default=5.0, help="compute per step")
    a = p.parse_args()
    torch.set_num_threads(1)
    work = calibrate(a.work_ms)
    tmp = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    results = {}
    mlflow_server = _tests_helper("mlflow_server")
    with mlflow_server.MlflowServer(tmp / "server") as server:
        server.start().wait()
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(server.uri)
        exp = client.create_experiment("bench")
        run_id = client.create_run(exp).info.run_id

        def direct(metrics, step):
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])

        def spooling(uri: str, name: str):
            cfg = TrackingConfig(experiment="bench", tracking_uri=uri, system_metrics=False, retry_max_s=5.0,
                                 drain_timeout_s=600.0)
            return MlflowTracker(cfg, spool_dir=str(tmp / name), start_wait_s=5.0)

        results["none"] = loop(a.steps, a.keys, work, None)
        results["direct"] = loop(a.steps, a.keys, work, direct)
        t = spooling(server.uri, "spool-up")
        results["spool"] = loop(a.steps, a.keys, work, t.log_metrics)
        t0 = time.perf_counter()
        t.close()
        drain = time.perf_counter() - t0
        down = spooling(f"http://127.0.0.1:{mlflow_server.free_port()}", "spool-down")
        results["spool, server down"] = loop(a.steps, a.keys, work, down.log_metrics)
        down.close(timeout_s=0)

    base = results["none"][0]
    print(f"{a.steps} steps, {a.keys} metrics per step, {a.work_ms:.0f} ms of compute per step")
    print(f"{'mode':<20} {'loop s':>8} {'in call ms/step':>16} {'extra ms/step':>14}")
    for name, (wall, inside) in results.items():
        print(f"{name:<20} {wall:8.2f} {1e3 * inside / a.steps:16.3f} {1e3 * (wall - base) / a.steps:14.3f}")
    d_in, s_in = results["direct"][1], results["spool"][1]
    d_ex, s_ex = results["direct"][0] - base, results["spool"][0] - base
    print(f"in-call time per step, direct / spool: ratio {d_in / max(s_in, 1e-12):.0f}x")
    print(f"extra loop time per step, direct / spool: {1e3 * d_ex / a.steps:.2f} ms / {1e3 * s_ex / a.steps:.2f} "
          f"ms (ratio {d_ex / s_ex:.1f}x)" if s_ex > 0 else
          f"extra loop time per step: direct {1e3 * d_ex / a.steps:.2f} ms, spool within noise (<= 0)")
    print(f"spool drain at close (server up, end of training): {drain:.2f} s")


if __name__ == "__main__":
    main()
