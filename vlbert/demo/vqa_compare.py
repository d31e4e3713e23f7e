"""The fine-tuning demo: does visual-linguistic pretraining help? VQA on the demo scenes.

    vlbert-compare-vqa-demo --pretrained runs/demo/model.safetensors [--seeds 0 1 2] [--set KEY=VALUE ...]

Fine-tunes ``configs/vqa_demo.yaml`` once per seed from the demo pretraining run and once
per seed from the same network without that pretraining (random encoder, the same demo
detector), with the same data, budget and schedule; prints the official VQA accuracy on
the held-out questions (mean and standard deviation over seeds, per answer type) and writes
``<out>/summary.json``. Each fine-tune is an MLflow run in experiment ``vlbert-vqa-demo``
(tag ``vlbert.pretrain_run_id`` names the pretraining run for the pretrained arm).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Optional

from vlbert.cli.common import add_overrides, command_parser, console_script, overrides
from vlbert.tasks.config import load_finetune_config

ARMS = {"pretrained": None, "no_pretraining": ""}  # model.pretrained override (None: --pretrained)


def main(argv: Optional[list[str]] = None) -> dict:
    p = command_parser("vlbert-compare-vqa-demo", __doc__)
    p.add_argument("--config", default="configs/vqa_demo.yaml")
    p.add_argument("--pretrained", default="runs/demo/model.safetensors")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/vqa_demo")
    add_overrides(p, "optim.lr=1e-4")
    args = p.parse_args(argv)
    args.overrides = overrides(args)
    from vlbert.tasks.finetune import finetune

    scores: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm, pretrained in ARMS.items():
            cfg = load_finetune_config(args.config, [
                *args.overrides, f"model.pretrained={args.pretrained if pretrained is None else pretrained}",
                f"runtime.seed={seed}", f"vqa.seed={seed}", f"runtime.output_dir={args.out}/{arm}-seed{seed}",
                "runtime.resume=false", f"tracking.run_name={arm}-seed{seed}"])
            result = finetune(cfg)
            scores[arm].append(result.eval_metrics)
            print(f"[demo] {arm} seed {seed}: val accuracy {result.eval_metrics['val/vqa_acc']:.2f}", flush=True)

    summary: dict[str, dict] = {}
    for arm, runs in scores.items():
        summary[arm] = {}
        for key in sorted(runs[0]):
            values = [r[key] for r in runs]
            summary[arm][key] = {"mean": statistics.fmean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    gap = summary["pretrained"]["val/vqa_acc"]["mean"] - summary["no_pretraining"]["val/vqa_acc"]["mean"]
    summary["gap_points"] = gap
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"VQA accuracy on held-out demo questions ({len(args.seeds)} seeds, mean ± std):")
    for key in sorted(summary["pretrained"]):
        cells = [f"{summary[a][key]['mean']:6.2f} ± {summary[a][key]['std']:5.2f}" for a in ARMS]
        print(f"  {key:28s} pretrained {cells[0]}   no pretraining {cells[1]}")
    print(f"  pretraining gains {gap:+.2f} points")
    return summary


cli = console_script(main)

if __name__ == "__main__":
    sys.exit(cli())
