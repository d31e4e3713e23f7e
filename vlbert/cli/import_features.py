"""Import published region features into our shards (``detector.source: features``).

    vlbert-import-features --tsv trainval_36/*.tsv --captions captions_train2014.json \\
        --out s3://bucket/coco-feats --prefix train [--rows-per-shard 1000]
    vlbert-import-features --tsv test2015_36.tsv --out data/vqa-feats --prefix test2015
    vlbert-import-features --json 'frcnn/*.json' --captions cc_train.jsonl --out data/cc-feats

Inputs (``vlbert.data.butd_features``): bottom-up-attention TSV files (``--columns butd``, the
default, or ``lxmert``, or a comma-separated list), or VL-BERT's per-image JSON files (with
``classes``, the detector's class scores). Output: tar shards ``<prefix>-00000.tar`` ... in the
layout of docs/features.md, ``--rows-per-shard`` samples each:

- ``KEY.json``: ``image_id``, ``width``, ``height``, ``boxes`` (pixels), and with class scores
  ``box_scores`` (each box's highest class score, the order the reference sorts boxes by);
- ``KEY.features.npy``: float16 [n_boxes, D]; ``KEY.regions.npy``: float16 [n_boxes, C] when
  the input has class scores (the masked-RoI targets);
- with ``--captions``, ``KEY.txt``: one sample per caption, joined by image id (pretraining
  shards); without, one sample per image keyed by its id (VQA: ``ImageIndex`` finds it by the
  JSON's ``image_id``).

Captions: COCO captions JSON (``{"annotations": [{"image_id", "caption"}, ...]}``) or JSON Lines
of ``{"image_id", "caption"}``. Bad records are counted and skipped with a reason (see
``butd_features``), as are duplicate image ids and images without a caption. A shard is written
to ``NAME.partial`` and renamed when complete; a shard that exists is complete and is skipped
when the command runs again, so an interrupted import resumes (inputs are read in the same
order, so the same samples land in the same shards).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
from typing import Iterator, Optional

import fsspec
import numpy as np

from vlbert.cli.common import add_renamed_flag, command_parser, console_script
from vlbert.data.butd_features import (BUTD_COLUMNS, LXMERT_COLUMNS, BadRecord, RegionRecord, parse_record,
                                       read_tsv, read_vlbert_json)
from vlbert.data.region_features import FEATURES_EXT, REGIONS_EXT, encode_npy
from vlbert.data.shards import SkipCounter, expand_urls

_DIGITS = re.compile(r"(\d+)\D*$")


# --------------------------------------------------------------------------- inputs


def tsv_records(urls: list[str], columns: tuple[str, ...], counter: SkipCounter) -> Iterator[RegionRecord]:
    for url in urls:
        with fsspec.open(url, "r", encoding="utf-8", newline="") as f:
            for row in read_tsv(f, columns):
                try:
                    yield parse_record(row)
                except BadRecord as e:
                    counter.add(e.reason)


def json_records(urls: list[str], counter: SkipCounter) -> Iterator[RegionRecord]:
    for url in urls:
        with fsspec.open(url, "rb") as f:
            data = f.read()
        m = _DIGITS.search(url.rsplit("/", 1)[-1].split(".", 1)[0])
        try:
            yield parse_record(read_vlbert_json(data, int(m.group(1)) if m else None), with_classes=True)
        except BadRecord as e:
            counter.add(e.reason)


def read_captions(url: str) -> dict[int, list[str]]:
    """image id -> captions, from COCO captions JSON or JSON Lines of {image_id, caption}."""
    with fsspec.open(url, "r", encoding="utf-8") as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except ValueError:  # not one JSON document: JSON Lines
        obj = None
    rows = obj["annotations"] if isinstance(obj, dict) and "annotations" in obj else None
    if rows is None:  # JSON Lines (one line parses as a document too)
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise ValueError(f"{url}: neither COCO captions JSON nor JSON Lines: {e}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{url}: expected {{'annotations': [{{image_id, caption}}, ...]}} or JSON Lines")
    out: dict[int, list[str]] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("image_id"), int) or not isinstance(r.get("caption"), str):
            raise ValueError(f"{url}: caption {i} needs an integer image_id and a string caption: {str(r)[:80]}")
        out.setdefault(r["image_id"], []).append(r["caption"])
    return out


# --------------------------------------------------------------------------- output


def sample_files(rec: RegionRecord, caption: Optional[str]) -> dict[str, bytes]:
    """The shard members of one sample. Raises ``BadRecord`` when a feature overflows float16."""
    feats = rec.features.astype(np.float16)
    if not np.isfinite(feats).all():
        raise BadRecord("nonfinite_features", "a feature exceeds the float16 range")
    meta = {"image_id": rec.image_id, "width": rec.width, "height": rec.height,
            "boxes": [[round(float(v), 2) for v in b] for b in rec.boxes]}
    files = {FEATURES_EXT: encode_npy(feats)}
    if rec.classes is not None:
        meta["box_scores"] = [round(float(v), 4) for v in rec.classes.max(axis=1)]
        files[REGIONS_EXT] = encode_npy(rec.classes.astype(np.float16))
    files["json"] = json.dumps(meta).encode()
    if caption is not None:
        files["txt"] = caption.encode("utf-8")
    return files


class ShardWriter:
    """Samples -> ``<output>/<prefix>-NNNNN.tar``, ``per_shard`` each, written to ``.partial`` and
    renamed when full (or at ``close``). Shards that exist are skipped (their samples counted)."""

    def __init__(self, output: str, prefix: str, per_shard: int):
        self.fs, self.root = fsspec.core.url_to_fs(output)
        self.fs.makedirs(self.root, exist_ok=True)
        self.prefix, self.per_shard = prefix, per_shard
        self.index, self.in_shard = 0, 0
        self.tar, self.file = None, None
        self.stats = {"samples": 0, "shards_written": 0, "shards_skipped": 0}

    def path(self, index: int) -> str:
        return f"{self.root.rstrip('/')}/{self.prefix}-{index:05d}.tar"

    def add(self, key: str, files: dict[str, bytes]) -> None:
        if self.in_shard == 0:
            exists = self.fs.exists(self.path(self.index))
            self.stats["shards_skipped" if exists else "shards_written"] += 1
            if not exists:
                self.file = self.fs.open(self.path(self.index) + ".partial", "wb")
                self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.GNU_FORMAT)
        if self.tar is not None:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                self.tar.addfile(info, io.BytesIO(data))
        self.in_shard += 1
        self.stats["samples"] += 1
        if self.in_shard == self.per_shard:
            self._finish()

    def _finish(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.file.close()
            self.fs.mv(self.path(self.index) + ".partial", self.path(self.index))
            self.tar = self.file = None
        self.index, self.in_shard = self.index + 1, 0

    def close(self) -> None:
        if self.in_shard:
            self._finish()


def import_records(records: Iterator[RegionRecord], writer: ShardWriter, counter: SkipCounter,
                   captions: Optional[dict[int, list[str]]]) -> dict:
    """Write every good record (once per caption with ``captions``); returns the counts."""
    seen: set[int] = set()
    images = 0
    for rec in records:
        if rec.image_id in seen:
            counter.add("duplicate_image")
            continue
        seen.add(rec.image_id)
        texts = [None] if captions is None else captions.get(rec.image_id, [])
        if not texts:
            counter.add("no_caption")
            continue
        try:
            files = [sample_files(rec, t) for t in texts]
        except BadRecord as e:
            counter.add(e.reason)
            continue
        images += 1
        for k, f in enumerate(files):
            key = f"{rec.image_id:012d}" if captions is None else f"{rec.image_id:012d}_{k}"
            writer.add(key, f)
    writer.close()
    out = {"images": images, **writer.stats, "skipped": counter.as_dict()}
    if captions is not None:
        out["captions_without_features"] = sum(len(v) for k, v in captions.items() if k not in seen)
    return out


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = command_parser("vlbert-import-features", __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tsv", nargs="+", help="bottom-up-attention TSV files (URLs or patterns)")
    src.add_argument("--json", nargs="+", help="VL-BERT per-image JSON files (URLs or patterns)")
    p.add_argument("--columns", default="butd",
                   help="TSV columns: butd (default), lxmert, or a comma-separated list of names")
    p.add_argument("--captions", default="", help="COCO captions JSON or JSON Lines {image_id, caption}")
    p.add_argument("--out", required=True, help="output folder (any fsspec URL)")
    add_renamed_flag(p, "--output", "--out", "out")
    p.add_argument("--prefix", default="features", help="shard name prefix")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="samples per shard")
    add_renamed_flag(p, "--per-shard", "--rows-per-shard", "rows_per_shard", type=int)
    args = p.parse_args(argv)
    if args.rows_per_shard < 1:
        p.error("--rows-per-shard must be positive")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the import; returns the counts (also printed as JSON to stderr)."""
    opts = parse_args(argv)
    counter = SkipCounter()
    if opts.tsv:
        named = {"butd": BUTD_COLUMNS, "lxmert": LXMERT_COLUMNS}
        columns = named.get(opts.columns) or tuple(c.strip() for c in opts.columns.split(","))
        records = tsv_records(expand_urls(opts.tsv), columns, counter)
    else:
        records = json_records(expand_urls(opts.json), counter)
    captions = read_captions(opts.captions) if opts.captions else None
    writer = ShardWriter(opts.out, opts.prefix, opts.rows_per_shard)
    stats = import_records(records, writer, counter, captions)
    print(json.dumps(stats), file=sys.stderr)
    return stats


cli = console_script(main)

if __name__ == "__main__":
    sys.exit(cli())
