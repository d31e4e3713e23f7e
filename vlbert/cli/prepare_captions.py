"""Turn a Conceptual Captions download into checked caption shards (docs/design.md section 4).

From the TSV and a folder of downloaded images:

    vlbert-prepare-captions --tsv Train_GCC-training.tsv --image-dir images/ \\
        --out s3://bucket/cc3m --rows-per-shard 10000 [--image-name '{index:09d}.jpg'] [--workers 8]

Rows are ``caption<TAB>url`` (the official file) or ``url<TAB>caption``; the URL
column is recognised per row by its ``http(s)://``. ``index`` is the 0-based line
number in the TSV, and the image of a row is ``<image-dir>/<image-name>`` with
``--image-name`` a Python format string over ``index``, ``sha1`` and ``md5``
(hex digests of the URL), e.g. ``{index:09d}.jpg`` (default) or
``{sha1}.jpg``. The sample key is ``{index:09d}``.

From an img2dataset output (already tar shards), to check and count, or to
re-shard into ``--rows-per-shard`` samples while dropping the bad ones:

    vlbert-prepare-captions --shards '/data/cc3m/{00000..00331}.tar' --validate-only
    vlbert-prepare-captions --shards '/data/cc3m/*.tar' --out /data/cc3m-clean

Every image is fully decoded once, so missing, truncated and corrupt images are
skipped and counted (as are bad rows and empty or non-UTF-8 captions). JPEG,
PNG and WebP bytes are kept as they are; other formats are re-encoded as JPEG.
Each kept sample is ``KEY.<ext>``, ``KEY.txt`` and ``KEY.json`` (``width``,
``height`` of the stored image, ``caption``, ``url`` when known; an img2dataset
sample keeps its other JSON fields and files). Shards are
``<out>/<prefix>NNNNN.tar``, written through fsspec; counts go to
``<out>/<prefix>stats.json`` and stderr.

Shards are read with the training's checked tar reader (``vlbert.data.formats``):
a damaged header ends that shard (counted under its reason). A compressed shard
(``.tar.gz``, ``.bz2``, ``.xz``, ``.zst``: told by its magic bytes) is decompressed
to at most ``--max-archive-bytes`` (a decompression bomb ends that shard as
``archive_too_large``). Over the caps of one sample (``--max-member-bytes``,
``--max-image-pixels``, ``--max-caption-bytes``; defaults from ``data.captions``)
a sample is skipped and counted (``member_too_large``, ``image_too_large``,
``caption_too_large``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Optional

import fsspec
from PIL import Image
from tqdm import tqdm

from vlbert.cli.common import add_renamed_flag, command_parser, console_script
from vlbert.config import CaptionDataConfig
from vlbert.data.formats import ReadLimits, ShardError, iter_tar, open_archive

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class Skip(Exception):
    """A sample left out; ``reason`` is the counter name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


CAPS = CaptionDataConfig()  # the per-sample caps' defaults
MAX_ARCHIVE_BYTES = 16 << 30  # decompressed bytes of one compressed shard


def check_image(data: bytes, max_pixels: int = CAPS.max_image_pixels) -> tuple[str, bytes, int, int]:
    """Fully decode ``data``; returns (extension, bytes to store, width, height). Raises Skip
    (``image_too_large`` over ``max_pixels``, told by the header before decoding)."""
    try:
        img = Image.open(io.BytesIO(data))
        fmt, (w, h) = img.format, img.size
    except Exception:
        raise Skip("corrupt_image") from None
    if w * h > max_pixels:
        raise Skip("image_too_large")
    try:
        if fmt == "JPEG":
            img.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # all the data is still read: truncation shows
        img.load()
        if fmt in KEPT_FORMATS:
            return KEPT_FORMATS[fmt], data, w, h
        out = io.BytesIO()
        img.convert("RGB").save(out, format="JPEG", quality=95)
        return "jpg", out.getvalue(), w, h
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise Skip("corrupt_image") from None


def check_caption(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise Skip("empty_caption")
    return text


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes samples (``{ext: bytes}``) into ``<out>/<prefix>NNNNN.tar`` of ``per_shard`` each."""

    def __init__(self, out: str, per_shard: int, prefix: str = ""):
        if per_shard < 1:
            raise ValueError(f"--rows-per-shard must be >= 1, got {per_shard}")
        self.out, self.per_shard, self.prefix = out.rstrip("/"), per_shard, prefix
        self.shards: list[str] = []
        self._file = self._tar = None
        self._count = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self._tar is None or self._count == self.per_shard:
            self._open_next()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def _open_next(self) -> None:
        self.close()
        url = f"{self.out}/{self.prefix}{len(self.shards):05d}.tar"
        self._file = fsspec.open(url, "wb").open()
        self._tar = tarfile.open(fileobj=self._file, mode="w|")  # streaming: no seeks, fine for object stores
        self.shards.append(url)
        self._count = 0

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None


# --------------------------------------------------------------------------- TSV + image folder


def _split_row(row: list[str]) -> tuple[str, str]:
    """(caption, url) from a two-column row in either order."""
    if len(row) != 2:
        raise Skip("bad_row")
    a, b = (x.strip() for x in row)
    if b.startswith(("http://", "https://")):
        return a, b
    if a.startswith(("http://", "https://")):
        return b, a
    raise Skip("bad_row")


def tsv_samples(tsv: str, image_dir: str, image_name: str, workers: int, stats: Counter,
                limit: Optional[int] = None,
                max_pixels: int = CAPS.max_image_pixels) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Checked ``(key, files)`` for the rows of ``tsv``; skipped rows are counted in ``stats``."""
    fs, root = fsspec.core.url_to_fs(image_dir)

    def load(item: tuple[int, list[str]]):
        index, row = item
        try:
            caption, url = _split_row(row)
            caption = check_caption(caption)
            digest = url.encode()
            path = f"{root.rstrip('/')}/" + image_name.format(
                index=index, sha1=hashlib.sha1(digest).hexdigest(), md5=hashlib.md5(digest).hexdigest())
            try:
                data = fs.cat_file(path)
            except FileNotFoundError:
                raise Skip("missing_image") from None
            ext, data, w, h = check_image(data, max_pixels)
        except Skip as e:
            return e.reason, None
        key = f"{index:09d}"
        meta = {"key": key, "caption": caption, "url": url, "width": w, "height": h}
        return None, (key, {ext: data, "txt": caption.encode(), "json": json.dumps(meta).encode()})

    with fsspec.open(tsv, "rt", encoding="utf-8", errors="replace", newline="") as f:
        rows = enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if limit is not None:
            rows = itertools.islice(rows, limit)
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL and file reads release the GIL
            for chunk in _chunks(rows, 64 * max(1, workers)):
                for reason, sample in pool.map(load, chunk):  # map keeps the TSV order
                    if sample is None:
                        stats[reason] += 1
                    else:
                        yield sample


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------- img2dataset shards


def expand_urls(patterns: list[str]) -> list[str]:
    """Brace ranges (``{00000..00331}``) and globs, through fsspec."""
    from braceexpand import braceexpand

    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if any(c in url for c in "*?["):
                fs, _ = fsspec.core.url_to_fs(url)
                found = sorted(fs.glob(url))
                urls += [fs.unstrip_protocol(p) if "://" in url else p for p in found]
            else:
                urls.append(url)
    if not urls:
        raise SystemExit(f"no shards match {patterns}")
    return urls


class _Counts:
    """The ``counter.add`` the tar reader calls, onto a ``Counter``."""

    def __init__(self, stats: Counter):
        self.stats = stats

    def add(self, reason: str, n: int = 1) -> None:
        self.stats[reason] += n


def _tar_samples(url: str, stats: Counter, max_member_bytes: int = CAPS.max_member_bytes,
                 max_archive_bytes: int = MAX_ARCHIVE_BYTES) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The (key, {ext: bytes}) of one tar, plain or compressed (WebDataset rule: key = up to the
    basename's first dot); a damaged or oversize shard ends early, counted (module docstring)."""
    limits = ReadLimits(max_member_bytes=max_member_bytes)
    with fsspec.open(url, "rb") as raw:
        try:
            f = open_archive(raw, max_archive_bytes, url)
            for _, key, files, _, _ in iter_tar(f, 0, 0, 1, 0, _Counts(stats), limits=limits):
                yield key, files
        except ShardError as e:
            print(f"warning: shard {url}: {e}; rest of the shard skipped", file=sys.stderr)
            stats[e.reason] += 1


def shard_samples(urls: list[str], stats: Counter, max_member_bytes: int = CAPS.max_member_bytes,
                  max_archive_bytes: int = MAX_ARCHIVE_BYTES, max_pixels: int = CAPS.max_image_pixels,
                  max_caption_bytes: int = CAPS.max_caption_bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Checked samples of img2dataset shards; the JSON gets the stored image's width and height."""
    for url in urls:
        for key, files in _tar_samples(url, stats, max_member_bytes, max_archive_bytes):
            try:
                image_ext = next((e for e in IMAGE_EXTS if e in files), None)
                if image_ext is None:
                    raise Skip("missing_image")
                if "txt" not in files:
                    raise Skip("missing_caption")
                if len(files["txt"]) > max_caption_bytes:
                    raise Skip("caption_too_large")
                try:
                    caption = check_caption(files["txt"].decode("utf-8"))
                except UnicodeDecodeError:
                    raise Skip("bad_caption") from None
                ext, data, w, h = check_image(files.pop(image_ext), max_pixels)
            except Skip as e:
                stats[e.reason] += 1
                continue
            try:
                meta = json.loads(files.get("json", b"{}"))
                meta = meta if isinstance(meta, dict) else {}
            except ValueError:
                meta = {}
            meta.update(width=w, height=h)
            meta.setdefault("caption", caption)
            files.update({ext: data, "txt": caption.encode(), "json": json.dumps(meta).encode()})
            yield key.rsplit("/", 1)[-1], files


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> dict:
    p = command_parser("vlbert-prepare-captions", __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tsv", help="Conceptual Captions TSV (any fsspec URL)")
    src.add_argument("--shards", nargs="+", help="img2dataset tar shards: URLs, globs or brace ranges")
    p.add_argument("--image-dir", help="folder of downloaded images (with --tsv)")
    p.add_argument("--image-name", default="{index:09d}.jpg",
                   help="file name of a row's image; fields: index, sha1, md5 (default: %(default)s)")
    p.add_argument("--out", help="output folder URL for the shards")
    p.add_argument("--prefix", default="", help="shard file name prefix, e.g. 'train-'")
    p.add_argument("--rows-per-shard", type=int, default=10000, help="samples per output shard")
    add_renamed_flag(p, "--per-shard", "--rows-per-shard", "rows_per_shard", type=int)
    p.add_argument("--workers", type=int, default=8, help="threads reading and decoding images (TSV mode)")
    p.add_argument("--limit", type=int, help="only the first N TSV rows")
    p.add_argument("--validate-only", action="store_true", help="check and count, write nothing")
    p.add_argument("--max-archive-bytes", type=int, default=MAX_ARCHIVE_BYTES,
                   help="decompressed bytes of one compressed shard at most (default: %(default)s)")
    p.add_argument("--max-member-bytes", type=int, default=CAPS.max_member_bytes,
                   help="bytes of one tar member at most (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=CAPS.max_image_pixels,
                   help="width x height of one image at most (default: %(default)s)")
    p.add_argument("--max-caption-bytes", type=int, default=CAPS.max_caption_bytes,
                   help="bytes of one caption at most (default: %(default)s)")
    a = p.parse_args(argv)
    if a.tsv and not a.image_dir:
        p.error("--tsv needs --image-dir")
    if not a.validate_only and not a.out:
        p.error("--out is required unless --validate-only")

    stats: Counter = Counter()
    if a.tsv:
        samples = tsv_samples(a.tsv, a.image_dir, a.image_name, a.workers, stats, a.limit, a.max_image_pixels)
    else:
        samples = shard_samples(expand_urls(a.shards), stats, a.max_member_bytes, a.max_archive_bytes,
                                a.max_image_pixels, a.max_caption_bytes)
    writer = None if a.validate_only else ShardWriter(a.out, a.rows_per_shard, a.prefix)
    try:
        for key, files in tqdm(samples, unit="img", desc="prepare_captions", file=sys.stderr):
            if writer is not None:
                writer.write(key, files)
            stats["written" if writer is not None else "valid"] += 1
    finally:
        if writer is not None:
            writer.close()
    result = {"counts": dict(sorted(stats.items())), "shards": writer.shards if writer else []}
    if writer is not None:
        with fsspec.open(f"{a.out.rstrip('/')}/{a.prefix}stats.json", "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result["counts"]), file=sys.stderr)
    return result


cli = console_script(main)

if __name__ == "__main__":
    sys.exit(cli())
