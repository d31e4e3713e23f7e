"""bench/loader.py runs end to end in its tiny mode (timings are printed, never asserted)."""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.timeout(120)


def test_bench_loader_tiny(capsys):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "loader.py")
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny"])
    out = capsys.readouterr().out
    assert "baseline (webdataset + PIL)" in out and "ours (vlbert.data)" in out and "resume cost" in out
    n_ours, n_base = result["samples"]
    assert n_ours == n_base > 0  # both pipelines processed the same number of samples
    assert result["ours_sps"] > 0 and result["baseline_sps"] > 0 and result["resume_n_s"] > 0
