"""The data streams, checkpoints and region extraction against a real S3-protocol server.

moto's S3 server runs on loopback (tests/s3_server.py); fsspec reaches it through its
configuration (``fsspec.config.conf`` in-process, ``FSSPEC_S3`` in subprocesses), so
the code under test opens plain ``s3://`` URLs. S3 differs from ``memory://`` in
what matters here: no rename (copy + delete), listings that s3fs caches (and that can
hide a deletion), uploads that a killed process leaves half done, and a network that
can fail. A fault-injecting proxy (503s, dropped connections, stalled uploads) sits in
front of the server where a test needs one.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from s3_server import (CREDENTIALS, FaultProxy, MotoS3, clear_s3_caches, fresh_s3, no_client_retries, object_reads,
                       path_matches, s3_config, s3_env)
from test_extract_regions import CONFIG as EXTRACT_CONFIG
from test_mixture import assert_batches_equal, take
from vlbert.config import CaptionDataConfig, DataConfig, MaskingConfig, TextDataConfig, TextSourceConfig
from vlbert.data.mixture import build_pretrain_stream
from vlbert.data.shards import ShardStream, SkipCounter, SourceUnusable, is_transient, slot_plan

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::FutureWarning")]

REPO = Path(__file__).resolve().parents[1]
N_SHARDS, PER_SHARD = 4, 8
WAIT_S = 90  # longest wait for a subprocess to reach the point where it is killed (it imports torch)
SUBPROCESS_TIMEOUT = pytest.mark.timeout(240)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def moto():
    """moto's S3 server for the module, with dummy credentials in the environment."""
    env = {**CREDENTIALS, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = MotoS3().start()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Bucket:
    """A fresh bucket on the moto server; in-process ``s3://`` URLs reach it directly."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.name = f"b-{uuid.uuid4().hex[:12]}"
        self.url = f"s3://{self.name}"
        fresh_s3(endpoint).mkdir(self.name)

    def put(self, local: Path, prefix: str = "") -> None:
        fs = fresh_s3(self.endpoint)
        for p in sorted(local.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{self.name}/{prefix}{p.relative_to(local).as_posix()}")

    def ls(self, prefix: str) -> list[str]:
        """Names under ``prefix`` as the server has them now (no cached listing)."""
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in fresh_s3(self.endpoint).ls(f"{self.name}/{prefix}"))
        except FileNotFoundError:
            return []


@pytest.fixture
def bucket(moto):
    with s3_config(moto.endpoint):
        yield Bucket(moto.endpoint)


@pytest.fixture(scope="module")
def shared(moto, corpus):
    """A bucket holding ``corpus``, uploaded once, for the tests that only read it."""
    with s3_config(moto.endpoint):
        b = Bucket(moto.endpoint)
        b.put(corpus)
    return b


@pytest.fixture
def readonly(shared):
    """``shared``, with in-process ``s3://`` URLs reaching it directly (fresh s3fs instances)."""
    with s3_config(shared.endpoint):
        yield shared


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_data / "tokenizer"))


@pytest.fixture(scope="module")
def corpus(demo_data, tmp_path_factory) -> Path:
    """Local copies of what the tests upload: 4 caption shards ``cc/0000i.tar`` (demo
    scenes), and the demo text as JSON Lines (plain, gzip, zstd) and Parquet (5 row groups)."""
    from vlbert.demo.make_data import write_caption_shard

    root = tmp_path_factory.mktemp("corpus")
    (root / "cc").mkdir()
    rng = np.random.default_rng(3)
    for i in range(N_SHARDS):
        write_caption_shard(root / "cc" / f"{i:05d}.tar", f"cc{i}", PER_SHARD, rng, 64)
    (root / "text").mkdir()
    books = (demo_data / "text" / "books-00000.jsonl").read_bytes()
    (root / "text" / "books-00000.jsonl").write_bytes(books)
    (root / "text" / "books-00001.jsonl.gz").write_bytes(gzip.compress(books))
    (root / "text" / "books-00002.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(books))
    wiki = pq.read_table(demo_data / "text" / "wiki-00000.parquet")
    pq.write_table(wiki, root / "text" / "wiki-00000.parquet", row_group_size=4)
    return root


def data_config(root: str, captions: str) -> DataConfig:
    """Captions from ``root/cc`` (``captions``: "brace" or "glob"), books (JSON Lines) and wiki (Parquet) text."""
    pattern = {"brace": f"{root}/cc/{{00000..{N_SHARDS - 1:05d}}}.tar", "glob": f"{root}/cc/*.tar"}[captions]
    caps = CaptionDataConfig(urls=[pattern], short_side=32, max_long_side=64, max_caption_tokens=24,
                             min_boxes=1, max_boxes=4)
    text = TextDataConfig(sources={"books": TextSourceConfig(urls=[f"{root}/text/books-00000.jsonl"], weight=1.0),
                                   "wiki": TextSourceConfig(urls=[f"{root}/text/wiki-*.parquet"], weight=1.0)},
                          segment_length=16)
    return DataConfig(captions=caps, text=text, num_workers=0, seed=5, retry_backoff_s=0.01)


def as_s3(batches, local_root: Path, s3_root: str):
    """The batches with every key's local shard path replaced by its S3 URL."""
    for b in batches:
        for part in (b.captions, b.text):
            if part is not None:
                part.keys = [k.replace(str(local_root), s3_root) for k in part.keys]
    return batches


def caption_keys(batches) -> list[str]:
    return [k for b in batches for k in b.captions.keys]


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("captions, workers", [("brace", 2), ("glob", 0)])
def test_stream_from_s3_equals_the_same_shards_on_disk(readonly, corpus, tokenizer, captions, workers):
    """Brace ranges and globs list the same shards on S3 as on disk; the batches (tensors and
    keys) are identical over more than an epoch, and so is a resume from S3."""
    bucket = readonly
    # a slot's epoch holds 32 / workers samples: its batches of 4 captions go past it
    n, k = (10, 4) if workers == 2 else (10, 7)

    def run(root, resume):
        cfg = data_config(root, captions)
        cfg.num_workers = workers
        stream = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, captions_per_batch=4,
                                       text_per_batch=3)
        first = take(stream, k)
        state = json.loads(json.dumps(stream.state_dict()))
        rest = take(stream, n - k)
        stream.close()
        assert stream.skip_counts() == {}
        if not resume:
            return stream.caption_urls, first + rest, None
        resumed = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, captions_per_batch=4,
                                        text_per_batch=3)
        resumed.load_state_dict(state)
        again = take(resumed, n - k)
        resumed.close()
        assert resumed.skip_counts() == {}
        return stream.caption_urls, first + rest, again

    urls, s3_batches, s3_again = run(bucket.url, resume=True)
    local_urls, local_batches, _ = run(str(corpus), resume=False)
    assert urls == [f"{bucket.url}/cc/{i:05d}.tar" for i in range(N_SHARDS)]
    assert [u.replace(str(corpus), bucket.url) for u in local_urls] == urls
    assert_batches_equal(s3_batches, as_s3(local_batches, corpus, bucket.url))
    assert_batches_equal(s3_again, s3_batches[k:])
    seen = caption_keys(s3_batches)
    assert len(seen) == 40 and len(set(seen)) == N_SHARDS * PER_SHARD  # every sample, then epoch 1 began
    assert {k.split("#")[0] for k in seen} == set(urls)
    text_sources = (f"text.books:{bucket.url}/", f"text.wiki:{bucket.url}/")
    assert all(k.startswith(text_sources) for b in s3_batches for k in b.text.keys)


def test_text_shards_from_s3_read_and_resume_like_local_ones(readonly, corpus):
    """Every record (key, text, cursor) of a text shard read from S3 (JSON Lines plain, gzip, zstd;
    Parquet) equals the local read, and a stream restored at a cursor in the middle (a byte
    offset, a line number, a Parquet row) resumes exactly."""

    def records(url, cursor=None):
        stream = ShardStream([url], 0, 1, 0, SkipCounter(), cursor=cursor, shuffle=False, loop=False)
        return [(r.key, r.payload, r.cursor) for r in stream], stream.counter

    for name in ("books-00000.jsonl", "books-00001.jsonl.gz", "books-00002.jsonl.zst", "wiki-00000.parquet"):
        remote, counter = records(f"{readonly.url}/text/{name}")
        local, _ = records(str(corpus / "text" / name))
        assert remote == local and len(remote) >= 20 and counter.as_dict() == {}, name
        mid = len(remote) // 2 - 1  # resume right after record `mid` (in the 3rd Parquet row group)
        tail, _ = records(f"{readonly.url}/text/{name}", remote[mid][2])
        assert tail == remote[mid + 1:], name


def test_bad_shards_on_s3_are_skipped_and_counted_as_on_disk(bucket, tmp_path, corpus):
    """0-byte, random-byte and truncated tars, a Parquet file with no text column or no rows, a
    shard that is not there: each skipped and counted, the good samples around them delivered."""
    good = (corpus / "cc" / "00000.tar").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a-good.tar").write_bytes(good)
    (bad / "b-empty.tar").write_bytes(b"")
    (bad / "c-random.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, np.uint8).tobytes())
    (bad / "d-truncated.tar").write_bytes(good[: len(good) // 2 + 100])
    pq.write_table(pa.table({"body": ["no text column"]}), bad / "e-notext.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), bad / "f-norows.parquet")
    (bad / "g-good.parquet").write_bytes((corpus / "text" / "wiki-00000.parquet").read_bytes())
    bucket.put(bad, "bad/")
    names = sorted(p.name for p in bad.iterdir()) + ["h-missing.tar"]

    def read(root):
        counter = SkipCounter()
        stream = ShardStream([f"{root}/{n}" for n in names], 0, 1, 0, counter, shuffle=False, loop=False,
                             backoff_s=0.01)
        return [(r.shard, r.key) for r in stream], counter.as_dict()

    remote, remote_skips = read(f"{bucket.url}/bad")
    local, local_skips = read(str(bad))
    assert remote == local and remote_skips == local_skips
    assert remote_skips == {"bad_text_shard": 1, "corrupt_shard": 1, "empty_shard": 2, "missing_shard": 1,
                            "truncated_shard": 1}
    per_shard = {names[s]: sum(1 for x, _ in remote if x == s) for s in range(len(names))}
    assert per_shard["a-good.tar"] == PER_SHARD and 0 < per_shard["d-truncated.tar"] < PER_SHARD
    assert per_shard["g-good.parquet"] == pq.read_metadata(bad / "g-good.parquet").num_rows


def test_shard_deleted_mid_run_is_skipped_counted_and_the_stream_goes_on(bucket, corpus, tokenizer):
    """A shard deleted from S3 after the stream listed it (s3fs still holds the listing) is
    skipped as ``missing_shard`` and the stream continues, batch for batch as on disk."""
    bucket.put(corpus)
    local = Path(shutil.copytree(corpus, corpus.parent / f"copy-{uuid.uuid4().hex[:8]}"))
    streams = {}
    for root in (bucket.url, str(local)):
        cfg = data_config(root, "glob")  # listed through s3fs: the listing is cached
        streams[root] = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, captions_per_batch=2,
                                              text_per_batch=1)
    before = {root: take(s, 1) for root, s in streams.items()}
    order = slot_plan(N_SHARDS, 1, 0, 5, 0).shards
    assert streams[bucket.url].state_dict()["partition_states"][0]["captions"]["pos"] == 0  # still on order[0]
    victim = f"cc/{order[-1]:05d}.tar"  # read last in epoch 0: not opened yet
    fs = fsspec.filesystem("s3")
    assert fs.exists(f"{bucket.name}/{victim}")
    fresh_s3(bucket.endpoint).rm(f"{bucket.name}/{victim}")
    (local / victim).unlink()
    assert fs.exists(f"{bucket.name}/{victim}")  # the stream's s3fs instance still lists it
    after = {root: take(s, 20) for root, s in streams.items()}  # the rest of epoch 0 and most of epoch 1
    s3_batches = before[bucket.url] + after[bucket.url]
    assert_batches_equal(s3_batches, as_s3(before[str(local)] + after[str(local)], local, bucket.url))
    skips = streams[bucket.url].skip_counts()
    assert skips == streams[str(local)].skip_counts() and skips["missing_shard"] >= 1
    gone = f"{bucket.url}/{victim}#"
    assert not any(k.startswith(gone) for k in caption_keys(after[bucket.url]))
    assert len(caption_keys(after[bucket.url])) == 40  # nothing short: the other shards filled every batch


def test_every_shard_deleted_mid_run_raises_a_clear_error(bucket, corpus, tokenizer):
    """All caption shards deleted after listing: the stream finishes what it had read, then names
    the source and the missing shards instead of looping over empty epochs."""
    bucket.put(corpus)
    stream = build_pretrain_stream(data_config(bucket.url, "brace"), MaskingConfig(), tokenizer, 0, 1,
                                   captions_per_batch=2, text_per_batch=0)
    take(stream, 1)
    fresh_s3(bucket.endpoint).rm(f"{bucket.name}/cc", recursive=True)
    assert bucket.ls("cc") == []
    delivered = 0
    with pytest.raises(SourceUnusable) as err:
        for _ in range(50):
            next(stream)
            delivered += 1
    assert delivered < PER_SHARD  # at most the rest of the shard it was reading (already fetched)
    msg = str(err.value)
    assert "'captions'" in msg and "no shard could be read" in msg and "missing_shard" in msg


# --------------------------------------------------------------------------- transient faults


def stream_through(root: str, endpoint: str, tokenizer, proxy=None, fail=0, kind="503", **options):
    """6 batches from ``root`` on S3 via ``endpoint``; ``fail`` object reads fail (``kind``) once the
    stream is built (its listing is not what is tested)."""
    with s3_config(endpoint, **options):
        stream = build_pretrain_stream(data_config(root, "brace"), MaskingConfig(), tokenizer, 0, 1,
                                       captions_per_batch=2, text_per_batch=2)
        if proxy is not None:
            proxy.fail(fail, kind)
        batches = take(stream, 6)
    return batches, stream.skip_counts()


@pytest.mark.parametrize("kind", ["503", "drop"])
@pytest.mark.parametrize("retries", ["client", "ours"])
def test_transient_faults_give_the_same_batches(readonly, tokenizer, kind, retries):
    """The first 2 object reads fail (503 ServiceUnavailable, or the connection is closed with no
    response). With the client's default retries botocore/s3fs absorb them (no ``read_retry``);
    with theirs off the stream's own retry (reopen, seek to the cursor) does, and counts them,
    except that aiohttp itself resends a GET/HEAD once after a dropped connection (RFC 9112
    9.3.1; s3fs offers no way to turn that off), so of 2 drops 1 reaches the stream.
    Either way the batches are those of a clean run."""
    bucket = readonly
    clean, clean_skips = stream_through(bucket.url, bucket.endpoint, tokenizer)
    with FaultProxy(bucket.endpoint) as proxy, contextlib.ExitStack() as stack:
        options = stack.enter_context(no_client_retries()) if retries == "ours" else {}
        faulty, skips = stream_through(bucket.url, proxy.endpoint, tokenizer, proxy, fail=2, kind=kind, **options)
        faults, requests = proxy.faults, proxy.requests
    assert [k for k, _ in faults] == [kind, kind]  # both injected, on reads of a shard
    assert all(object_reads(r) for _, r in faults)
    assert_batches_equal(faulty, clean)
    assert clean_skips == {}
    if retries == "client":
        assert skips == {}  # absorbed below us: the request after a fault is the client's retry of it
        i = requests.index(faults[0][1])
        assert requests[i + 1] is faults[1][1] and requests[i + 2] == faults[0][1]
    else:
        assert skips == {"read_retry": {"503": 2, "drop": 1}[kind]}
    if kind == "drop":
        i = requests.index(faults[0][1])
        assert requests[i + 1] is faults[1][1]  # aiohttp's resend of the dropped request


def test_a_shard_that_keeps_failing_is_skipped_and_the_stream_goes_on(readonly, tokenizer):
    """More consecutive failures than ``read_retries`` (3) on one shard: ``failed_shard``, then the next shard."""
    bucket = readonly
    with FaultProxy(bucket.endpoint) as proxy, no_client_retries() as options:
        batches, skips = stream_through(bucket.url, proxy.endpoint, tokenizer, proxy, fail=4, kind="503",
                                        **options)
    assert len(proxy.faults) == 4
    assert skips == {"failed_shard": 1, "read_retry": 3}
    assert all(len(b.captions) == 2 for b in batches)
    first_shard = f"{bucket.url}/cc/{slot_plan(N_SHARDS, 1, 0, 5, 0).shards[0]:05d}.tar#"
    assert not any(k.startswith(first_shard) for k in caption_keys(batches))


def test_gcsfs_http_errors_are_transient_by_status():
    """gcsfs raises ``HttpError`` (not an OSError) with the HTTP status in ``code``."""

    class HttpError(Exception):
        def __init__(self, code):
            super().__init__(f"status {code}")
            self.code = code

    assert is_transient(HttpError(503)) and is_transient(HttpError(429))
    assert not is_transient(HttpError(404)) and not is_transient(HttpError(403))

    class OtherError(Exception):
        code = 503

    assert not is_transient(OtherError())  # only the HttpError class name carries the status meaning
    assert not is_transient(ValueError("bad"))


def test_botocore_connection_errors_are_transient():
    """What s3fs raises once botocore's retries are spent on a dead connection is not an OSError."""
    from botocore.exceptions import (ClientError, ConnectionClosedError, EndpointConnectionError,
                                     ParamValidationError)

    assert not isinstance(ConnectionClosedError(endpoint_url="http://x"), OSError)
    assert is_transient(ConnectionClosedError(endpoint_url="http://x"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert not is_transient(ParamValidationError(report="bad key"))
    assert not is_transient(ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"))


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_on_s3_save_prune_and_resume(bucket):
    from test_checkpoint import FakeEngine

    from vlbert.train.checkpoint import COMPLETE, Checkpointer

    root = f"{bucket.url}/run/ckpt"
    ck = Checkpointer(root, keep_last=2, rank=0, world_size=1)
    for step in (10, 20, 30):
        assert ck.save(FakeEngine(step), step, {"samples_seen": step * 4}, {"cursor": step}) == \
            f"{root}/step-0000{step}"
    assert bucket.ls("run/ckpt") == ["latest", "step-000020", "step-000030"]  # on the server, not a cache
    manifest = json.loads(fresh_s3(bucket.endpoint).cat_file(f"{bucket.name}/run/ckpt/step-000030/{COMPLETE}"))
    assert set(manifest["files"]) == {"ds/weights.json", "ds/optim.json", "rank-00000.json", "meta.json"}

    clear_s3_caches()  # a new process resuming
    engine = FakeEngine()
    loaded = Checkpointer(root, keep_last=2, rank=0, world_size=1).load_latest(engine)
    assert loaded.info.step == 30 and engine.value == 30
    assert loaded.meta["samples_seen"] == 120 and loaded.rank_state == {"cursor": 30}


def test_deepspeed_engine_round_trip_through_s3(bucket):
    from test_engine import fixed_batch, make_engine

    import torch
    from vlbert.train.checkpoint import Checkpointer
    from vlbert.train.engine import init_distributed

    init_distributed()
    a = make_engine(stage=2)
    for _ in range(2):
        a.step(fixed_batch())
    Checkpointer(f"{bucket.url}/ds", keep_last=1).save(a, 2, {}, {"tokens_local": 7})
    clear_s3_caches()
    b = make_engine(stage=2, seed=5)
    loaded = Checkpointer(f"{bucket.url}/ds", keep_last=1).load_latest(b)
    assert loaded.rank_state == {"tokens_local": 7} and b.global_step == 2
    sa, sb = a.full_state_dict(), b.full_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.step(fixed_batch()).loss.item() == b.step(fixed_batch()).loss.item()


SAVE_SCRIPT = """
import os, sys
from vlbert.train.checkpoint import Checkpointer

class Engine:
    # two 1 MiB files, the second uploaded after the first
    def save_state(self, directory):
        os.makedirs(os.path.join(directory, "ds"), exist_ok=True)
        for name in ("weights.bin", "optim.bin"):
            with open(os.path.join(directory, "ds", name), "wb") as f:
                f.write(os.urandom(1 << 20))

Checkpointer(sys.argv[1], keep_last=3, rank=0, world_size=1).save(Engine(), int(sys.argv[2]), {}, {})
print("saved")
"""


def run_until_stalled(args: list[str], proxy: FaultProxy, stall_at, cwd: Path, log: Path) -> None:
    """Run ``args`` (output to ``log``) with S3 through ``proxy``; SIGKILL it as soon as a request
    matching ``stall_at`` hangs there."""
    proxy.stall(stall_at)
    env = {**os.environ, **s3_env(proxy.endpoint), "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while not proxy.stalled.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"{args[1:3]} never reached the stall point in {WAIT_S} s (rc {proc.poll()}):\n{tail}")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def nth_match(pattern: str, n: int):
    """A matcher for the ``n``-th and later uploads whose path matches ``pattern``."""
    match, seen = path_matches(pattern), []

    def nth(req) -> bool:
        if match(req):
            seen.append(req)
        return len(seen) >= n

    return nth


@SUBPROCESS_TIMEOUT
@pytest.mark.parametrize("killed_at, nth, newest_complete", [
    ("step-000002/ds/", 2, 1),  # mid-upload: one DeepSpeed file there, the other not
    ("step-000002/COMPLETE", 1, 1),  # every file uploaded, the marker not
    ("ckpt/latest", 1, 2),  # the marker uploaded, the pointer not: step 2 is complete
])
def test_checkpoint_upload_killed_midway_is_never_chosen(bucket, tmp_path, killed_at, nth, newest_complete):
    """A process saving to S3 is SIGKILLed while one of its uploads hangs: resume never picks a
    checkpoint without its marker, and the next save cleans up and publishes normally."""
    from test_checkpoint import FakeEngine

    from vlbert.train.checkpoint import Checkpointer

    root = f"{bucket.url}/ckpt"
    Checkpointer(root, keep_last=3, rank=0, world_size=1).save(FakeEngine(1), 1, {}, {})
    script = tmp_path / "save.py"
    script.write_text(SAVE_SCRIPT)
    with FaultProxy(bucket.endpoint) as proxy:
        run_until_stalled([sys.executable, str(script), root, "2"], proxy, nth_match(killed_at, nth), tmp_path,
                          tmp_path / "save.log")
    uploaded = bucket.ls("ckpt/step-000002/ds")
    assert len(uploaded) == (1 if nth == 2 else 2)  # how far the killed process got
    assert ("COMPLETE" in bucket.ls("ckpt/step-000002")) == (newest_complete == 2)

    clear_s3_caches()  # a new process resuming
    ck = Checkpointer(root, keep_last=3, rank=0, world_size=1)
    assert [c.step for c in ck.complete()] == [1, 2][:newest_complete]
    engine = FakeEngine()
    if newest_complete == 1:
        assert ck.load_latest(engine).info.step == 1 and engine.value == 1
    else:
        assert ck.find_latest().step == 2
    # The next save publishes normally and prunes what the killed one left behind.
    ck.save(FakeEngine(3), 3, {}, {})
    assert ck.find_latest().step == 3
    left = bucket.ls("ckpt")
    assert left == (["latest", "step-000001", "step-000003"] if newest_complete == 1 else
                    ["latest", "step-000001", "step-000002", "step-000003"])


# --------------------------------------------------------------------------- region extraction


@SUBPROCESS_TIMEOUT
def test_extract_regions_to_s3_resumes_after_a_kill(bucket, tmp_path):
    """Killed while publishing its second output shard (the copy of ``.partial`` to the final
    name hangs): the rerun skips the finished shard, redoes the other, and leaves no ``.partial``."""
    from vlbert.cli.extract_regions import main, read_samples

    (tmp_path / "cfg.yaml").write_text(EXTRACT_CONFIG)  # the config of tests/test_extract_regions.py
    inputs = tmp_path / "in"
    inputs.mkdir()
    from vlbert.demo.make_data import write_caption_shard

    rng = np.random.default_rng(7)
    for i in range(2):  # 2 samples a shard: the detector runs on CPU
        write_caption_shard(inputs / f"s{i}.tar", f"x{i}", 2, rng, 64)
    bucket.put(inputs, "in/")
    args = ["--config", str(tmp_path / "cfg.yaml"), "--input", f"{bucket.url}/in/s{{0..1}}.tar",
            "--out", f"{bucket.url}/out", "--device", "cpu", "--num-proposals", "20", "--batch-size", "4"]
    with FaultProxy(bucket.endpoint) as proxy:
        run_until_stalled([sys.executable, "-m", "vlbert.cli.extract_regions", *args], proxy,
                          path_matches(r"/out/s1\.tar$"), REPO, tmp_path / "extract.log")
    # killed between writing and publishing s1, holding the lease on its partial file
    assert bucket.ls("out") == ["s0.tar", "s1.tar.partial", "s1.tar.partial.lease"]
    fs = fresh_s3(bucket.endpoint)
    first = fs.cat_file(f"{bucket.name}/out/s0.tar")

    clear_s3_caches()
    stats = main(args)
    assert stats["shards_skipped"] == 1 and stats["shards_done"] == 1 and stats["samples_written"] == 2
    assert bucket.ls("out") == ["s0.tar", "s1.tar"]
    assert fs.cat_file(f"{bucket.name}/out/s0.tar") == first  # not redone
    for i in range(2):
        samples = dict(read_samples(f"{bucket.url}/out/s{i}.tar", SkipCounter()))
        assert list(samples) == [f"x{i}_{j:05d}" for j in range(2)]
        for files in samples.values():
            meta = json.loads(files["json"])
            regions = np.load(io.BytesIO(files["regions.npy"]), allow_pickle=False)
            assert 2 <= len(meta["boxes"]) <= 5 and regions.shape == (len(meta["boxes"]), 5)
