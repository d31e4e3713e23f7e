"""Crafted and damaged shards and samples, made byte by byte by the tests.

Every reader either yields good samples, counts a skip, or ends the shard with a
``ShardError`` (counted); the stream then moves on to the next shard. Anything that
could hang runs under ``pytest.mark.timeout``. Each test says in its docstring how it
fails on the code before the checks (and which deliberate break makes it fail now).
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlbert.config import CaptionDataConfig, MaskingConfig, TextDataConfig
from vlbert.data.captions import BadSample, _decode_image, decode_caption_sample
from vlbert.data.formats import ReadLimits, ShardError, iter_tar, write_tar
from vlbert.data.tar_headers import (
    MAX_EXT_HEADER_BYTES, MAX_NAME_BYTES, TarMember, _pax_records, file_size, iter_tar_members,
)
from vlbert.data.mixture import caption_limits, text_limits
from vlbert.data.shards import ShardStream, SkipCounter

# --------------------------------------------------------------------------- crafting tars by hand


def header(name: bytes, size: int = 0, typeflag: bytes = b"0", size_field: bytes | None = None,
           checksum_off: int = 0) -> bytes:
    """A ustar header block; ``size_field`` replaces the 12-byte size field as is (base-256
    numbers), ``checksum_off`` spoils the checksum by that much."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:263], h[263:265] = b"ustar\0", b"00"
    h[148:156] = b" " * 8  # the checksum counts its own field as spaces
    h[148:156] = b"%06o\0 " % (sum(h) + checksum_off)
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def member(name: bytes, data: bytes, typeflag: bytes = b"0") -> bytes:
    return header(name, len(data), typeflag) + pad(data)


def sample(key: str) -> bytes:
    return member(f"{key}.txt".encode(), f"caption {key}".encode()) + member(f"{key}.json".encode(), b"{}")


END = b"\0" * 1024


def test_hand_made_headers_are_valid_tar():
    """The crafting helpers make what tarfile itself reads (so the bad cases differ only where meant)."""
    with tarfile.open(fileobj=io.BytesIO(sample("a") + sample("b") + END)) as tar:
        assert [(m.name, m.size) for m in tar] == [("a.txt", 9), ("a.json", 2), ("b.txt", 9), ("b.json", 2)]


def base256(n: int) -> bytes:
    """A 12-byte GNU base-256 number field (two's complement for negatives)."""
    return bytes([0xFF if n < 0 else 0x80]) + (n % 256 ** 11).to_bytes(11, "big")


# The crafted shards: (name, bytes after one good sample, skip reason).
CRAFTED = {
    # A pax record of length 0: the old parser never moved on.
    "pax_length_0": (member(b"././@PaxHeader", b"0 path=x.txt\n", b"x") + sample("x"), "corrupt_shard"),
    # A directory of size -512 (GNU base-256): the old reader seeked back to the same header.
    "negative_size": (header(b"d/", typeflag=b"5", size_field=base256(-512)) + sample("x"), "corrupt_shard"),
    # A pax record whose length is not a number: int() raised ValueError out of the stream.
    "pax_length_nan": (member(b"././@PaxHeader", b"xx path=x.txt\n", b"x") + sample("x"), "corrupt_shard"),
    # A member that declares 2^62 bytes: the old reader asked for them (MemoryError).
    "size_2_62": (header(b"x.txt", size_field=base256(2 ** 62)) + b"tiny", "truncated_shard"),
    # A header with a checksum off by one.
    "bad_checksum": (header(b"x.txt", 4, checksum_off=1) + pad(b"abcd") + sample("y"), "corrupt_shard"),
}


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_ends_its_shard_and_the_stream_goes_on(tmp_path, case):
    """A crafted header ends its shard with a counted ShardError; the next shard is read in full.

    On the old reader: pax_length_0 and negative_size loop forever (the timeout fails the
    test), pax_length_nan raises ValueError and size_2_62 MemoryError out of the stream;
    bad_checksum was already a ShardError (kept as a guard). Fails if the size < 0 check,
    the pax record-length check or the size-within-the-file check in
    ``iter_tar_members`` is removed (the same hang or crash), or if ``ShardError``s are
    no longer caught per shard in ``ShardStream._read_shard``.
    """
    tail, reason = CRAFTED[case]
    bad = write(tmp_path / "bad.tar", sample("a") + tail + END)
    good = str(tmp_path / "good.tar")
    write_tar(good, [(f"g{i}", {"txt": b"caption", "json": b"{}"}) for i in range(3)])
    counter = SkipCounter()
    keys = [r.key for r in ShardStream([bad, good], 0, 1, 0, counter, shuffle=False, loop=False)]
    assert keys[-3:] == ["g0", "g1", "g2"] and set(keys[:-3]) <= {"a"}
    assert counter.as_dict() == {reason: 1}


@pytest.mark.timeout(30)
def test_resume_at_a_crafted_header_moves_on(tmp_path):
    """A run saved with its cursor at the sample just before a crafted header resumes there,
    counts the shard once and goes on to the next shard (it does not fail again and again).

    On the old reader the resumed stream loops on the pax record of length 0 (timeout).
    Fails if ``_pax_records`` accepts a length that does not move past the record.
    """
    bad = write(tmp_path / "bad.tar", sample("a") + sample("b") + CRAFTED["pax_length_0"][0] + END)
    good = str(tmp_path / "good.tar")
    write_tar(good, [("g0", {"txt": b"caption"})])
    counter = SkipCounter()
    stream = ShardStream([bad, good], 0, 1, 0, counter, shuffle=False, loop=True)
    first = next(iter(stream))  # "a", read in full before the bad header: its cursor points at "b"
    assert first.key == "a" and first.cursor.offset == 2 * 1024
    resumed = ShardStream([bad, good], 0, 1, 0, counter, cursor=first.cursor, shuffle=False, loop=True)
    it = iter(resumed)
    assert [next(it).key for _ in range(2)] == ["g0", "a"]  # next epoch starts over at the bad shard
    assert counter["corrupt_shard"] == 1 and resumed.cursor.epoch == 1


@pytest.mark.timeout(30)
def test_shard_cut_inside_another_slots_member_is_counted(tmp_path):
    """A shard cut inside a member that this slot seeks over is ``truncated_shard``.

    The old reader seeked past the end of the file, found no more bytes and ended the
    shard as if it were complete: the cut went unnoticed. Fails if the "member ends
    past the end of the file" check in ``iter_tar_members`` is removed.
    """
    data = b"".join(sample(f"s{i}") for i in range(4)) + END
    cut = write(tmp_path / "cut.tar", data[: 2 * 2048 + 512 + 5])  # 5 bytes into s2.txt's data
    counter = SkipCounter()
    keys = [r.key for r in ShardStream([cut], 1, 2, 0, counter, shuffle=False, loop=False)]  # slot 1: s1, s3
    assert keys == ["s1"] and counter.as_dict() == {"truncated_shard": 1}


def fix_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


@pytest.mark.timeout(60)
def test_random_header_damage_never_escapes_or_hangs():
    """300 tars with 1-3 header bytes changed the way an attacker would (size fields,
    type flags, names, pax record bytes; the checksums then made right again): the
    reader only yields samples, counts skips or raises ShardError, and always ends.

    The old reader lets OverflowError or ValueError out on some of these and hangs on
    others (a pax length of 0, a size that seeks back onto its own header). Fails if the size < 0 check or the pax
    record-length check in ``iter_tar_members`` / ``_pax_records`` is removed.
    """
    pax = member(b"././@PaxHeader", b"20 path=b.txt\n\0\0\0\0\0\0", b"x")
    data = bytearray(sample("a") + pax + member(b"b.txt", b"x") + sample("c") + END)
    headers = [0, 1024, 2048, 3072, 4096, 5120]
    fields = list(range(124, 136)) + [156, 0, 1, 99]
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(300):
        bad = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.3:
                at = 2048 + 512 + int(rng.integers(0, 20))  # the pax record
            else:
                at = int(rng.choice(headers)) + int(rng.choice(fields))
            bad[at] = int(rng.choice([int(rng.integers(0, 256)), 0xFF, 0x80, ord("0"), ord("7"), ord(" "), 0]))
        for h in headers:
            block = bad[h:h + 512]
            fix_checksum(block)
            bad[h:h + 512] = block
        try:
            list(iter_tar(io.BytesIO(bytes(bad)), 0, 0, 1, 0, SkipCounter()))
            outcomes.add("read")
        except ShardError as e:
            outcomes.add(e.reason)
    assert {"read", "corrupt_shard"} <= outcomes


# --------------------------------------------------------------------------- other readers of tars


@pytest.mark.timeout(30)
def test_image_index_counts_a_damaged_shard_and_keeps_what_it_read(tmp_path):
    """The fine-tuning image index reads the good samples before a bad checksum and counts
    the shard; the old index (tarfile) raised ``ReadError`` and stopped the run.
    Fails if ``ImageIndex._index_shard`` lets the ``ShardError`` out."""
    from vlbert.tasks.images import ImageIndex

    jpg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpg, format="JPEG")
    good = member(b"COCO_000000000001.jpg", jpg.getvalue()) + member(b"COCO_000000000002.jpg", jpg.getvalue())
    path = write(tmp_path / "images.tar", good + CRAFTED["bad_checksum"][0] + END)
    index = ImageIndex([path])
    assert sorted(index.entries) == [1, 2] and index.skips.as_dict() == {"corrupt_shard": 1}
    assert index.read(2)["jpg"] == jpg.getvalue()


@pytest.mark.timeout(300)  # importing the command loads torch and mmdet: slow on a busy machine
def test_extract_regions_reader_moves_past_a_crafted_shard(tmp_path):
    """``vlbert-extract-regions`` reads shards with the same checked reader: the pax record of
    length 0 is counted, the good sample before it kept. The old reader looped forever.
    Fails like ``test_crafted_header_ends_its_shard_and_the_stream_goes_on[pax_length_0]``."""
    from vlbert.cli.extract_regions import read_samples

    path = write(tmp_path / "bad.tar", sample("a") + sample("b") + CRAFTED["pax_length_0"][0] + END)
    counter = SkipCounter()
    assert [k for k, _ in read_samples(path, counter)] == ["a"]
    assert counter.as_dict() == {"corrupt_shard": 1}


def test_tar_member_over_the_cap_is_not_read(tmp_path):
    """A member over ``max_member_bytes`` is passed over unread and counted; the sample keeps its
    other members. The old reader read every member whole. Fails if the cap check in
    ``iter_tar`` is removed (the member shows up in the payload)."""
    path = write(tmp_path / "big.tar", member(b"a.txt", b"caption") + member(b"a.jpg", b"\xff" * 5000)
                 + sample("b") + END)
    counter = SkipCounter()
    recs = list(ShardStream([path], 0, 1, 0, counter, loop=False,
                            limits=caption_limits(CaptionDataConfig(max_member_bytes=4096))))
    assert [(r.key, sorted(r.payload)) for r in recs] == [("a", ["txt"]), ("b", ["json", "txt"])]
    assert counter.as_dict() == {"member_too_large": 1}


# --------------------------------------------------------------------------- images


def png16(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(pixels.astype(np.uint16))
    assert image.mode == "I;16"
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_png_converts_to_the_nearest_8_bit_tone():
    """Each 16-bit tone p becomes round(p / 257) (65535 -> 255), computed here in floats,
    independently of the integer formula in ``_to_rgb``. Fails if the integer rounding is
    changed (e.g. ``p * 255 // 65535``, which truncates: 1 tone in 2 differs)."""
    rng = np.random.default_rng(0)
    p = rng.integers(0, 65536, size=(23, 37))
    p[0, :4] = [0, 128, 129, 65535]  # 128/257 rounds down, 129/257 up
    img, size = _decode_image(png16(p), CaptionDataConfig(short_side=23, max_long_side=37))
    assert size == (37, 23) and img.size == (37, 23)
    got = np.asarray(img)
    expected = np.floor(p / 257.0 + 0.5).astype(np.uint8)
    assert (got[..., 0] == expected).all() and (got[..., 1] == expected).all() and (got[..., 2] == expected).all()
    assert list(got[0, :4, 0]) == [0, 0, 1, 255]


def test_16_bit_png_decodes_at_bounded_memory():
    """A 2048 x 2048 16-bit PNG (4 M pixels) decodes with under 6 bytes a pixel of Python/NumPy
    allocations at the peak (tracemalloc; PIL's own buffers are the same either way).

    The old ``_to_rgb`` made float64 copies of the whole image: over 24 bytes a pixel
    (a 700 KB PNG under PIL's pixel limit cost over 4 GB). Fails if ``_to_rgb`` goes back
    to ``np.asarray(img, dtype=np.float64)`` over the whole image, or if
    ``CHUNK_PIXELS`` is made as large as the image.
    """
    side = 2048
    ramp = np.add.outer(np.arange(side), np.arange(side)) * 16 % 65536
    data = png16(ramp)
    cfg = CaptionDataConfig(short_side=64, max_long_side=64)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        img, _ = _decode_image(data, cfg)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert img.size == (64, 64)
    assert peak < 6 * side * side, f"peak {peak / 2**20:.1f} MiB for {side}x{side}"


def test_image_over_the_pixel_cap_is_refused_before_decoding():
    """An image of more than ``max_image_pixels`` is ``image_too_large`` from its header;
    the old code had no cap below PIL's own (89 M pixels). Fails if the check in
    ``_decode_image`` is removed (the 21 x 20 image then decodes)."""
    buf = io.BytesIO()
    Image.new("RGB", (21, 20)).save(buf, format="PNG")
    with pytest.raises(BadSample) as err:
        decode_caption_sample({"png": buf.getvalue(), "txt": b"a"}, "k", CaptionDataConfig(max_image_pixels=420 - 1),
                              MaskingConfig(), None, np.random.default_rng(0))
    assert err.value.reason == "image_too_large"


def test_caption_over_the_cap_is_skipped_before_tokenising():
    """A caption of more than ``max_caption_bytes`` is ``caption_too_large`` before it is decoded
    or tokenised (no tokenizer is even given). The old code tokenised captions of any
    size. Fails if the check in ``_caption_text`` is removed (then the None tokenizer is
    reached and raises TypeError)."""
    files = {"png": b"unused", "txt": b"word " * 2000}
    with pytest.raises(BadSample) as err:
        decode_caption_sample(files, "k", CaptionDataConfig(max_caption_bytes=9999), MaskingConfig(), None,
                              np.random.default_rng(0))
    assert err.value.reason == "caption_too_large"


# --------------------------------------------------------------------------- text


def doc(text: str) -> bytes:
    return json.dumps({"text": text}).encode() + b"\n"


def test_jsonl_line_over_the_cap_is_skipped_without_holding_it(tmp_path):
    """A 4 MB line with a 64 KB cap is counted (``line_too_long``) and never held: the peak
    of Python allocations stays under 1 MB; the documents around it are read, and the
    cursor after the last one is the file's size (byte offsets still right).

    The old reader read the whole line (``for line in f``) and parsed it. Fails if
    ``_bounded_lines`` keeps the pieces of an oversize line, or miscounts its bytes (the
    final offset check).
    """
    data = doc("first") + doc("x" * (4 << 20)) + doc("last")
    path = write(tmp_path / "t.jsonl", data)
    counter = SkipCounter()
    limits = text_limits(TextDataConfig(max_line_bytes=64 << 10))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        recs = list(ShardStream([path], 0, 1, 0, counter, loop=False, limits=limits))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert [r.payload for r in recs] == ["first", "last"] and counter.as_dict() == {"line_too_long": 1}
    assert recs[-1].cursor.offset == len(data) and recs[-1].cursor.index == 3
    assert peak < 1 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_compressed_jsonl_long_line_and_resume_by_line(tmp_path):
    """In a gzip JSON Lines shard the long line is skipped, and a cursor (a line number) after
    it resumes at the right line. Fails as the plain-file test does."""
    path = write(tmp_path / "t.jsonl.gz", gzip.compress(doc("a") + doc("y" * 5000) + doc("b") + doc("c")))
    counter = SkipCounter()
    limits = ReadLimits(max_line_bytes=1000)
    recs = list(ShardStream([path], 0, 1, 0, counter, loop=False, limits=limits))
    assert [r.payload for r in recs] == ["a", "b", "c"] and counter.as_dict() == {"line_too_long": 1}
    resumed = ShardStream([path], 0, 1, 0, SkipCounter(), cursor=recs[1].cursor, loop=False, limits=limits)
    assert [r.payload for r in resumed] == ["c"]


def test_document_over_the_cap_is_skipped_before_tokenising(tmp_path):
    """A document over ``max_document_bytes`` of UTF-8 is ``document_too_large``, in JSON Lines
    and Parquet alike; the cap counts bytes, not characters (400 'é' are 800 bytes). The
    old readers passed documents of any size to the tokenizer. Fails if the UTF-8 length
    test in ``_decode_text`` is replaced by ``len(text)``."""
    texts = ["short", "é" * 400, "z" * 700]
    jsonl = write(tmp_path / "t.jsonl", b"".join(doc(t) for t in texts))
    parquet = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), parquet)
    limits = text_limits(TextDataConfig(max_document_bytes=750))
    for url in (jsonl, parquet):
        counter = SkipCounter()
        got = [r.payload for r in ShardStream([url], 0, 1, 0, counter, loop=False, limits=limits)]
        assert got == ["short", "z" * 700] and counter.as_dict() == {"document_too_large": 1}, url


# --------------------------------------------------------------------------- prepare-captions


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.timeout(60)
def test_prepare_captions_refuses_a_gzip_bomb(tmp_path):
    """A 40 KB ``.tar.gz`` that inflates to 40 MB (one member of zeros after a good sample) is
    ``archive_too_large`` with a 4 MB cap: the good sample before it is kept, the next shard
    is read, and no more than the cap is inflated (the reader's position never passes it).

    The old command opened shards with ``tarfile`` mode ``r|*`` (transparent gzip, no
    bound) and has no ``--max-archive-bytes``. Fails if ``CappedReader`` stops counting
    (the bomb then reads through and is counted as ``member_too_large`` only).
    """
    from vlbert.cli.prepare_captions import main

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    ok = {"png": png.getvalue(), "txt": b"a red square"}
    bomb = tar_bytes([("a", ok), ("b", {"png": b"\0" * (40 << 20), "txt": b"zeros"})])
    packed = gzip.compress(bomb, compresslevel=9)
    assert len(packed) < 100 << 10
    write(tmp_path / "0.tar.gz", packed)
    write(tmp_path / "1.tar", tar_bytes([("c", ok)]))
    result = main(["--shards", str(tmp_path / "0.tar.gz"), str(tmp_path / "1.tar"), "--validate-only",
                   "--max-archive-bytes", str(4 << 20), "--max-member-bytes", str(64 << 20)])
    assert result["counts"] == {"archive_too_large": 1, "valid": 2}


def test_prepare_captions_caps_members_images_and_captions(tmp_path):
    """Over the per-sample caps, img2dataset samples are skipped with their reasons. The old
    command had none of the flags (argparse exits). Fails if any of the three checks in
    ``shard_samples``/``check_image``/``iter_tar`` is removed (that sample is then valid)."""
    from vlbert.cli.prepare_captions import main

    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, format="PNG")
        return buf.getvalue()

    samples = [("ok", {"png": png(8, 8), "txt": b"fine"}),
               ("wide", {"png": png(100, 100), "txt": b"too many pixels"}),
               ("talk", {"png": png(8, 8), "txt": b"w " * 600}),
               ("heavy", {"png": png(8, 8) + b"\0" * 9000, "txt": b"big member"})]
    write(tmp_path / "0.tar", tar_bytes(samples))
    result = main(["--shards", str(tmp_path / "0.tar"), "--validate-only", "--max-image-pixels", "5000",
                   "--max-caption-bytes", "1000", "--max-member-bytes", "8000"])
    assert result["counts"] == {"caption_too_large": 1, "image_too_large": 1, "member_too_large": 1,
                                "missing_image": 1, "valid": 1}


def test_caps_are_config_fields_with_checked_values():
    """The caps are typed config keys; a cap of 0 is refused naming the key. Fails if
    ``validate`` stops checking them."""
    from vlbert.config import ConfigError, load_config

    base = str(Path(__file__).resolve().parents[1] / "configs/base_e2e.yaml")
    for key in ("data.text.max_line_bytes", "data.validation.max_caption_bytes"):
        with pytest.raises(ConfigError, match=key):
            load_config(base, [f"{key}=0"], check_files=False)
    ok = load_config(base, ["data.text.max_line_bytes=1000", "data.captions.max_member_bytes=5"], check_files=False)
    assert text_limits(ok.data.text) == ReadLimits(max_line_bytes=1000)
    assert caption_limits(ok.data.captions) == ReadLimits(max_member_bytes=5)


# --------------------------------------------------------------------------- tar headers, field by field

def pax_record(key: bytes, value: bytes, width: int = 0) -> bytes:
    """One pax record per POSIX ("%d %s=%s\\n", the length counting its own digits), the length
    written in ``width`` digits with leading zeros when ``width`` is given."""
    body = b" " + key + b"=" + value + b"\n"
    if width:
        return b"%0*d" % (width, width + len(body)) + body
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return b"%d" % n + body


def walk(data: bytes, f=None):
    """iter_tar_members over ``data`` as (start, name, type, data offset, size, end, complete)."""
    return [(m.start, m.name, m.type, m.data, m.size, m.end, m.complete)
            for m in iter_tar_members(f if f is not None else io.BytesIO(data))]


def walk_error(data: bytes) -> ShardError:
    with pytest.raises(ShardError) as e:
        walk(data)
    return e.value


def by_tarfile(data: bytes):
    """The same tuples from Python's tarfile, the second implementation."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.offset, m.name, m.type, m.offset_data, m.size,
                 m.offset_data + -(-m.size // 512) * 512, True) for m in tar]


def pax_member(records: bytes) -> bytes:
    return member(b"././@PaxHeader", records, b"x")


@pytest.mark.timeout(30)
def test_walk_agrees_with_tarfile_on_gnu_and_pax_tars():
    """Long names (GNU ``L`` and pax ``path``), a pax ``size`` record, a directory, an empty
    member, several extended headers before one member: every field of every member is what
    tarfile reads, ``start`` at the first extended header, and a pax size or name applies to
    the next member only. Fails if ``ext_start`` is not kept across a second extended header
    (``ext_start = hdr_pos``), if ``long_name``/``pax_size`` are not reset after a member, if a
    pax ``size`` is ignored or applied to an extended header, or if a GNU long name keeps bytes
    after its NUL."""
    long = b"d/" + b"n" * 200 + b".txt"
    data = (member(b"././@LongLink", long + b"\0junk", b"L") + member(b"short", b"abc")
            + pax_member(pax_record(b"path", b"p" * 120 + b".bin") + pax_record(b"size", b"700"))
            + header(b"p.bin", 0) + pad(b"z" * 700)
            + member(b"plain.txt", b"12345")
            + member(b"././@LongLink", b"q" * 130 + b"\0", b"L")
            + pax_member(pax_record(b"size", b"3") + pax_record(b"mtime", b"1.5"))
            + header(b"q", 0) + pad(b"xyz")
            + header(b"dir/", typeflag=b"5") + member(b"empty", b"") + END)
    got = walk(data)
    want = by_tarfile(data)
    assert [g[:1] + g[2:] for g in got] == [w[:1] + w[2:] for w in want]
    assert [g[1] for g in got] == [long.decode(), "p" * 120 + ".bin", "plain.txt", "q" * 130, "dir", "empty"]
    assert [w[1] for w in want] == [g[1] for g in got]
    assert got[0][0] == 0 and got[3][0] == got[2][5]  # both extended headers counted in start


@pytest.mark.timeout(30)
def test_walk_of_tarfile_written_tars(tmp_path):
    """Tars written by tarfile itself in GNU, pax and ustar format (names past 100 bytes,
    a directory, a symlink, a pax-only header field): same members, same offsets. Fails like
    ``test_walk_agrees_with_tarfile_on_gnu_and_pax_tars``."""
    long_name = {tarfile.GNU_FORMAT: "sub/" + "s" * 120, tarfile.PAX_FORMAT: "sub/" + "é" * 60,
                 tarfile.USTAR_FORMAT: "p" * 80 + "/" + "n" * 90}  # ustar: split into prefix and name
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, kind, data in [("x" * 99, b"0", b"a" * 513), (long_name[fmt], b"0", b"b"),
                                     ("sub", b"5", b""), ("link", b"2", b"")]:
                ti = tarfile.TarInfo(name)
                ti.type, ti.size = kind, len(data)
                if kind == b"2":
                    ti.linkname = "x" * 99
                tar.addfile(ti, io.BytesIO(data) if data else None)
        data = buf.getvalue()
        got, want = walk(data), by_tarfile(data)
        assert [g[:1] + g[2:] for g in got] == [w[:1] + w[2:] for w in want], fmt
        assert [g[1] for g in got] == [w[1] for w in want], fmt


@pytest.mark.timeout(30)
def test_pax_records_parse_per_posix():
    """Records are split by their lengths, not by newlines: a value may hold '=' and '\\n';
    the minimal record "5 k=\\n" (empty value) is valid; NUL padding after the last record
    ends the parse; values keep undecodable bytes (surrogateescape), keys replace them.
    Expected dicts written out by hand. Fails if the minimum length check becomes
    ``length <= len(digits) + 4`` (rejects "5 k=\\n"), if the parse stops at a newline, if it
    does not stop at NUL padding, or if the decode error handlers change."""
    recs = b"5 k=\n" + b"13 a=b=c\nd=e\n" + b"8 v=\xff\xfeZ\n" + b"7 \xffk=1\n" + b"\0" * 7
    assert _pax_records(recs, 0) == {"k": "", "a": "b=c\nd=e", "v": "\udcff\udcfeZ", "\ufffdk": "1"}
    assert _pax_records(b"", 0) == {} and _pax_records(b"\0" * 512, 0) == {}
    # tarfile parses the same records to the same key/values (the decodable ones)
    data = pax_member(b"5 k=\n" + b"13 a=b=c\nd=e\n") + member(b"m", b"") + END
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getmembers()[0].pax_headers == {"k": "", "a": "b=c\nd=e"}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("records, message", [
    (b"5 k=\n6 =v\n\n", "record without 'key='"),  # empty key
    (b"5 kv\n", "record without 'key='"),  # no '='
    (b"4 k\n\n", "bad record length 4"),  # shorter than "N k=\n"
    (b"7 k=v\n", "bad record length 7"),  # past the end of the header
    (b"5 k=v\n", "bad record length 5"),  # not ending in a newline
    (b"x5 k=v\n", "record length b'x5' is not a number"),
    (b" 5 k=v\n", "record length b' 5 k=v\\n' is not a number"),  # starts with the space: 20 bytes shown
    (b"5", "record length b'5' is not a number"),  # no space at all
    (b"1" * 21 + b" k=v\n", "record length b'" + "1" * 20 + "' is not a number"),  # no space in 21 bytes
])
def test_malformed_pax_records_are_corrupt_with_where(records, message):
    """Each malformed record is ``corrupt_shard`` with a one-line message that says what and
    where (the pax header's offset, 1024 here; a length that is not a number shown as its first
    20 bytes at most). Fails if one of the checks in ``_pax_records``
    is dropped or loosened (e.g. ``not eq or not key`` to ``and``, ``end > n`` to ``>=``), if the
    bytes shown change (``space >= i``, ``data[i:i - _MAX_LENGTH_DIGITS]``), or
    if ``ShardError`` loses its message."""
    e = walk_error(member(b"a.txt", b"hi") + pax_member(records) + member(b"b.txt", b"") + END)
    assert e.reason == "corrupt_shard" and str(e).startswith("corrupt_shard: pax header at 1024: ")
    assert message in str(e) and "\n" not in str(e)


def test_shard_error_text():
    """``str(ShardError)`` is the reason alone, or "reason: message". Fails if the message
    default is not empty or the join changes."""
    assert str(ShardError("empty_shard")) == "empty_shard" and ShardError("empty_shard").reason == "empty_shard"
    assert str(ShardError("corrupt_shard", "at 5")) == "corrupt_shard: at 5"


@pytest.mark.timeout(30)
def test_caps_are_exact_boundaries():
    """An extended header of exactly ``MAX_EXT_HEADER_BYTES`` (1 MiB) and a name of exactly
    ``MAX_NAME_BYTES`` (4096) bytes, pax path or GNU long name, are read; one byte more is
    ``corrupt_shard``. A record length or pax size of 20 digits (leading zeros) is read, of 21
    digits refused. A name's bytes are counted after surrogateescape (an undecodable byte is one
    byte). Fails if a cap constant changes (e.g. ``1 << 21``, ``4097``, 21 digits) or
    a ``>`` becomes ``>=``, or if ``_check_name`` encodes with another error handler."""
    assert MAX_EXT_HEADER_BYTES == 1 << 20 and MAX_NAME_BYTES == 4096
    def one(ext: bytes) -> bytes:
        return ext + member(b"m.txt", b"data") + END
    head = b"1048576 comment="
    full = head + b"c" * ((1 << 20) - len(head) - 1) + b"\n"
    assert len(full) == 1 << 20 and walk(one(pax_member(full)))[0][1:5] == ("m.txt", b"0", 1024 + (1 << 20), 4)
    big = b"1048577 comment=" + b"c" * ((1 << 20) - len(head)) + b"\n"
    e = walk_error(one(pax_member(big)))
    assert str(e) == f"corrupt_shard: extended tar header of {(1 << 20) + 1} bytes at 0"
    name = "é" * 2047 + "ab"  # 4096 bytes of utf-8
    assert walk(one(pax_member(pax_record(b"path", name.encode()))))[0][1] == name
    assert walk(one(member(b"././@LongLink", b"n" * 4096 + b"\0", b"L")))[0][1] == "n" * 4096
    # undecodable bytes count one byte each (surrogateescape), as tarfile's reader keeps them
    assert walk(one(member(b"././@LongLink", b"\xff" * 4096 + b"\0", b"L")))[0][1] == "\udcff" * 4096
    for ext in (pax_member(pax_record(b"path", name.encode() + b"c")), member(b"././@LongLink", b"n" * 4097, b"L"),
                member(b"././@LongLink", b"\xff" * 4097, b"L")):
        assert str(walk_error(one(ext))) == "corrupt_shard: member name of over 4096 bytes at 0"
    assert walk(one(pax_member(pax_record(b"size", b"4".zfill(20)))))[0][4] == 4
    assert walk(one(pax_member(pax_record(b"size", b"4", width=20)))) == [(0, "m.txt", b"0", 1536, 4, 2048, True)]
    assert "size '000000000000000000004'" in str(walk_error(one(pax_member(pax_record(b"size", b"4".zfill(21))))))
    assert "is not a number" in str(walk_error(one(pax_member(pax_record(b"size", b"4", width=21)))))
    assert "size '-4'" in str(walk_error(one(pax_member(pax_record(b"size", b"-4")))))


class _Sized:
    """A file that tells its size only by a ``size`` attribute (as fsspec's files do)."""

    def __init__(self, data: bytes, size):
        self._f, self.size = io.BytesIO(data), size

    def read(self, n=-1):
        return self._f.read(n)

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)


def test_file_size_sources(tmp_path):
    """The size comes from a ``size`` attribute, else the OS, else a BytesIO's buffer, else
    None (a stream that cannot tell); a non-int ``size`` is not trusted. Fails if one of the
    sources is skipped or the fall-through returns something else."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1234)
    with open(path, "rb") as f:
        assert file_size(f) == 1234
    assert file_size(io.BytesIO(b"y" * 77)) == 77
    assert file_size(_Sized(b"", 99)) == 99
    assert file_size(_Sized(b"", None)) is None and file_size(_Sized(b"", "5")) is None


@pytest.mark.timeout(30)
def test_member_cut_short_is_seen_only_with_a_known_size():
    """A member whose padded data run past the end of the file is yielded with
    ``complete=False`` then ``truncated_shard``; when the file cannot tell its size the member
    is complete and the walk ends at the end of the file. A cut inside an extended header is
    ``truncated_shard`` before any member. Fails if ``complete`` is computed with ``<`` (a
    member ending exactly at the end of the file), ignores an unknown size, or if
    ``_read_exact``'s message changes."""
    data = member(b"a.txt", b"hello") + member(b"b.txt", b"world!")
    exact = walk(data)  # no end-of-archive blocks: ends exactly at the end of the file
    assert exact == [(0, "a.txt", b"0", 512, 5, 1024, True), (1024, "b.txt", b"0", 1536, 6, 2048, True)]
    cut = data[:1536 + 6]
    with pytest.raises(ShardError) as e:
        for m in iter_tar_members(io.BytesIO(cut)):
            assert (m.name, m.complete) in {("a.txt", True), ("b.txt", False)}
    assert str(e.value) == "truncated_shard: tar member at 1024 declares 6 bytes, 6 left in the file"
    assert walk(b"", _Sized(cut, None))[-1] == (1024, "b.txt", b"0", 1536, 6, 2048, True)
    ext = member(b"././@LongLink", b"n" * 600, b"L")
    assert str(walk_error(ext[:700])) == "truncated_shard: tar member at 0 declares 600 bytes, 188 left in the file"
    assert walk_error(ext[:700] + b"\0" * 500).reason == "truncated_shard"  # padding cut: 1200 < 1536
    assert walk_error(data[:700]).reason == "truncated_shard"  # a short header
    with pytest.raises(ShardError) as e:  # size unknown: the extended header's read comes up short
        walk(b"", _Sized(ext[:700], None))
    assert str(e.value) == "truncated_shard: wanted 600 bytes, got 188"


@pytest.mark.parametrize("typeflag, regular", [
    (b"0", True), (b"\0", True), (b"7", True), (b"S", False), (b"5", False), (b"2", False), (b"1", False),
])
def test_regular_members(typeflag, regular):
    """Regular files are the types tarfile reads data of (``0``, NUL, ``7``), minus GNU sparse
    files (``S``, whose data is a map). Fails if ``regular`` becomes ``or`` or ``==``, or is no
    longer a property (a bound method is always true)."""
    (m,) = list(iter_tar_members(io.BytesIO(header(b"m", 0, typeflag) + END)))
    assert m.regular is regular
    with tarfile.open(fileobj=io.BytesIO(header(b"m", 0, typeflag) + END)) as tar:
        assert tar.getmembers()[0].isreg() == (regular or typeflag == b"S")


def test_tar_member_is_a_frozen_record():
    """A ``TarMember`` cannot be changed after the walk made it, and is complete unless told
    otherwise. Fails if ``frozen=True`` or the ``complete`` default is dropped."""
    import dataclasses

    m = TarMember(0, "a.txt", b"0", 512, 3, 1024)
    assert m.complete is True and m.regular is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.size = 10 ** 12  # type: ignore[misc]


@pytest.mark.timeout(30)
def test_header_errors_say_what_and_where():
    """Each header error is one line naming the reason, the check and the header's offset; a
    cut member tells the bytes it declares and those left (never fewer than 0, even when the
    file's stated size is below what was read). Fails if one of these messages changes, or if
    ``max(0, left)`` becomes ``max(1, left)`` or ``max(-1, left)``."""
    a = member(b"a.txt", b"hello")
    cases = [
        (a + header(b"b.txt", 4, checksum_off=1) + pad(b"abcd"), "corrupt_shard: bad tar header at 1024: bad checksum"),
        (a + header(b"b.txt", 4)[:100], "truncated_shard: short header at 1024"),
        (a + header(b"d/", typeflag=b"5", size_field=base256(-512)) + END,
         "corrupt_shard: tar header at 1024: negative size -512"),
        (a + header(b"b.txt", 5), "truncated_shard: tar member at 1024 declares 5 bytes, 0 left in the file"),
        (a + pax_member(pax_record(b"size", b"0x10")) + a, "corrupt_shard: pax header at 1024: size '0x10'"),
    ]
    for data, message in cases:
        with pytest.raises(ShardError) as e:
            walk(data)
        assert str(e.value) == message
    with pytest.raises(ShardError) as e:  # a stated size of 100 bytes for a file of 1024
        walk(b"", _Sized(a, 100))
    assert str(e.value) == "truncated_shard: tar member at 0 declares 5 bytes, 0 left in the file"
