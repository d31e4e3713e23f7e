"""Streams that never crash or hang on bad data (issue: streams and bad input).

- An epoch in which a slot's shards are all unreadable moves on to the next epoch
  (the repro: 2 good shards + a 0-byte tar + 20 kB of random bytes, 2 workers).
- A source whose every sample is rejected (captions as ``KEY.caption``; documents
  that tokenise to nothing) raises ``SourceUnusable`` naming the source, the skip
  counts and the likely cause: in the stream, and as exit 1 of ``vlbert-train``.
- SIGTERM while the loader waits on a store that never answers: the trainer stops
  within seconds with a checkpoint of its last step.
- Smaller cases: BOM, 16-bit PNG, 0-byte shard and 0-row Parquet counted,
  decompression bombs under their own reason.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from vlbert.config import CaptionDataConfig, MaskingConfig, load_config
from vlbert.data.captions import BadSample, decode_caption_sample
from vlbert.data.formats import write_tar
from vlbert.data.mixture import CaptionReader
from vlbert.data.shards import ShardStream, SkipCounter, SourceUnusable, is_transient, slot_plan
from vlbert.data.text import TextSegmenter, WordPieces

pytestmark = [pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore::FutureWarning")]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_data / "tokenizer"))


def bad_shards(folder: Path) -> list[str]:
    """A 0-byte tar and a tar of 20 kB of random bytes."""
    (folder / "empty.tar").write_bytes(b"")
    (folder / "noise.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    return [str(folder / "empty.tar"), str(folder / "noise.tar")]


def tiny_train_config(data: Path, out: Path, caption_urls: list[str], **overrides) -> dict:
    """The tiny end-to-end config of tests/test_train_e2e.py, with other caption shards."""
    from test_train_e2e import tiny_config

    cfg = tiny_config(data, out, **{"data.captions.urls": caption_urls, "runtime.val_every": 0,
                                    "tracking.enabled": False, **overrides})
    return cfg


# --------------------------------------------------------------------------- unlucky epochs


def test_an_epoch_of_only_bad_shards_moves_on(demo_data, tmp_path):
    good = [str(demo_data / f"captions/train-0000{i}.tar") for i in range(2)]
    urls = good + bad_shards(tmp_path)
    # An epoch in which slot 0 of 2 gets exactly the two bad shards: the old stream raised there.
    unlucky = next(e for e in range(50) if set(slot_plan(4, 2, 0, 0, e).shards) == {2, 3})
    counter = SkipCounter()
    stream = ShardStream(urls, 0, 2, seed=0, counter=counter)
    records = []
    for rec in stream:
        stream.mark_delivered()
        records.append(rec)
        if rec.epoch > unlucky + 1:
            break
    assert {r.epoch for r in records} >= set(range(unlucky + 2)) - {unlucky}
    assert not [r for r in records if r.epoch == unlucky]
    assert counter["empty_epoch"] >= 1
    assert counter["empty_shard"] >= 1 and counter["corrupt_shard"] >= 1


@pytest.mark.integration
def test_training_survives_bad_shards_with_two_workers(demo_data, tmp_path, one_torch_thread):
    """A case that once stopped training (2 good shards of 16 samples + 2 bad, 2 workers, seed 0): it died
    before step 30. Slot 0 gets exactly the bad shards in its second epoch, which it reaches after
    its 8 micro-batches of 2 captions in the first (steps alternate between the two workers), so
    24 steps go well past that epoch. Fails if a slot's epoch of only bad shards ends the stream."""
    from vlbert.train.loop import train

    steps = 24
    assert set(slot_plan(4, 2, 0, 0, 1).shards) == {2, 3}  # the unlucky epoch is the second
    good = [str(demo_data / f"captions/train-0000{i}.tar") for i in range(2)]
    cfg = tiny_train_config(demo_data, tmp_path / "out", good + bad_shards(tmp_path),
                            **{"data.num_workers": 2, "optim.total_steps": steps, "runtime.checkpoint_every": steps})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_config(path))
    assert result.step == steps and not result.preempted


# --------------------------------------------------------------------------- every sample rejected


def caption_as_wrong_member(src: Path, dst: Path) -> None:
    """Copy a caption shard with ``KEY.txt`` renamed to ``KEY.caption``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".txt"):
                m.name = m.name[:-4] + ".caption"
            tout.addfile(m, io.BytesIO(data))


def test_captions_that_are_never_usable_raise_a_clear_error(demo_data, tmp_path, tokenizer):
    urls = []
    for i in range(2):
        caption_as_wrong_member(demo_data / f"captions/train-0000{i}.tar", tmp_path / f"c{i}.tar")
        urls.append(str(tmp_path / f"c{i}.tar"))
    stream = ShardStream(urls, 0, 1, seed=0, counter=SkipCounter(), source="captions")
    reader = CaptionReader(stream, CaptionDataConfig(short_side=64, max_long_side=64), MaskingConfig(),
                           tokenizer, seed=0, tag=1, train=True)
    t0 = time.monotonic()
    with pytest.raises(SourceUnusable) as err:
        next(iter(reader))
    msg = str(err.value)
    assert time.monotonic() - t0 < 30
    assert "source 'captions' (2 shard(s)" in msg and "0 of 32 samples" in msg
    assert "missing_caption 32" in msg and "no caption member (KEY.txt)" in msg
    assert "members seen: .caption, .jpg, .json" in msg


def test_text_that_tokenises_to_nothing_raises_a_clear_error(tmp_path, tokenizer):
    path = tmp_path / "ctrl.jsonl"
    path.write_text("".join(json.dumps({"text": "\x01\x02 \u200b"}) + "\n" for _ in range(30)))
    stream = ShardStream([str(path)], 0, 1, seed=0, counter=SkipCounter(), source="text.junk")
    segments = TextSegmenter(stream, WordPieces(tokenizer), 16, MaskingConfig(), seed=0)
    with pytest.raises(SourceUnusable, match=r"source 'text.junk'.*0 of 30 samples.*no_tokens 30.*tokenises to nothing"):
        next(segments)


def test_unreadable_source_names_what_was_wrong(tmp_path):
    stream = ShardStream(bad_shards(tmp_path), 0, 1, seed=0, counter=SkipCounter(), source="captions")
    with pytest.raises(SourceUnusable, match=r"no shard could be read \((corrupt_shard 1, empty_shard 1|empty_shard 1, corrupt_shard 1)\)"):
        next(iter(stream))


def test_train_exits_1_with_the_reason_when_no_caption_is_usable(demo_data, tmp_path):
    urls = []
    for i in range(2):
        caption_as_wrong_member(demo_data / f"captions/train-0000{i}.tar", tmp_path / f"c{i}.tar")
        urls.append(str(tmp_path / f"c{i}.tar"))
    cfg = tiny_train_config(demo_data, tmp_path / "out", urls, **{"data.num_workers": 2})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "vlbert.cli.train", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "data error:" in proc.stderr and "source 'captions'" in proc.stderr
    assert "members seen: .caption, .jpg, .json" in proc.stderr


# --------------------------------------------------------------------------- a store that never answers


class HangingFS(MemoryFileSystem):
    """In-memory store in which opening a path in ``hang`` blocks (until released, at most
    ``HANG_LIMIT_S``) and then fails: a store that accepts a request and never answers."""

    protocol = "hangmem"
    store: dict = {}
    pseudo_dirs = [""]
    hang: set = set()
    entered = threading.Event()
    release = threading.Event()
    HANG_LIMIT_S = 120

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(str(path).removeprefix("hangmem://"))

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if mode == "rb" and path in self.hang:
            HangingFS.entered.set()
            HangingFS.release.wait(self.HANG_LIMIT_S)
            raise OSError(f"{path}: no answer")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("hangmem", HangingFS, clobber=True)


def test_sigterm_while_the_loader_waits_stops_within_seconds_with_a_checkpoint(demo_data, tmp_path):
    from vlbert.train.checkpoint import Checkpointer
    from vlbert.train.loop import train

    fs = HangingFS()
    urls = []
    for i in range(2):
        fs.pipe(f"/s/train-{i}.tar", (demo_data / f"captions/train-0000{i}.tar").read_bytes())
        urls.append(f"hangmem:///s/train-{i}.tar")
    fs.pipe("/s/stuck.tar", (demo_data / "captions/train-00000.tar").read_bytes())
    urls.append("hangmem:///s/stuck.tar")
    HangingFS.hang = {"/s/stuck.tar"}
    HangingFS.entered.clear()
    HangingFS.release.clear()
    cfg = tiny_train_config(demo_data, tmp_path / "out", urls,
                            **{"optim.total_steps": 1000, "runtime.checkpoint_every": 1000,
                               "data.read_retries": 0})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sent = {}

    def signal_when_stuck():
        if HangingFS.entered.wait(180):
            time.sleep(1.0)  # well inside the wait
            sent["t"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_stuck, daemon=True).start()
    try:
        result = train(load_config(path))
        took = time.monotonic() - sent["t"]
    finally:
        HangingFS.release.set()
    assert result.preempted and result.signal == "SIGTERM"
    # The poll (0.25 s), the checkpoint, and up to STREAM_CLOSE_WAIT_S for the stuck loader thread.
    assert took < 15, f"stopped {took:.1f} s after the signal"
    latest = Checkpointer(str(tmp_path / "out" / "checkpoints"), 2, 0, 1).find_latest()
    assert latest is not None and latest.step == result.step < 1000


# --------------------------------------------------------------------------- smaller cases


def test_jsonl_with_a_bom_keeps_its_first_document(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    counter = SkipCounter()
    got = [r.payload for r in ShardStream([str(path)], 0, 1, 0, counter, loop=False)]
    assert got == ["first", "second"] and counter.as_dict() == {}


def test_prepare_text_check_counts_the_bom_document(tmp_path, capsys):
    from vlbert.cli.prepare_text import main as prepare_text

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    assert prepare_text(["--check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 2 documents; skipped: none; usable as is" in out, out


def test_empty_tar_and_zero_row_parquet_are_counted(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    write_tar(str(tmp_path / "b.tar"), [])
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "c.parquet")
    (tmp_path / "d.jsonl").write_bytes(b"")
    for name in ("a.tar", "b.tar", "c.parquet", "d.jsonl"):
        counter = SkipCounter()
        assert list(ShardStream([str(tmp_path / name)], 0, 1, 0, counter, loop=False)) == []
        assert counter.as_dict() == {"empty_shard": 1}, name


def png_sample(image: Image.Image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"png": buf.getvalue(), "txt": b"a grey square"}


def test_16_bit_greyscale_png_keeps_its_tones(tokenizer):
    ramp = (np.arange(64, dtype=np.uint32)[None, :].repeat(64, 0) * 1024).astype(np.uint16)  # 0 .. 64512
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    sample = decode_caption_sample(png_sample(image), "k", CaptionDataConfig(short_side=64, max_long_side=64),
                                   MaskingConfig(), tokenizer, np.random.default_rng(0), train=False)
    row = sample.image[0, 32].astype(int)
    assert row[0] == 0 and 250 <= row[-1] <= 255  # black to white, not all white
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 32
    assert (sample.image[0] == sample.image[1]).all() and (sample.image[1] == sample.image[2]).all()


def test_decompression_bomb_has_its_own_reason(tokenizer, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 64x64 is then over twice the limit
    with pytest.raises(BadSample) as err:
        decode_caption_sample(png_sample(Image.new("RGB", (64, 64))), "k", CaptionDataConfig(), MaskingConfig(),
                              tokenizer, np.random.default_rng(0))
    assert err.value.reason == "image_too_large"


class HttpError(Exception):
    """Shaped like gcsfs.retry.HttpError, which is not an OSError."""

    def __init__(self, code):
        super().__init__(f"HTTP {code}")
        self.code = code


@pytest.mark.parametrize("code,transient", [(503, True), (429, True), (500, True), (404, False), (403, False)])
def test_gcs_http_errors_5xx_and_429_are_transient(code, transient):
    assert is_transient(HttpError(code)) is transient
    assert is_transient(ConnectionResetError()) and not is_transient(ValueError())
