"""Does pretraining help a downstream task? The same fine-tuning with and without it, over seeds.

Shared by ``vlbert-compare-vqa-demo`` and ``vlbert-compare-vcr-demo``: each seed fine-tunes the
task's demo config once from a pretraining run's export and once from the same network without
that pretraining (random encoder, the same demo detector), with the same data, budget and
schedule; then the mean and standard deviation over seeds of every evaluation figure, the gap on
the headline figure and the seeds on which the pretrained arm won, printed and written to
``<out>/summary.json``. Each fine-tune is an MLflow run (tag ``vlbert.pretrain_run_id`` names the
pretraining run for the pretrained arm).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vlbert.cli.common import add_overrides, command_parser, overrides
from vlbert.tasks.config import load_finetune_config

ARMS = {"pretrained": None, "no_pretraining": ""}  # model.pretrained override (None: --pretrained)


@dataclass
class DemoTask:
    """What differs between the tasks' comparisons."""

    name: str           # the config section: vqa, vcr
    title: str          # for the printed table: "VQA accuracy"
    config: str         # the demo config
    out: str            # default output folder
    headline: str       # the figure the gap is taken on
    headline_name: str  # how the gap line names it


def summarise(scores: dict[str, list[dict[str, float]]], headline: str) -> dict:
    """Per arm and figure: mean, std (0 for one seed) and the values; the gap on ``headline``
    (pretrained minus not) and the number of seeds the pretrained arm won."""
    summary: dict[str, dict] = {}
    for arm, runs in scores.items():
        summary[arm] = {}
        for key in sorted(runs[0]):
            values = [r[key] for r in runs]
            summary[arm][key] = {"mean": statistics.fmean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    summary["gap_points"] = summary["pretrained"][headline]["mean"] - summary["no_pretraining"][headline]["mean"]
    summary["wins"] = sum(a[headline] > b[headline] for a, b in zip(scores["pretrained"], scores["no_pretraining"]))
    return summary


def compare_main(task: DemoTask, prog: str, doc: str, argv: Optional[list[str]] = None) -> dict:
    p = command_parser(prog, doc)
    p.add_argument("--config", default=task.config)
    p.add_argument("--pretrained", default="runs/demo/model.safetensors")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=task.out)
    add_overrides(p, "optim.lr=1e-4")
    args = p.parse_args(argv)
    args.overrides = overrides(args)
    from vlbert.tasks.finetune import finetune

    scores: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm, pretrained in ARMS.items():
            cfg = load_finetune_config(args.config, [
                *args.overrides, f"model.pretrained={args.pretrained if pretrained is None else pretrained}",
                f"runtime.seed={seed}", f"{task.name}.seed={seed}", f"runtime.output_dir={args.out}/{arm}-seed{seed}",
                "runtime.resume=false", f"tracking.run_name={arm}-seed{seed}"])
            result = finetune(cfg)
            scores[arm].append(result.eval_metrics)
            print(f"[demo] {arm} seed {seed}: {task.headline} {result.eval_metrics[task.headline]:.2f}", flush=True)

    summary = summarise(scores, task.headline)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{task.title} on held-out demo questions ({len(args.seeds)} seeds, mean ± std):")
    for key in sorted(summary["pretrained"]):
        cells = [f"{summary[a][key]['mean']:6.2f} ± {summary[a][key]['std']:5.2f}" for a in ARMS]
        print(f"  {key:28s} pretrained {cells[0]}   no pretraining {cells[1]}")
    print(f"  pretraining gains {summary['gap_points']:+.2f} points on {task.headline_name}; "
          f"better on {summary['wins']} of {len(args.seeds)} seeds")
    return summary
