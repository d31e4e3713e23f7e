"""The stored-feature files of a shard sample (``vlbert.data.region_features``), read alone: the
pixel frame from the sample's JSON, the ``features.npy`` array and its checks, and ``.npy``
writing. Fast (no model, no shards): these are the tests the module's mutation run uses.

Expected ``.npy`` bytes are built by hand from NumPy's format description (numpy/lib/format.py,
version 1.0: magic, little-endian header length, a Python-literal header padded with spaces to a
multiple of 64 bytes and ended by a newline, then the raw data in C order).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from vlbert.data.captions import BadSample
from vlbert.data.region_features import (FEATURES_EXT, REGIONS_EXT, encode_npy, load_features,
                                         stored_image_size)


def npy_v1(descr: str, shape: tuple, data: bytes) -> bytes:
    """A version 1.0 ``.npy`` file written out by hand (C order)."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, shape)
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * (pad % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + data


def bad(fn, *args) -> BadSample:
    with pytest.raises(BadSample) as e:
        fn(*args)
    return e.value


def test_file_names_are_the_documented_ones():
    """The shard names of the two arrays, as the module's docstring, ``vlbert-import-features`` and
    ``vlbert-extract-regions`` document them (``<key>.features.npy``, ``<key>.regions.npy``).
    Fails if either name changes (e.g. ``FEATURES_EXT = "feature.npy"``)."""
    assert FEATURES_EXT == "features.npy"
    assert REGIONS_EXT == "regions.npy"


def test_image_size_is_width_then_height():
    """Fails if the pair comes back as (height, width), or the smallest size (1) is refused
    (``v > 0`` as ``v > 1``)."""
    assert stored_image_size(b'{"width": 640, "height": 480, "boxes": []}') == (640, 480)
    assert stored_image_size(b'{"height": 1, "width": 1}') == (1, 1)
    assert stored_image_size(b'{"width": 7, "height": 3, "extra": "ignored"}') == (7, 3)


@pytest.mark.parametrize("meta", [
    b'{"width": 0, "height": 480}', b'{"width": 640, "height": 0}',
    b'{"width": -640, "height": 480}', b'{"width": 640, "height": -1}',
    b'{"width": true, "height": 480}', b'{"width": 640, "height": true}',
    b'{"width": 640.0, "height": 480}', b'{"width": 640, "height": "480"}',
    b'{"width": 640}', b'{"height": 480}', b'{}', b'[640, 480]', b'640', b'null',
])
def test_image_size_needs_positive_integers(meta):
    """Zero, negatives, booleans (``True`` is an int in Python), floats, strings, a missing key or
    a JSON that is not an object: ``bad_json`` with the one message. Fails if ``v > 0`` becomes
    ``v >= 0``, the bool check is dropped, either size is left unchecked, or ``and`` becomes ``or``."""
    e = bad(stored_image_size, meta)
    assert e.reason == "bad_json"
    assert str(e) == "bad_json: a sample with features needs positive integer 'width' and 'height'"


def test_image_size_errors_in_full():
    """No JSON, JSON that does not parse, bytes that are not UTF-8: each message word for word.
    Fails if any message changes."""
    e = bad(stored_image_size, None)
    assert (e.reason, e.detail) == ("bad_json", "a sample with features needs its JSON (width, height, boxes)")
    e = bad(stored_image_size, b'{"width": 640,')
    assert e.reason == "bad_json"
    assert e.detail.startswith("not valid JSON: ") and len(e.detail) > len("not valid JSON: ")
    e = bad(stored_image_size, b'{"width": "\xff\xfe"}')
    assert e.reason == "bad_json" and e.detail.startswith("not valid JSON: ")
    assert e.__suppress_context__  # one line: the JSON error is not chained


def test_features_come_back_as_stored():
    """float16 and float32 arrays come back with their values and dtype; one box, one column is a
    valid array. Fails if the row count, the width floor (``shape[1] < 1`` as ``< 2``) or the
    float check refuses a valid file."""
    rng = np.random.default_rng(0)
    for dtype, n, d in (("<f2", 3, 5), ("<f4", 2, 8), ("<f4", 1, 1), ("<f2", 4, 1)):
        a = rng.standard_normal((n, d)).astype(dtype)
        got = load_features(npy_v1(dtype, (n, d), a.tobytes()), n)
        assert got.dtype == np.dtype(dtype) and got.shape == (n, d)
        np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("shape, n_boxes, dtype", [
    ((6,), 6, "<f4"),        # 1-D
    ((2, 3, 1), 2, "<f4"),   # 3-D
    ((3, 4), 2, "<f4"),      # one row too many
    ((2, 4), 3, "<f4"),      # one row too few
    ((3, 0), 3, "<f4"),      # no columns
    ((2, 4), 2, "<i4"),      # integers
    ((2, 4), 2, "|b1"),      # booleans
    ((2, 4), 2, "<c8"),      # complex
])
def test_features_of_the_wrong_shape_or_type_are_bad(shape, n_boxes, dtype):
    """Each a ``bad_features`` naming what was expected and what came. Fails if one of the four
    checks (``ndim != 2``, row count, ``shape[1] < 1``, ``kind != "f"``) is dropped or loosened."""
    a = np.zeros(shape, dtype=dtype)
    e = bad(load_features, npy_v1(dtype, shape, a.tobytes()), n_boxes)
    assert e.reason == "bad_features"
    assert e.detail == f"expected a float [{n_boxes}, D] array, got {np.dtype(dtype)} {shape}"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_bad(value):
    """One NaN or infinity anywhere: ``bad_features: non-finite values``. Fails if the check is
    dropped or made ``any`` (one finite value would pass)."""
    a = np.ones((3, 4), dtype="<f2")
    a[2, 1] = value
    e = bad(load_features, npy_v1("<f2", (3, 4), a.tobytes()), 3)
    assert str(e) == "bad_features: non-finite values"


def test_missing_and_unreadable_feature_files():
    """No file: ``missing_features`` naming the file and the setting; bytes that are not a .npy, a
    file cut short, and a pickled object array (never unpickled): ``bad_features: not a .npy
    array: ...``. Fails if a message changes, or if ``allow_pickle=False`` becomes ``True`` (the
    object array then loads and is refused as not float, with the other message)."""
    e = bad(load_features, None, 2)
    assert str(e) == "missing_features: no features.npy (detector.source: features)"
    good = npy_v1("<f4", (2, 2), np.ones((2, 2), "<f4").tobytes())
    for data in (b"not numpy at all", good[:-3], good[:20]):
        e = bad(load_features, data, 2)
        assert e.reason == "bad_features" and e.detail.startswith("not a .npy array: ")
        assert e.__suppress_context__
    buf = io.BytesIO()
    np.save(buf, np.array([[{"a": 1}, None]], dtype=object), allow_pickle=True)
    e = bad(load_features, buf.getvalue(), 1)
    assert e.reason == "bad_features" and e.detail.startswith("not a .npy array: ")
    assert "pickle" in e.detail


def test_encode_npy_writes_c_order_npy_bytes():
    """The bytes are exactly a version 1.0 ``.npy`` file in C order, also for a Fortran-ordered or
    strided input. Fails if the array is saved as given (a Fortran header, or a different layout)."""
    a = np.arange(6, dtype="<f2").reshape(2, 3)
    c_bytes = npy_v1("<f2", (2, 3), a.tobytes(order="C"))
    assert encode_npy(a) == c_bytes
    assert encode_npy(np.asfortranarray(a)) == c_bytes
    wide = np.arange(12, dtype="<f2").reshape(2, 6)
    assert encode_npy(wide[:, ::2]) == npy_v1("<f2", (2, 3), wide[:, ::2].tobytes(order="C"))
    assert np.array_equal(load_features(encode_npy(a), 2), a)


def test_encode_npy_never_pickles():
    """An object array cannot be written: ``ValueError`` (NumPy's "allow_pickle=False"). Fails if
    ``allow_pickle`` is made ``True`` (the bytes would carry a pickle)."""
    with pytest.raises(ValueError, match="allow_pickle"):
        encode_npy(np.array([{"a": 1}, None], dtype=object))
