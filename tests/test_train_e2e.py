"""End-to-end training (vlbert/train/loop.py, tools/train.py) of a tiny VL-BERT (hidden 32,
2 layers, ResNet-18 C4 detector, 64-pixel images) on demo data, on the CPU with gloo.

- a fixed batch is overfit (the real model, engine and losses);
- 2 ranks under torchrun with ZeRO-2, and with ZeRO-3 where SIGUSR1 reaches one rank
  only: both stop at the same step with a checkpoint and exit 0; ZeRO-2 and ZeRO-3
  give the same losses;
- a run killed with SIGKILL and resumed ends with the same losses and weights as an
  uninterrupted run, and its MLflow run holds one value per step;
- SIGTERM to ``python tools/train.py`` with a tracking server that is down: a
  checkpoint, exit 0.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from mlflow_store import new_sqlite_store
from vlbert.config import load_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::FutureWarning")]

REPO = Path(__file__).resolve().parents[1]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data


def tiny_config(data: Path, out: Path, **overrides) -> dict:
    cfg = {
        "model": {"vocab_size": 68, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 64, "hidden_dropout": 0.1, "attention_dropout": 0.1,
                  "visual_dropout": 0.1, "geometry_freqs": 16},
        "detector": {"depth": 18, "num_classes": 15},
        "data": {
            "tokenizer": str(data / "tokenizer"),
            "captions": {"urls": [str(data / "captions/train-{00000..00001}.tar")], "short_side": 64,
                         "max_long_side": 64, "max_caption_tokens": 16, "min_boxes": 1, "max_boxes": 4},
            "text": {"segment_length": 16, "sources": {"books": {"urls": [str(data / "text/books-*.jsonl")]},
                                                       "wiki": {"urls": [str(data / "text/wiki-*.parquet")]}}},
            "validation": {"urls": [str(data / "captions/val-00000.tar")], "short_side": 64, "max_long_side": 64,
                           "max_caption_tokens": 16, "min_boxes": 1, "max_boxes": 4},
            "captions_per_step": 2, "text_per_step": 2, "num_workers": 0,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 0, "total_steps": 6, "grad_clip": 1.0},
        "runtime": {"deepspeed_config": str(REPO / "ds_configs/cpu_zero2_fp32.json"), "output_dir": str(out),
                    "checkpoint_every": 3, "keep_last": 2, "log_every": 1, "val_every": 3, "val_batches": 2},
        "tracking": {"experiment": "e2e", "tracking_uri": f"sqlite:///{out.parent / 'mlflow.db'}",
                     "system_metrics": False},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    store = out.parent / "mlflow.db"
    if cfg["tracking"].get("enabled", True) and cfg["tracking"]["tracking_uri"] == f"sqlite:///{store}":
        new_sqlite_store(store)  # its schema made already (MLflow takes seconds to make it)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def clean_env() -> dict:
    """This process may hold a one-process group (other tests): children must not reuse its port."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def histories(cfg: dict, keys=("loss",)):
    from vlbert.tracking import fetch_metric_histories, fetch_runs

    uri = cfg["tracking"]["tracking_uri"]
    (run,) = fetch_runs(uri, experiment=cfg["tracking"]["experiment"])
    return run, fetch_metric_histories(uri, run.run_id, list(keys))


def model_weights(ckpt_dir: Path) -> dict:
    return torch.load(ckpt_dir / "ds" / "mp_rank_00_model_states.pt", weights_only=True)["module"]


# --------------------------------------------------------------------------- in-process


def test_real_model_overfits_a_fixed_batch(data, tmp_path):
    from transformers import AutoTokenizer

    from vlbert.data.mixture import build_pretrain_stream
    from vlbert.model.pretraining import VLBertForPretraining
    from vlbert.train.ds_config import resolve_deepspeed_config
    from vlbert.train.engine import Engine, init_distributed

    init_distributed()
    cfg = load_config(write_config(tiny_config(data, tmp_path / "out"), tmp_path / "c.yaml"),
                      ["model.hidden_dropout=0", "model.attention_dropout=0", "model.visual_dropout=0",
                       "optim.lr=1e-2", "optim.grad_clip=10", "optim.total_steps=100"])
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    batch = next(build_pretrain_stream(cfg.data, cfg.masking, tokenizer, 0, 1, 2, 2))
    ds = resolve_deepspeed_config({"zero_optimization": {"stage": 2}}, cfg.data, cfg.optim, 1)
    engine = Engine(VLBertForPretraining(cfg.model, cfg.detector), cfg.optim, ds)
    first = engine.step(batch)
    for _ in range(11):
        last = engine.step(batch)
    assert last.loss.item() < 0.3 * first.loss.item(), (first.loss.item(), last.loss.item())
    for task in ("mlm_caption_loss", "roi_loss", "mlm_text_loss"):
        assert getattr(last, task).item() < getattr(first, task).item(), task


def _train_then_sigkill(cfg_path: str, kill_after: int, threads: int) -> None:
    """Child process: train, and after step ``kill_after`` (logged and flushed) die by SIGKILL."""
    for k in DIST_ENV:
        os.environ.pop(k, None)
    torch.set_num_threads(threads)
    from vlbert.train.loop import train

    def on_step(step, loss):
        if step == kill_after:
            time.sleep(1.5)  # let the tracker's thread write the step, as a real crash would find it
            os.kill(os.getpid(), signal.SIGKILL)

    train(load_config(cfg_path), on_step=on_step)


@pytest.mark.integration
def test_sigkill_and_resume_matches_an_uninterrupted_run(data, tmp_path, one_torch_thread):
    from vlbert.train.loop import train

    keys_on = {"runtime.log_sample_keys": True}
    straight_cfg = tiny_config(data, tmp_path / "straight", **{"tracking.experiment": "straight"}, **keys_on)
    straight = train(load_config(write_config(straight_cfg, tmp_path / "straight.yaml")))
    assert sorted(straight.losses) == [1, 2, 3, 4, 5, 6] and not straight.preempted

    cfg = tiny_config(data, tmp_path / "killed", **{"tracking.experiment": "killed"}, **keys_on)
    path = write_config(cfg, tmp_path / "killed.yaml")
    child = mp.get_context("spawn").Process(target=_train_then_sigkill, args=(str(path), 5, torch.get_num_threads()))
    child.start()
    child.join(240)
    assert child.exitcode == -signal.SIGKILL
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "step-000003" / "COMPLETE").exists() and not (ckpts / "step-000006").exists()

    resumed = train(load_config(path))
    assert resumed.resumed_from.endswith("step-000003") and resumed.step == 6
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-6, abs=1e-7)
    a = model_weights(tmp_path / "straight" / "checkpoints" / "step-000006")
    b = model_weights(ckpts / "step-000006")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)

    run, hist = histories(cfg, ("loss", "samples_seen", "val_loss"))
    assert run.run_id == resumed.run_id and run.status == "FINISHED"
    assert hist["loss"].steps == [1, 2, 3, 4, 5, 6]  # one value per step, though 4 and 5 ran twice
    assert hist["samples_seen"].values == [4.0 * s for s in range(1, 7)]
    assert hist["val_loss"].steps == [3, 6]
    assert hist["loss"].values[3:] == pytest.approx([resumed.losses[s] for s in (4, 5, 6)], rel=1e-6)

    # The samples consumed: the same keys in the same order, each step once (the killed
    # attempt's steps 4-5 were dropped on resume), and no caption twice within the epoch.
    from vlbert.train.sample_keys import read_sample_keys

    (want,) = read_sample_keys(tmp_path / "straight").values()
    (got,) = read_sample_keys(tmp_path / "killed").values()
    assert [line["step"] for line in got] == [1, 2, 3, 4, 5, 6]
    assert got == want
    captions = [k for line in got for k in line["captions"]]
    assert len(captions) == 12 and len(set(captions)) == 12 and all(".tar#" in k for k in captions)
    assert all(len(line["text"]) == 2 and all(k.startswith("text.") for k in line["text"]) for line in got)


@pytest.mark.integration
@pytest.mark.mlflow_server
def test_killed_while_the_tracking_server_is_down_then_resumed_after_it_is_back(data, tmp_path, one_torch_thread):
    """The MLflow run does not exist when the step-3 checkpoint is written (server down) nor when
    the trainer dies at step 5; the resumed trainer creates it and it holds every step once."""
    from mlflow_server import MlflowServer

    from vlbert.tracking.spool import Spool
    from vlbert.train.loop import train

    server = MlflowServer(tmp_path / "server")  # nothing listens on its port yet
    cfg = tiny_config(data, tmp_path / "down", **{"tracking.experiment": "down", "tracking.tracking_uri": server.uri,
                                                  "tracking.retry_max_s": 0.5})
    path = write_config(cfg, tmp_path / "down.yaml")
    child = mp.get_context("spawn").Process(target=_train_then_sigkill, args=(str(path), 5, torch.get_num_threads()))
    child.start()
    child.join(240)
    assert child.exitcode == -signal.SIGKILL
    ckpts, spool = tmp_path / "down" / "checkpoints", tmp_path / "down" / "mlflow_spool"
    meta = yaml.safe_load((ckpts / "step-000003" / "meta.json").read_text())
    assert meta["mlflow_run_id"] is None and meta["mlflow_run_key"]
    assert Spool(spool).count("metrics") == 6  # steps 1-5 and the validation at 3, on disk

    with server:
        server.start().wait()
        resumed = train(load_config(path))
        run, hist = histories(cfg, ("loss", "samples_seen", "val_loss"))
    assert resumed.resumed_from.endswith("step-000003") and resumed.step == 6
    assert run.run_id == resumed.run_id and run.status == "FINISHED"
    assert run.params["optim.lr"] == str(cfg["optim"]["lr"]) and run.tags["vlbert.world_size"] == "1"
    assert hist["loss"].steps == [1, 2, 3, 4, 5, 6]  # once each: 4 and 5 from the killed attempt
    assert hist["samples_seen"].values == [4.0 * s for s in range(1, 7)]
    assert hist["val_loss"].steps == [3, 6]
    assert hist["loss"].values[5] == pytest.approx(resumed.losses[6], rel=1e-6)
    last = yaml.safe_load((ckpts / "step-000006" / "meta.json").read_text())
    assert last["mlflow_run_id"] == run.run_id and last["mlflow_run_key"] == meta["mlflow_run_key"]
    assert Spool(spool).count() == 0


# --------------------------------------------------------------------------- launched


def launch(args: list[str], env: dict) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    return proc, lines, reader


def wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(text in line for line in list(lines)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n" + "".join(lines[-40:]))
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout} s:\n" + "".join(lines[-40:]))


def torchrun(config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "tools/train.py", "--config", str(config)]


def train_two_ranks_until_signal(cfg: dict, path: Path, rank: str, sig: signal.Signals) -> tuple[int, str]:
    """torchrun 2 ranks; after step 3 send ``sig`` to one rank only; (step of the checkpoint, output)."""
    proc, lines, reader = launch(torchrun(write_config(cfg, path), free_port()), clean_env())
    wait_for(lines, "step 3/1000", proc)
    workers = psutil.Process(proc.pid).children()
    target = [w for w in workers if w.environ().get("RANK") == rank]
    assert len(workers) == 2 and len(target) == 1
    target[0].send_signal(sig)
    assert proc.wait(240) == 0, "".join(lines[-40:])
    reader.join(10)
    out = "".join(lines)
    assert f"received {sig.name}" in out and "stopped at step" in out
    (stopped,) = list(Path(cfg["runtime"]["output_dir"], "checkpoints").glob("step-*"))
    assert (stopped / "COMPLETE").exists()
    assert sorted(p.name for p in stopped.glob("rank-*.json")) == ["rank-00000.json", "rank-00001.json"]
    return int(stopped.name.split("-")[1]), out


@pytest.mark.integration
def test_two_ranks_zero2_and_zero3_stop_together_on_a_signal_to_one_rank(data, tmp_path):
    # Adam's eps well above the rounding noise of near-zero gradients (whose sign may differ
    # between ZeRO-2's all-reduce and ZeRO-3's reduce-scatter), so that the two runs agree closely.
    common = {"optim.total_steps": 1000, "runtime.checkpoint_every": 1000, "runtime.val_every": 0,
              "optim.eps": 1e-3}
    z2 = tiny_config(data, tmp_path / "z2", **common, **{"tracking.experiment": "z2"})
    z2_step, _ = train_two_ranks_until_signal(z2, tmp_path / "z2.yaml", "0", signal.SIGTERM)
    z3 = tiny_config(data, tmp_path / "z3", **common, **{
        "tracking.experiment": "z3", "runtime.deepspeed_config": str(REPO / "ds_configs/cpu_zero3_fp32.json")})
    z3_step, _ = train_two_ranks_until_signal(z3, tmp_path / "z3.yaml", "1", signal.SIGUSR1)

    (run2, h2), (run3, h3) = histories(z2), histories(z3)
    assert run2.status == run3.status == "KILLED"
    assert h2["loss"].steps == list(range(1, z2_step + 1)) and h3["loss"].steps == list(range(1, z3_step + 1))
    assert run3.tags["vlbert.zero_stage"] == "3" and run3.tags["vlbert.world_size"] == "2"
    # ZeRO-3 partitions parameters, ZeRO-2 does not: the same training either way.
    n = min(z2_step, z3_step)
    assert h3["loss"].values[:n] == pytest.approx(h2["loss"].values[:n], rel=1e-5)


@pytest.mark.integration
def test_sigterm_checkpoints_and_exits_zero_with_tracking_server_down(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "term", **{
        "optim.total_steps": 1000, "runtime.checkpoint_every": 1000, "runtime.val_every": 0,
        "tracking.tracking_uri": f"http://127.0.0.1:{free_port()}"})  # nothing listens there
    config = write_config(cfg, tmp_path / "t.yaml")
    proc, lines, reader = launch([sys.executable, "tools/train.py", "--config", str(config)], clean_env())
    wait_for(lines, "step 2/1000", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, "".join(lines[-40:])
    reader.join(10)
    out = "".join(lines)
    assert "tracking unavailable" in out and "received SIGTERM" in out
    (ck,) = list((tmp_path / "term" / "checkpoints").glob("step-*"))
    assert (ck / "COMPLETE").exists() and int(ck.name.split("-")[1]) >= 2
    assert (tmp_path / "term" / "config.yaml").exists()


def test_cli_reports_a_config_error_with_exit_code_2(tmp_path, capsys):
    from vlbert.cli.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lrr: 1}\n")
    assert main(["--config", str(bad)]) == 2
    assert "config error" in (err := capsys.readouterr().err) and "unknown key optim.lrr" in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_a_tokenizer_that_does_not_fit_the_model_stops_the_run_at_start(data, tmp_path, capsys):
    """A model with fewer word embeddings than the tokenizer has ids: a config error before the first
    step (fails if the trainer does not check: it would train, or crash later on an index error)."""
    from vlbert.cli.train import main

    out = tmp_path / "vocab"
    config = write_config(tiny_config(data, out, **{"model.vocab_size": 40}), tmp_path / "v.yaml")
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "config error: data.tokenizer: the tokenizer has 68 tokens but the model only 40 word embeddings" in err
    assert not (out / "checkpoints").exists()
