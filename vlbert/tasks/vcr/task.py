"""VCR as a fine-tuning task (the surface of ``VQATask``: train_set, eval_sets, build_model,
predict, score, write_predictions).

Training items: every question once per subtask in ``vcr.subtasks`` (QA->R with the right
answer in the context). Evaluation on ``val``: Q->A, and QA->R given the right answer;
on ``test`` (``vlbert-evaluate --split test``): Q->A and QA->R given each of the four
answers, written as the leaderboard CSV (``metric.LEADERBOARD_COLUMNS``) beside the
predictions JSON.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional

import fsspec
import torch

from vlbert.tasks.config import FinetuneConfig, VCRSplitConfig
from vlbert.tasks.sampling import eval_batches
from vlbert.tasks.vcr.data import NUM_CHOICES, Q2A, QA2R, Item, MemberIndex, VCRDataset, load_vcr_jsonl
from vlbert.tasks.vcr.metric import VCRPrediction, vcr_accuracies, write_leaderboard_csv
from vlbert.tasks.vcr.model import VLBertForVCR
from vlbert.tasks.vcr.tokens import COCO_CATEGORIES
from vlbert.train import dist

log = logging.getLogger(__name__)


class VCREvalSet:
    def __init__(self, name: str, dataset: VCRDataset, labels: dict[str, tuple[int, int]]):
        self.name, self.dataset, self.labels = name, dataset, labels  # labels: {} for test


class VCRTask:
    name = "vcr"

    def __init__(self, cfg: FinetuneConfig, tokenizer):
        self.cfg, self.v, self.tokenizer = cfg, cfg.vcr, tokenizer
        self.categories = {c: i for i, c in enumerate(self.v.categories or COCO_CATEGORIES)}
        self.subtasks = tuple(s for s in (Q2A, QA2R) if s in self.v.subtasks)

    # ----------------------------------------------------------------- data

    def _dataset(self, split: VCRSplitConfig, with_labels: bool, items_of, train: bool) -> VCRDataset:
        examples, _ = load_vcr_jsonl(split.annotations, self.categories, with_labels)
        items = [it for i, ex in enumerate(examples) for it in items_of(i, ex)]
        return VCRDataset(examples, items, MemberIndex(split.images), split.metadata, self.categories, self.v.image,
                          self.tokenizer, self.v.max_text_tokens, self.v.mask_size, seed=self.v.seed, train=train)

    def train_set(self) -> VCRDataset:
        if self.v.train is None:
            raise ValueError("vcr.train is not set")

        def items(i, ex):
            return [Item(i, s, ex.answer_label if s == QA2R else None) for s in self.subtasks]

        return self._dataset(self.v.train, True, items, train=True)

    def eval_set(self, name: str) -> VCREvalSet:
        split = getattr(self.v, name, None)
        if name not in ("val", "test") or split is None:
            raise ValueError(f"vcr.{name} is not set (evaluation splits: val, test)")
        labelled = name != "test"

        def items(i, ex):
            out = [Item(i, Q2A)] if Q2A in self.subtasks else []
            if QA2R in self.subtasks:
                answers = [ex.answer_label] if labelled else range(NUM_CHOICES)
                out += [Item(i, QA2R, a) for a in answers]
            return out

        dataset = self._dataset(split, labelled, items, train=False)
        kept = {it.example for it in dataset.items}
        labels = {dataset.examples[i].annot_id: (dataset.examples[i].answer_label, dataset.examples[i].rationale_label)
                  for i in sorted(kept)} if labelled else {}
        return VCREvalSet(name, dataset, labels)

    def eval_sets(self, split: Optional[str] = None) -> list[VCREvalSet]:
        if split is not None:
            return [self.eval_set(split)]
        return [self.eval_set("val")] if self.v.val is not None else []

    # ----------------------------------------------------------------- model

    def build_model(self, starting_weights: bool = True) -> VLBertForVCR:
        build = VLBertForVCR.from_config if starting_weights else VLBertForVCR.for_weights
        return build(self.cfg.model, self.cfg.detector, len(self.categories), self.v.aux_loss_weight)

    def save_artifacts(self, out_dir) -> None:
        pass

    # ----------------------------------------------------------------- evaluation

    @torch.no_grad()
    def predict(self, forward: Callable, eval_set: VCREvalSet, rank: int, world: int) -> dict[str, VCRPrediction]:
        """annot_id -> probabilities, gathered on all ranks. ``forward(batch)`` runs the model."""
        dataset, mine = eval_set.dataset, {}
        for items in eval_batches(len(dataset), self.v.eval_batch_size, rank, world):
            batch, skipped = dataset.get_batch(items)
            if skipped:
                log.warning("%s: %d VCR items skipped (%s); they count as wrong", eval_set.name,
                            sum(skipped.values()), skipped)
            if batch is None:
                continue
            probs = forward(batch).logits.float().softmax(-1).cpu().tolist()
            for k, p in zip(batch.items.tolist(), probs):
                mine[k] = p
        out: dict[str, VCRPrediction] = {}
        for part in dist.all_gather_object(mine):
            for k, p in part.items():
                item = dataset.items[k]
                pred = out.setdefault(dataset.examples[item.example].annot_id, VCRPrediction())
                if item.subtask == Q2A:
                    pred.answer = p
                else:
                    pred.rationale[item.answer] = p
        return out

    def score(self, eval_set: VCREvalSet, predictions: dict[str, VCRPrediction]) -> dict[str, float]:
        return vcr_accuracies(predictions, eval_set.labels, self.subtasks, eval_set.name)

    def write_predictions(self, url: str, predictions: dict[str, VCRPrediction]) -> None:
        """The probabilities as JSON; with every answer and every conditioned rationale scored (the
        test split, both subtasks), also the leaderboard CSV (``..._predictions.json`` ->
        ``..._leaderboard.csv``)."""
        with fsspec.open(url, "w") as f:
            json.dump({k: p.to_json() for k, p in sorted(predictions.items())}, f)
        complete = predictions and all(p.answer is not None and len(p.rationale) == NUM_CHOICES
                                       for p in predictions.values())
        if complete:
            csv_url = url[: -len("_predictions.json")] + "_leaderboard.csv" if url.endswith("_predictions.json") \
                else url + ".leaderboard.csv"
            write_leaderboard_csv(csv_url, predictions)
            log.info("leaderboard CSV: %s (%d questions)", csv_url, len(predictions))
