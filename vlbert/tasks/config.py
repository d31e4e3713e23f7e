"""The typed config tree of a fine-tuning run (VQA or RefCOCO+).

It reuses the pretraining sections (``ModelConfig``, ``DetectorConfig``,
``OptimConfig``, ``RuntimeConfig``, ``TrackingConfig``) and adds the task's
data section. Exactly one of ``vqa`` and ``refcoco`` is set: which one decides
the task. YAML + dotted overrides as for pretraining
(``model.pretrained=runs/x/model.safetensors optim.lr=1e-4``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from vlbert.config import (CaptionDataConfig, DataConfig, DetectorConfig, ModelConfig, OptimConfig,
                           RuntimeConfig, TrackingConfig)
from vlbert.config_reader import build, read_raw_config, require


@dataclass
class FinetuneModelConfig(ModelConfig):
    """The encoder, plus where its weights come from: ``pretrained`` names a
    pretraining run's ``model.safetensors`` (detector, encoder and MLM head);
    when empty, the encoder starts from ``bert`` (plain BERT, no visual-linguistic
    pretraining) and the detector from ``detector.checkpoint``."""

    pretrained: str = ""
    head_dropout: float = 0.1


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
    answers_file: str = ""  # one answer per line; empty = built from the training annotations
    min_answer_count: int = 9
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
    boxes: str = "detected"  # "detected": the shard JSON's boxes; "gt": the image's COCO boxes
    image: CaptionDataConfig = field(default_factory=_image_config)
    max_expression_tokens: int = 32
    positive_iou: float = 0.5
    batch_size: int = 32
    eval_batch_size: int = 32


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    vqa: Optional[VQADataConfig] = None
    refcoco: Optional[RefCOCODataConfig] = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1.6e-4, weight_decay=1e-4, warmup_steps=500, total_steps=0, grad_clip=1.0))
    epochs: int = 5  # used when optim.total_steps is 0
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="vlbert-finetune"))

    @property
    def task(self):
        """The task's data section (``vqa`` or ``refcoco``)."""
        return self.vqa if self.vqa is not None else self.refcoco

    @property
    def tokenizer(self) -> str:
        return self.task.tokenizer or self.model.bert

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_finetune_config(path: str | os.PathLike | None, overrides: list[str] = (),
                         check_files: bool = True) -> FinetuneConfig:
    """Read a YAML fine-tuning config, apply ``key=value`` overrides, validate."""
    raw, source = read_raw_config(path, overrides)
    cfg = build(FinetuneConfig, raw, prefix="", source=source + (" + overrides" if overrides else ""))
    validate_finetune(cfg, source, check_files)
    return cfg


def validate_finetune(cfg: FinetuneConfig, source: str = "<config>", check_files: bool = True) -> None:
    m, o, r = cfg.model, cfg.optim, cfg.runtime
    require((cfg.vqa is None) != (cfg.refcoco is None), source, "vqa",
            "set exactly one task section: vqa or refcoco")
    t = cfg.task
    require(m.hidden_size % m.num_heads == 0, source, "model.hidden_size", "must be divisible by model.num_heads")
    require(0.0 <= m.head_dropout < 1.0, source, "model.head_dropout", "expected a probability in [0, 1)")
    require(bool(cfg.tokenizer), source, "vqa.tokenizer" if cfg.vqa else "refcoco.tokenizer",
            "set a tokenizer when model.bert is empty")
    require(t.batch_size > 0 and t.eval_batch_size > 0, source, "batch_size", "must be positive")
    require(t.wait_warn_s > 0 and t.wait_timeout_s >= 0, source, "wait_warn_s",
            "wait_warn_s must be positive and wait_timeout_s >= 0 (0 = no limit)")
    require(o.lr > 0, source, "optim.lr", "must be positive")
    require(o.decay_steps >= 0, source, "optim.decay_steps", "must be >= 0 (0: decay over every step after the warmup)")
    require(o.total_steps > 0 or cfg.epochs > 0, source, "epochs", "set epochs or optim.total_steps")
    require(o.grad_accum >= 1 and t.batch_size % o.grad_accum == 0, source, "optim.grad_accum",
            f"must divide the batch size {t.batch_size}")
    require(r.checkpoint_every > 0 and r.keep_last >= 1 and r.log_every > 0, source, "runtime.checkpoint_every",
            "checkpoint_every and log_every must be positive and keep_last >= 1")
    require(r.lease_stale_minutes > 0, source, "runtime.lease_stale_minutes", "must be positive")
    if cfg.vqa is not None:
        v = cfg.vqa
        require(bool(v.train) or bool(v.val), source, "vqa.train", "give a train or a val split")
        for i, split in enumerate(v.train + ([v.val] if v.val else [])):
            require(bool(split.questions) and bool(split.images), source, f"vqa split {i}",
                    "every split needs questions and images")
        require(v.min_answer_count >= 1, source, "vqa.min_answer_count", "must be >= 1")
    else:
        rc = cfg.refcoco
        require(bool(rc.refs) and bool(rc.instances) and bool(rc.images), source, "refcoco.refs",
                "refs, instances and images are required")
        require(rc.boxes in ("detected", "gt"), source, "refcoco.boxes", "expected 'detected' or 'gt'")
        require(0.0 < rc.positive_iou < 1.0, source, "refcoco.positive_iou", "expected a value in (0, 1)")
    if check_files:
        # Its contents are read and checked where the run starts (vlbert.train.ds_config).
        require(os.path.isfile(r.deepspeed_config), source, f"runtime.deepspeed_config ({r.deepspeed_config})",
                "file not found")


def batch_as_data_config(cfg: FinetuneConfig) -> DataConfig:
    """The global batch in the form the engine's DeepSpeed helpers take (all as 'captions')."""
    return DataConfig(captions_per_step=cfg.task.batch_size, text_per_step=0)
