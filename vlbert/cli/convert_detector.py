"""Convert a published Visual Genome detector checkpoint into this project's detector weights.

    vlbert-convert-detector resnet101-pt-vgbua-0000.model --out vg_detector.pth --config configs/base_e2e.yaml
    vlbert-convert-detector SOURCE --out OUTPUT --config CONFIG
        [--format vlbert_resnet|detectron2_caffe|bua_caffe] [--set detector.depth=101]

SOURCE is one of (docs/detector.md):
- VL-BERT's ``resnet101-pt-vgbua-0000.model`` (backbone and res5 only);
- the detectron2 ports ``faster_rcnn_from_caffe.pkl`` / ``faster_rcnn_from_caffe_attr.pkl``
  (numpy pickles, read through inert stand-ins: plain numeric arrays only, nothing runs);
- MILVLG's ``bua-caffe-frcn-r101-*.pth``.
Torch files in either container (zip, or the pre-1.6 legacy format) load with
``torch.load(weights_only=True)``; the container is told by the file's first bytes.
The detector is built from the config's ``detector`` section (the e2e configs use
the ``butd_r101_vg`` preset); every one of its weights must be filled, or nothing is
written. The output (any fsspec URL) is ``{"state_dict", "meta"}``: set
``detector.checkpoint`` to it. Source weights that were not used (attribute heads)
are listed. Conventions (background index, softmax RPN, delta scaling, BGR input):
``vlbert.model.detector.convert``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Optional

import fsspec
import torch

from vlbert.cli.common import add_overrides, command_parser, console_script
from vlbert.config import DetectorConfig, load_config
from vlbert.model.detector import RegionFeatureExtractor
from vlbert.model.detector.convert import FORMATS, ConversionError, architecture_differences, convert, read_source


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = command_parser("vlbert-convert-detector", __doc__)
    p.add_argument("source", help="published checkpoint (path or fsspec URL)")
    p.add_argument("legacy_output", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="converted checkpoint to write (path or fsspec URL)")
    p.add_argument("--config", required=True, help="run config whose detector section describes the target")
    add_overrides(p, "detector.depth=101", positional=False)
    p.add_argument("--format", choices=FORMATS, help="source layout (detected from the names when omitted)")
    args = p.parse_args(argv)
    if args.legacy_output is not None:
        if args.out is not None:
            p.error("give the output once, as --out")
        print("warning: the output as a second positional argument is deprecated: write --out OUTPUT", file=sys.stderr)
        args.out = args.legacy_output
    if args.out is None:
        p.error("the following arguments are required: --out")
    return args


def convert_file(source: str, output: str, det_cfg: DetectorConfig,
                 fmt: Optional[str] = None) -> tuple[dict, RegionFeatureExtractor]:
    """Convert ``source`` for a detector built from ``det_cfg``, write ``output``, load it back
    strictly. Returns (summary, the detector holding the converted weights)."""
    with fsspec.open(source, "rb") as f:
        data = f.read()
    detector = RegionFeatureExtractor(det_cfg)
    try:
        result = convert(read_source(data), detector.detector.state_dict(), fmt,
                         num_anchor_sizes=len(det_cfg.anchor_scales), num_anchor_ratios=len(det_cfg.anchor_ratios))
    except ConversionError as e:
        raise SystemExit(f"error: {source}: {e}") from None
    buf = io.BytesIO()
    torch.save(result.checkpoint(source), buf)
    with fsspec.open(output, "wb") as f:
        f.write(buf.getvalue())
    # The written file loads into the detector it was made for (strict: see load_checkpoint).
    detector.load_checkpoint(output)
    summary = {"source_format": result.source_format, "parts": result.parts, "weights": len(result.state_dict),
               "unused_source_keys": result.unused, "output": output,
               "architecture_differences": architecture_differences(result.source_format, det_cfg)}
    return summary, detector


def main(argv: Optional[list[str]] = None) -> dict:
    """Convert; returns (and prints to stderr as JSON) the summary."""
    opts = parse_args(argv)
    det_cfg = load_config(opts.config, opts.overrides, check_files=False).detector
    summary, _ = convert_file(opts.source, opts.out, det_cfg, opts.format)
    print(json.dumps(summary, indent=1), file=sys.stderr)
    for line in summary["architecture_differences"]:
        print(f"note: {line}", file=sys.stderr)
    return summary


cli = console_script(main)

if __name__ == "__main__":
    sys.exit(cli())
