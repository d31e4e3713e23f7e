"""The demo's last step end to end: a tiny run trains and exports its weights, then
vlbert.demo.probe_colours probes them on the held-out shards and logs to the same MLflow run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_e2e import clean_env, tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_train_exports_weights_and_the_probe_logs_to_the_run(tmp_path):
    from vlbert.demo.make_data import make_demo_data

    from vlbert.tracking import fetch_metric_histories, fetch_runs

    data = tmp_path / "demo"
    make_demo_data(data, train_shards=1, per_shard=16, val=12, size=64, book_files=1, docs_per_file=10,
                   wiki_docs=10)
    cfg = tiny_config(data, tmp_path / "run", **{"optim.total_steps": 3, "runtime.val_every": 0})
    config = write_config(cfg, tmp_path / "tiny.yaml")
    train = subprocess.run([sys.executable, "-m", "vlbert.cli.train", "--config", str(config)], cwd=REPO,
                           env=clean_env(), capture_output=True, text=True, timeout=240)
    assert train.returncode == 0, train.stderr[-3000:]
    exported = json.loads((tmp_path / "run" / "model.json").read_text())
    assert exported["step"] == 3 and (tmp_path / "run" / "model.safetensors").is_file()

    probe = subprocess.run([sys.executable, "-m", "vlbert.demo.probe_colours", "--config", str(config)], cwd=REPO,
                           env=clean_env(), capture_output=True, text=True, timeout=240)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "with the image" in probe.stdout and "image blanked" in probe.stdout
    result = json.loads((tmp_path / "run" / "probe.json").read_text())
    # Every validation caption names at least one colour; each is one query.
    assert result["probe_colour_queries"] >= 12 and result["probe_colour_chance"] == pytest.approx(0.2)
    for key in ("probe_colour_acc_with_image", "probe_colour_acc_blanked"):
        assert 0.0 <= result[key] <= 1.0

    uri = cfg["tracking"]["tracking_uri"]
    (run,) = fetch_runs(uri, experiment=cfg["tracking"]["experiment"])
    assert run.run_id == exported["mlflow_run_id"] and run.status == "FINISHED"
    logged = fetch_metric_histories(uri, run.run_id, ["probe_colour_acc_with_image"])
    assert logged["probe_colour_acc_with_image"].values == [pytest.approx(result["probe_colour_acc_with_image"])]
    assert logged["probe_colour_acc_with_image"].steps == [3]
