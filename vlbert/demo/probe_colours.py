"""Probe a pretrained demo model: fill in masked colour words, with the image and with it blanked.

    vlbert-probe-colours --config configs/demo.yaml [--set KEY=VALUE ...]

Reads the weights that training exported (``<runtime.output_dir>/model.safetensors``),
the held-out caption shards (``data.validation``) without any other masking, and the
colour words from the demo manifest. With ``detector.source: features`` (configs/demo_features.yaml)
the shards' stored box features take the place of the pixels, and blanking zeroes them
(vlbert/demo/probe.py). Prints both accuracies and chance, writes them
to ``<output_dir>/probe.json`` and logs them to the run's MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from vlbert.cli.common import add_overrides, command_parser, overrides
from vlbert.config import ConfigError, MaskingConfig, load_config


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = command_parser("vlbert-probe-colours", __doc__)
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--weights", default=None, help="default: <runtime.output_dir>/model.safetensors")
    p.add_argument("--manifest", default=None, help="demo manifest with colour_words; default: "
                   "manifest.json beside data.tokenizer")
    p.add_argument("--batch-size", type=int, default=32)
    add_overrides(p, "runtime.output_dir=runs/demo")
    args = p.parse_args(argv)
    args.overrides = overrides(args)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from vlbert.data.mixture import build_validation_stream
    from vlbert.model.pretraining import VLBertForPretraining
    from vlbert.model.vlbert import bert_architecture
    from vlbert.demo.probe import colour_fill_accuracy
    from vlbert.tracking import build_tracker

    out_dir = Path(cfg.runtime.output_dir)
    weights = Path(args.weights or out_dir / "model.safetensors")
    manifest = Path(args.manifest or Path(cfg.data.tokenizer).parent / "manifest.json")
    for path, what in ((weights, "model weights (does training finish?)"), (manifest, "demo manifest")):
        if not path.is_file():
            print(f"error: {path}: {what} not found", file=sys.stderr)
            return 1
    if not cfg.data.validation.urls:
        print("error: data.validation.urls is empty: nothing to probe on", file=sys.stderr)
        return 1

    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer or cfg.model.bert)
    colours = json.loads(manifest.read_text())["colour_words"]
    ids = [tokenizer.convert_tokens_to_ids(w) for w in colours]
    if tokenizer.unk_token_id in ids:
        print(f"error: not every colour word is one token of the tokenizer: {colours}", file=sys.stderr)
        return 1

    model = VLBertForPretraining(cfg.model, cfg.detector, bert_architecture(cfg.model))
    model.load_state_dict(load_file(str(weights)), strict=True)
    no_masking = MaskingConfig(mlm_prob=0.0, roi_prob=0.0)
    data_cfg = dataclasses.replace(cfg.data, num_workers=0)
    batches = build_validation_stream(data_cfg, no_masking, tokenizer, rank=0, world_size=1,
                                      batch_size=args.batch_size, features=cfg.detector.source == "features")
    results = colour_fill_accuracy(model, batches, torch.tensor(ids), tokenizer.mask_token_id)

    chance = 1.0 / len(colours)
    summary = {
        "probe_colour_acc_with_image": results["with_image"].accuracy,
        "probe_colour_acc_blanked": results["blanked"].accuracy,
        "probe_colour_queries": results["with_image"].total,
        "probe_colour_chance": chance,
    }
    print(f"colour probe on {results['with_image'].total} masked colour words "
          f"({len(colours)} colours, chance {chance:.2f}):")
    print(f"  with the image : {summary['probe_colour_acc_with_image']:.3f}")
    print(f"  image blanked  : {summary['probe_colour_acc_blanked']:.3f}")
    (out_dir / "probe.json").write_text(json.dumps(summary, indent=2) + "\n")

    info_path = out_dir / "model.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if cfg.tracking.enabled and (info.get("mlflow_run_id") or info.get("mlflow_run_key")):
        tracking = dataclasses.replace(cfg.tracking, system_metrics=False)  # a few seconds of work
        # The training run's spool: what training left unsent goes first, then the summary.
        tracker = build_tracker(tracking, rank=0, run_id=info.get("mlflow_run_id"), run_key=info.get("mlflow_run_key"),
                                spool_dir=cfg.tracking.spool_dir or str(out_dir / "mlflow_spool"))
        tracker.log_summary(summary, int(info.get("step", 0)))
        tracker.close("FINISHED")
        if tracker.unsent:
            print(f"  MLflow unavailable: the summary waits in {tracker.spool_dir} (see the warning above)")
        else:
            print(f"  logged to MLflow run {tracker.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
