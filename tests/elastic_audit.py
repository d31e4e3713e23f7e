"""Exactly-once audits of elastic resumes: each canonical partition's reference sample order,
and a check that what a run consumed from each partition is a gap-free prefix of it.

The order within a partition can only come from ``ShardStream`` (it is the stream's own
shuffle); *which* samples exist does not: ``tar_keys`` lists every shard's samples by reading
the tar files with the standard library, and every audit checks that the partitions' epochs are
disjoint and together hold each of those samples exactly once, so overlapping partitions (or a
partition that drops a sample) fail whatever the run consumed.
"""

from __future__ import annotations

import itertools
import posixpath
import tarfile
from collections import Counter, defaultdict

import fsspec

from vlbert.config import DataConfig, MaskingConfig
from vlbert.data.shards import ShardStream, SkipCounter, expand_urls
from vlbert.data.text import TextSegmenter, WordPieces


def caption_reference(cfg: DataConfig, partition: int, num_partitions: int, epochs: int) -> list[list[str]]:
    """Per epoch, the caption keys partition ``partition`` reads, in order (clean data: every record is a sample)."""
    urls = expand_urls(cfg.captions.urls)
    out: list[list[str]] = [[] for _ in range(epochs)]
    stream = ShardStream(urls, partition, num_partitions, cfg.seed, SkipCounter())
    for rec in stream:
        if rec.epoch >= epochs:
            break
        stream.mark_delivered()
        out[rec.epoch].append(f"{urls[rec.shard]}#{rec.key}")
    return out


def tar_keys(url: str) -> list[str]:
    """The samples of one tar shard, in file order, read with ``tarfile``: a sample is a run of
    consecutive regular members whose names agree up to the basename's first dot (WebDataset)."""
    keys: list[str] = []
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            key = posixpath.join(folder, base.split(".", 1)[0]) if folder else base.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def every_caption(cfg: DataConfig) -> list[str]:
    """``url#key`` of every caption sample of the data, from the tar files themselves."""
    return [f"{url}#{key}" for url in expand_urls(cfg.captions.urls) for key in tar_keys(url)]


def assert_partitions_cover_every_caption_once(cfg: DataConfig, num_partitions: int, epochs: int = 2) -> None:
    """In each of the first ``epochs`` epochs, the partitions' caption orders are disjoint and
    together hold every caption of the tar files exactly once."""
    everything = every_caption(cfg)
    assert len(set(everything)) == len(everything), "a key repeated within the tar files themselves"
    refs = [caption_reference(cfg, p, num_partitions, epochs) for p in range(num_partitions)]
    for epoch in range(epochs):
        seen = Counter(k for ref in refs for k in ref[epoch])
        twice = sorted(k for k, n in seen.items() if n > 1)
        assert not twice, f"epoch {epoch}: {len(twice)} captions in more than one partition (or twice), e.g. {twice[:3]}"
        assert set(seen) == set(everything), (
            f"epoch {epoch}: {len(set(everything) - set(seen))} captions in no partition, "
            f"{len(set(seen) - set(everything))} not in the tar files")


def text_reference(cfg: DataConfig, tokenizer, partition: int, num_partitions: int, n: int) -> dict[str, list[str]]:
    """Per text source, the keys of the first ``n`` segments partition ``partition`` packs."""
    pieces = WordPieces(tokenizer)
    out = {}
    for name, source in cfg.text.sources.items():
        stream = ShardStream(expand_urls(source.urls), partition, num_partitions, cfg.seed, SkipCounter(),
                             source=f"text.{name}")
        segmenter = TextSegmenter(stream, pieces, cfg.text.segment_length, MaskingConfig(), cfg.seed)
        out[name] = [s.key for s in itertools.islice(segmenter, n)]
    return out


def consumed_by_partition(batches) -> tuple[dict[int, list[str]], dict[int, dict[str, list[str]]]]:
    """``batches``: ``(partition, caption keys, text keys)`` in the order each rank consumed them
    (ranks of one phase in any order: a partition belongs to one rank at a time)."""
    captions: dict[int, list[str]] = defaultdict(list)
    text: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for partition, caption_keys, text_keys in batches:
        assert partition is not None, "a batch without its partition"
        captions[partition].extend(caption_keys)
        for key in text_keys:
            source = key.split(":", 1)[0].removeprefix("text.")
            text[partition][source].append(key)
    return captions, text


def assert_exactly_once(cfg: DataConfig, tokenizer, num_partitions: int, batches, full_epoch: bool) -> dict:
    """Every partition's captions and every (partition, source)'s text segments, as consumed, are
    the start of its reference order (nothing skipped, nothing repeated). ``full_epoch``: every
    partition has also finished its first epoch, so the first-epoch captions the run consumed,
    over all partitions, are every caption of the tar files, each once. Whatever ``full_epoch``,
    the partitions' reference epochs must split the tar files' captions exactly
    (``assert_partitions_cover_every_caption_once``). Returns captions consumed per partition."""
    captions, text = consumed_by_partition(batches)
    assert set(captions) <= set(range(num_partitions)), sorted(captions)
    assert_partitions_cover_every_caption_once(cfg, num_partitions)
    counts, first = {}, []
    for p in range(num_partitions):
        got = captions.get(p, [])
        epoch_length = len(caption_reference(cfg, p, num_partitions, 1)[0])
        ref = caption_reference(cfg, p, num_partitions, epochs=len(got) // epoch_length + 1)
        flat = [k for epoch in ref for k in epoch]
        assert got == flat[: len(got)], f"partition {p}: consumed captions are not its reference order"
        counts[p] = len(got)
        for source, keys in text.get(p, {}).items():
            want = text_reference(cfg, tokenizer, p, num_partitions, len(keys))[source]
            assert keys == want, f"partition {p}, text source {source}: not its reference order"
        if full_epoch:
            assert len(got) >= len(ref[0]), f"partition {p} is still in its first epoch ({len(got)} < {len(ref[0])})"
            first.extend(got[:epoch_length])
    if full_epoch:
        assert sorted(first) == sorted(every_caption(cfg)) and len(set(first)) == len(first)
    return counts
