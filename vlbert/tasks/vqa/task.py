"""VQA as a fine-tuning task: data sets, answer vocabulary, model, prediction and scoring.

The fine-tuning loop (``finetune.py``) and ``vlbert-evaluate`` talk to a task
through this small surface: ``train_set``, ``build_model``, ``eval_sets``,
``predict`` and ``score``.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from vlbert.tasks.config import FinetuneConfig, VQASplitConfig
from vlbert.tasks.images import ImageIndex
from vlbert.tasks.missing import check_missing, missing_metrics
from vlbert.tasks.sampling import eval_batches
from vlbert.tasks.vqa.answers import AnswerVocab, build_answer_vocab, write_submission
from vlbert.tasks.vqa.data import VQADataset, load_vqa_split
from vlbert.tasks.vqa.metric import evaluate_vqa
from vlbert.tasks.vqa.model import VLBertForVQA
from vlbert.train import dist

log = logging.getLogger(__name__)
ANSWERS_FILE = "answers.txt"  # the vocabulary, saved next to the fine-tuned weights


class EvalSet:
    """A data set to predict on and, when it has annotations, to score."""

    def __init__(self, name: str, dataset: VQADataset, annotations: list[dict], question_ids: list[int] = ()):
        self.name, self.dataset, self.annotations = name, dataset, annotations
        # Every question of the split, those without an image included: the denominator.
        self.question_ids = list(question_ids) or [q.question_id for q in dataset.questions]


class VQATask:
    name = "vqa"

    def __init__(self, cfg: FinetuneConfig, tokenizer, vocab: Optional[AnswerVocab] = None):
        self.cfg, self.v, self.tokenizer = cfg, cfg.vqa, tokenizer
        self._train_questions: list = []
        self._train_annotations: list[dict] = []
        for split in self.v.train:
            questions, annotations = load_vqa_split(split.questions, split.annotations)
            if not split.annotations:
                raise ValueError(f"vqa.train: {split.questions} has no annotations file; training needs answers")
            self._train_questions += questions
            self._train_annotations += annotations
        if vocab is None:
            if self.v.answers_file:
                vocab = AnswerVocab.load(self.v.answers_file)
            else:
                vocab = self._build_vocab()
        self.vocab = vocab

    def _build_vocab(self) -> AnswerVocab:
        """The vocabulary from the annotations ``vqa.answers_from`` names: the training splits, plus
        ``vqa.val`` for "train+val" (how the reference's 3129 answers were counted)."""
        annotations = list(self._train_annotations)
        if self.v.answers_from == "train+val":
            if self.v.val is None or not self.v.val.annotations:
                raise ValueError("vqa.answers_from is 'train+val' but vqa.val has no annotations file")
            annotations += load_vqa_split(self.v.val.questions, self.v.val.annotations)[1]
        if not annotations:
            raise ValueError("vqa: no answers_file and no training annotations to build the vocabulary from")
        return build_answer_vocab(annotations, self.v.min_answer_count)

    # ----------------------------------------------------------------- data

    def _dataset(self, questions, images: list[str], train: bool) -> VQADataset:
        return VQADataset(questions, ImageIndex(images), self.v.image, self.tokenizer, self.vocab,
                          self.v.max_question_tokens, seed=self.v.seed, train=train,
                          features=self.cfg.detector.source == "features")

    def train_set(self) -> VQADataset:
        if not self._train_questions:
            raise ValueError("vqa.train lists no split")
        images = [u for split in self.v.train for u in split.images]
        return self._dataset(self._train_questions, images, train=True)

    def eval_set(self, split: VQASplitConfig, name: str = "val") -> EvalSet:
        questions, annotations = load_vqa_split(split.questions, split.annotations)
        dataset = self._dataset(questions, split.images, train=False)
        # Fail before predicting when the shards lack too many of the split's images.
        check_missing(name, dataset.missing_images, len(questions), self.cfg.eval.max_missing_fraction, "questions")
        return EvalSet(name, dataset, annotations, [q.question_id for q in questions])

    def eval_sets(self) -> list[EvalSet]:
        return [self.eval_set(self.v.val)] if self.v.val is not None else []

    # ----------------------------------------------------------------- model

    def build_model(self, starting_weights: bool = True) -> VLBertForVQA:
        """With the starting weights the config names (``from_config``), or random weights in the
        same architecture, to load a fine-tuned state dict into (``for_weights``)."""
        build = VLBertForVQA.from_config if starting_weights else VLBertForVQA.for_weights
        return build(self.cfg.model, self.cfg.detector, len(self.vocab))

    def save_artifacts(self, out_dir) -> None:
        self.vocab.save(str(out_dir / ANSWERS_FILE))

    # ----------------------------------------------------------------- evaluation

    @torch.no_grad()
    def predict(self, forward: Callable, eval_set: EvalSet, rank: int, world: int) -> dict[int, str]:
        """Answers of every question, gathered on all ranks. ``forward(batch)`` runs the model."""
        dataset, mine = eval_set.dataset, {}
        batches = eval_batches(len(dataset), self.v.eval_batch_size, rank, world)
        for items in batches:
            batch, skipped = dataset.get_batch(items)
            if skipped:
                log.warning("%s: %d questions skipped (%s); they score 0", eval_set.name, sum(skipped.values()),
                            skipped)
            if batch is None:
                continue
            best = forward(batch).logits.argmax(-1).tolist()
            for qid, k in zip(batch.question_ids.tolist(), best):
                mine[qid] = self.vocab.answers[k]
        out: dict[int, str] = {}
        for part in dist.all_gather_object(mine):
            out.update(part)
        return out

    def score(self, eval_set: EvalSet, predictions: dict[int, str]) -> dict[str, float]:
        """Official accuracy (percent), overall and per answer type (without annotations: none),
        and ``<split>/missing_images``. A question without a prediction (its image absent from
        the shards or undecodable) scores 0 and stays in the denominator (``vlbert.tasks.missing``)."""
        missing = sum(int(q) not in predictions for q in eval_set.question_ids)
        metrics = missing_metrics(eval_set.name, missing, len(eval_set.question_ids),
                                  self.cfg.eval.max_missing_fraction, "questions")
        if not eval_set.annotations:
            return metrics
        full = {int(a["question_id"]): predictions.get(int(a["question_id"]), "") for a in eval_set.annotations}
        return {**evaluate_vqa(full, eval_set.annotations).metrics(f"{eval_set.name}/vqa_acc"), **metrics}

    def write_predictions(self, url: str, predictions: dict[int, str]) -> None:
        write_submission(url, predictions)
