"""Shard listing, skip counts, seeds, the split over slots and cursors, detail by detail
(vlbert/data/shards.py): expected values worked out by hand or written out from the contract."""

import dataclasses

import numpy as np
import pytest

from vlbert.data.shards import (
    Cursor,
    Record,
    SkipCounter,
    SlotPlan,
    epoch_order,
    expand_urls,
    record_rng,
    slot_plan,
)

pytestmark = pytest.mark.timeout(60)


def test_skip_counter_counts_merges_and_prints():
    """Fails if ``add`` does not add one by default, a missing reason is not 0, ``merge`` of a
    plain dict or the repr (sorted reasons) differ, or the counter shares the dict it was given."""
    given = {"b": 2}
    c = SkipCounter(given)
    c.add("a")
    c.add("b", 3)
    assert given == {"b": 2}
    assert c["a"] == 1 and c["b"] == 5 and c["zzz"] == 0
    assert c.merge({"a": 2, "c": 1}) is c
    assert c.as_dict() == {"a": 3, "b": 5, "c": 1} and list(c.as_dict()) == ["a", "b", "c"]
    assert c.total() == 9
    assert repr(c) == "SkipCounter({'a': 3, 'b': 5, 'c': 1})"
    assert SkipCounter().as_dict() == {} and SkipCounter(None).total() == 0


def test_expand_urls_glob_characters_directories_and_messages(tmp_path):
    """Fails if "?" or "[...]" is not a glob, another character (an "X": ``"XX*?[XX"``) is, a
    directory is listed as a shard, an http(s) URL with a glob character is listed rather than
    kept, a literal list checks more than its first URL, or a message is not word for word."""
    for s in range(3):
        (tmp_path / f"{s:05d}.tar").write_bytes(b"")
    (tmp_path / "dir.tar").mkdir()
    t = str(tmp_path)
    assert expand_urls(f"{t}/0000?.tar") == [f"{t}/00000.tar", f"{t}/00001.tar", f"{t}/00002.tar"]
    assert expand_urls(f"{t}/0000[02].tar") == [f"{t}/00000.tar", f"{t}/00002.tar"]
    assert expand_urls(f"{t}/*.tar") == [f"{t}/00000.tar", f"{t}/00001.tar", f"{t}/00002.tar"]
    assert expand_urls(f"{t}/{{00000,77777}}.tar") == [f"{t}/00000.tar", f"{t}/77777.tar"]
    assert expand_urls(f"{t}/{{00000,XL}}.tar") == [f"{t}/00000.tar", f"{t}/XL.tar"]  # "X" is no glob character
    assert expand_urls(["https://example.com/a*.tar", "http://example.com/b?.tar"]) == [
        "https://example.com/a*.tar", "http://example.com/b?.tar"]
    with pytest.raises(FileNotFoundError) as err:
        expand_urls(f"{t}/{{none,x}}-*.tar")
    assert str(err.value) == f"shard pattern {t + '/{none,x}-*.tar'!r} matched no files ({t + '/none-*.tar'!r})"
    with pytest.raises(FileNotFoundError) as err:
        expand_urls([f"{t}/00000.tar", f"{t}/{{77777,00001}}.tar"])
    assert str(err.value) == f"shard pattern {t + '/{77777,00001}.tar'!r}: {t + '/77777.tar'!r} does not exist"
    with pytest.raises(ValueError) as err:
        expand_urls([])
    assert str(err.value) == "no shard URLs given (empty list)"


def test_seeds_count_modulo_2_to_the_32():
    """Fails if the seed's mask is not 2**32 - 1 (``|`` for ``&``: every seed the same; 2**32:
    seeds 1 and 2**32 + 1 differ) in the epoch order and in a record's generator, or if a
    record's generator is not seeded with (seed, tag, epoch, shard, index, extra...)."""
    assert epoch_order(10, 1, 0) != epoch_order(10, 0, 0)
    assert epoch_order(10, 2**32 + 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, -1, 0) == epoch_order(10, 2**32 - 1, 0)
    assert epoch_order(10, 5, 2) == np.random.default_rng([5, 2]).permutation(10).tolist()
    rec = Record("k", b"", shard=3, epoch=2, index=7, cursor=Cursor())
    expected = np.random.default_rng([1, 4, 2, 3, 7, 9]).random(4)
    assert record_rng(1, 4, rec, 9).random(4).tolist() == expected.tolist()
    assert record_rng(2**32 + 1, 4, rec, 9).random(4).tolist() == expected.tolist()
    assert record_rng(0, 4, rec, 9).random(4).tolist() != expected.tolist()


def test_slot_plans_worked_out_by_hand():
    """Fails if a plan differs from the hand-worked split: 3 shards over 8 slots (shard j shared by
    slots j, j+3, j+6: strides 3, 3, 2, phase slot // 3), 4 shards over 4 slots, 5 over 2 in the
    epoch's order (shuffled by default), or if the range checks or their messages change."""
    expected = [([0], 3, 0), ([1], 3, 0), ([2], 2, 0), ([0], 3, 1), ([1], 3, 1), ([2], 2, 1), ([0], 3, 2),
                ([1], 3, 2)]
    assert [slot_plan(3, 8, s, 0, 0, shuffle=False) for s in range(8)] == [SlotPlan(*e) for e in expected]
    order = epoch_order(3, 9, 1)
    assert [slot_plan(3, 8, s, 9, 1) for s in range(8)] == [SlotPlan([order[e[0][0]]], e[1], e[2]) for e in expected]
    order = epoch_order(4, 9, 1)
    assert [slot_plan(4, 4, s, 9, 1) for s in range(4)] == [SlotPlan([order[s]], 1, 0) for s in range(4)]
    order = epoch_order(5, 4, 2)
    assert slot_plan(5, 2, 1, seed=4, epoch=2) == SlotPlan([order[1], order[3]], 1, 0)
    assert slot_plan(5, 2, 0, seed=4, epoch=2, shuffle=False) == SlotPlan([0, 2, 4], 1, 0)
    for slot in (-1, 4):
        with pytest.raises(ValueError) as err:
            slot_plan(4, 4, slot, 0, 0)
        assert str(err.value) == f"slot {slot} out of range for 4 slots"
    with pytest.raises(ValueError) as err:
        slot_plan(0, 4, 0, 0, 0)
    assert str(err.value) == "no shards to split"


def test_cursor_defaults_and_dict_round_trip():
    """Fails if a default cursor is not at (0, 0, 0, 0), ``to_dict`` names differ,
    ``from_dict`` does not take the four keys as ints (ignoring others), or a cursor or a slot
    plan can be changed in place (``frozen=False``)."""
    assert Cursor().to_dict() == {"epoch": 0, "pos": 0, "offset": 0, "index": 0}
    assert Cursor(1, 2, 3, 4).to_dict() == {"epoch": 1, "pos": 2, "offset": 3, "index": 4}
    back = Cursor.from_dict({"epoch": "1", "pos": 2.0, "offset": 3, "index": 4, "note": "x"})
    assert back == Cursor(1, 2, 3, 4) and type(back.pos) is int
    with pytest.raises(KeyError):
        Cursor.from_dict({"epoch": 1, "pos": 2, "offset": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):  # a record's cursor is the stream's: nobody may move it
        Cursor().offset = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        slot_plan(4, 4, 0, 0, 0).phase = 1
