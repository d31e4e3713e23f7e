"""vlbert-compare: pretraining runs side by side with the scores of the fine-tunes started from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vlbert.tracking.compare import PRETRAIN_TAG, downstream_rows


@dataclass
class Rec:
    status: str
    tags: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def test_downstream_rows_mean_std_per_pretraining_run():
    finetunes = [
        Rec("FINISHED", {PRETRAIN_TAG: "a"}, {"val/vqa_acc": 70.0, "val/vqa_acc/yes/no": 90.0, "loss": 1.0}),
        Rec("FINISHED", {PRETRAIN_TAG: "a"}, {"val/vqa_acc": 72.0}),
        Rec("FAILED", {PRETRAIN_TAG: "b"}, {"val/vqa_acc": 10.0}),
        Rec("FINISHED", {PRETRAIN_TAG: "b"}, {"testA/refcoco_acc": 61.0}),
        Rec("FINISHED", {PRETRAIN_TAG: "zzz"}, {"val/vqa_acc": 1.0}),
        Rec("FINISHED", {}, {"val/vqa_acc": 2.0}),
    ]
    rows = {r[0]: r[1:] for r in downstream_rows(["a", "b", "c"], finetunes)}
    assert set(rows) == {"downstream val/vqa_acc", "downstream testA/refcoco_acc"}
    assert rows["downstream val/vqa_acc"] == ["71.00 ± 1.41 (2)", "-", "-"]
    assert rows["downstream testA/refcoco_acc"] == ["-", "61.00 ± 0.00 (1)", "-"]
    assert downstream_rows(["a"], []) == []


@pytest.mark.timeout(120)
def test_cli_shows_downstream_scores(tmp_path, capsys):
    import mlflow

    from vlbert.cli.compare import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    pre = client.create_run(client.create_experiment("vlbert")).info.run_id
    client.log_metric(pre, "loss", 2.5, step=1)
    client.set_terminated(pre)
    ft_exp = client.create_experiment("vlbert-vqa")
    for acc in (60.0, 64.0):
        ft = client.create_run(ft_exp, tags={PRETRAIN_TAG: pre}).info.run_id
        client.log_metric(ft, "val/vqa_acc", acc, step=10)
        client.set_terminated(ft)
    assert main(["--tracking-uri", uri, "--plot", ""]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("downstream val/vqa_acc"))
    assert "62.00 ± 2.83 (2)" in line

    # The fine-tuning runs compared with each other: their evaluation is a row of the table.
    assert main(["--tracking-uri", uri, "--experiment", "vlbert-vqa", "--plot", ""]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("val/vqa_acc final"))
    assert line.split()[2:] == ["60", "64"]
