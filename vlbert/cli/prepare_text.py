"""Turn raw text dumps into text shards, or check dumps as they are.

Text shards are Parquet files with a ``text`` column, one document per row
(docs/design.md section 4). Inputs (local paths or any fsspec URL, globs and brace
ranges allowed):

  *.txt[.gz|.zst]          one document per blank-line-separated block
                           (``--txt-mode file``: one document per file)
  *.jsonl / *.json[.gz|.zst]  JSON Lines with a ``text`` field
  *.parquet                Parquet with a ``text`` column

    vlbert-prepare-text 'dumps/wiki/*.jsonl.gz' --out s3://b/wiki --rows-per-shard 20000
    vlbert-prepare-text --check 'dumps/books/*.parquet'

``--check`` reads the inputs and reports, per input, the usable rows, the
empty or bad ones (by reason) and whether the training loader can read it as
it is (JSON Lines / Parquet with a usable ``text`` field); exit status 1 when
some input is not usable as it is.
"""

from __future__ import annotations

import io
import sys
from typing import Iterator, Optional

import fsspec

from vlbert.cli.common import add_renamed_flag, command_parser
from vlbert.data.formats import reader_for
from vlbert.data.shards import ShardStream, SkipCounter, expand_urls

TXT_EXTS = (".txt", ".txt.gz", ".txt.zst", ".txt.bz2", ".txt.xz")


def _is_txt(url: str) -> bool:
    return url.lower().endswith(TXT_EXTS)


def iter_txt(url: str, mode: str, counter: SkipCounter) -> Iterator[str]:
    """Documents of a raw text file: blank-line-separated blocks, or the whole file.
    A block (or file) that is not valid UTF-8 is skipped and counted as ``bad_text``."""

    def emit(lines: list[bytes]):
        try:
            doc = b"\n".join(lines).decode("utf-8")
        except UnicodeDecodeError:
            counter.add("bad_text")
            return
        if doc.strip():
            yield doc
        else:
            counter.add("empty_text")

    with fsspec.open(url, "rb", compression="infer") as raw:
        f = raw if hasattr(raw, "peek") else io.BufferedReader(raw)
        if mode == "file":
            yield from emit([f.read()])
            return
        block: list[bytes] = []
        for line in f:
            if line.strip():
                block.append(line.rstrip(b"\r\n"))
            elif block:
                yield from emit(block)
                block = []
        if block:
            yield from emit(block)


def iter_documents(url: str, txt_mode: str, counter: SkipCounter, max_rows: Optional[int] = None) -> Iterator[str]:
    if _is_txt(url):
        docs = iter_txt(url, txt_mode, counter)
    else:
        reader_for(url)  # raises a clear error for an unknown type
        docs = (r.payload for r in ShardStream([url], 0, 1, 0, counter, shuffle=False, loop=False))
    for i, doc in enumerate(docs):
        if max_rows is not None and i >= max_rows:
            return
        yield doc


def write_shards(docs: Iterator[str], out: str, rows_per_shard: int, prefix: str = "text",
                 row_group_size: int = 1000) -> list[str]:
    """Write documents as Parquet shards ``{out}/{prefix}-00000.parquet``, ... ; returns their URLs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    written, rows = [], []

    def flush():
        url = f"{out.rstrip('/')}/{prefix}-{len(written):05d}.parquet"
        with fsspec.open(url, "wb", auto_mkdir=True) as f:
            pq.write_table(pa.table({"text": pa.array(rows, pa.string())}), f, row_group_size=row_group_size)
        written.append(url)
        rows.clear()

    for doc in docs:
        rows.append(doc)
        if len(rows) == rows_per_shard:
            flush()
    if rows:
        flush()
    return written


def check(urls: list[str], txt_mode: str, max_rows: Optional[int], out=None) -> bool:
    out = out or sys.stdout
    all_usable = True
    for url in urls:
        counter = SkipCounter()
        try:
            n = sum(1 for _ in iter_documents(url, txt_mode, counter, max_rows))
            error = ""
        except Exception as e:  # report and go on with the other inputs
            n, error = 0, f"{type(e).__name__}: {e}"
        shard_problems = {k: v for k, v in counter.as_dict().items() if k.endswith("_shard")}
        usable = not _is_txt(url) and n > 0 and not shard_problems and not error
        all_usable &= usable
        skipped = ", ".join(f"{k} {v}" for k, v in counter.as_dict().items()) or "none"
        verdict = "usable as is" if usable else ("convert with prepare_text" if _is_txt(url) and n else "NOT usable")
        print(f"{url}: {n} documents; skipped: {skipped}; {verdict}{' (' + error + ')' if error else ''}", file=out)
    return all_usable


def main(argv: Optional[list[str]] = None) -> int:
    p = command_parser("vlbert-prepare-text", __doc__)
    p.add_argument("inputs", nargs="+", help="input files, URLs, globs or brace patterns")
    p.add_argument("--out", help="output folder or URL for the Parquet shards")
    p.add_argument("--rows-per-shard", type=int, default=10000, help="documents per output shard")
    add_renamed_flag(p, "--per-shard", "--rows-per-shard", "rows_per_shard", type=int)
    p.add_argument("--prefix", default="text", help="shard file name prefix")
    p.add_argument("--txt-mode", choices=("blocks", "file"), default="blocks",
                   help="raw .txt: one document per blank-line-separated block, or per file")
    p.add_argument("--check", action="store_true", help="only read the inputs and report")
    p.add_argument("--max-rows", type=int, default=None, help="read at most this many documents per input")
    args = p.parse_args(argv)
    urls = expand_urls(args.inputs)
    if args.check:
        return 0 if check(urls, args.txt_mode, args.max_rows) else 1
    if not args.out:
        p.error("--out is required unless --check")
    if args.rows_per_shard <= 0:
        p.error("--rows-per-shard must be positive")
    counter = SkipCounter()

    def docs():
        for url in urls:
            yield from iter_documents(url, args.txt_mode, counter, args.max_rows)

    written = write_shards(docs(), args.out, args.rows_per_shard, args.prefix)
    print(f"wrote {len(written)} shards to {args.out}; skipped: {counter.as_dict() or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
