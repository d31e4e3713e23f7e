"""Fine-tune VL-BERT on a downstream task (VQA v2, RefCOCO+).

    vlbert-finetune --config configs/vqa_base.yaml model.pretrained=runs/x/model.safetensors
    torchrun --nproc_per_node 8 tools/finetune.py --config configs/vqa_base.yaml ...
    deepspeed tools/finetune.py --config configs/vqa_base.yaml optim.lr=1e-4

At the end the run evaluates on its val split (``<output_dir>/val_predictions.json``,
accuracy in MLflow) and writes ``<output_dir>/model.safetensors``. Exit status: 0 when
training finished or stopped cleanly on SIGTERM/SIGUSR1 (a requeued job resumes from
the checkpoint), 2 for a config error, 1 for any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from vlbert.config import ConfigError
from vlbert.launch import parse_run_args
from vlbert.tasks.config import load_finetune_config


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_run_args(__doc__, "YAML fine-tuning config (configs/vqa_*.yaml)",
                          "model.pretrained=runs/x/model.safetensors", argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_finetune_config(args.config, args.overrides)
        from vlbert.tasks.finetune import finetune

        result = finetune(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if result.preempted:
        print(f"stopped on {result.signal} at step {result.step}; checkpoint {result.checkpoint}", file=sys.stderr)
    elif result.eval_metrics and os.environ.get("RANK", "0") == "0":
        print(json.dumps(result.eval_metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
