"""Progress output fit for log files (vlbert/train/progress.py and the training loop)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlbert.train.progress import Progress

REPO = Path(__file__).resolve().parents[1]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def frames(text: str) -> list[str]:
    """What a log viewer shows: carriage returns start a new frame too."""
    return [f for f in re.split(r"[\r\n]", text) if f.strip()]


def test_in_a_log_file_one_plain_line_per_interval():
    out = io.StringIO()
    with Progress(1000, "detector", every=100, stream=out) as p:
        for _ in range(1000):
            p.update(1, loss="0.123")
    lines = frames(out.getvalue())
    assert len(lines) == 10 and lines[0] == "detector 100/1000 loss 0.123" and lines[-1].startswith("detector 1000/")


def test_partial_last_interval_and_silent_without_every():
    out = io.StringIO()
    with Progress(250, "x", every=100, stream=out) as p:
        for _ in range(250):
            p.update()
    assert frames(out.getvalue()) == ["x 100/250", "x 200/250", "x 250/250"]
    quiet = io.StringIO()
    with Progress(250, "x", stream=quiet) as p:
        for _ in range(250):
            p.update(1, loss=1.0)
    assert quiet.getvalue() == ""


def test_on_a_terminal_a_live_bar_that_does_not_redraw_per_update():
    out = Tty()
    with Progress(5000, "train", stream=out) as p:
        assert p.live
        for _ in range(5000):
            p.update(1, loss="1.0")
    assert "train" in out.getvalue()
    assert len(frames(out.getvalue())) < 200  # tqdm's own pace, not one frame per update


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_trainer_log_file_has_a_few_lines_per_logging_interval(demo_data, tmp_path):
    """Fails if the trainer writes a line (or a progress-bar frame) per step to a log file: with 6
    steps per interval that is 12 lines between the first and the last logged step, over the bound of 6."""
    from test_train_e2e import clean_env, tiny_config

    steps, every = 18, 6
    cfg = tiny_config(demo_data, tmp_path / "out", **{"optim.total_steps": steps, "runtime.log_every": every,
                                                       "runtime.checkpoint_every": steps, "runtime.val_every": 0,
                                                       "tracking.enabled": False})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "vlbert.cli.train", "--config", str(path)], cwd=REPO, env=clean_env(),
                              stdout=f, stderr=subprocess.STDOUT, timeout=540)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = frames(text)
    step_lines = [l for l in lines if re.search(rf"step \d+/{steps} loss", l)]
    assert len(step_lines) == steps // every
    assert not [l for l in lines if "%|" in l or "it/s]" in l], "a progress bar frame in the log file"
    # Start-up (DeepSpeed's banner, config) and the end take a fixed number of lines; the
    # training itself no more than a few per logging interval.
    first, last = lines.index(step_lines[0]), lines.index(step_lines[-1])
    assert last - first <= 3 * (len(step_lines) - 1), lines[first:last + 1]
