"""RefCOCO+ data: REFER annotations (refs + COCO instances, ``unc`` split), samples, batches.

Sequence: ``[CLS] expression [SEP] RoI_1 ... RoI_k [END]`` (text segment 0).
RoIs are the detected boxes (``boxes: detected``: the image shard's JSON, or a
detections file, ``detections.read_detections``) or every COCO ground-truth box
of the image (``boxes: gt``). With ``train_add_gt`` the training set appends
every COCO box of the image to the detected ones, as the reference's
``TRAIN_BOXES: "proposal+gt"`` (jackroos/VL-BERT refcoco/data/datasets/refcoco.py);
evaluation sets never do. A RoI is a
positive training example when its IoU with the referred object's box is
above ``positive_iou``. Box 0, the whole image, is labelled the same way and
can be chosen, as in the reference (which adds the image as a box with
``ADD_IMAGE_AS_A_BOX`` and labels every box by IoU).

The REFER toolkit ships ``refs(unc).p``, a Python 2 pickle of plain dicts and
lists; it is read with an unpickler that refuses to build any class, so a
tampered file cannot run code. A JSON list of the same records works too.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Optional

import fsspec
import numpy as np
import torch

from vlbert.config import CaptionDataConfig
from vlbert.batch import _to
from vlbert.tasks.images import ImageIndex, decode_image_sample
from vlbert.tasks.refcoco.metric import box_iou
from vlbert.tasks.sampling import ItemBatchDataset, flips
from vlbert.tasks.vqa.answers import swap_left_right
from vlbert.tasks.vqa.data import collate_images, read_json


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refs file wants to build {module}.{name}; only plain data is allowed")


def read_refs(url: str) -> list[dict]:
    """REFER refs: a pickle (``refs(unc).p``, read without building any class) or a JSON list."""
    if url.endswith((".p", ".pkl", ".pickle")):
        with fsspec.open(url, "rb") as f:
            refs = _PlainUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    else:
        refs = read_json(url)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{url}: expected a list of REFER ref records")
    return refs


def xywh_to_xyxy(box) -> np.ndarray:
    x, y, w, h = (float(v) for v in box)
    return np.array([x, y, x + w, y + h], np.float64)


@dataclass
class Expression:
    """One referring expression (a sentence of a ref)."""

    sent_id: int
    ref_id: int
    image_id: int
    text: str
    gt_box: np.ndarray  # float64 [4] x1, y1, x2, y2 in the stored image's pixels
    image_boxes: np.ndarray  # float64 [m, 4] every COCO box of the image (for boxes: gt)


def load_refcoco(refs_url: str, instances_url: str, splits: list[str]) -> dict[str, list[Expression]]:
    """Expressions of each split (``train``, ``val``, ``testA``, ``testB``)."""
    refs = read_refs(refs_url)
    instances = read_json(instances_url)
    if not isinstance(instances, dict) or not isinstance(instances.get("annotations"), list):
        raise ValueError(f"{instances_url}: expected COCO instances with 'annotations'")
    anns = {int(a["id"]): a for a in instances["annotations"]}
    by_image: dict[int, list] = {}
    for a in instances["annotations"]:
        by_image.setdefault(int(a["image_id"]), []).append(xywh_to_xyxy(a["bbox"]))
    out: dict[str, list[Expression]] = {s: [] for s in splits}
    for i, ref in enumerate(refs):
        split = ref.get("split")
        if split not in out:
            continue
        try:
            ann = anns[int(ref["ann_id"])]
        except KeyError:
            raise ValueError(f"{refs_url}: ref {i} names annotation {ref.get('ann_id')} missing from "
                             f"{instances_url}") from None
        image_id = int(ref["image_id"])
        for sent in ref.get("sentences", []):
            out[split].append(Expression(int(sent["sent_id"]), int(ref["ref_id"]), image_id, str(sent["sent"]),
                                         xywh_to_xyxy(ann["bbox"]), np.stack(by_image[image_id])))
    return out


# --------------------------------------------------------------------------- samples


@dataclass
class RefSample:
    sent_id: int
    input_ids: np.ndarray  # int64 [T]: [CLS] expression [SEP]
    image: np.ndarray
    boxes: np.ndarray  # float32 [n, 4], box 0 = whole image
    image_size: tuple[int, int]
    gt_box: np.ndarray  # float32 [4] in the pixels of ``image`` (flipped with it)
    labels: np.ndarray  # float32 [n]: IoU(box, gt) > positive_iou (box 0 included)
    scale: tuple[float, float]  # (sx, sy): stored pixels -> pixels of ``image``


def make_ref_sample(e: Expression, files: dict[str, bytes], image_cfg: CaptionDataConfig, tokenizer,
                    max_tokens: int, use_gt_boxes: bool, positive_iou: float, flip: bool,
                    detected: Optional[np.ndarray] = None, add_gt: bool = False) -> RefSample:
    """``use_gt_boxes``: the RoIs are the image's COCO boxes. Otherwise the detected boxes:
    ``detected`` (float [n, 4] stored pixels, e.g. from a detections file) or, when None, the
    shard JSON's; ``add_gt`` appends the image's COCO boxes to them."""
    if use_gt_boxes:
        boxes, extra = e.image_boxes, None
    else:
        boxes, extra = detected, (e.image_boxes if add_gt else None)
    image = decode_image_sample(files, image_cfg, flip, boxes=boxes, extra_boxes=extra)
    sx, sy = image.scale
    gt = e.gt_box * np.array([sx, sy, sx, sy])
    text = e.text
    if flip:
        w = image.image_size[1]
        gt = np.array([w - gt[2], gt[1], w - gt[0], gt[3]])
        text = swap_left_right(text)
    ids = tokenizer(text, truncation=True, max_length=max_tokens + 2)["input_ids"]
    labels = (box_iou(image.boxes, gt) > positive_iou).astype(np.float32)
    return RefSample(e.sent_id, np.asarray(ids, np.int64), image.image, image.boxes, image.image_size,
                     gt.astype(np.float32), labels, (sx, sy))


@dataclass
class RefBatch:
    """input_ids long [B, T]; attention_mask bool [B, T]; images, image_sizes, boxes [B, R, 4],
    box_mask [B, R] as in VQABatch; labels float [B, R]; gt_boxes float [B, 4]; sent_ids long [B];
    scales float [B, 4]: (sx, sy, sx, sy) from stored pixels to the resized image."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: torch.Tensor
    image_sizes: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
    labels: torch.Tensor
    gt_boxes: torch.Tensor
    sent_ids: torch.Tensor
    scales: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "RefBatch":
        return _to(self, device, non_blocking)


def collate_refs(samples: list[RefSample]) -> RefBatch:
    b, t = len(samples), max(len(s.input_ids) for s in samples)
    input_ids = torch.zeros(b, t, dtype=torch.long)
    attention_mask = torch.zeros(b, t, dtype=torch.bool)
    images, image_sizes, boxes, box_mask = collate_images(samples)
    labels = torch.zeros(box_mask.shape, dtype=torch.float32)
    for i, s in enumerate(samples):
        input_ids[i, :len(s.input_ids)] = torch.from_numpy(s.input_ids)
        attention_mask[i, :len(s.input_ids)] = True
        labels[i, :len(s.labels)] = torch.from_numpy(s.labels)
    return RefBatch(input_ids, attention_mask, images, image_sizes, boxes, box_mask, labels,
                    torch.from_numpy(np.stack([s.gt_box for s in samples])),
                    torch.tensor([s.sent_id for s in samples], dtype=torch.long),
                    torch.tensor([[*s.scale, *s.scale] for s in samples], dtype=torch.float32))


class RefDataset(ItemBatchDataset):
    """Expressions whose image is in the shards; items ``(index, epoch)`` as ``VQADataset``."""

    def __init__(self, expressions: list[Expression], images: ImageIndex, image_cfg: CaptionDataConfig, tokenizer,
                 max_tokens: int, use_gt_boxes: bool, positive_iou: float, seed: int = 0, train: bool = True,
                 add_gt: bool = False, detections: Optional[dict[int, np.ndarray]] = None):
        """``add_gt``: append the image's COCO boxes to the detected ones (the training set of the
        reference's recipe); ``detections``: image id -> detected boxes (``read_detections``), used
        instead of the shard JSON's; an image it lacks has no detected box."""
        self.expressions = [e for e in expressions if e.image_id in images]
        if not self.expressions:
            raise ValueError(f"none of the {len(expressions)} expressions has its image in the shards")
        self.missing_images = len(expressions) - len(self.expressions)
        self.images, self.image_cfg, self.tokenizer = images, image_cfg, tokenizer
        self.max_tokens, self.use_gt_boxes, self.positive_iou = max_tokens, use_gt_boxes, positive_iou
        self.seed, self.train = seed, train
        self.add_gt, self.detections = add_gt and not use_gt_boxes, detections
        self.without_detections = 0 if detections is None else len({e.image_id for e in self.expressions
                                                                     if e.image_id not in detections})

    def __len__(self) -> int:
        return len(self.expressions)

    def sample(self, index: int, epoch: int) -> RefSample:
        e = self.expressions[index]
        flip = self.train and flips(self.seed, epoch, index, self.image_cfg.flip_prob)
        detected = None
        if self.detections is not None:
            detected = self.detections.get(e.image_id, np.zeros((0, 4)))
        return make_ref_sample(e, self.images.read(e.image_id), self.image_cfg, self.tokenizer, self.max_tokens,
                               self.use_gt_boxes, self.positive_iou, flip, detected, self.add_gt)

    def collate(self, samples: list[RefSample]) -> RefBatch:
        return collate_refs(samples)
