"""VCR as a fine-tuning task (the surface of ``VQATask``: train_set, eval_sets, build_model,
predict, score, write_predictions).

Training items: every question once per subtask in ``vcr.subtasks`` (QA->R with the right
answer in the context). Evaluation on ``val``: Q->A, and QA->R given the right answer;
on ``test`` (``vlbert-evaluate --split test``): Q->A and QA->R given each of the four
answers, written as the leaderboard CSV (``metric.LEADERBOARD_COLUMNS``) beside the
predictions JSON.

Questions whose image is missing (absent from the shards, or unreadable with its metadata) are
counted as VQA and RefCOCO+ count them (``vlbert.tasks.missing``): they stay in the denominator of
Q->A, QA->R and Q->AR and score 0, ``<split>/missing_images`` reports them, and more than
``eval.max_missing_fraction`` of a split is an error (checked before predicting for the images
absent from the shards, and again when scoring). The predictions hold every question of the split,
an empty ``VCRPrediction`` (nulls in the JSON) for one not predicted; the leaderboard CSV gives it
uniform probabilities (``metric.complete_for_leaderboard``).
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional

import fsspec
import torch

from vlbert.tasks.config import FinetuneConfig, VCRSplitConfig
from vlbert.tasks.missing import check_missing, missing_metrics
from vlbert.tasks.sampling import eval_batches
from vlbert.tasks.vcr.data import NUM_CHOICES, Q2A, QA2R, Item, MemberIndex, VCRDataset, load_vcr_jsonl
from vlbert.tasks.vcr.metric import VCRPrediction, complete_for_leaderboard, vcr_accuracies, write_leaderboard_csv
from vlbert.tasks.vcr.model import VLBertForVCR
from vlbert.tasks.vcr.tokens import COCO_CATEGORIES
from vlbert.train import dist

log = logging.getLogger(__name__)


class VCREvalSet:
    """A split to predict: ``dataset`` holds the questions whose image is in the shards, ``annot_ids``
    every question read from the jsonl (the denominator), ``labels`` annot_id -> (answer_label,
    rationale_label) of every question ({} for test)."""

    def __init__(self, name: str, dataset: VCRDataset, labels: dict[str, tuple[int, int]], annot_ids: list[str]):
        self.name, self.dataset, self.labels, self.annot_ids = name, dataset, labels, annot_ids


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
        examples = dataset.examples
        # Fail before predicting when the shards lack too many of the split's images.
        check_missing(name, dataset.missing_images, len(examples), self.cfg.eval.max_missing_fraction, "questions")
        # Every question, those without an image included: the denominator of the accuracies.
        labels = {ex.annot_id: (ex.answer_label, ex.rationale_label) for ex in examples} if labelled else {}
        return VCREvalSet(name, dataset, labels, [ex.annot_id for ex in examples])

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
        """annot_id -> probabilities of every question of the split (in file order), gathered on all
        ranks; an empty ``VCRPrediction`` where nothing could be predicted (image absent or
        unreadable). ``forward(batch)`` runs the model."""
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
        out = {annot_id: VCRPrediction() for annot_id in eval_set.annot_ids}
        for part in dist.all_gather_object(mine):
            for k, p in part.items():
                item = dataset.items[k]
                pred = out[dataset.examples[item.example].annot_id]
                if item.subtask == Q2A:
                    pred.answer = p
                else:
                    pred.rationale[item.answer] = p
        return out

    def score(self, eval_set: VCREvalSet, predictions: dict[str, VCRPrediction]) -> dict[str, float]:
        """Q->A, QA->R and Q->AR (percent; val) over every question of the split, and
        ``<split>/missing_images``: the questions without any prediction, which count as wrong
        (``vlbert.tasks.missing``; ValueError past ``eval.max_missing_fraction``)."""
        missing = sum(a not in predictions or predictions[a].empty for a in eval_set.annot_ids)
        metrics = missing_metrics(eval_set.name, missing, len(eval_set.annot_ids), self.cfg.eval.max_missing_fraction,
                                  "questions")
        return {**vcr_accuracies(predictions, eval_set.labels, self.subtasks, eval_set.name), **metrics}

    def write_predictions(self, url: str, predictions: dict[str, VCRPrediction]) -> None:
        """The probabilities as JSON (nulls for a question not predicted); when the answers and the
        rationales given each answer were scored (the test split, both subtasks), also the
        leaderboard CSV (``..._predictions.json`` -> ``..._leaderboard.csv``), a row for every
        question, uniform probabilities where it has none (``metric.complete_for_leaderboard``)."""
        with fsspec.open(url, "w") as f:
            json.dump({k: p.to_json() for k, p in sorted(predictions.items())}, f)
        if any(p.leaderboard_ready for p in predictions.values()):
            csv_url = url[: -len("_predictions.json")] + "_leaderboard.csv" if url.endswith("_predictions.json") \
                else url + ".leaderboard.csv"
            rows, filled = complete_for_leaderboard(predictions)
            write_leaderboard_csv(csv_url, rows)
            log.info("leaderboard CSV: %s (%d questions, %d of them without a prediction: uniform probabilities)",
                     csv_url, len(rows), filled)
