"""Caption image decode: full decode + resize (baseline) vs ours (JPEG draft, then resize).

    PYTHONPATH=. python bench/bench_caption_decode.py [--n 20]

Prints ms per image for a few source sizes at the paper's short side 600 / long 1000.
"""

import argparse
import io
import time

import numpy as np
from PIL import Image

from vlbert.config import CaptionDataConfig
from vlbert.data.captions import _decode_image, target_size


def photo(w: int, h: int) -> bytes:
    """A smooth image with texture, JPEG quality 90 (closer to a photo than pure noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def baseline(data: bytes, cfg: CaptionDataConfig) -> Image.Image:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return img.resize(target_size(*img.size, cfg.short_side, cfg.max_long_side), Image.BILINEAR)


def timeit(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20)
    a = p.parse_args()
    cfg = CaptionDataConfig()
    for w, h in [(500, 375), (1600, 1200), (4000, 3000)]:
        data = photo(w, h)
        assert baseline(data, cfg).size == _decode_image(data, cfg)[0].size
        b = timeit(lambda: baseline(data, cfg), a.n)
        o = timeit(lambda: _decode_image(data, cfg), a.n)
        print(f"{w}x{h} -> short side {cfg.short_side}: baseline {b:.1f} ms, ours {o:.1f} ms, speed-up {b / o:.2f}x")


if __name__ == "__main__":
    main()
