"""Detector cost per image of the e2e recipe: the res4 pass versus res5 per RoI (multiply-adds).

    python bench/detector_roi_cost.py [--config configs/base_e2e.yaml] [--height 600 --width 1000]

Counts the multiply-adds (torch FlopCounterMode; FLOPs / 2) of the config's detector on
meta tensors (no weights, no time): the stem-to-res4 pass over one image, and res5 +
pooling for one RoI; then the detector cost of an image with 100 RoIs (the paper's
maximum) and with the joint sequence cap (``data.captions.max_sequence_length``: RoIs =
cap - caption tokens, for the longest and the shortest caption), relative to res4
alone. Counts, not timings: the baseline (res4) is counted in the same run.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlbert.config import load_config
from vlbert.model.detector import RegionFeatureExtractor


def macs(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/base_e2e.yaml")
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--width", type=int, default=1000)
    args = p.parse_args()
    cfg = load_config(args.config, check_files=False)
    det = RegionFeatureExtractor(cfg.detector).eval()
    det = det.to("meta")
    image = torch.empty(1, 3, args.height, args.width, device="meta")
    res4_macs = macs(lambda: det.res4(image))
    S = det.cfg.roi_size
    pooled = torch.empty(1, det.detector.backbone.layer3[-1].conv3.out_channels, S, S, device="meta")
    head = det.detector.roi_head.shared_head
    roi_macs = macs(lambda: head(pooled).mean(dim=(2, 3)))
    cap, max_tokens = cfg.data.captions.max_sequence_length, cfg.data.captions.max_caption_tokens
    print(f"res4 pass {args.height}x{args.width}: {res4_macs / 1e9:.1f} GMAC; res5 per {S}x{S} RoI: "
          f"{roi_macs / 1e9:.2f} GMAC")
    rows = [("100 RoIs (paper's maximum)", 100)]
    if cap:
        rows += [(f"cap {cap}, {max_tokens}-token caption", cap - max_tokens), (f"cap {cap}, 3-token caption", cap - 3)]
    for name, rois in rows:
        total = res4_macs + rois * roi_macs
        print(f"{name}: {rois} RoIs, {total / 1e9:.0f} GMAC = {total / res4_macs:.2f}x the res4 pass")


if __name__ == "__main__":
    main()
