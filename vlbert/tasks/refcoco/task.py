"""RefCOCO+ as a fine-tuning task (same surface as ``VQATask``).

Evaluation sets are ``refcoco.val_splits`` (val, testA, testB); the metric is
the fraction of expressions whose top-scored box has IoU >= 0.5 with the
referred object, in percent. Predictions are written as
``[{"sent_id": int, "box": [x1, y1, x2, y2]}]`` in the stored image's pixels.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import fsspec
import torch

from vlbert.tasks.config import FinetuneConfig
from vlbert.tasks.images import ImageIndex
from vlbert.tasks.missing import check_missing, missing_metrics
from vlbert.tasks.refcoco.data import RefDataset, load_refcoco
from vlbert.tasks.refcoco.detections import read_detections
from vlbert.tasks.refcoco.metric import refcoco_accuracy
from vlbert.tasks.refcoco.model import VLBertForRefCOCO
from vlbert.tasks.sampling import eval_batches
from vlbert.train import dist

log = logging.getLogger(__name__)


class RefEvalSet:
    """A split to predict: ``dataset`` holds the expressions whose image is in the shards,
    ``expressions`` all of them (the denominator of the accuracy)."""

    def __init__(self, name: str, dataset: RefDataset, expressions: list = ()):
        self.name, self.dataset = name, dataset
        self.expressions = list(expressions) or list(dataset.expressions)


class RefCOCOTask:
    name = "refcoco"

    def __init__(self, cfg: FinetuneConfig, tokenizer):
        self.cfg, self.c, self.tokenizer = cfg, cfg.refcoco, tokenizer
        splits = [self.c.train_split, *self.c.val_splits]
        self.expressions = load_refcoco(self.c.refs, self.c.instances, splits)
        # A split name the refs file does not have (a typo, another split scheme) would otherwise
        # be found only when it is scored, after training: it has no accuracy.
        empty = [s for s in self.c.val_splits if not self.expressions[s]]
        if empty:
            raise ValueError(f"refcoco.val_splits: {self.c.refs} has no referring expression in split(s) "
                             f"{', '.join(empty)}")
        self.images = ImageIndex(self.c.images)
        self.detections = None
        if self.c.detections and self.c.boxes == "detected":
            self.detections, skipped = read_detections(self.c.detections)
            if skipped:
                log.warning("%s: %d detections skipped (%s)", self.c.detections, sum(skipped.values()), skipped)

    def _dataset(self, split: str, train: bool) -> RefDataset:
        """Training adds the ground-truth boxes when ``refcoco.train_add_gt``; evaluation never does."""
        dataset = RefDataset(self.expressions[split], self.images, self.c.image, self.tokenizer,
                             self.c.max_expression_tokens, self.c.boxes == "gt", self.c.positive_iou,
                             seed=self.c.seed, train=train, add_gt=train and self.c.train_add_gt,
                             detections=self.detections)
        if dataset.without_detections:
            log.warning("%s: %d images have no box in %s; only the whole-image box is scored there", split,
                        dataset.without_detections, self.c.detections)
        return dataset

    def train_set(self) -> RefDataset:
        return self._dataset(self.c.train_split, train=True)

    def eval_sets(self) -> list[RefEvalSet]:
        sets = []
        for split in self.c.val_splits:
            dataset = self._dataset(split, train=False)
            # Fail before predicting when the shards lack too many of the split's images.
            check_missing(split, dataset.missing_images, len(self.expressions[split]),
                          self.cfg.eval.max_missing_fraction, "expressions")
            sets.append(RefEvalSet(split, dataset, self.expressions[split]))
        return sets

    def build_model(self, starting_weights: bool = True) -> VLBertForRefCOCO:
        """With the starting weights the config names (``from_config``), or random weights in the
        same architecture, to load a fine-tuned state dict into (``for_weights``)."""
        build = VLBertForRefCOCO.from_config if starting_weights else VLBertForRefCOCO.for_weights
        return build(self.cfg.model, self.cfg.detector)

    def save_artifacts(self, out_dir) -> None:
        pass

    @torch.no_grad()
    def predict(self, forward: Callable, eval_set: RefEvalSet, rank: int, world: int) -> dict[int, list[float]]:
        """sent_id -> top box in the stored image's pixels, gathered on all ranks."""
        dataset, mine = eval_set.dataset, {}
        for items in eval_batches(len(dataset), self.c.eval_batch_size, rank, world):
            batch, skipped = dataset.get_batch(items)
            if skipped:
                log.warning("%s: %d expressions skipped (%s); they count as wrong", eval_set.name,
                            sum(skipped.values()), skipped)
            if batch is None:
                continue
            top = forward(batch).top_boxes.float().cpu() / batch.scales  # back to stored pixels
            for sent_id, box in zip(batch.sent_ids.tolist(), top.tolist()):
                mine[sent_id] = box
        out: dict[int, list[float]] = {}
        for part in dist.all_gather_object(mine):
            out.update(part)
        return out

    def score(self, eval_set: RefEvalSet, predictions: dict[int, list[float]]) -> dict[str, float]:
        """Accuracy (percent) over every expression of the split, and ``<split>/missing_images``:
        an expression without a prediction (image absent or undecodable) counts as wrong."""
        expressions = eval_set.expressions
        missing = sum(e.sent_id not in predictions for e in expressions)
        metrics = missing_metrics(eval_set.name, missing, len(expressions), self.cfg.eval.max_missing_fraction,
                                  "expressions")
        return {f"{eval_set.name}/refcoco_acc": refcoco_accuracy(expressions, predictions), **metrics}

    def write_predictions(self, url: str, predictions: dict[int, list[float]]) -> None:
        with fsspec.open(url, "w") as f:
            json.dump([{"sent_id": k, "box": v} for k, v in sorted(predictions.items())], f)

