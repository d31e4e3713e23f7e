"""The typed config tree of a fine-tuning run (VQA, RefCOCO+ or VCR).

It reuses the pretraining sections (``ModelConfig``, ``DetectorConfig``,
``OptimConfig``, ``RuntimeConfig``, ``TrackingConfig``) and adds the task's
data section. Exactly one of ``vqa``, ``refcoco`` and ``vcr`` is set: which one
decides the task. YAML + dotted overrides as for pretraining
(``model.pretrained=runs/x/model.safetensors optim.lr=1e-4``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from vlbert.config import (CaptionDataConfig, DataConfig, DetectorConfig, ModelConfig, OptimConfig,
                           RuntimeConfig, TrackingConfig, _apply_detector_preset,
                           validate_detector, validate_optimizer_choice)
from vlbert.config_reader import build, read_raw_config, require


@dataclass
class FinetuneModelConfig(ModelConfig):
    """The encoder, plus where its weights come from: ``pretrained`` names a
    pretraining run's ``model.safetensors`` (detector, encoder and MLM head);
    when empty, the encoder starts from ``bert`` (plain BERT, no visual-linguistic
    pretraining) and the detector from ``detector.checkpoint``."""

    pretrained: str = ""
    head_dropout: float = 0.1
    # The whole-image region (box 0): "pooled" = RoI-pooled by the detector like any box (the
    # reference's end-to-end path, jackroos/VL-BERT common/fast_rcnn.py, whole-image box added
    # in vqa/data/datasets/vqa.py); "mean" = the mean of the other boxes' appearance features
    # (the reference's precomputed-feature path, same file, when the JSON has no
    # image_box_feature).
    whole_image: str = "pooled"


def _image_config() -> CaptionDataConfig:
    """Images for fine-tuning: the recipe's size; flips are the task's own switch."""
    return CaptionDataConfig(flip_prob=0.5)


@dataclass
class TaskLoaderConfig:
    """How a task's training examples are loaded, and how long a step may wait for them."""

    num_workers: int = 2
    seed: int = 0
    # Waiting for a batch: a warning every wait_warn_s, an error after wait_timeout_s (0 = no limit).
    wait_warn_s: float = 60.0
    wait_timeout_s: float = 900.0


@dataclass
class VQASplitConfig:
    """One split in the official VQA v2 files, plus the image shards that hold its images."""

    questions: str = ""  # v2_OpenEnded_mscoco_<split>_questions.json
    annotations: str = ""  # v2_mscoco_<split>_annotations.json; empty for test / test-dev
    images: list[str] = field(default_factory=list)  # caption-style tar shards (URLs or globs)


@dataclass
class VQADataConfig(TaskLoaderConfig):
    tokenizer: str = ""  # empty = model.bert
    train: list[VQASplitConfig] = field(default_factory=list)  # e.g. train2014 (+ val2014 for test-dev)
    val: Optional[VQASplitConfig] = None
    answers_file: str = ""  # one answer per line; empty = built from the annotations answers_from names
    min_answer_count: int = 9
    # Which annotations build the vocabulary when answers_file is empty: "train" (the splits of
    # vqa.train) or "train+val" (those and vqa.val). The reference downloads its 3129 answers
    # (jackroos/VL-BERT data/PREPARE_DATA.md, answers_vqa.txt): the multiple-choice answers of at
    # least 9 train2014 + val2014 questions (hengyuan-hu/bottom-up-attention-vqa
    # tools/compute_softscore.py, filter_answers(train_answers + val_answers, 9)).
    answers_from: str = "train"
    image: CaptionDataConfig = field(default_factory=_image_config)  # sizes, boxes, flip_prob
    max_question_tokens: int = 32  # question tokens, without [CLS] [SEP] [MASK] [SEP]
    batch_size: int = 256  # global questions per optimizer step
    eval_batch_size: int = 64  # per rank


@dataclass
class RefCOCODataConfig(TaskLoaderConfig):
    """RefCOCO+ in the REFER layout: ``refs(unc).p`` is a pickle, so the refs are read
    from a JSON export of it (``refs``: the same records) plus ``instances.json``."""

    tokenizer: str = ""
    refs: str = ""  # JSON list of REFER ref records (ref_id, ann_id, image_id, split, sentences)
    instances: str = ""  # COCO-style instances.json (images, annotations with bbox)
    images: list[str] = field(default_factory=list)  # caption-style tar shards
    train_split: str = "train"
    val_splits: list[str] = field(default_factory=lambda: ["val"])
    # "detected": the detections (below); "gt": the image's COCO boxes in training and evaluation
    # (the paper's ground-truth-box setting; train_add_gt and detections are then ignored).
    boxes: str = "detected"
    # Training only, with boxes "detected": every COCO box of the image is appended to the detected
    # ones (the reference's TRAIN_BOXES "proposal+gt", jackroos/VL-BERT
    # cfgs/refcoco/base_detected_regions_4x16G.yaml); evaluation stays on the detected boxes.
    train_add_gt: bool = False
    # A detections file (MAttNet's res101_coco_minus_refer_notime_dets.json: a JSON list of
    # {image_id, box: [x, y, w, h], ...}) to take the detected boxes from instead of the shard
    # JSON; empty = the shard JSON's boxes (vlbert-extract-regions).
    detections: str = ""
    image: CaptionDataConfig = field(default_factory=_image_config)
    max_expression_tokens: int = 32
    positive_iou: float = 0.5
    batch_size: int = 32
    eval_batch_size: int = 32


@dataclass
class VCRSplitConfig:
    """One split of the VCR release: its jsonl, the folder its ``metadata_fn`` paths are
    relative to (``.../vcr1images``), and the caption-style tar shards holding its images
    under their ``img_fn`` (optionally below one top folder)."""

    annotations: str = ""  # train.jsonl / val.jsonl / test.jsonl
    metadata: str = ""  # folder URL
    images: list[str] = field(default_factory=list)


def _vcr_image_config() -> CaptionDataConfig:
    """The reference's VCR images: short side 600, long side at most 1200, flips p = 0.5."""
    return CaptionDataConfig(short_side=600, max_long_side=1200, flip_prob=0.5)


@dataclass
class VCRDataConfig(TaskLoaderConfig):
    tokenizer: str = ""
    train: Optional[VCRSplitConfig] = None
    val: Optional[VCRSplitConfig] = None
    test: Optional[VCRSplitConfig] = None  # unannotated: vlbert-evaluate --split test writes the leaderboard CSV
    # Which 4-choice problems one model learns and is scored on; both give Q->AR from one run
    # (the reference trains one model per subtask).
    subtasks: list[str] = field(default_factory=lambda: ["q2a", "qa2r"])
    categories: list[str] = field(default_factory=list)  # detection classes, [0] = background; empty = COCO's 81
    image: CaptionDataConfig = field(default_factory=_vcr_image_config)
    max_text_tokens: int = 64  # WordPieces of question + answer (+ rationale), specials not counted
    mask_size: int = 14
    aux_loss_weight: float = 1.0  # the object classification on the RoIs
    batch_size: int = 64
    eval_batch_size: int = 8


@dataclass
class EvalConfig:
    """How evaluation treats a split's items whose image is missing (absent from the shards or
    undecodable): they count as wrong, as in the official evaluations; more than
    ``max_missing_fraction`` of a split's items missing is an error (``vlbert.tasks.missing``)."""

    max_missing_fraction: float = 0.01


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    vqa: Optional[VQADataConfig] = None
    refcoco: Optional[RefCOCODataConfig] = None
    vcr: Optional[VCRDataConfig] = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1.6e-4, weight_decay=1e-4, warmup_steps=500, total_steps=0, grad_clip=1.0))
    epochs: int = 5  # used when optim.total_steps is 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="vlbert-finetune"))

    @property
    def task(self):
        """The task's data section (``vqa``, ``refcoco`` or ``vcr``)."""
        return next((t for t in (self.vqa, self.refcoco, self.vcr) if t is not None), None)

    @property
    def task_name(self) -> str:
        return next(n for n in ("vqa", "refcoco", "vcr") if getattr(self, n) is not None)

    @property
    def tokenizer(self) -> str:
        return self.task.tokenizer or self.model.bert

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_finetune_config(path: str | os.PathLike | None, overrides: list[str] = (),
                         check_files: bool = True) -> FinetuneConfig:
    """Read a YAML fine-tuning config, apply ``key=value`` overrides (and ``detector.preset``),
    validate. The keys the config wrote in ``model`` and ``detector`` are kept (``_written_keys``):
    the network of the weights fills the others (``vlbert.network.resolve_network``)."""
    raw, source = read_raw_config(path, overrides)
    where = source + (" + overrides" if overrides else "")
    _apply_detector_preset(raw, where)
    cfg = build(FinetuneConfig, raw, prefix="", source=where)
    cfg._written_keys = frozenset(f"{section}.{key}" for section in ("model", "detector")
                                  for key in (raw.get(section) or {}))
    validate_finetune(cfg, source, check_files)
    return cfg


def validate_finetune(cfg: FinetuneConfig, source: str = "<config>", check_files: bool = True) -> None:
    m, o, r = cfg.model, cfg.optim, cfg.runtime
    require(sum(t is not None for t in (cfg.vqa, cfg.refcoco, cfg.vcr)) == 1, source, "vqa",
            "set exactly one task section: vqa, refcoco or vcr")
    t = cfg.task
    require(m.hidden_size % m.num_heads == 0, source, "model.hidden_size", "must be divisible by model.num_heads")
    require(0.0 <= m.head_dropout < 1.0, source, "model.head_dropout", "expected a probability in [0, 1)")
    require(bool(cfg.tokenizer), source, f"{cfg.task_name}.tokenizer", "set a tokenizer when model.bert is empty")
    require(t.batch_size > 0 and t.eval_batch_size > 0, source, "batch_size", "must be positive")
    require(t.wait_warn_s > 0 and t.wait_timeout_s >= 0, source, "wait_warn_s",
            "wait_warn_s must be positive and wait_timeout_s >= 0 (0 = no limit)")
    require(o.lr > 0, source, "optim.lr", "must be positive")
    validate_optimizer_choice(o, source)
    require(o.decay_steps >= 0, source, "optim.decay_steps", "must be >= 0 (0: decay over every step after the warmup)")
    require(o.total_steps > 0 or cfg.epochs > 0, source, "epochs", "set epochs or optim.total_steps")
    require(o.grad_accum >= 1 and t.batch_size % o.grad_accum == 0, source, "optim.grad_accum",
            f"must divide the batch size {t.batch_size}")
    require(r.checkpoint_every > 0 and r.keep_last >= 1 and r.log_every > 0, source, "runtime.checkpoint_every",
            "checkpoint_every and log_every must be positive and keep_last >= 1")
    require(0.0 <= cfg.eval.max_missing_fraction <= 1.0, source, "eval.max_missing_fraction",
            f"expected a fraction in [0, 1], got {cfg.eval.max_missing_fraction}")
    validate_detector(cfg.detector, source)
    require(cfg.detector.source == "pixels" or cfg.refcoco is None, source, "detector.source",
            "RefCOCO+ fine-tunes on pixels only (its ground-truth boxes have no stored features); "
            "use detector.source: pixels")
    require(r.lease_stale_minutes > 0, source, "runtime.lease_stale_minutes", "must be positive")
    if cfg.vqa is not None:
        v = cfg.vqa
        require(bool(v.train) or bool(v.val), source, "vqa.train", "give a train or a val split")
        for i, split in enumerate(v.train + ([v.val] if v.val else [])):
            require(bool(split.questions) and bool(split.images), source, f"vqa split {i}",
                    "every split needs questions and images")
        require(v.min_answer_count >= 1, source, "vqa.min_answer_count", "must be >= 1")
        require(v.answers_from in ("train", "train+val"), source, "vqa.answers_from",
                f"expected 'train' or 'train+val', got {v.answers_from!r}")
        require(v.answers_from == "train" or bool(v.answers_file) or (v.val is not None and bool(v.val.annotations)),
                source, "vqa.answers_from", "'train+val' needs vqa.val with an annotations file")
    elif cfg.vcr is not None:
        validate_vcr(cfg.vcr, source)
    else:
        rc = cfg.refcoco
        require(bool(rc.refs) and bool(rc.instances) and bool(rc.images), source, "refcoco.refs",
                "refs, instances and images are required")
        require(rc.boxes in ("detected", "gt"), source, "refcoco.boxes", "expected 'detected' or 'gt'")
        require(0.0 < rc.positive_iou < 1.0, source, "refcoco.positive_iou", "expected a value in (0, 1)")
    require(m.whole_image in ("pooled", "mean"), source, "model.whole_image",
            f"expected 'pooled' or 'mean', got {m.whole_image!r}")
    if check_files:
        # Its contents are read and checked where the run starts (vlbert.train.ds_config).
        require(os.path.isfile(r.deepspeed_config), source, f"runtime.deepspeed_config ({r.deepspeed_config})",
                "file not found")


def validate_vcr(v: VCRDataConfig, source: str) -> None:
    splits = {name: getattr(v, name) for name in ("train", "val", "test") if getattr(v, name) is not None}
    require(bool(splits), source, "vcr.train", "give a train, val or test split")
    for name, split in splits.items():
        require(bool(split.annotations) and bool(split.images), source, f"vcr.{name}",
                "every split needs annotations (a jsonl) and images (tar shards)")
    require(bool(v.subtasks) and all(s in ("q2a", "qa2r") for s in v.subtasks)
            and len(set(v.subtasks)) == len(v.subtasks), source, "vcr.subtasks",
            "expected a non-empty list of distinct 'q2a' / 'qa2r'")
    require(not v.categories or (len(set(v.categories)) == len(v.categories) and len(v.categories) >= 2), source,
            "vcr.categories", "expected distinct names, background first (empty = the release's 81)")
    require(v.max_text_tokens >= 3, source, "vcr.max_text_tokens", "must be >= 3")
    require(v.mask_size >= 1, source, "vcr.mask_size", "must be >= 1")
    require(v.aux_loss_weight >= 0, source, "vcr.aux_loss_weight", "must be >= 0")


def batch_as_data_config(cfg: FinetuneConfig) -> DataConfig:
    """The global batch in the form the engine's DeepSpeed helpers take (all as 'captions')."""
    return DataConfig(captions_per_step=cfg.task.batch_size, text_per_step=0)
