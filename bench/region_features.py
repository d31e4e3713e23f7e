"""A pretraining step on stored region features vs the same step with the frozen detector on pixels.

Same process, same samples: a demo caption shard is made, ``vlbert-extract-regions --features``
turns it into a shard carrying boxes, class scores and each box's pooled feature, and both
streams read that shard with the same seed (so the same captions, boxes and masks). The pixel
model runs the frozen detector (``detector.trainable: false``, as the demo); the feature model
reads the features (``detector.source: features``). A step = forward, backward, AdamW step on
one micro-batch. Iterations alternate which model goes first; ratio = median pixel step time /
median feature step time. The loader's samples/s (decode + collate, captions only, no workers)
is measured on both shard kinds too.

    python bench/region_features.py                  # configs/demo.yaml sizes (random weights)
    python bench/region_features.py --image-size 600 --iters 3   # images of the recipes' short side

The step ratio is bounded by (detector + encoder) / encoder: with the demo's small encoder and
64-pixel images the encoder is a third of the pixel step; the detector's share grows with the
image (``--image-size``), the encoder's does not.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlbert.batch import PretrainBatch
from vlbert.config import load_config

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--images", type=int, default=64, help="images in the bench shard")
    p.add_argument("--loader-batches", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64,
                   help="side of the bench's square images, and the short and long side they are read at")
    return p.parse_args(argv)


def _stream(cfg, tok, features: bool, captions: int, text: int):
    from vlbert.data.mixture import build_pretrain_stream

    return iter(build_pretrain_stream(cfg.data, cfg.masking, tok, 0, 1, captions, text, features=features))


def _step(model, opt, batch: PretrainBatch) -> float:
    t = time.perf_counter()
    out = model(batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    from transformers import AutoTokenizer

    from vlbert.cli.extract_regions import main as extract
    from vlbert.demo.make_data import make_demo_data
    from vlbert.model.pretraining import VLBertForPretraining

    opts = parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_demo_data(root / "data", train_shards=1, per_shard=opts.images, val=4, size=opts.image_size, book_files=1,
                       docs_per_file=20, wiki_docs=20)
        size = [f"data.captions.short_side={opts.image_size}", f"data.captions.max_long_side={opts.image_size}"]
        extract(["--config", opts.config, "--set", "detector.checkpoint=", *(a for kv in size for a in ("--set", kv)),
                 "--input",
                 str(root / "data/captions/train-00000.tar"), "--out", str(root / "feats"), "--features",
                 "--device", "cpu", "--batch-size", "16"])
        common = [f"data.tokenizer={root / 'data/tokenizer'}", f"data.captions.urls=[{root / 'feats/train-00000.tar'}]",
                  "data.validation.urls=[]", "detector.checkpoint=", "data.num_workers=0",
                  f"data.text.sources.books.urls=[{root / 'data/text/books-*.jsonl'}]",
                  f"data.text.sources.wiki.urls=[{root / 'data/text/wiki-*.parquet'}]", *size]
        pix = load_config(opts.config, common, check_files=False)
        feat = load_config(opts.config, common + ["detector.source=features", "detector.roi_targets=precomputed",
                                                  f"detector.feature_dim={512}"], check_files=False)
        tok = AutoTokenizer.from_pretrained(pix.data.tokenizer)
        b = pix.data.captions_per_step, pix.data.text_per_step
        models = {}
        for name, cfg in (("pixels", pix), ("features", feat)):
            torch.manual_seed(0)
            m = VLBertForPretraining.from_config(cfg.model, cfg.detector).train()
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            models[name] = (m, opt, next(_stream(cfg, tok, name == "features", *b)))
        assert models["pixels"][2].captions.keys == models["features"][2].captions.keys  # the same samples
        times = {"pixels": [], "features": []}
        for i in range(opts.iters + 1):
            order = ["pixels", "features"] if i % 2 else ["features", "pixels"]
            for name in order:
                m, opt, batch = models[name]
                dt = _step(m, opt, batch)
                if i:  # the first iteration warms up
                    times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        loader = {}
        for name, cfg in (("pixels", pix), ("features", feat)):
            it = _stream(cfg, tok, name == "features", b[0], 0)
            next(it)  # opening the shard
            t = time.perf_counter()
            for _ in range(opts.loader_batches):
                next(it)
            loader[name] = opts.loader_batches * b[0] / (time.perf_counter() - t)
    result = {"step_s": med, "step_ratio": med["pixels"] / med["features"], "loader_samples_per_s": loader,
              "loader_ratio": loader["features"] / loader["pixels"], "batch": {"captions": b[0], "text": b[1]},
              "image_size": opts.image_size,
              "threads": torch.get_num_threads()}
    print(f"step: pixels {med['pixels'] * 1e3:.1f} ms, features {med['features'] * 1e3:.1f} ms, "
          f"ratio {result['step_ratio']:.2f}x (captions {b[0]} + text {b[1]}, {opts.image_size}-pixel images, "
          f"{torch.get_num_threads()} threads)")
    print(f"loader: pixels {loader['pixels']:.1f} samples/s, features {loader['features']:.1f} samples/s, "
          f"ratio {result['loader_ratio']:.2f}x")
    return result


if __name__ == "__main__":
    main()
