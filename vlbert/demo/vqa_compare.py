"""The fine-tuning demo: does visual-linguistic pretraining help? VQA on the demo scenes.

    vlbert-make-demo-vqa --out demo_vqa
    vlbert-compare-vqa-demo --pretrained runs/demo/model.safetensors [--seeds 0 1 2] [--set KEY=VALUE ...]

Fine-tunes ``configs/vqa_demo.yaml`` once per seed from the demo pretraining run and once
per seed from the same network without that pretraining (``vlbert.demo.finetune_compare``);
prints the official VQA accuracy on the held-out questions (mean and standard deviation over
seeds, per answer type) and writes ``<out>/summary.json``. Each fine-tune is an MLflow run in
experiment ``vlbert-vqa-demo``.
"""

from __future__ import annotations

import sys
from typing import Optional

from vlbert.cli.common import console_script
from vlbert.demo.finetune_compare import DemoTask, compare_main

VQA = DemoTask("vqa", "VQA accuracy", "configs/vqa_demo.yaml", "runs/vqa_demo", "val/vqa_acc", "VQA accuracy")


def main(argv: Optional[list[str]] = None) -> dict:
    return compare_main(VQA, "vlbert-compare-vqa-demo", __doc__, argv)


cli = console_script(main)

if __name__ == "__main__":
    sys.exit(cli())
