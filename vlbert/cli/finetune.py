"""Fine-tune VL-BERT on a downstream task (VQA v2, RefCOCO+).

    vlbert-finetune --config configs/vqa_base.yaml --set model.pretrained=runs/x/model.safetensors
    torchrun --nproc_per_node 8 tools/finetune.py --config configs/vqa_base.yaml ...
    deepspeed tools/finetune.py --config configs/vqa_base.yaml --set optim.lr=1e-4

At the end the run evaluates on its val split (``<output_dir>/val_predictions.json``,
accuracy in MLflow) and writes ``<output_dir>/model.safetensors``. Exit status: 0 when
training finished or stopped cleanly on SIGTERM/SIGUSR1 (a requeued job resumes from
the checkpoint), 2 for a config error, 1 for a data error (no batch within the task's
wait_timeout_s), another job holding the output folder (its lease) or any other failure.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from vlbert.launch import run_command
from vlbert.tasks.config import load_finetune_config


def _finetune(cfg):
    from vlbert.tasks.finetune import finetune

    return finetune(cfg)


def _print_metrics(result) -> None:
    if result.eval_metrics and os.environ.get("RANK", "0") == "0":
        print(json.dumps(result.eval_metrics, indent=2, sort_keys=True))


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(argv, "vlbert-finetune", __doc__, "YAML fine-tuning config (configs/vqa_*.yaml)",
                       "model.pretrained=runs/x/model.safetensors", load_finetune_config, _finetune, _print_metrics)


if __name__ == "__main__":
    sys.exit(main())
