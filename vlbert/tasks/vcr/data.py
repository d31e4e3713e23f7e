"""VCR data: the release's jsonl and metadata files, region masks, 4-choice samples and batches.

The release format (rowanz/r2c, dataloaders/vcr.py; jackroos/VL-BERT,
vcr/data/datasets/vcr.py): ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl``, one
question per line with ``annot_id``, ``objects`` (a category per detection),
``img_fn``, ``metadata_fn``, ``question``, ``answer_choices`` (4),
``rationale_choices`` (4), and, except in test, ``answer_label`` and
``rationale_label``. ``metadata_fn`` names a JSON with the image's ``boxes``
(``[x1, y1, x2, y2, score]`` per detection), ``segms`` (a list of polygons per
detection, each a list of ``[x, y]``), ``width`` and ``height``.

Here the jsonl and metadata files are read through fsspec (``metadata`` is the folder
that ``metadata_fn`` is relative to), and the images come from caption-style tar shards
(``vlbert.tasks.images``), found by member name: ``img_fn`` itself, or ``img_fn`` under
one top folder (``vcr1images/<img_fn>``, as the release zip holds them).

Regions: box 0 = the whole image (mask all ones), then every detection of the metadata
in its order (the reference's ``add_image_as_a_box: true``, ``only_use_relevant_dets:
false``), each with its polygons rasterised to ``mask_size`` x ``mask_size`` cells.

Sequences, one per choice (``[CLS] context [SEP] response [SEP]``, segments 0 then 1;
the RoIs and [END] follow in the model, segment 2):
- Q->A: context = question, response = answer i;
- QA->R: context = question + an answer (the right one; in test, each of the 4 in turn),
  response = rationale i.
Truncation to ``max_text_tokens`` WordPieces (specials not counted) follows the reference:
Q->A drops the last token of the longer of question and answer; QA->R drops from the
rationale while it is longer than question + answer, else from the question (down to one
token), else from the answer. (The reference shortens one question across the 4 answers;
here each choice is truncated on its own.)

Flips (training, ``image.flip_prob``) mirror the image, boxes and masks; the words stay
as they are (the reference does not swap left and right for VCR).
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Optional

import fsspec
import numpy as np
import torch
from matplotlib.path import Path as PolygonPath
from PIL import Image

from vlbert.batch import _to
from vlbert.config import CaptionDataConfig
from vlbert.data.captions import BadSample, _decode_image
from vlbert.data.shards import expand_urls
from vlbert.model.embeddings import SEGMENT_A, SEGMENT_B
from vlbert.tasks.sampling import ItemBatchDataset, flips
from vlbert.tasks.vcr.tokens import TaggedText, encode_sentence, object_words, referenced_objects
from vlbert.tasks.vqa.data import collate_images

log = logging.getLogger(__name__)
NUM_CHOICES = 4
Q2A, QA2R = "q2a", "qa2r"
SUBTASKS = (Q2A, QA2R)


# --------------------------------------------------------------------------- annotations


@dataclass
class VCRExample:
    annot_id: str
    line: int  # 0-based line in its jsonl (names persons; see tokens.py)
    img_fn: str
    metadata_fn: str
    objects: list[str]
    question: list
    answer_choices: list[list]
    rationale_choices: list[list]
    answer_label: Optional[int] = None
    rationale_label: Optional[int] = None


def _check_example(d: dict, categories: dict[str, int], with_labels: bool) -> tuple[Optional[str], str]:
    """(skip reason, detail) for a bad record, (None, "") for a good one."""
    for key in ("objects", "img_fn", "metadata_fn", "question", "answer_choices", "rationale_choices"):
        if key not in d:
            return "missing_field", f"no {key!r}"
    objects = d["objects"]
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        return "bad_objects", "objects must be a list of category names"
    unknown = sorted({o for o in objects if o not in categories})
    if unknown:
        return "unknown_category", f"categories {unknown[:3]} not in vcr.categories"
    sentences = [d["question"]]
    for key in ("answer_choices", "rationale_choices"):
        if not isinstance(d[key], list) or len(d[key]) != NUM_CHOICES:
            return "bad_choices", f"{key} must list {NUM_CHOICES} choices"
        sentences += d[key]
    for s in sentences:
        if not isinstance(s, list) or not all(
                isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(o, int) for o in t)) for t in s):
            return "bad_sentence", f"a sentence must list words and lists of object indices: {s!r:.80}"
        bad = [o for o in referenced_objects(s) if not 0 <= o < len(objects)]
        if bad:
            return "object_out_of_range", f"object index {bad[0]} but {len(objects)} objects"
    if with_labels:
        for key in ("answer_label", "rationale_label"):
            label = d.get(key)
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_CHOICES:
                return "label_out_of_range", f"{key} = {label!r}, expected 0..{NUM_CHOICES - 1}"
    return None, ""


def load_vcr_jsonl(url: str, categories: dict[str, int], with_labels: bool) -> tuple[list[VCRExample], dict[str, int]]:
    """Examples of a VCR jsonl file, and the lines left out by reason (each logged once with
    its first line number). A line that is not JSON is a clear error (a damaged file)."""
    examples, skipped, first = [], {}, {}
    try:
        f = fsspec.open(url, "r", encoding="utf-8").open()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: VCR annotation file not found") from None
    with f:
        for n, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{url}:{n + 1}: not a JSON line: {e}") from None
            reason, detail = _check_example(d, categories, with_labels) if isinstance(d, dict) else ("bad_record", "")
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                first.setdefault(reason, f"{url}:{n + 1}: {detail}")
                continue
            examples.append(VCRExample(
                annot_id=str(d.get("annot_id", f"line-{n}")), line=n, img_fn=str(d["img_fn"]),
                metadata_fn=str(d["metadata_fn"]), objects=list(d["objects"]), question=d["question"],
                answer_choices=d["answer_choices"], rationale_choices=d["rationale_choices"],
                answer_label=d.get("answer_label") if with_labels else None,
                rationale_label=d.get("rationale_label") if with_labels else None))
    for reason, where in first.items():
        log.warning("%s: %d questions left out (%s), first at %s", url, skipped[reason], reason, where)
    if not examples:
        raise ValueError(f"{url}: no usable VCR questions (left out: {skipped or 'none; the file is empty'})")
    return examples, skipped


# --------------------------------------------------------------------------- images and metadata


class MemberIndex:
    """Tar member name -> (shard URL, data offset, size), over caption-style shards; every
    member is also reachable without its first folder (``vcr1images/a/b.jpg`` as ``a/b.jpg``)."""

    def __init__(self, patterns: list[str]):
        urls = expand_urls(patterns)
        if not urls:
            raise FileNotFoundError(f"no image shards match {patterns}")
        self.members: dict[str, tuple[str, int, int]] = {}
        for url in urls:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    if m.isfile():
                        where = (url, m.offset_data, m.size)
                        self.members.setdefault(m.name, where)
                        if "/" in m.name:
                            self.members.setdefault(m.name.split("/", 1)[1], where)

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def read(self, name: str) -> bytes:
        url, off, size = self.members[name]
        with fsspec.open(url, "rb") as f:
            f.seek(off)
            return f.read(size)


def read_metadata(root: str, metadata_fn: str) -> dict:
    """The metadata JSON of an image; ``BadSample`` when missing or malformed (a counted skip)."""
    if metadata_fn.startswith("/") or ".." in metadata_fn.split("/"):
        raise BadSample("bad_metadata", f"{metadata_fn!r} leaves the metadata folder")
    url = posixpath.join(root, metadata_fn) if root else metadata_fn
    try:
        with fsspec.open(url, "r") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise BadSample("missing_metadata", f"{url} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample("bad_metadata", f"{url}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("boxes"), list) or not isinstance(meta.get("segms"), list):
        raise BadSample("bad_metadata", f"{url}: expected {{'boxes': [...], 'segms': [...]}}")
    return meta


def rasterize_polygons(box, polygons: list, size: int) -> np.ndarray:
    """Object mask float32 [size, size] over ``box`` (x1, y1, x2, y2, continuous pixels).

    Cell (i, j) is 1 when its centre, (x1 + (j + 0.5) w / size, y1 + (i + 0.5) h / size), lies
    inside any polygon (each a list of [x, y] vertices, even-odd rule) - rowanz/r2c's sampling
    (dataloaders/mask_utils.py, ``make_mask``); the VL-BERT reference rasterises the polygon
    scaled to the grid instead (common/utils/mask.py). Raises ``BadSample('bad_polygon')`` when
    no polygon has 3 finite vertices."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    xs = x1 + (np.arange(size) + 0.5) * (x2 - x1) / size
    ys = y1 + (np.arange(size) + 0.5) * (y2 - y1) / size
    centres = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    mask = np.zeros(size * size, bool)
    usable = 0
    for poly in polygons if isinstance(polygons, list) else []:
        try:
            pts = np.asarray(poly, np.float64)
        except (TypeError, ValueError):
            continue
        if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            continue
        usable += 1
        mask |= PolygonPath(pts).contains_points(centres)
    if not usable:
        raise BadSample("bad_polygon", f"no polygon with 3 finite vertices for box {[x1, y1, x2, y2]}")
    return mask.reshape(size, size).astype(np.float32)


# --------------------------------------------------------------------------- samples


def truncate_q2a(q: TaggedText, a: TaggedText, limit: int) -> tuple[TaggedText, TaggedText]:
    """The reference's rule: while too long, drop the last token of the longer (the question on a tie)."""
    nq, na = len(q), len(a)
    while nq + na > limit:
        if na > nq:
            na -= 1
        else:
            nq -= 1
    return q.head(nq), a.head(na)


def truncate_qa2r(q: TaggedText, a: TaggedText, r: TaggedText, limit: int) -> tuple[TaggedText, TaggedText, TaggedText]:
    """The reference's rule: rationale while longer than question + answer, else the question
    down to one token, else the answer."""
    nq, na, nr = len(q), len(a), len(r)
    while nq + na + nr > limit:
        if nr > nq + na:
            nr -= 1
        elif nq > 1:
            nq -= 1
        else:
            na -= 1
    return q.head(nq), a.head(na), r.head(nr)


def pair_sequence(context: TaggedText, response: TaggedText, cls_id: int, sep_id: int) -> tuple[np.ndarray, ...]:
    """``[CLS] context [SEP] response [SEP]``: (ids, segments, region tags), int64 [T] each."""
    zero = np.zeros(1, np.int64)
    ids = np.concatenate([[cls_id], context.ids, [sep_id], response.ids, [sep_id]]).astype(np.int64)
    seg = np.concatenate([np.full(len(context) + 2, SEGMENT_A), np.full(len(response) + 1, SEGMENT_B)]).astype(np.int64)
    tags = np.concatenate([zero, context.tags, zero, response.tags, zero]).astype(np.int64)
    return ids, seg, tags


@dataclass(frozen=True)
class Item:
    """One 4-choice question to score: Q->A, or QA->R with the context's answer ``answer``."""

    example: int
    subtask: str
    answer: Optional[int] = None


@dataclass
class VCRSample:
    item_index: int
    label: Optional[int]
    input_ids: list[np.ndarray]  # 4 x int64 [T_i]
    token_type_ids: list[np.ndarray]
    text_regions: list[np.ndarray]
    image: np.ndarray  # uint8 [3, h, w]
    boxes: np.ndarray  # float32 [R, 4], box 0 = whole image
    masks: np.ndarray  # float32 [R, M, M]
    classes: np.ndarray  # int64 [R], 0 for the whole image
    image_size: tuple[int, int]


def load_regions(image_bytes: bytes, meta: dict, n_objects: int, image_cfg: CaptionDataConfig, mask_size: int,
                 flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Decode and resize the image; (pixels uint8 [3, h, w], boxes float32 [1 + n, 4] with the
    whole image first, masks float32 [1 + n, M, M], (h, w)). Raises ``BadSample``."""
    if len(meta["boxes"]) < n_objects or len(meta["segms"]) < n_objects:
        raise BadSample("object_not_in_metadata", f"{n_objects} objects but {len(meta['boxes'])} boxes and "
                                                  f"{len(meta['segms'])} segms in the metadata")
    try:
        raw = np.asarray([b[:4] for b in meta["boxes"][:n_objects]], np.float64).reshape(n_objects, 4)
    except (TypeError, ValueError):
        raise BadSample("bad_boxes", "metadata boxes must be [x1, y1, x2, y2, score] lists") from None
    masks = [np.ones((mask_size, mask_size), np.float32)]
    masks += [rasterize_polygons(raw[i], meta["segms"][i], mask_size) for i in range(n_objects)]
    img, (w0, h0) = _decode_image(image_bytes, image_cfg)
    w, h = img.size
    boxes = np.clip(raw * np.array([w / w0, h / h0, w / w0, h / h0]), 0, [w, h, w, h])
    if not np.isfinite(boxes).all() or ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise BadSample("bad_boxes", "a metadata box is empty or outside the image")
    masks = np.stack(masks)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        masks = masks[:, :, ::-1].copy()
    all_boxes = np.concatenate([np.array([[0, 0, w, h]], np.float64), boxes]).astype(np.float32)
    return np.asarray(img).transpose(2, 0, 1), all_boxes, masks, (h, w)


def encode_item(ex: VCRExample, item: Item, tokenizer, max_text_tokens: int) -> list[tuple[np.ndarray, ...]]:
    """The 4 sequences of an item: (ids, segments, tags) each."""
    names = object_words(ex.objects, ex.line)
    q = encode_sentence(ex.question, names, tokenizer)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    out = []
    if item.subtask == Q2A:
        for choice in ex.answer_choices:
            qq, aa = truncate_q2a(q, encode_sentence(choice, names, tokenizer), max_text_tokens)
            out.append(pair_sequence(qq, aa, cls_id, sep_id))
    else:
        a = encode_sentence(ex.answer_choices[item.answer], names, tokenizer)
        for choice in ex.rationale_choices:
            qq, aa, rr = truncate_qa2r(q, a, encode_sentence(choice, names, tokenizer), max_text_tokens)
            out.append(pair_sequence(qq + aa, rr, cls_id, sep_id))
    return out


# --------------------------------------------------------------------------- batches


@dataclass
class VCRBatch:
    """B questions x 4 choices, one image each.

    input_ids, token_type_ids, text_regions: long [B, 4, T] (padded with 0); attention_mask
    bool [B, 4, T]; images uint8 [B, 3, H, W]; image_sizes long [B, 2]; boxes float [B, R, 4];
    box_mask bool [B, R]; region_masks float [B, R, M, M]; classes long [B, R] (-1 on padding);
    labels long [B] (the right choice) or None; items long [B] (the data set's item numbers)."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_regions: torch.Tensor
    images: torch.Tensor
    image_sizes: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
    region_masks: torch.Tensor
    classes: torch.Tensor
    items: torch.Tensor
    labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "VCRBatch":
        return _to(self, device, non_blocking)


def collate_vcr(samples: list[VCRSample]) -> VCRBatch:
    b = len(samples)
    t = max(len(x) for s in samples for x in s.input_ids)
    text = {k: torch.zeros(b, NUM_CHOICES, t, dtype=torch.long) for k in ("ids", "seg", "reg")}
    attention = torch.zeros(b, NUM_CHOICES, t, dtype=torch.bool)
    images, image_sizes, boxes, box_mask = collate_images(samples)
    m = samples[0].masks.shape[-1]
    masks = torch.zeros(b, box_mask.shape[1], m, m)
    classes = torch.full(box_mask.shape, -1, dtype=torch.long)
    for i, s in enumerate(samples):
        for c in range(NUM_CHOICES):
            n = len(s.input_ids[c])
            text["ids"][i, c, :n] = torch.from_numpy(s.input_ids[c])
            text["seg"][i, c, :n] = torch.from_numpy(s.token_type_ids[c])
            text["reg"][i, c, :n] = torch.from_numpy(s.text_regions[c])
            attention[i, c, :n] = True
        masks[i, :len(s.masks)] = torch.from_numpy(s.masks)
        classes[i, :len(s.classes)] = torch.from_numpy(s.classes)
    labels = None
    if all(s.label is not None for s in samples):
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return VCRBatch(text["ids"], text["seg"], attention, text["reg"], images, image_sizes, boxes, box_mask, masks,
                    classes, torch.tensor([s.item_index for s in samples], dtype=torch.long), labels)


# --------------------------------------------------------------------------- data set


class VCRDataset(ItemBatchDataset):
    """Items (``Item``) over examples whose image is in the shards. Dataset items are
    ``(index, epoch)`` pairs (``sampling.EpochBatchSampler``; epoch -1 = evaluation, no flip);
    ``get_batch`` collates them and counts the ones it cannot read by reason (``BadSample``)."""

    def __init__(self, examples: list[VCRExample], items: list[Item], images: MemberIndex, metadata_root: str,
                 categories: dict[str, int], image_cfg: CaptionDataConfig, tokenizer, max_text_tokens: int,
                 mask_size: int, seed: int = 0, train: bool = True):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("VCR data needs a fast (Rust) Hugging Face tokenizer")
        self.examples, self.images, self.metadata_root = examples, images, metadata_root
        self.categories, self.image_cfg, self.tokenizer = categories, image_cfg, tokenizer
        self.max_text_tokens, self.mask_size, self.seed, self.train = max_text_tokens, mask_size, seed, train
        missing = {i for i, ex in enumerate(examples) if self._image_name(ex) is None}
        self.missing_images = len(missing)
        if missing:
            log.warning("%d of %d VCR questions have no image in the shards; left out", len(missing), len(examples))
        self.items = [it for it in items if it.example not in missing]
        if not self.items:
            raise ValueError(f"none of the {len(examples)} VCR questions has its image in the shards "
                             f"({len(images.members)} members indexed)")

    def _image_name(self, ex: VCRExample) -> Optional[str]:
        return ex.img_fn if ex.img_fn in self.images else None

    def __len__(self) -> int:
        return len(self.items)

    def label(self, item: Item) -> Optional[int]:
        ex = self.examples[item.example]
        return ex.answer_label if item.subtask == Q2A else ex.rationale_label

    def sample(self, index: int, epoch: int) -> VCRSample:
        item = self.items[index]
        ex = self.examples[item.example]
        flip = self.train and flips(self.seed, epoch, index, self.image_cfg.flip_prob)
        meta = read_metadata(self.metadata_root, ex.metadata_fn)
        image, boxes, masks, size = load_regions(self.images.read(ex.img_fn), meta, len(ex.objects), self.image_cfg,
                                                 self.mask_size, flip)
        seqs = encode_item(ex, item, self.tokenizer, self.max_text_tokens)
        classes = np.asarray([0] + [self.categories[o] for o in ex.objects], np.int64)
        return VCRSample(index, self.label(item), [s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs],
                         image, boxes, masks, classes, size)

    def collate(self, samples: list[VCRSample]) -> VCRBatch:
        return collate_vcr(samples)
