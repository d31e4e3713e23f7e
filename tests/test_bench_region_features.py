"""bench/region_features.py runs end to end at its smallest (timings are printed, never asserted):
the extraction it drives, both models' steps on the same samples, and both loaders. Fails if the
bench no longer runs against the commands and streams it calls (as when an option it passes is
renamed)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


def test_bench_region_features_smallest(capsys):
    spec = importlib.util.spec_from_file_location("bench_region_features", REPO / "bench/region_features.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--iters", "1", "--images", "8", "--loader-batches", "1", "--image-size", "48"])
    out = capsys.readouterr().out
    assert "step: pixels" in out and "loader: pixels" in out
    assert set(result["step_s"]) == {"pixels", "features"} and all(v > 0 for v in result["step_s"].values())
    assert result["image_size"] == 48 and result["batch"] == {"captions": 16, "text": 8}
