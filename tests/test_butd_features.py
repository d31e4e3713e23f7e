"""Reading published region-feature records (``vlbert.data.butd_features``) alone, without the
importer: columns, the checks of every number and array, and each ``BadRecord`` word for word.
Fast (numpy only): these are the tests the module's mutation run uses. The importer end to end is
in tests/test_region_features.py.

Column lists as published: peteanderson80/bottom-up-attention, tools/generate_tsv.py
(``FIELDNAMES``) and airsplay/lxmert, src/utils.py (``FIELDNAMES``); VL-BERT's per-image JSON keys
as jackroos/VL-BERT's pretrain/data/datasets/conceptual_captions.py reads them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import struct

import numpy as np
import pytest

from vlbert.data.butd_features import (BUTD_COLUMNS, LXMERT_COLUMNS, BadRecord, RegionRecord, parse_record,
                                       read_tsv, read_vlbert_json)


def b64(values) -> str:
    """base64 of float32 little-endian, packed with ``struct`` (not numpy)."""
    flat = [float(v) for v in np.asarray(values, dtype=float).ravel()]
    return base64.b64encode(struct.pack(f"<{len(flat)}f", *flat)).decode()


def record(n=2, w=100, h=50, d=3, **over) -> dict:
    boxes = [[0, 0, 10, 10], [5, 5, w, h]][:n] + [[1, 1, 2, 2]] * max(0, n - 2)
    fields = {"image_id": "7", "image_w": str(w), "image_h": str(h), "num_boxes": str(n),
              "boxes": b64(boxes), "features": b64(np.arange(n * d) / 4)}
    fields.update(over)
    return fields


def bad(fields, **kw) -> BadRecord:
    with pytest.raises(BadRecord) as e:
        parse_record(fields, **kw)
    return e.value


def test_column_lists_are_the_published_ones():
    """Fails if a column name or the order changes."""
    assert BUTD_COLUMNS == ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
    assert LXMERT_COLUMNS == ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id",
                              "attrs_conf", "num_boxes", "boxes", "features")


def test_bad_record_text_and_reason():
    """``reason: detail``, or the reason alone. Fails if the format or the empty-detail case changes."""
    assert str(BadRecord("bad_number", "x is 0")) == "bad_number: x is 0"
    assert str(BadRecord("truncated_row")) == "truncated_row"
    assert BadRecord("truncated_row").reason == "truncated_row"


def test_a_record_parses_to_its_numbers():
    """Ids, sizes, boxes [n, 4] and features [n, D] float32 with their values; no classes by
    default. Fails if a field is read from the wrong column, the width is not inferred, or
    ``with_classes`` defaults to True (the record has no classes: that would be truncated_row)."""
    r = parse_record(record(n=3, w=100, h=50, d=2))
    assert isinstance(r, RegionRecord)
    assert (r.image_id, r.width, r.height) == (7, 100, 50)
    assert r.boxes.dtype == np.float32 and r.features.dtype == np.float32
    np.testing.assert_array_equal(r.boxes, [[0, 0, 10, 10], [5, 5, 100, 50], [1, 1, 2, 2]])
    np.testing.assert_array_equal(r.features, [[0, 0.25], [0.5, 0.75], [1.0, 1.25]])
    assert r.classes is None
    assert RegionRecord(1, 2, 3, r.boxes, r.features).classes is None


def test_classes_are_read_when_asked():
    """Fails if ``classes`` is not read with ``with_classes=True``, or read with another row count."""
    r = parse_record(record(n=2, classes=b64([[0.1, 0.9, 0.0], [0.5, 0.25, 0.25]])), with_classes=True)
    np.testing.assert_allclose(r.classes, [[0.1, 0.9, 0.0], [0.5, 0.25, 0.25]], rtol=1e-6)
    assert r.classes.dtype == np.float32
    assert bad(record(n=2), with_classes=True).args[0] == "truncated_row: no classes"


def test_lxmert_names_are_read_as_butd_names():
    """``img_id``, ``img_w``, ``img_h`` stand for ``image_id``, ``image_w``, ``image_h``: with
    width 100 and height 50 a box reaching x = 100 fits only if w and h are not swapped. Fails if an
    alias maps to the wrong name or is lost."""
    f = record(n=2, w=100, h=50)
    lx = {"img_id": f["image_id"], "img_w": f["image_w"], "img_h": f["image_h"],
          "num_boxes": f["num_boxes"], "boxes": f["boxes"], "features": f["features"],
          "objects_id": "", "objects_conf": "", "attrs_id": "", "attrs_conf": ""}
    r = parse_record(lx)
    assert (r.image_id, r.width, r.height) == (7, 100, 50)


def test_missing_fields_are_named_together():
    """Fields absent, None (a short TSV row) or empty: ``truncated_row`` naming them in column order.
    Fails if the list or its separator changes, or ``""`` counts as present."""
    f = record()
    del f["image_w"]
    f["boxes"] = None
    f["features"] = ""
    assert str(bad(f)) == "truncated_row: missing image_w, boxes, features"
    assert str(bad({})) == "truncated_row: missing " + ", ".join(BUTD_COLUMNS)


def test_numbers_must_be_positive_integers_except_a_zero_id():
    """Spaces around a number are allowed; image id 0 is valid (COCO has none, VG and others may);
    a zero width, height or box count is not; negatives, floats and words are refused with the
    value cut at 40 characters. Fails if ``v < 0`` becomes ``v <= 0``, the zero check applies to the
    id, or a message changes."""
    assert parse_record(record(image_id=" 0 ", image_w=" 100\n")).image_id == 0
    for key in ("image_w", "image_h", "num_boxes"):
        assert str(bad(record(**{key: "0"}))) == f"bad_number: {key} must be positive, got 0"
    assert str(bad(record(image_id="-1"))) == "bad_number: image_id must be positive, got -1"
    assert str(bad(record(image_h="-3"))) == "bad_number: image_h must be positive, got -3"
    assert str(bad(record(image_w="10.5"))) == "bad_number: image_w is not an integer: '10.5'"
    long = "x" * 60
    assert str(bad(record(image_id=long))) == f"bad_number: image_id is not an integer: {'x' * 40!r}"
    assert bad(record(num_boxes=[2])).reason == "bad_number"


def test_the_box_cap_is_exact():
    """1000 boxes are read, 1001 refused before any array is decoded. Fails if ``MAX_BOXES`` or the
    comparison changes."""
    n = 1000
    boxes = base64.b64encode(struct.pack(f"<{4 * n}f", *([1.0, 1.0, 2.0, 2.0] * n))).decode()
    r = parse_record(record(n=n, d=1, boxes=boxes, features=b64(np.zeros(n))))
    assert r.boxes.shape == (1000, 4) and r.features.shape == (1000, 1)
    e = bad(record(num_boxes="1001", boxes="!", features="!"))
    assert str(e) == "too_many_boxes: num_boxes 1001 > 1000"


def test_arrays_must_be_strict_base64_of_whole_float32_rows():
    """A character outside base64 (even one a lax decoder would drop), a partial float, no floats,
    a size not giving ``num_boxes`` rows, boxes not 4 wide: each its reason and message. Fails if
    ``validate=True`` is dropped, any size check is loosened (``rest or n_floats == 0`` as
    ``rest and n_floats == 0``: 26 bytes over 2 boxes reach ``np.frombuffer``, a ValueError), or a
    message changes."""
    e = bad(record(boxes="AAAA!AAA"))
    assert e.reason == "bad_base64" and str(e).startswith("bad_base64: boxes: ")
    assert bad(record(features="AAAA AAA=")).reason == "bad_base64"
    assert str(bad(record(n=2, d=3, features=b64(np.zeros(6))[:-4] + "AAA="))) == \
        "num_boxes_mismatch: features holds 23 bytes, not float32 a multiple of 2"
    assert str(bad(record(n=2, features=b64(np.zeros(5))))) == \
        "num_boxes_mismatch: features holds 20 bytes, not float32 a multiple of 2"
    assert str(bad(record(n=2, boxes=b64(np.zeros(12))))) == \
        "num_boxes_mismatch: boxes holds 48 bytes, not float32 2 x 4"
    assert str(bad(record(n=2, boxes=b64(np.zeros(4))))) == \
        "num_boxes_mismatch: boxes holds 16 bytes, not float32 2 x 4"
    assert str(bad(record(n=1, boxes=base64.b64encode(b"\0\0\0").decode()))) == \
        "num_boxes_mismatch: boxes holds 3 bytes, not float32 1 x 4"
    # A partial float whose whole floats would still give the rows: 6 floats and 2 bytes over
    # 2 boxes, and a single byte over 1 box (no float at all).
    assert str(bad(record(n=2, features=base64.b64encode(bytes(26)).decode()))) == \
        "num_boxes_mismatch: features holds 26 bytes, not float32 a multiple of 2"
    assert str(bad(record(n=1, features="AA=="))) == \
        "num_boxes_mismatch: features holds 1 bytes, not float32 a multiple of 1"
    assert str(bad(record(n=2), with_classes=True)) == "truncated_row: no classes"
    assert str(bad(record(n=2, classes=5), with_classes=True)) == "truncated_row: no classes"


def test_an_array_read_with_width_none_infers_the_columns():
    """8 floats over 2 boxes are 2 rows of 4 features; 8 floats over 1 box are 1 row of 8; one
    float is one feature. Fails if the reshape keeps another number of rows, or the floor of one
    float (``n_floats == 0``) moves up."""
    assert parse_record(record(n=2, features=b64(np.arange(8)))).features.shape == (2, 4)
    assert parse_record(record(n=1, features=b64(np.arange(8)))).features.shape == (1, 8)
    assert parse_record(record(n=1, features=b64([2.5]))).features.tolist() == [[2.5]]


def test_bytes_fields_are_decoded_too():
    """A JSON or bytes row may hand base64 as bytes. Fails if bytes are refused as no field."""
    f = record(n=2)
    f["boxes"] = f["boxes"].encode()
    assert parse_record(f).boxes.shape == (2, 4)


@pytest.mark.parametrize("box", [
    [-1, -1, 100 + 1, 50 + 1],   # at the tolerance on every side
    [0, 0, 0, 0],                 # a point
    [10, 20, 10, 20],
])
def test_boxes_within_one_pixel_of_the_image_are_inside(box):
    """The +1 pixel convention (x2 = w - 1 + 1) and a degenerate box are kept. Fails if the
    tolerance shrinks or a ``>=`` / ``<=`` of the check becomes strict."""
    r = parse_record(record(n=1, w=100, h=50, boxes=b64([box])))
    np.testing.assert_array_equal(r.boxes, [box])


@pytest.mark.parametrize("box", [
    [-1.01, 0, 10, 10], [0, -1.01, 10, 10], [0, 0, 101.01, 10], [0, 0, 10, 51.01],
    [10, 0, 9.99, 10], [0, 10, 10, 9.99],
])
def test_boxes_past_the_tolerance_or_inverted_are_outside(box):
    """Each side just past one pixel, and x2 < x1 or y2 < y1: ``box_outside_image`` naming the first
    such box (index 1 here, after a good box 0) and the image size. Fails if the tolerance grows,
    a side goes unchecked, or the index or message changes."""
    e = bad(record(n=2, w=100, h=50, boxes=b64([[0, 0, 100, 50], box])))
    want = np.asarray(box, dtype=np.float32).tolist()
    assert str(e) == f"box_outside_image: box 1 {want} outside the 100 x 50 image"


def test_the_first_bad_box_is_named():
    """Fails if another bad box than the first is named."""
    e = bad(record(n=3, w=100, h=50, boxes=b64([[0, 0, 1, 1], [0, 0, 200, 1], [0, 0, 300, 1]])))
    assert str(e) == "box_outside_image: box 1 [0.0, 0.0, 200.0, 1.0] outside the 100 x 50 image"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(value):
    """NaN or infinity in a box, a feature or a class score: each its reason and message. Fails if
    a check is dropped or made ``any``."""
    assert str(bad(record(n=2, boxes=b64([[0, 0, 1, 1], [0, 0, value, 1]])))) == \
        "box_outside_image: non-finite box coordinates"
    feats = np.ones(6)
    feats[4] = value
    assert str(bad(record(n=2, features=b64(feats)))) == "nonfinite_features: NaN or infinity in the features"
    classes = np.ones((2, 2))
    classes[1, 0] = value
    assert str(bad(record(n=2, classes=b64(classes)), with_classes=True)) == \
        "nonfinite_classes: NaN or infinity in the class scores"


def test_read_tsv_splits_tabs_into_named_columns():
    """Rows of a tab-separated file as dicts of the given columns, a short row with None; a field of
    300 kB (over csv's 128 kB default limit) is read. Fails if the delimiter, the column names or
    the size limit change."""
    big = record(n=2, d=30000)
    text = ("\t".join(big[k] for k in BUTD_COLUMNS) + "\n"
            + "1\t2\t3\n"
            + "a,b\tc d\n")
    assert len(big["features"]) > 300_000
    rows = list(read_tsv(io.StringIO(text)))
    assert rows[0] == {k: big[k] for k in BUTD_COLUMNS}
    assert parse_record(rows[0]).features.shape == (2, 30000)
    assert rows[1] == {"image_id": "1", "image_w": "2", "image_h": "3", "num_boxes": None, "boxes": None,
                       "features": None}
    assert rows[2] == dict({"image_id": "a,b", "image_w": "c d"}, **{k: None for k in BUTD_COLUMNS[2:]})
    lx = list(read_tsv(io.StringIO("\t".join(str(i) for i in range(10)) + "\n"), LXMERT_COLUMNS))
    assert lx == [{k: str(i) for i, k in enumerate(LXMERT_COLUMNS)}]
    assert csv.field_size_limit() >= 300_000


def test_vlbert_json_fields_and_the_fallback_id():
    """The object's own ``image_id`` wins; a missing or null one takes ``fallback_id``; an id of 0
    is kept. Fails if the None check is inverted or the fallback is ignored."""
    f = record(n=2, classes=b64(np.zeros((2, 3))))
    del f["image_id"]
    data = json.dumps(dict(f, image_id=12)).encode()
    assert read_vlbert_json(data, 99)["image_id"] == 12
    assert read_vlbert_json(json.dumps(dict(f, image_id=0)).encode(), 99)["image_id"] == 0
    assert read_vlbert_json(json.dumps(dict(f, image_id=None)).encode(), 99)["image_id"] == 99
    got = read_vlbert_json(json.dumps(f).encode(), 5)
    assert got["image_id"] == 5
    r = parse_record(got, with_classes=True)
    assert (r.image_id, r.width, r.height, r.classes.shape) == (5, 100, 50, (2, 3))
    assert read_vlbert_json(json.dumps(f).encode(), None)["image_id"] is None


def test_vlbert_json_errors_in_full():
    """Not JSON, not UTF-8, not an object: ``bad_json`` with the parser's words or the type. Fails
    if a message changes."""
    e = pytest.raises(BadRecord, read_vlbert_json, b"[1, 2]", 1).value
    assert str(e) == "bad_json: expected an object, got list"
    e = pytest.raises(BadRecord, read_vlbert_json, b'"text"', 1).value
    assert str(e) == "bad_json: expected an object, got str"
    for data in (b"{oops", b'{"a": "\xff"}'):
        e = pytest.raises(BadRecord, read_vlbert_json, data, 1).value
        assert e.reason == "bad_json"
        try:
            json.loads(data)
        except ValueError as err:
            assert str(e) == f"bad_json: {err}"
        assert e.__suppress_context__
