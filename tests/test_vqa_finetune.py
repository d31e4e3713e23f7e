"""VQA fine-tuning end to end on the CPU: a tiny VL-BERT (hidden 32, 2 layers, ResNet-18 C4)
on demo VQA files in the official formats.

- the head starts from a pretraining run's MLM transform; encoder and detector load exactly;
- a tiny fine-tune overfits a few questions (the real model, engine, loss, official metric);
- a run stopped by SIGTERM resumes to the same losses as an uninterrupted one, in the same
  MLflow run, tagged with the pretraining run it started from;
- a stop request while the loader waits on a stalled store is honoured within the wait, with a
  checkpoint of the last step; a stall past the task's wait_timeout_s is a data error (exit 1);
- vlbert-evaluate reproduces the run's accuracy and writes the submission file;
- the shipped VQA configs load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from vlbert.tasks.config import load_finetune_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parents[1]


def tiny(demo_data: Path, vqa: Path, out: Path, *overrides: str):
    """configs/vqa_tiny.yaml pointed at the test files; val = the training questions (overfitting)."""
    split = {"questions": str(vqa / "train_questions.json"), "annotations": str(vqa / "train_annotations.json"),
             "images": [str(vqa / "images/train-*.tar")]}
    return load_finetune_config(REPO / "configs/vqa_tiny.yaml", [
        f"vqa.tokenizer={demo_data / 'tokenizer'}", f"vqa.train=[{json.dumps(split)}]", f"vqa.val={json.dumps(split)}",
        f"runtime.deepspeed_config={REPO / 'ds_configs/cpu_zero2_fp32.json'}", f"runtime.output_dir={out}",
        f"tracking.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}", *overrides])


def _pretraining_state(cfg) -> dict:
    """The state dict a pretraining run of the same model/detector sections exports."""
    from vlbert.model.pretraining import VLBertForPretraining
    from vlbert.model.vlbert import bert_architecture

    torch.manual_seed(1)
    model = VLBertForPretraining(cfg.model, cfg.detector, bert_architecture(cfg.model))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pretrained_weights_and_head_transform_load(demo_data, vqa, tmp_path):
    from vlbert.tasks.vqa.model import VLBertForVQA

    cfg = tiny(demo_data, vqa, tmp_path / "out")
    state = _pretraining_state(cfg)
    model = VLBertForVQA(cfg.model, cfg.detector, num_answers=7)
    model.load_pretrained(state)
    mine = model.state_dict()
    detector_keys = [k for k in state if k.startswith("detector.")]
    assert detector_keys
    for k in ["vlbert.encoder.layer.1.output.dense.weight", "vlbert.embeddings.visual_projection.weight",
              *detector_keys]:
        assert torch.equal(mine["backbone." + k], state[k]), k
    for k in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
        assert torch.equal(mine["head.transform." + k], state["mlm_head.predictions.transform." + k])
    assert model.head.classifier.out_features == 7 and model.head.dropout.p == cfg.model.head_dropout
    bad = dict(state)
    bad.pop("vlbert.encoder.layer.0.attention.self.query.weight")
    with pytest.raises(ValueError, match="missing"):
        model.load_pretrained(bad)
    with pytest.raises(ValueError, match="no detector"):
        model.load_pretrained({"x": torch.zeros(1)})


def test_from_config_loads_the_starting_weights_the_config_names(demo_data, vqa, tmp_path):
    """model.bert: encoder and the head's transform from BERT's MLM transform; model.pretrained: the
    pretraining run's weights in the architecture of model.bert. The constructor reads neither."""
    from transformers import BertConfig, BertForMaskedLM

    from vlbert.tasks.vqa.model import VLBertForVQA

    base = tiny(demo_data, vqa, tmp_path / "out")
    bert = BertForMaskedLM(BertConfig(vocab_size=base.model.vocab_size, hidden_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    model_cfg = dataclasses.replace(base.model, bert=str(tmp_path / "bert"))
    model = VLBertForVQA.from_config(model_cfg, base.detector, 3)
    assert model.backbone.config.hidden_size == 48  # the checkpoint's architecture, not the config's sizes
    assert torch.equal(model.head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(model.backbone.vlbert.encoder.layer[0].output.dense.weight,
                       bert.bert.encoder.layer[0].output.dense.weight)
    built = VLBertForVQA(model_cfg, base.detector, 3)
    assert not torch.equal(built.head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)

    pretraining_cfg = dataclasses.replace(base, model=model_cfg)
    weights = _save_pretrained(pretraining_cfg, tmp_path / "run")
    state = _pretraining_state(pretraining_cfg)
    model = VLBertForVQA.from_config(dataclasses.replace(model_cfg, pretrained=str(weights)), base.detector, 3)
    assert torch.equal(model.head.transform.dense.weight, state["mlm_head.predictions.transform.dense.weight"])
    assert torch.equal(model.backbone.detector.detector.backbone.conv1.weight,
                       state["detector.detector.backbone.conv1.weight"])


def _save_pretrained(cfg, folder: Path, run_id: str = "pretrain-run-123") -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _pretraining_state(cfg).items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({"step": 10, "mlflow_run_id": run_id}))
    return folder / "model.safetensors"


def test_tiny_finetune_overfits_a_few_questions(demo_data, vqa, tmp_path):
    from vlbert.tasks.finetune import finetune
    from vlbert.tasks.vqa.answers import read_submission

    out = tmp_path / "overfit"
    cfg = tiny(demo_data, vqa, out, "optim.lr=1e-2", "optim.total_steps=60", "runtime.checkpoint_every=100",
               "model.hidden_dropout=0", "model.attention_dropout=0", "model.visual_dropout=0")
    result = finetune(cfg)
    assert not result.preempted and result.step == 60
    # Soft targets (0.3, 0.6, 0.9) bound the BCE away from 0: compare with its floor, the targets' entropy.
    from vlbert.tasks.vqa.task import VQATask
    from transformers import AutoTokenizer

    task = VQATask(cfg, AutoTokenizer.from_pretrained(cfg.tokenizer))
    batch, _ = task.train_set().get_batch([(i, -1) for i in range(8)])
    t = batch.targets.clamp(1e-6, 1 - 1e-6)
    floor = float(-(t * t.log() + (1 - t) * (1 - t).log()).sum(1).mean())
    first, last = result.losses[1], sum(result.losses[s] for s in range(56, 61)) / 5
    assert last - floor < 0.4 * (first - floor), (first, last, floor)
    # The training questions scored by the official metric, against the best single answer for all
    # (what a model that ignores question and image can reach). On 2 CPU cores the 60 steps fit the
    # yes/no and number questions; colour/shape need longer to ground in a random detector's features.
    from vlbert.tasks.vqa.metric import evaluate_vqa

    anns = json.loads((vqa / "train_annotations.json").read_text())["annotations"]
    constant = max(evaluate_vqa({a["question_id"]: answer for a in anns}, anns).overall
                   for answer in task.vocab.answers)
    acc = result.eval_metrics["val/vqa_acc"]
    # Fitted: the yes/no and number questions it trained on, and overall well above the best constant
    # answer (how far above depends on the share of colour/shape questions, which stay hard here).
    fitted = {t: v for t, v in result.eval_metrics.items() if t.endswith(("yes/no", "number"))}
    assert fitted and all(v >= 90.0 for v in fitted.values()), result.eval_metrics
    assert acc >= constant + 20.0, (acc, constant, result.eval_metrics)
    types = {a["answer_type"] for a in json.loads((vqa / "train_annotations.json").read_text())["annotations"]}
    assert set(result.eval_metrics) == {"val/vqa_acc", "val/missing_images"} | {f"val/vqa_acc/{t}" for t in types}
    assert result.eval_metrics["val/missing_images"] == 0
    questions = json.loads((vqa / "train_questions.json").read_text())["questions"]
    preds = read_submission(str(out / "val_predictions.json"), [q["question_id"] for q in questions])
    answers = (out / "answers.txt").read_text().split("\n")
    assert set(preds.values()) <= set(answers)
    assert (out / "model.safetensors").exists() and json.loads((out / "model.json").read_text())["task"] == "vqa"

    # vlbert-evaluate on the exported weights: the same accuracy, and the submission file.
    from vlbert.cli.evaluate import main as evaluate_main

    config_path = tmp_path / "ft.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert evaluate_main(["--config", str(config_path), "--weights", str(out / "model.safetensors"),
                          "--out", str(tmp_path / "eval")]) == 0
    again = read_submission(str(tmp_path / "eval" / "val_predictions.json"))
    assert again == preds
    # An unannotated split (test-dev): only the submission file.
    qonly = "vqa.val.annotations="
    assert evaluate_main(["--config", str(config_path), "--weights", str(out / "model.safetensors"),
                          "--out", str(tmp_path / "testdev"), "--set", qonly]) == 0
    rows = json.loads((tmp_path / "testdev" / "val_predictions.json").read_text())
    assert len(rows) == len(questions) and all(set(r) == {"question_id", "answer"} for r in rows)


def test_resume_after_sigterm_matches_an_uninterrupted_run(demo_data, vqa, tmp_path):
    from vlbert.tasks.finetune import finetune
    from vlbert.tracking import fetch_metric_histories, fetch_runs

    pretrained = _save_pretrained(tiny(demo_data, vqa, tmp_path / "x"), tmp_path / "pretrain")
    common = ("optim.total_steps=6", "runtime.checkpoint_every=100", "vqa.image.flip_prob=0.5",
              "model.hidden_dropout=0.1", f"model.pretrained={pretrained}")
    straight = finetune(tiny(demo_data, vqa, tmp_path / "straight", "tracking.experiment=straight", *common))

    cfg = tiny(demo_data, vqa, tmp_path / "stopped", "tracking.experiment=stopped", *common)

    def on_step(step, loss):
        if step == 3:  # noticed at the next step's vote, before its batches are used
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = finetune(cfg, on_step=on_step)
    assert stopped.preempted and stopped.signal == "SIGTERM" and stopped.step == 3
    assert stopped.checkpoint.endswith("step-000003") and stopped.eval_metrics == {}
    assert not (tmp_path / "stopped" / "model.safetensors").exists()
    resumed = finetune(cfg)
    assert resumed.resumed_from.endswith("step-000003") and resumed.step == 6
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (1, 2, 3):
        assert stopped.losses[step] == pytest.approx(straight.losses[step], rel=1e-6, abs=1e-7)
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-6, abs=1e-7)
    assert resumed.eval_metrics == pytest.approx(straight.eval_metrics)

    uri = cfg.tracking.tracking_uri
    (run,) = fetch_runs(uri, experiment="stopped")
    assert run.run_id == resumed.run_id == stopped.run_id and run.status == "FINISHED"
    assert run.tags["vlbert.pretrain_run_id"] == "pretrain-run-123"
    assert run.tags["vlbert.task"] == "vqa"
    hist = fetch_metric_histories(uri, run.run_id, ["loss", "val/vqa_acc"])
    assert hist["loss"].steps == [1, 2, 3, 4, 5, 6]
    assert hist["val/vqa_acc"].values == pytest.approx([resumed.eval_metrics["val/vqa_acc"]])


class StalledStore:
    """Makes the ``stall_at``-th training micro-batch (0-based) wait as if on a store that stopped
    answering, until ``release`` is set; a run that never gives up that wait fails after 60 s
    instead of hanging."""

    def __init__(self, monkeypatch, stall_at: int):
        from vlbert.tasks.vqa.data import VQADataset

        self.stalled, self.release, self.calls = threading.Event(), threading.Event(), 0
        original = VQADataset.__getitem__

        def getitem(dataset, items):
            self.calls += 1
            if self.calls - 1 == stall_at:
                self.stalled.set()
                if not self.release.wait(60):
                    raise RuntimeError("the run never gave up waiting for the stalled batch")
            return original(dataset, items)

        monkeypatch.setattr(VQADataset, "__getitem__", getitem)


def test_a_stop_while_waiting_for_data_checkpoints_the_last_step(demo_data, vqa, tmp_path, monkeypatch):
    """SIGTERM arrives while step 3 waits for its batch on a stalled store: the run stops within
    the wait, checkpoints step 2 (with the data position before step 3's batches), and the resumed
    run's losses equal those of a run that never stopped."""
    from vlbert.tasks.finetune import finetune

    common = ("optim.total_steps=5", "runtime.checkpoint_every=100")
    straight = finetune(tiny(demo_data, vqa, tmp_path / "straight", "tracking.experiment=straight", *common))

    store = StalledStore(monkeypatch, stall_at=2)  # one micro-batch per step: step 3's batch
    cfg = tiny(demo_data, vqa, tmp_path / "stopped", "tracking.experiment=stopped", *common)

    def on_step(step, loss):
        if step == 2:
            assert store.stalled.wait(30), "the loader never reached the stalled batch"
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # arrives during the wait

    try:
        stopped = finetune(cfg, on_step=on_step)
    finally:
        store.release.set()
    assert stopped.preempted and stopped.signal == "SIGTERM" and stopped.step == 2
    assert stopped.checkpoint.endswith("step-000002") and not stopped.eval_metrics

    monkeypatch.undo()
    resumed = finetune(cfg)
    assert resumed.resumed_from.endswith("step-000002") and sorted(resumed.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-6, abs=1e-7)


def test_a_store_that_stops_answering_is_a_data_error(demo_data, vqa, tmp_path, monkeypatch, capsys, caplog):
    """No batch within vqa.wait_timeout_s: a warning every wait_warn_s, then the command exits 1
    with a message that says what it waited for."""
    from vlbert.cli.finetune import main as finetune_main

    cfg = tiny(demo_data, vqa, tmp_path / "out", "optim.total_steps=3", "vqa.wait_warn_s=0.5",
               "vqa.wait_timeout_s=2")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    store = StalledStore(monkeypatch, stall_at=1)
    try:
        with caplog.at_level("WARNING", logger="vlbert.data.prefetch"):
            assert finetune_main(["--config", str(config)]) == 1
    finally:
        store.release.set()
    err = capsys.readouterr().err
    assert re.search(r"data error: no batch from the data pipeline for \d+ s \(vqa.wait_timeout_s = 2 s\).*skips so far", err)
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
    assert len(waits) >= 2 and all("for a batch" in w for w in waits)


@pytest.mark.parametrize("name", ["vqa_base.yaml", "vqa_demo.yaml", "vqa_tiny.yaml"])
def test_shipped_configs_load(name):
    cfg = load_finetune_config(REPO / "configs" / name, check_files=False)
    assert cfg.vqa is not None and cfg.refcoco is None
    if name == "vqa_base.yaml":
        o = cfg.optim
        assert (cfg.vqa.batch_size, o.lr, o.warmup_steps, cfg.epochs, o.weight_decay, o.grad_clip) == (
            256, 1.6e-4, 500, 5, 1e-4, 1.0)
        assert cfg.model.head_dropout == 0.1 and cfg.vqa.image.flip_prob == 0.5


def test_config_errors_name_the_key(tmp_path):
    from vlbert.config import ConfigError

    with pytest.raises(ConfigError, match="exactly one task"):
        load_finetune_config(None, check_files=False)
    with pytest.raises(ConfigError, match="vqa.batch_sise"):
        load_finetune_config(REPO / "configs/vqa_tiny.yaml", ["vqa.batch_sise=3"], check_files=False)


def test_demo_comparison_tool_runs_both_arms(demo_data, vqa, tmp_path, capsys):
    """vlbert.demo.vqa_compare: one seed per arm on the tiny config (the real demo uses
    configs/vqa_demo.yaml and the demo pretraining run; see docs/finetuning.md)."""
    from vlbert.demo.vqa_compare import main

    cfg = tiny(demo_data, vqa, tmp_path / "x")
    pretrained = _save_pretrained(cfg, tmp_path / "pretrain", run_id="demo-pretrain")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    summary = main(["--config", str(config), "--pretrained", str(pretrained), "--seeds", "0",
                    "--out", str(tmp_path / "cmp"), "--set", "optim.total_steps=2",
                    "--set", "tracking.experiment=demo-cmp"])
    on_disk = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert on_disk["gap_points"] == pytest.approx(summary["gap_points"])
    for arm in ("pretrained", "no_pretraining"):
        metrics = json.loads((tmp_path / "cmp" / f"{arm}-seed0" / "eval_metrics.json").read_text())
        assert on_disk[arm]["val/vqa_acc"]["values"] == pytest.approx([metrics["val/vqa_acc"]])
    assert on_disk["gap_points"] == pytest.approx(on_disk["pretrained"]["val/vqa_acc"]["mean"]
                                                  - on_disk["no_pretraining"]["val/vqa_acc"]["mean"])
    from vlbert.tracking import fetch_runs

    runs = {r.name: r for r in fetch_runs(cfg.tracking.tracking_uri, experiment="demo-cmp")}
    assert runs["pretrained-seed0"].tags["vlbert.pretrain_run_id"] == "demo-pretrain"
    assert runs["no_pretraining-seed0"].tags["vlbert.pretrain_run_id"] == ""
    assert "pretraining gains" in capsys.readouterr().out


def test_cli_config_errors_exit_2(capsys):
    from vlbert.cli.evaluate import main as evaluate_main
    from vlbert.cli.finetune import main as finetune_main

    assert finetune_main(["--config", str(REPO / "configs/vqa_tiny.yaml"), "--set", "vqa.batch_sise=3"]) == 2
    assert "vqa.batch_sise" in capsys.readouterr().err
    assert evaluate_main(["--config", str(REPO / "configs/vqa_tiny.yaml"), "--weights", "x", "--set", "epochs=-1",
                          "--set", "optim.total_steps=0"]) == 2
    assert "epochs" in capsys.readouterr().err


# Run under torchrun in place of tools/finetune.py: records each rank's own answers (the dict it
# hands to all_gather_object inside VQATask.predict) before the gather merges them.
_RECORDING_LAUNCHER = """
import json, os, runpy, sys
from vlbert.tasks.vqa import task as vqa_task
from vlbert.train import dist

gather, predict = dist.all_gather_object, vqa_task.VQATask.predict

def recording_predict(self, forward, eval_set, rank, world):
    def record(mine):
        path = os.path.join(os.environ["RANK_RECORDS"], f"{eval_set.name}.rank{os.environ['RANK']}.json")
        with open(path, "w") as f:
            json.dump({"rank": rank, "world": world, "question_ids": sorted(mine)}, f)
        return gather(mine)
    dist.all_gather_object = record
    try:
        return predict(self, forward, eval_set, rank, world)
    finally:
        dist.all_gather_object = gather

vqa_task.VQATask.predict = recording_predict
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.integration
def test_two_ranks_under_torchrun(demo_data, vqa, tmp_path):
    """tools/finetune.py under torchrun (2 CPU ranks, gloo, ZeRO-2): the ranks split the evaluation
    questions (each rank answers its own share, the shares are disjoint, 4 + 4 of the 8, and
    together hold every question exactly once); rank 0 writes every question's answer.
    Fails if ``eval_batches`` ignores the rank (tried: ``mine = list(range(num_examples))``: each
    rank answers every question, the union still covers them all, the shares overlap)."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = tiny(demo_data, vqa, tmp_path / "out", "optim.total_steps=2")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    launcher = tmp_path / "recording_launcher.py"
    launcher.write_text(_RECORDING_LAUNCHER)
    records = tmp_path / "records"
    records.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), RANK_RECORDS=str(records))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(launcher), str(REPO / "tools/finetune.py"),
                           "--config", str(config)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    questions = [q["question_id"] for q in json.loads((vqa / "train_questions.json").read_text())["questions"]]
    assert len(questions) == len(set(questions)) == 8
    shares = [json.loads((records / f"val.rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["world"]) for s in shares] == [(0, 2), (1, 2)]
    ids = [s["question_ids"] for s in shares]
    assert [len(i) for i in ids] == [4, 4]  # rank r answers positions r, r + 2, ...
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(questions)
    rows = json.loads((tmp_path / "out" / "val_predictions.json").read_text())
    assert sorted(r["question_id"] for r in rows) == sorted(questions)
    metrics = json.loads((tmp_path / "out" / "eval_metrics.json").read_text())
    assert json.loads(proc.stdout)["val/vqa_acc"] == pytest.approx(metrics["val/vqa_acc"])
