"""The GPU kit's smoke check: what was installed imports and works, one training step runs on the device.

    python scripts/gpu_kit_smoke.py --device cuda --json-out OUT/smoke.json

Checks, each recorded as {"ok": bool, ...} (the exit status is 1 when a required one fails):
- imports: torch, mmcv (its version and ops), mmdet, mmengine, deepspeed, mlflow (skinny), vlbert's model,
  engine and tracking packages;
- mmcv RoIAlign on the device against the same op on the CPU (the compiled kernels, both ways);
- tests/test_mmcv_ops.py (RoIAlign, RoIPool, NMS kernels against their definitions on the device; the
  subset build's "not built in this install" stubs);
- vlbert's tracker writes a metric through mlflow-skinny to a file store and reads it back (skinny cannot
  open vlbert's default SQLite store, having no SQLAlchemy: a real run on such a host points
  tracking.tracking_uri at a server; the bench does not track);
- one training step of bench/gpu_e2e.py's tiny model on the device (torch AdamW; and DeepSpeed ZeRO-2 bf16
  through vlbert.train.engine when the device is CUDA), with a finite loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def check(results: dict, name: str, required: bool = True):
    """Decorator: run the check now, record its dict (or its error) under ``name``."""
    def run(fn):
        t = time.perf_counter()
        try:
            results[name] = dict(ok=True, **(fn() or {}))
        except Exception as e:  # every failure is recorded: the other checks still run
            results[name] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
        results[name].update(required=required, seconds=round(time.perf_counter() - t, 2))
        print(f"[smoke] {name}: {'ok' if results[name]['ok'] else 'FAILED ' + results[name]['error']}", flush=True)
        return fn
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json-out", required=True)
    args = p.parse_args(argv)
    results: dict = {}

    @check(results, "imports")
    def _imports():
        import deepspeed
        import mlflow
        import mmcv
        import mmdet
        import mmengine
        import torch
        from mmcv.ops import RoIAlign  # noqa: F401  (loads the compiled _ext)

        import vlbert.model.pretraining  # noqa: F401
        import vlbert.tracking  # noqa: F401
        import vlbert.train.engine  # noqa: F401
        return dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
                    device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    mmcv=mmcv.__version__, mmdet=mmdet.__version__, mmengine=mmengine.__version__,
                    deepspeed=deepspeed.__version__, mlflow=mlflow.__version__,
                    mmcv_file=mmcv.__file__, deepspeed_file=deepspeed.__file__)

    @check(results, "mmcv_roi_align")
    def _roi_align():
        import torch
        from mmcv.ops import roi_align
        g = torch.Generator().manual_seed(0)
        feat = torch.randn(2, 8, 32, 48, generator=g)
        rois = torch.tensor([[0, 1.5, 2.0, 30.0, 20.0], [1, 0.0, 0.0, 47.0, 31.0], [1, 10.2, 5.1, 12.9, 9.8]])
        cpu = roi_align(feat, rois, (7, 7), 1 / 1.0, 2, "avg", True)
        dev = roi_align(feat.to(args.device), rois.to(args.device), (7, 7), 1 / 1.0, 2, "avg", True).cpu()
        err = float((cpu - dev).abs().max())
        if not err < 1e-4:
            raise AssertionError(f"RoIAlign on {args.device} differs from the CPU kernel by {err}")
        return dict(max_abs_diff=err, device=args.device)

    @check(results, "mmcv_ops_tests")
    def _mmcv_ops_tests():
        # tests/test_mmcv_ops.py on this host: with CUDA its RoIPool, RoIAlign and NMS kernel checks run
        # (they are skipped on CPU-only machines), and the subset build's stub error.
        import subprocess
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                              str(ROOT / "tests" / "test_mmcv_ops.py")], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        tail = out.stdout.strip().splitlines()[-12:]
        if out.returncode != 0:
            raise AssertionError("tests/test_mmcv_ops.py failed: " + "\n".join(tail))
        return dict(summary=tail[-1] if tail else "", skipped=[ln for ln in tail if ln.startswith("SKIPPED")])

    @check(results, "tracking_skinny")
    def _tracking():
        from mlflow import MlflowClient

        from vlbert.config import TrackingConfig
        from vlbert.tracking import build_tracker
        # mlflow 3 refuses a file store unless told (it wants a database, which skinny cannot open: no SQLAlchemy).
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        with tempfile.TemporaryDirectory() as tmp:
            uri = Path(tmp, "mlruns").as_uri()
            tracker = build_tracker(TrackingConfig(tracking_uri=uri, system_metrics=False, experiment="smoke"),
                                    rank=0, spool_dir=str(Path(tmp, "spool")))
            tracker.log_metrics({"smoke/x": 1.5}, step=3)
            tracker.close(timeout_s=60)
            client = MlflowClient(tracking_uri=uri)
            runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
            history = client.get_metric_history(runs[0].info.run_id, "smoke/x")
            got = [(m.step, m.value) for m in history]
            if got != [(3, 1.5)]:
                raise AssertionError(f"the file store holds {got}, expected [(3, 1.5)]")
        return dict(store="file", metric_history=got)

    bench_args = ["--tiny", "--device", args.device, "--warmup", "0", "--steps", "1", "--profile-steps", "1",
                  "--checkpointing", "on", "--no-sync-debug"]

    def one_step(extra):
        import importlib.util
        spec = importlib.util.spec_from_file_location("gpu_e2e", ROOT / "bench" / "gpu_e2e.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                report = bench.main(bench_args + extra + ["--json-out", str(Path(tmp, "e2e.json"))])
            except SystemExit as e:  # the bench exits 1 when a variant failed
                raise AssertionError(f"bench/gpu_e2e.py exited with {e.code}") from e
        v = report["variants"][0]
        if "error" in v or not math.isfinite(v["loss"]):
            raise AssertionError(f"the step failed: {v.get('error') or v['loss']}")
        return dict(engine=v["engine"], loss=v["loss"], step_s=v["step_s"])

    check(results, "train_step_torch")(lambda: one_step(["--no-deepspeed"]))
    if args.device.startswith("cuda"):
        check(results, "train_step_deepspeed_zero2_bf16")(lambda: one_step(["--deepspeed", "--precision", "bf16"]))

    Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")
    failed = [k for k, v in results.items() if v["required"] and not v["ok"]]
    print(f"[smoke] {'all ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
