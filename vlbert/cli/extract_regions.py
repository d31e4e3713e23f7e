"""Detect regions in caption shards; write shards that carry boxes and class distributions.

    vlbert-extract-regions --config configs/base_e2e.yaml \\
        --input 's3://bucket/cc3m/{00000..00331}.tar' --out s3://bucket/cc3m-regions \\
        [--rank $SLURM_PROCID --world-size $SLURM_NTASKS] [--device cuda] [--set detector.checkpoint=...]

The detector is built from the config's ``detector`` section (with ``--set`` overrides);
the resize and box-selection defaults come from ``data.captions`` (short side,
long side, ``min_box_score``, ``min_boxes``, ``max_boxes``) and can be overridden.

Every input shard ``<dir>/NAME.tar`` becomes ``<out>/NAME.tar`` with the same
samples in the same order, each with (docs/design.md section 4):
- ``KEY.json``: the input JSON plus ``boxes`` [[x1, y1, x2, y2], ...] in pixels of the
  stored image, ``box_scores`` [...] (best first), ``width``/``height`` of the stored image;
- ``KEY.regions.npy``: float16 [n_boxes, num_classes], the detector's class
  distribution per box (softmax over all ``num_classes`` outputs, background last);
- with ``--features``, ``KEY.features.npy``: float16 [n_boxes, dim], each box's pooled
  appearance feature (res5 on its RoI, average-pooled; ``detect_with_features``), the input
  of ``detector.source: features`` (docs/features.md). Read with ``allow_pickle=False``.
With ``--given-boxes`` (implies ``--features``) nothing is detected: each sample keeps the boxes
of its JSON (pixels of the stored image, as ``vlbert-make-demo-data`` and annotated data sets
write them), its ``box_scores`` and its ``regions.npy`` (the detector's class distribution of
those boxes is written only where the sample has none and the detector has a box head), and
gains the feature of every one of those boxes, in the JSON's order. A sample whose JSON has no
valid ``boxes`` list is left out and counted (``bad_boxes``).
Samples whose image is missing or cannot be decoded, or whose JSON is invalid, are
left out and counted. Shards are split over ``--world-size`` processes by index.
A shard is written to ``NAME.tar.partial`` and renamed when complete, so an existing
``NAME.tar`` is complete and is skipped when the command runs again. While it is
written the partial file is leased (``NAME.tar.partial.lease``): a second process on
the same shard exits naming the first (a lease left by a killed process is taken over
once it is gone, or after ``runtime.lease_stale_minutes`` without a heartbeat).
"""

from __future__ import annotations

import argparse
import io
import json
import posixpath
import sys
import tarfile
from typing import Iterable, Iterator, Optional

import fsspec
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vlbert.cli.common import add_overrides, add_renamed_flag, command_parser, console_script
from vlbert.config import load_config
from vlbert.data.captions import IMAGE_EXTENSIONS, target_size
from vlbert.data.formats import ShardError, iter_tar
from vlbert.data.region_features import FEATURES_EXT, encode_npy
from vlbert.data.shards import SkipCounter, expand_urls, open_shard
from vlbert.model.detector import RegionFeatureExtractor
from vlbert.train.lease import Lease, LeaseHeld, LeaseLost

Sample = tuple[str, dict[str, bytes]]


# --------------------------------------------------------------------------- shards


def read_samples(url: str, counter: SkipCounter) -> Iterator[Sample]:
    """``(key, {ext: bytes})`` of a tar shard in order; a broken shard ends early (counted)."""
    with open_shard(url) as f:
        try:
            for _, key, files, _, _ in iter_tar(f, 0, 0, 1, 0, counter):
                yield key, files
        except ShardError as e:
            counter.add(e.reason)


def write_shard(url: str, samples: Iterable[Sample], stale_after_s: float = 600.0) -> Optional[int]:
    """Stream samples into ``url + ".partial"``, then rename it to ``url``. Returns the count,
    or None when another process published ``url`` first.

    The partial file is leased (``.partial.lease``, vlbert/train/lease.py) while it is written,
    so two processes never write one: the second raises ``LeaseHeld`` naming the first."""
    fs, path = fsspec.core.url_to_fs(url)
    partial = path + ".partial"
    n = 0
    with Lease(fs.unstrip_protocol(partial + ".lease"), stale_after_s) as lease:
        if fs.exists(path):
            return None
        with fs.open(partial, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for key, files in samples:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
                n += 1
        lease.check()  # still ours: no other process took this shard over meanwhile
        fs.mv(partial, path)
    return n


def output_url(output: str, input_url: str) -> str:
    return output.rstrip("/") + "/" + posixpath.basename(input_url.split("?", 1)[0])


# --------------------------------------------------------------------------- samples


def decode_image(data: bytes, short_side: int, max_long_side: int,
                 max_pixels: Optional[int] = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """JPEG/PNG/WebP bytes -> (uint8 [3, h, w] RGB resized, stored (width, height)).
    Raises ValueError, also for an image of over ``max_pixels`` (checked before decoding)."""
    try:
        img = Image.open(io.BytesIO(data))
        size = img.size
        if max_pixels is not None and size[0] * size[1] > max_pixels:
            raise ValueError(f"{size[0]}x{size[1]} pixels, over {max_pixels}")
        tw, th = target_size(*size, short_side, max_long_side)
        img = img.convert("RGB")  # forces the full decode: truncated or corrupt data fails here
        if img.size != (tw, th):
            img = img.resize((tw, th), Image.BILINEAR)
    except Exception as e:  # PIL raises many types
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), size


def annotate(files: dict[str, bytes], boxes: torch.Tensor, scores: torch.Tensor, probs: torch.Tensor,
             meta: dict, scale: tuple[float, float], size: tuple[int, int],
             features: Optional[torch.Tensor] = None) -> dict[str, bytes]:
    """The sample's files with the detections added (boxes scaled back to the stored image), and
    the boxes' features [n, dim] as float16 ``features.npy`` when given."""
    sx, sy = scale
    w, h = size
    b = (boxes.float().cpu() * torch.tensor([sx, sy, sx, sy])).clamp(min=0)
    b = torch.minimum(b, torch.tensor([w, h, w, h], dtype=torch.float))
    meta = dict(meta, width=w, height=h, boxes=[[round(v, 2) for v in row] for row in b.tolist()],
                box_scores=[round(v, 4) for v in scores.float().cpu().tolist()])
    buf = io.BytesIO()
    np.save(buf, probs.float().cpu().numpy().astype(np.float16), allow_pickle=False)
    out = {k: v for k, v in files.items() if k not in ("json", "regions.npy", FEATURES_EXT)}
    out["json"] = json.dumps(meta).encode()
    out["regions.npy"] = buf.getvalue()
    if features is not None:
        out[FEATURES_EXT] = encode_npy(features.float().cpu().numpy().astype(np.float16))
    return out


def _prepare(files: dict[str, bytes], opts, counter: SkipCounter):
    """(image [3, h, w], meta, stored size) or None when the sample is skipped (counted)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if ext is None:
        counter.add("missing_image")
        return None
    meta: dict = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            counter.add("bad_json")
            return None
    try:
        image, size = decode_image(files[ext], opts.short_side, opts.max_long_side, opts.max_image_pixels)
    except ValueError:
        counter.add("corrupt_image")
        return None
    if opts.given_boxes:
        boxes = given_boxes(meta, size)
        if boxes is None:
            counter.add("bad_boxes")
            return None
        meta = dict(meta, boxes=boxes)
    return image, meta, size


def given_boxes(meta: dict, size: tuple[int, int]) -> Optional[list[list[float]]]:
    """The JSON's ``boxes`` when every one is 4 finite numbers with x1 < x2, y1 < y2 inside the
    stored image of ``size`` (width, height), and there is at least one; else None."""
    boxes = meta.get("boxes")
    if not isinstance(boxes, list) or not boxes:
        return None
    w, h = size
    for b in boxes:
        if (not isinstance(b, list) or len(b) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
            return None
        x1, y1, x2, y2 = (float(v) for v in b)
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):  # also false for NaN
            return None
    return [[float(v) for v in b] for b in boxes]


def _pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    H, W = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    padded = torch.zeros(len(images), 3, H, W, dtype=torch.uint8)
    for i, img in enumerate(images):
        padded[i, :, : img.shape[1], : img.shape[2]] = img
    return padded


@torch.no_grad()
def features_of_given_boxes(detector: RegionFeatureExtractor, batch: list, opts) -> list[Sample]:
    """batch: [(key, files, image [3, h, w], meta, size)] -> samples with the features of their
    own JSON boxes added (``--given-boxes``; the module docstring says what is kept)."""
    images = [x[2] for x in batch]
    padded = _pad_images(images)
    rows = []
    for _, _, img, meta, size in batch:
        sx, sy = img.shape[2] / size[0], img.shape[1] / size[1]  # stored pixels -> resized pixels
        rows.append(torch.tensor(meta["boxes"], dtype=torch.float) * torch.tensor([sx, sy, sx, sy]))
    R = max(len(r) for r in rows)
    boxes = torch.zeros(len(batch), R, 4)
    box_mask = torch.zeros(len(batch), R, dtype=torch.bool)
    for i, r in enumerate(rows):
        boxes[i, : len(r)], box_mask[i, : len(r)] = r, True
    device = next(detector.parameters()).device
    padded, boxes, box_mask = padded.to(device), boxes.to(device), box_mask.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.bf16):
        feats = detector(padded, boxes, box_mask)
        need_probs = detector.has_heads and any("regions.npy" not in x[1] for x in batch)
        probs = detector.class_probs(padded, boxes, box_mask) if need_probs else None
    out = []
    for i, ((key, files, _, meta, size), r) in enumerate(zip(batch, rows)):
        n = len(r)
        files = {k: v for k, v in files.items() if k != FEATURES_EXT}
        files["json"] = json.dumps(dict(meta, width=size[0], height=size[1])).encode()
        files[FEATURES_EXT] = encode_npy(feats[i, :n].float().cpu().numpy().astype(np.float16))
        if "regions.npy" not in files and probs is not None:
            files["regions.npy"] = encode_npy(probs[i, :n].float().cpu().numpy().astype(np.float16))
        out.append((key, files))
    return out


def detect_batch(detector: RegionFeatureExtractor, batch: list, opts) -> list[Sample]:
    """batch: [(key, files, image [3, h, w], meta, size)] -> annotated samples."""
    if opts.given_boxes:
        return features_of_given_boxes(detector, batch, opts)
    images = [x[2] for x in batch]
    padded = _pad_images(images)
    sizes = torch.tensor([[i.shape[1], i.shape[2]] for i in images])
    device = next(detector.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.bf16):
        results = detector.detect_with_features(
            padded.to(device), score_thr=opts.score_thr, min_boxes=opts.min_boxes, max_boxes=opts.max_boxes,
            image_sizes=sizes, num_proposals=opts.num_proposals)
    out = []
    for (key, files, img, meta, size), (boxes, scores, probs, feats) in zip(batch, results):
        scale = (size[0] / img.shape[2], size[1] / img.shape[1])
        out.append((key, annotate(files, boxes, scores, probs, meta, scale, size,
                                  feats if opts.features else None)))
    return out


def process_shard(detector, in_url: str, opts, counter: SkipCounter, bar: tqdm) -> Iterator[Sample]:
    """Annotated samples of one input shard, detected ``opts.batch_size`` at a time."""
    batch = []
    for key, files in read_samples(in_url, counter):
        prepared = _prepare(files, opts, counter)
        bar.update(1)
        if prepared is None:
            continue
        batch.append((key, files, *prepared))
        if len(batch) == opts.batch_size:
            yield from detect_batch(detector, batch, opts)
            batch = []
    if batch:
        yield from detect_batch(detector, batch, opts)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = command_parser("vlbert-extract-regions", __doc__)
    p.add_argument("--config", required=True, help="run config YAML (its detector and data.captions sections)")
    add_overrides(p, "detector.checkpoint=s3://b/vg.pth", positional=False)
    p.add_argument("--input", nargs="+", required=True, help="caption shard URLs or patterns (braces, globs)")
    p.add_argument("--out", required=True, help="output folder (any fsspec URL)")
    add_renamed_flag(p, "--output", "--out", "out")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="run the detector under bf16 autocast")
    p.add_argument("--num-proposals", type=int, default=300, help="RPN proposals classified per image")
    p.add_argument("--features", action="store_true",
                   help="also write each box's pooled feature (KEY.features.npy, float16 [n_boxes, dim])")
    p.add_argument("--given-boxes", action="store_true",
                   help="detect nothing: write the features of each sample's own JSON boxes, keeping those "
                        "boxes, their scores and regions.npy (implies --features)")
    for name, kind in (("score-thr", float), ("min-boxes", int), ("max-boxes", int), ("short-side", int),
                       ("max-long-side", int), ("max-image-pixels", int)):
        p.add_argument(f"--{name}", type=kind, default=None, help="default: from data.captions")
    args = p.parse_args(argv)
    args.features = args.features or args.given_boxes
    if not 0 <= args.rank < args.world_size:
        p.error(f"--rank must be in [0, --world-size), got {args.rank} of {args.world_size}")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the extraction; returns the counts (also printed as JSON to stderr)."""
    opts = parse_args(argv)
    cfg = load_config(opts.config, opts.overrides, check_files=False)
    caps = cfg.data.captions
    defaults = dict(score_thr=caps.min_box_score, min_boxes=caps.min_boxes, max_boxes=caps.max_boxes,
                    short_side=caps.short_side, max_long_side=caps.max_long_side,
                    max_image_pixels=caps.max_image_pixels)
    for name, value in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)

    urls = expand_urls(opts.input)
    outs = [output_url(opts.out, u) for u in urls]
    if len(set(outs)) != len(outs):
        raise SystemExit("error: input shards with the same file name would overwrite each other in --out")
    mine = list(range(opts.rank, len(urls), opts.world_size))
    if not cfg.detector.checkpoint:
        print("warning: detector.checkpoint is empty: regions come from a randomly initialised detector",
              file=sys.stderr)
    detector = RegionFeatureExtractor.from_config(cfg.detector).eval().to(opts.device)
    fs, root = fsspec.core.url_to_fs(opts.out)
    fs.makedirs(root, exist_ok=True)

    counter = SkipCounter()
    stats = {"shards": len(mine), "shards_done": 0, "shards_skipped": 0, "samples_written": 0}
    with tqdm(unit="img", desc=f"rank {opts.rank}/{opts.world_size}", dynamic_ncols=True) as bar:
        for i in mine:
            if fs.exists(fsspec.core.url_to_fs(outs[i])[1]):
                stats["shards_skipped"] += 1
                continue
            bar.set_postfix(shard=posixpath.basename(outs[i]), skipped=counter.total())
            try:
                n = write_shard(outs[i], process_shard(detector, urls[i], opts, counter, bar),
                                cfg.runtime.lease_stale_minutes * 60)
            except (LeaseHeld, LeaseLost) as e:
                raise SystemExit(f"error: {e}") from None
            if n is None:  # another process published it meanwhile
                stats["shards_skipped"] += 1
                continue
            stats["samples_written"] += n
            stats["shards_done"] += 1
    stats["skipped_samples"] = counter.as_dict()
    print(json.dumps(stats), file=sys.stderr)
    return stats


cli = console_script(main)

if __name__ == "__main__":
    sys.exit(cli())
