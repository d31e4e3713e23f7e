"""VQA v2 data: the official JSON files, question encoding, samples, batches.

Sequence (DESIGN.md section 7)::

    [CLS] question [SEP] [MASK] [SEP]  RoI_1 ... RoI_k [END]
    segment 0 ............  1 ......  2 ...............

The answer is read at ``[MASK]``. Flipping an image (training only, with
probability ``image.flip_prob``) swaps "left" and "right" in the question and
in the human answers before the targets are made.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Optional

import fsspec
import numpy as np
import torch

from vlbert.config import CaptionDataConfig
from vlbert.batch import _to
from vlbert.model.embeddings import SEGMENT_A, SEGMENT_B
from vlbert.tasks.images import ImageIndex, decode_feature_sample, decode_image_sample
from vlbert.tasks.sampling import ItemBatchDataset, flips
from vlbert.tasks.vqa.answers import AnswerVocab, answer_targets, swap_left_right

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- official files


@dataclass
class VQAQuestion:
    question_id: int
    image_id: int
    question: str
    answers: Optional[list[str]] = None  # the 10 human answers; None without annotations (test)
    answer_type: str = ""
    question_type: str = ""


def read_json(url: str):
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: not valid JSON: {e}") from None


def load_vqa_split(questions_url: str, annotations_url: str = "") -> tuple[list[VQAQuestion], list[dict]]:
    """Questions (with their human answers when ``annotations_url`` is given) and the raw
    annotation records (for ``evaluate_vqa``), in the questions file's order."""
    qdata = read_json(questions_url)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise ValueError(f"{questions_url}: expected {{'questions': [{{image_id, question, question_id}}, ...]}}")
    questions = []
    for i, q in enumerate(qdata["questions"]):
        try:
            questions.append(VQAQuestion(int(q["question_id"]), int(q["image_id"]), str(q["question"])))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{questions_url}: question {i} lacks image_id, question or question_id: {q!r}") from None
    annotations: list[dict] = []
    if annotations_url:
        adata = read_json(annotations_url)
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise ValueError(f"{annotations_url}: expected {{'annotations': [...]}}")
        by_id = {}
        for i, a in enumerate(adata["annotations"]):
            if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("answers"), list) \
                    or not a["answers"] or not all(isinstance(x, dict) and "answer" in x for x in a["answers"]):
                raise ValueError(f"{annotations_url}: annotation {i} needs question_id and answers [{{answer}}]")
            by_id[int(a["question_id"])] = a
        missing = [q.question_id for q in questions if q.question_id not in by_id]
        if missing:
            raise ValueError(f"{annotations_url}: no annotation for {len(missing)} questions of {questions_url} "
                             f"(first {missing[:3]})")
        for q in questions:
            a = by_id[q.question_id]
            q.answers = [str(x["answer"]) for x in a["answers"]]
            q.answer_type, q.question_type = str(a.get("answer_type", "")), str(a.get("question_type", ""))
            annotations.append(a)
    return questions, annotations


# --------------------------------------------------------------------------- samples


def encode_question(question: str, tokenizer, max_question_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``[CLS] question [SEP] [MASK] [SEP]``: (ids int64 [T], segments int64 [T], index of [MASK])."""
    ids = tokenizer(question, add_special_tokens=False, truncation=True, max_length=max_question_tokens)["input_ids"]
    seq = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id, tokenizer.mask_token_id, tokenizer.sep_token_id]
    seg = [SEGMENT_A] * (len(ids) + 2) + [SEGMENT_B] * 2
    return np.asarray(seq, np.int64), np.asarray(seg, np.int64), len(ids) + 2


@dataclass
class VQASample:
    question_id: int
    input_ids: np.ndarray  # int64 [T]
    token_type_ids: np.ndarray  # int64 [T]
    mask_position: int
    image: Optional[np.ndarray]  # uint8 [3, h, w]; None with stored features
    boxes: np.ndarray  # float32 [n, 4], box 0 = whole image
    image_size: tuple[int, int]
    targets: Optional[dict[int, float]]  # answer index -> soft score; None without answers
    flipped: bool = False
    features: Optional[np.ndarray] = None  # float [n, D] stored box features (detector.source: features)


def make_vqa_sample(q: VQAQuestion, files: dict[str, bytes], image_cfg: CaptionDataConfig, tokenizer,
                    vocab: Optional[AnswerVocab], max_question_tokens: int, flip: bool,
                    features: bool = False) -> VQASample:
    image = decode_feature_sample(files, image_cfg, flip) if features else decode_image_sample(files, image_cfg, flip)
    question, answers = q.question, q.answers
    if flip:
        question = swap_left_right(question)
        answers = [swap_left_right(a) for a in answers] if answers is not None else None
    ids, seg, mask_pos = encode_question(question, tokenizer, max_question_tokens)
    targets = answer_targets(answers, vocab) if answers is not None and vocab is not None else None
    return VQASample(q.question_id, ids, seg, mask_pos, image.image, image.boxes, image.image_size, targets, flip,
                     image.features)


@dataclass
class VQABatch:
    """input_ids, token_type_ids: long [B, T] (padded with 0); attention_mask: bool [B, T];
    mask_position: long [B], text slot of [MASK]; images uint8 [B, 3, H, W] (None with stored
    features); image_sizes long [B, 2] (h, w); boxes float [B, R, 4]; box_mask bool [B, R];
    targets float [B, A] soft scores or None; question_ids long [B]; features float [B, R, D]
    stored box features or None."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_position: torch.Tensor
    images: Optional[torch.Tensor]
    image_sizes: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
    question_ids: torch.Tensor
    targets: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "VQABatch":
        return _to(self, device, non_blocking)


def collate_features(samples) -> Optional[torch.Tensor]:
    """Stored box features [B, R, D] padded with 0, or None when the samples carry images."""
    if all(getattr(s, "features", None) is None for s in samples):
        return None
    if any(getattr(s, "features", None) is None for s in samples):
        raise ValueError("some samples carry features and others images")
    dims = {(s.features.shape[1], s.features.dtype) for s in samples}
    if len(dims) != 1:
        raise ValueError(f"samples disagree on the feature width or dtype: {sorted(map(str, dims))}")
    dim, dtype = dims.pop()
    out = torch.zeros(len(samples), max(len(s.boxes) for s in samples), dim,
                      dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    for i, s in enumerate(samples):
        out[i, :len(s.features)] = torch.from_numpy(s.features)
    return out


def collate_images(samples, pad_to_multiple: int = 32):
    """Pad images and boxes: (images, image_sizes, boxes, box_mask); images is None when the
    samples carry stored features instead (``collate_features``)."""
    b = len(samples)
    r = max(len(s.boxes) for s in samples)
    m = max(1, pad_to_multiple)
    if all(s.image is None for s in samples):
        image_sizes = torch.tensor([list(s.image_size) for s in samples], dtype=torch.long)
        boxes = torch.zeros(b, r, 4, dtype=torch.float32)
        box_mask = torch.zeros(b, r, dtype=torch.bool)
        for i, s in enumerate(samples):
            boxes[i, :len(s.boxes)] = torch.from_numpy(s.boxes)
            box_mask[i, :len(s.boxes)] = True
        return None, image_sizes, boxes, box_mask
    hh = math.ceil(max(s.image.shape[1] for s in samples) / m) * m
    ww = math.ceil(max(s.image.shape[2] for s in samples) / m) * m
    images = torch.zeros(b, 3, hh, ww, dtype=torch.uint8)
    images_np = images.numpy()
    image_sizes = torch.zeros(b, 2, dtype=torch.long)
    boxes = torch.zeros(b, r, 4, dtype=torch.float32)
    box_mask = torch.zeros(b, r, dtype=torch.bool)
    for i, s in enumerate(samples):
        _, h, w = s.image.shape
        images_np[i, :, :h, :w] = s.image
        image_sizes[i, 0], image_sizes[i, 1] = h, w
        boxes[i, :len(s.boxes)] = torch.from_numpy(s.boxes)
        box_mask[i, :len(s.boxes)] = True
    return images, image_sizes, boxes, box_mask


def collate_vqa(samples: list[VQASample], num_answers: int, pad_to_multiple: int = 32) -> VQABatch:
    if not samples:
        raise ValueError("collate_vqa needs at least one sample")
    b, t = len(samples), max(len(s.input_ids) for s in samples)
    input_ids = torch.zeros(b, t, dtype=torch.long)
    token_type_ids = torch.zeros(b, t, dtype=torch.long)
    attention_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.from_numpy(s.input_ids)
        token_type_ids[i, :n] = torch.from_numpy(s.token_type_ids)
        attention_mask[i, :n] = True
    targets = None
    if all(s.targets is not None for s in samples):
        targets = torch.zeros(b, num_answers, dtype=torch.float32)
        for i, s in enumerate(samples):
            for k, v in s.targets.items():
                targets[i, k] = v
    images, image_sizes, boxes, box_mask = collate_images(samples, pad_to_multiple)
    return VQABatch(
        input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
        mask_position=torch.tensor([s.mask_position for s in samples], dtype=torch.long),
        images=images, image_sizes=image_sizes, boxes=boxes, box_mask=box_mask,
        question_ids=torch.tensor([s.question_id for s in samples], dtype=torch.long), targets=targets,
        features=collate_features(samples),
    )


# --------------------------------------------------------------------------- data set


class VQADataset(ItemBatchDataset):
    """Questions whose image is in the shards. Items are ``(index, epoch)`` pairs
    (``sampling.EpochBatchSampler``); epoch -1 = evaluation (no flip). Flips are
    drawn from ``(seed, epoch, index)``. ``get_batch`` returns a collated batch;
    a question whose image cannot be decoded is left out of it and counted in
    ``skipped``."""

    def __init__(self, questions: list[VQAQuestion], images: ImageIndex, image_cfg: CaptionDataConfig,
                 tokenizer, vocab: Optional[AnswerVocab], max_question_tokens: int, seed: int = 0,
                 train: bool = True, features: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("VQA data needs a fast (Rust) Hugging Face tokenizer")
        self.missing_images = sum(q.image_id not in images for q in questions)
        self.questions = [q for q in questions if q.image_id in images]
        if not self.questions:
            raise ValueError(f"none of the {len(questions)} questions has its image in the shards "
                             f"({len(images)} images indexed)")
        if self.missing_images:
            log.warning("%d of %d questions have no image in the shards; left out", self.missing_images,
                        len(questions))
        self.images, self.image_cfg, self.tokenizer, self.vocab = images, image_cfg, tokenizer, vocab
        self.max_question_tokens, self.seed, self.train = max_question_tokens, seed, train
        self.features = features  # read stored box features, not pixels (detector.source: features)
        self.num_answers = len(vocab) if vocab is not None else 0

    def __len__(self) -> int:
        return len(self.questions)

    def sample(self, index: int, epoch: int) -> VQASample:
        q = self.questions[index]
        flip = self.train and flips(self.seed, epoch, index, self.image_cfg.flip_prob)
        return make_vqa_sample(q, self.images.read(q.image_id), self.image_cfg, self.tokenizer, self.vocab,
                               self.max_question_tokens, flip, self.features)

    def collate(self, samples: list[VQASample]) -> VQABatch:
        return collate_vqa(samples, self.num_answers)
