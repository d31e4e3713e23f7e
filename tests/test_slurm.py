"""slurm/pretrain.sh on a real two-node Slurm cluster (tests/slurm_cluster.py): the real
trainer (tools/train.py, configs/tiny.yaml) on 2 ranks, one per node, gloo on the CPU.

- an uninterrupted job trains the requested steps with ranks 0 and 1 on nodes n1 and n2,
  writes its checkpoints under $VLBERT_OUTPUT_DIR and one MLflow run (in the store named
  by $MLFLOW_TRACKING_URI) with one loss value per step;
- a job preempted with USR1 to its batch shell checkpoints, requeues itself (restart count
  1), resumes from that checkpoint and finishes: one MLflow run with one value per step,
  the same losses and the same final data position on every rank as the uninterrupted job
  (so no sample was repeated or skipped).

Needs root and Debian's slurm-wlm and munge (scripts/system_deps.sh). Run alone with
``python -m pytest -m slurm``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, slurm_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
STEPS = 10
GLOBAL_BATCH = 4  # configs/tiny.yaml: 2 captions + 2 text segments per step
JOB_TIMEOUT = 300


@pytest.fixture(scope="module")
def slurm() -> SlurmCluster:
    with slurm_cluster() as cluster:
        yield cluster


@dataclass
class Job:
    id: int
    folder: Path  # logs, output, MLflow store
    info: dict[str, str]  # `scontrol show job` at the end

    @property
    def output(self) -> Path:
        return self.folder / "run"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.folder / 'mlflow.db'}"

    @property
    def log(self) -> str:
        return "".join(p.read_text(errors="replace") if p.exists() else "" for p in
                       (self.folder / f"job-{self.id}.out", self.folder / f"job-{self.id}.err"))

    def checkpoint(self, step: int) -> Path:
        return self.output / "checkpoints" / f"step-{step:06d}"


def submit(slurm: SlurmCluster, data: Path, folder: Path) -> Job:
    """sbatch slurm/pretrain.sh configs/tiny.yaml on 2 nodes x 1 task, CPU only."""
    folder.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.tokenizer={data / 'tokenizer'}",
        f'data.captions.urls=["{data}/captions/train-*.tar"]',
        f'data.validation.urls=["{data}/captions/val-*.tar"]',
        f'data.text.sources.books.urls=["{data}/text/books-*.jsonl"]',
        f'data.text.sources.wiki.urls=["{data}/text/wiki-*.parquet"]',
        f"optim.total_steps={STEPS}", "runtime.checkpoint_every=2", "runtime.keep_last=2",
        "tracking.experiment=slurm",
        "data.num_workers=1",  # a DataLoader worker per rank: Slurm signals it too
        # Without dropout the losses depend only on the weights and the data, not on the
        # trainer's global torch RNG (which starting a DataLoader draws from).
        "model.hidden_dropout=0", "model.attention_dropout=0", "model.visual_dropout=0",
    ]
    env = {"VLBERT_OUTPUT_DIR": str(folder / "run"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "VLBERT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}  # tools/train.py imports this checkout's vlbert, not another install
    job_id = slurm.sbatch(["--job-name=vlbert-test", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                           "--cpus-per-task=1", "--time=15", f"--output={folder}/job-%j.out",
                           f"--error={folder}/job-%j.err", "slurm/pretrain.sh", "configs/tiny.yaml", *overrides],
                          cwd=REPO, env=env)
    return Job(job_id, folder, {})


def finish(slurm: SlurmCluster, job: Job) -> Job:
    job.info = slurm.wait_finished(job.id, JOB_TIMEOUT, on_timeout=lambda: job.log[-4000:])
    return job


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def one_run(job: Job):
    from vlbert.tracking import fetch_metric_histories, fetch_runs

    runs = fetch_runs(job.tracking_uri)
    assert len(runs) == 1, [(r.run_id, r.status) for r in runs]
    return runs[0], fetch_metric_histories(job.tracking_uri, runs[0].run_id, ["loss", "samples_seen"])


@pytest.fixture(scope="module")
def straight(slurm, demo_data, tmp_path_factory) -> Job:
    """An uninterrupted job (the reference for the preempted one)."""
    t0 = time.monotonic()
    job = finish(slurm, submit(slurm, demo_data, tmp_path_factory.mktemp("straight")))
    print(f"uninterrupted job: {time.monotonic() - t0:.0f} s")
    return job


def test_two_nodes_train_the_requested_steps_into_one_mlflow_run(straight):
    job = straight
    log = job.log
    assert job.info["JobState"] == "COMPLETED" and job.info["ExitCode"] == "0:0", log[-4000:]
    assert job.info["Restarts"] == "0" and job.info["NodeList"] == "n[1-2]"
    # One task per node, ranks from SLURM_PROCID, rendezvous on the first node's address.
    assert re.search(r"rank 0/2 local_rank 0 on node n1\b", log), log[-4000:]
    assert re.search(r"rank 1/2 local_rank 0 on node n2\b", log), log[-4000:]
    assert re.search(r"master 127\.0\.0\.1:\d+", log)
    assert f"step {STEPS}/{STEPS}" in log and "requeueing" not in log

    # $VLBERT_OUTPUT_DIR became runtime.output_dir; the last checkpoint was written by both ranks.
    assert (job.output / "config.yaml").exists()
    final = job.checkpoint(STEPS)
    assert (final / "COMPLETE").exists()
    meta = read_json(final / "meta.json")
    assert meta["world_size"] == 2 and meta["step"] == STEPS
    assert meta["samples_seen"] == STEPS * GLOBAL_BATCH
    for rank in (0, 1):
        data_state = read_json(final / f"rank-{rank:05d}.json")["data"]
        assert (data_state["rank"], data_state["world_size"]) == (rank, 2)

    # $MLFLOW_TRACKING_URI reached rank 0: one run, one loss value per step.
    run, hist = one_run(job)
    assert run.status == "FINISHED" and run.run_id == meta["mlflow_run_id"]
    assert run.tags.get("vlbert.world_size") == "2"
    assert hist["loss"].steps == list(range(1, STEPS + 1))
    assert hist["samples_seen"].values == [float(GLOBAL_BATCH * s) for s in range(1, STEPS + 1)]


def test_preempted_job_checkpoints_requeues_and_resumes_into_the_same_run(slurm, demo_data, straight,
                                                                         tmp_path_factory):
    t0 = time.monotonic()
    job = submit(slurm, demo_data, tmp_path_factory.mktemp("preempted"))
    first = job.checkpoint(2) / "COMPLETE"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not first.exists():
        info = slurm.job(job.id)
        assert info.get("JobState") in ("PENDING", "RUNNING"), f"{info.get('JobState')} before a checkpoint:\n" \
                                                                 + job.log[-4000:]
        assert time.monotonic() < deadline, "no checkpoint in time:\n" + job.log[-4000:]
        time.sleep(0.3)

    # What Slurm does before the time limit with --signal=B:USR1@120.
    slurm.cmd("scancel", "--signal=USR1", "--batch", str(job.id))
    pending = slurm.wait_job(job.id, lambda i: i["JobState"] == "PENDING" and i.get("Restarts") == "1", 120,
                             "requeue", on_timeout=lambda: job.log[-4000:])
    # Slurm holds a requeued job for about two minutes (Reason=BeginTime; for a moment after the
    # requeue the controller may still show Reason=None): start it now either way.
    assert pending["Reason"] in ("BeginTime", "None"), pending
    slurm.release(job.id)
    finish(slurm, job)
    print(f"preempted job: {time.monotonic() - t0:.0f} s")

    log = job.log
    assert job.info["JobState"] == "COMPLETED" and job.info["ExitCode"] == "0:0", log[-4000:]
    assert job.info["Restarts"] == "1"
    assert "received SIGUSR1" in log and f"requeueing job {job.id}" in log, log[-4000:]
    assert "(restart 0)" in log and "(restart 1)" in log  # --open-mode=append: both attempts in one log
    stopped = re.search(r"stopped on SIGUSR1 at step (\d+)", log)
    assert stopped, log[-4000:]
    k = int(stopped.group(1))
    assert 2 <= k < STEPS, f"stopped at step {k}: the second attempt had nothing to do"
    assert re.search(rf"resuming from \S*step-{k:06d}", log), log[-4000:]

    final = job.checkpoint(STEPS)
    meta = read_json(final / "meta.json")
    assert meta["step"] == STEPS and meta["samples_seen"] == STEPS * GLOBAL_BATCH
    run, hist = one_run(job)
    assert run.status == "FINISHED" and run.run_id == meta["mlflow_run_id"]
    assert hist["loss"].steps == list(range(1, STEPS + 1))  # one value per step across both attempts
    assert hist["samples_seen"].values == [float(GLOBAL_BATCH * s) for s in range(1, STEPS + 1)]

    # The same batches in the same order as without the interruption: the same losses, and
    # every rank's data position at the end is the uninterrupted job's.
    _, reference = one_run(straight)
    assert hist["loss"].values == pytest.approx(reference["loss"].values, rel=1e-5)
    for rank in (0, 1):
        ours = read_json(final / f"rank-{rank:05d}.json")["data"]
        theirs = read_json(straight.checkpoint(STEPS) / f"rank-{rank:05d}.json")["data"]
        assert ours == theirs, f"rank {rank}"
