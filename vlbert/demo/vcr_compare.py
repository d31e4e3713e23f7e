"""The VCR fine-tuning demo: does visual-linguistic pretraining help? VCR on the demo scenes.

    vlbert-make-demo-vcr --out demo_vcr
    vlbert-compare-vcr-demo --pretrained runs/demo/model.safetensors [--seeds 0 1 2] [--set KEY=VALUE ...]

Fine-tunes ``configs/vcr_demo.yaml`` once per seed from the demo pretraining run and once per
seed from the same network without that pretraining (``vlbert.demo.finetune_compare``); prints
Q->A, QA->R and Q->AR on the held-out questions (mean and standard deviation over seeds), the
gap on Q->AR and the seeds the pretrained arm won, and writes ``<out>/summary.json``. Each
fine-tune is an MLflow run in experiment ``vlbert-vcr-demo``.
"""

from __future__ import annotations

import sys
from typing import Optional

from vlbert.cli.common import console_script
from vlbert.demo.finetune_compare import DemoTask, compare_main

VCR = DemoTask("vcr", "VCR accuracy", "configs/vcr_demo.yaml", "runs/vcr_demo", "val/q2ar_acc", "Q->AR")


def main(argv: Optional[list[str]] = None) -> dict:
    return compare_main(VCR, "vlbert-compare-vcr-demo", __doc__, argv)


cli = console_script(main)

if __name__ == "__main__":
    sys.exit(cli())
