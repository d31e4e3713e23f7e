"""The model-step benchmark still runs (tiny sizes; timings are printed, never asserted)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "model_step.py"


def test_model_step_bench_tiny_runs(capsys):
    spec = importlib.util.spec_from_file_location("bench_model_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--tiny", "--threads", "1"])
    for key in ("pretraining", "encoder"):
        assert results[f"{key}_ours_s"] > 0 and results[f"{key}_baseline_s"] > 0
        assert results[f"{key}_ratio"] > 0 and results[f"{key}_ratio_of_min"] > 0
    printed = capsys.readouterr().out
    assert "pretraining step" in printed and "VisualBERT" in printed and "ratio" in printed
