"""When a source gives a slot nothing (vlbert/data/shards.py): when the probe runs, what it
reads, and the ``SourceUnusable`` message word for word, for every cause."""

import itertools
import json
import logging

import fsspec
import pytest

from test_shards import make_shards
from vlbert.data.formats import write_tar
from vlbert.data.shards import Cursor, ShardStream, SkipCounter, SourceUnusable

pytestmark = pytest.mark.timeout(60)


def _jsonl_shard(url: str, texts: list[str]) -> str:
    fsspec.filesystem("memory").pipe(url, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    return url


def test_probes_after_1_2_4_8_fruitless_epochs_in_a_row(caplog):
    """Fails if the probe runs at other times than after 1, 2, 4, 8, ... fruitless epochs in a row
    (counting restarts after an epoch that delivered), if a fruitless epoch is not counted as
    ``empty_epoch``, or if its warning differs."""
    url = _jsonl_shard("memory://probe-schedule/a.jsonl", ["one", "two"])
    probed = []

    def usable(rec, counter):
        probed.append(stream.cursor.epoch)
        return True

    def run(deliver_in):
        probed.clear()
        for rec in stream:
            if rec.epoch == 10:
                return
            if rec.epoch in deliver_in:
                stream.mark_delivered()

    stream = ShardStream([url], 0, 1, 0, SkipCounter(), source="text.x", usable=usable)
    with caplog.at_level(logging.WARNING, logger="vlbert.data.shards"):
        run(deliver_in=())
    assert probed == [0, 1, 3, 7]
    assert stream.counter["empty_epoch"] == 10
    assert [r.getMessage() for r in caplog.records][:2] == [
        "text.x, slot 0/1: epoch 0 gave no usable sample from its 1 shard(s); next epoch",
        "text.x, slot 0/1: epoch 1 gave no usable sample from its 1 shard(s); next epoch"]
    stream = ShardStream([url], 0, 1, 0, SkipCounter(), usable=usable)
    run(deliver_in=(2, 3))
    assert probed == [0, 1, 4, 5, 7]  # fruitless runs: 0-1, then 4-9 (1, 2, _, 4, _, _)
    assert stream.counter["empty_epoch"] == 8 and stream.delivered == 4


def test_the_probe_reads_every_shard_for_a_usable_sample():
    """Fails if the probe reads only this slot's shards or stops before a later shard's usable
    sample: slot 0 of 2 owns one shard, and only the other shard holds usable samples."""
    a = _jsonl_shard("memory://probe-all/a.jsonl", ["bad a1", "bad a2"])
    b = _jsonl_shard("memory://probe-all/b.jsonl", ["bad b1", "good b2"])
    stream = ShardStream([a, b], 0, 2, 0, SkipCounter(), usable=lambda rec, counter: rec.payload.startswith("good"))
    got = [r.payload for r in itertools.islice(stream, 6)]  # three epochs, each fruitless: no raise
    assert len(got) == 6 and stream.counter["empty_epoch"] == 2


def _unusable(stream) -> str:
    with pytest.raises(SourceUnusable) as err:
        for _ in stream:
            pass
    return str(err.value)


def test_unusable_messages_in_full(tmp_path):
    """Fails if any of the messages of ``SourceUnusable`` is not word for word: no shard readable
    (exactly as many shard errors as shards), the slot's empty share, shards holding no
    samples (stride 1, fewer shard errors than shards), the most frequent rejection (by count,
    not by name), a reason without a known cause, a rejection that counted nothing; or if the
    cursor is not left where the stream stopped (the probe reads without moving it)."""
    empty, noise = str(tmp_path / "empty.tar"), str(tmp_path / "noise.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "noise.tar").write_bytes(b"\x01" * 1024)
    stream = ShardStream([empty, noise], 0, 1, 0, SkipCounter(), source="captions")
    assert _unusable(stream) == (
        f"source 'captions' (2 shard(s), first {empty}): 0 of 0 samples read were usable after a full pass "
        "over every shard (skips: corrupt_shard 1, empty_shard 1); likely cause: no shard could be read "
        "(corrupt_shard 1, empty_shard 1)")
    assert stream.cursor == Cursor(0, 2, 0, 0)

    two = make_shards(str(tmp_path / "two"), 1, 2)
    assert _unusable(ShardStream(two, 3, 4, 0, SkipCounter())) == (
        f"source 'source' (1 shard(s), first {two[0]}): 0 of 0 samples read (this slot's share: every 4-th "
        "sample, phase 3) were usable after a full pass over every shard (skips: none); likely cause: too few "
        "samples for the slots: 1 shard(s) are shared by 4 slots (the run's data partitions: data.partitions, "
        "by default the first attempt's ranks x data.num_workers) and slot 3's share of them is empty; start "
        "the run with fewer partitions (workers or ranks), or use more data")

    one = make_shards(str(tmp_path / "one"), 1, 1)  # stride 2: slot 1's share of one sample is empty
    assert _unusable(ShardStream(one, 1, 2, 0, SkipCounter())).endswith(
        "likely cause: too few samples for the slots: 1 shard(s) are shared by 2 slots (the run's data partitions: "
        "data.partitions, by default the first attempt's ranks x data.num_workers) and slot 1's share of them is "
        "empty; start the run with fewer partitions (workers or ranks), or use more data")

    blank = _jsonl_shard("memory://unusable/blank.jsonl", ["", " "])
    assert _unusable(ShardStream([blank, empty], 0, 1, 0, SkipCounter(), source="text.w")) == (
        "source 'text.w' (2 shard(s), first memory://unusable/blank.jsonl): 0 of 0 samples read were usable "
        "after a full pass over every shard (skips: empty_shard 1, empty_text 2); likely cause: the shards "
        "hold no samples")

    docs = _jsonl_shard("memory://unusable/docs.jsonl", ["a", "b", "c"])

    def rejects(reasons):
        def usable(rec, counter):
            if reasons[rec.index]:
                counter.add(reasons[rec.index])
            return False
        return usable

    head = "source 'text.w' (1 shard(s), first memory://unusable/docs.jsonl): 0 of 3 samples read were usable " \
           "after a full pass over every shard"
    stream = ShardStream([docs], 0, 1, 0, SkipCounter(), source="text.w",
                         usable=rejects(["missing_image", "bad_json", "bad_json"]))
    assert _unusable(stream) == head + (" (skips: bad_json 2, missing_image 1); likely cause: the JSON members "
                                        "(or JSON Lines rows) do not parse")
    assert stream.cursor == Cursor(0, 1, 0, 0)  # past the epoch's one shard, not inside the probe's read
    stream = ShardStream([docs], 0, 1, 0, SkipCounter(), source="text.w", usable=rejects(["odd", "odd", "odd"]))
    assert _unusable(stream) == head + " (skips: odd 3); likely cause: every sample was rejected, most often as 'odd'"
    stream = ShardStream([docs], 0, 1, 0, SkipCounter(), source="text.w", usable=rejects([None, None, None]))
    assert _unusable(stream) == head + " (skips: none); likely cause: every sample was rejected, most often as ''"


LIKELY_CAUSES = {
    "missing_caption": "the samples have no caption member (KEY.txt)",
    "missing_image": "the samples have no image member (KEY.jpg, .jpeg, .png or .webp)",
    "corrupt_image": "the images cannot be decoded",
    "empty_caption": "every caption is empty",
    "bad_json": "the JSON members (or JSON Lines rows) do not parse",
    "bad_boxes": "the boxes in KEY.json are malformed",
    "bad_regions": "KEY.regions.npy does not match the boxes",
    "empty_text": "every document's text is empty",
    "bad_text": "the text is not valid UTF-8 strings",
    "no_tokens": "every document tokenises to nothing (only characters the tokenizer drops)",
    "bad_text_shard": "the text shards have no 'text' column/field",
}


@pytest.mark.parametrize("reason", sorted(LIKELY_CAUSES))
def test_each_rejection_reason_names_its_likely_cause(reason):
    """Fails if the cause given for a reason is not the one written here (every entry of the
    table, key and text), or if a text payload adds "members seen"."""
    url = _jsonl_shard("memory://causes/a.jsonl", ["x", "y"])

    def usable(rec, counter):
        counter.add(reason)
        return False

    assert _unusable(ShardStream([url], 0, 1, 0, SkipCounter(), source="s", usable=usable)) == (
        "source 's' (1 shard(s), first memory://causes/a.jsonl): 0 of 2 samples read were usable after a full "
        f"pass over every shard (skips: {reason} 2); likely cause: {LIKELY_CAUSES[reason]}")


def test_members_seen_are_listed_up_to_twelve(tmp_path):
    """Fails if the members seen are not listed sorted with their dot, or more than 12 are
    gathered (a limit of 13, or ``<=``): 14 samples each with one member of its own extension."""
    url = str(tmp_path / "m.tar")
    write_tar(url, [(f"k{i:02d}", {f"e{i:02d}": b"x"}) for i in range(14)])

    def usable(rec, counter):
        counter.add("missing_caption")
        return False

    seen = ", ".join(f".e{i:02d}" for i in range(12))
    assert _unusable(ShardStream([url], 0, 1, 0, SkipCounter(), source="captions", usable=usable)) == (
        f"source 'captions' (1 shard(s), first {url}): 0 of 14 samples read were usable after a full pass over "
        "every shard (skips: missing_caption 14); likely cause: the samples have no caption member (KEY.txt); "
        f"members seen: {seen}")
