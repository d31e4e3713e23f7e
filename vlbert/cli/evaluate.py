"""Evaluate a fine-tuned VL-BERT: the official accuracy on a split, or its submission file.

    vlbert-evaluate --config configs/vqa_base.yaml --weights runs/vqa/model.safetensors --out runs/vqa/eval
    # test-dev: no annotations, so only the submission file <out>/val_predictions.json
    vlbert-evaluate --config configs/vqa_base.yaml --weights runs/vqa/model.safetensors --out sub \
        --set vqa.val.questions=v2_OpenEnded_mscoco_test-dev2015_questions.json --set vqa.val.annotations="" \
        --set 'vqa.val.images=[coco/test2015-{00000..00099}.tar]'

VCR: the val split gives Q->A, QA->R and Q->AR; the test split the leaderboard CSV
(<out>/test_leaderboard.csv):
    vlbert-evaluate --config configs/vcr_base.yaml --weights runs/vcr/model.safetensors --out sub --split test

Runs under plain python, torchrun or deepspeed (ranks split the questions). Prints the
accuracies as JSON. Exit status 2 for a config error.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from vlbert.cli.common import add_overrides, command_parser, overrides, skip_garbage_collection_at_exit
from vlbert.config import ConfigError
from vlbert.tasks.config import load_finetune_config


def main(argv: Optional[list[str]] = None) -> int:
    skip_garbage_collection_at_exit()
    p = command_parser("vlbert-evaluate", __doc__)
    p.add_argument("--config", required=True, help="the fine-tuning config (its val split is evaluated)")
    p.add_argument("--weights", required=True, help="model.safetensors of a fine-tuning run (answers.txt beside it)")
    p.add_argument("--out", default="", help="folder for <split>_predictions.json (submission format)")
    p.add_argument("--split", default=None, choices=("val", "test"),
                   help="VCR: the split to evaluate (test writes the leaderboard CSV); default: val")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    add_overrides(p, "vqa.val.questions=...")
    args = p.parse_args(argv)
    args.overrides = overrides(args)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_finetune_config(args.config, args.overrides, check_files=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from vlbert.tasks.evaluate import evaluate_finetuned

    if args.split is not None and cfg.vcr is None:
        print(f"config error: --split applies to vcr configs, not {cfg.task_name}", file=sys.stderr)
        return 2
    try:
        metrics = evaluate_finetuned(cfg, args.weights, args.out or None, args.split)
    except ConfigError as e:  # found once the model is built: a tokenizer that does not fit it
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
