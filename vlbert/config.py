"""One typed config tree for a run.

The dataclasses below are the schema. A run config is a YAML file whose keys
mirror this tree, followed by dotted command-line overrides
(``optim.lr=1e-4 data.captions.urls=[a.tar,b.tar]``). Loading checks every key
and value against the schema and the cross-field rules in ``validate``; any
problem raises ``ConfigError`` naming the key, the file and what was expected.

Each component receives only its own part (``cfg.model``, ``cfg.data``, ...).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlbert.config_reader import ConfigError, build, read_raw_config, require  # noqa: F401  (ConfigError: imported from here)


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """The VL-BERT encoder. ``bert`` names a Hugging Face checkpoint (hub name or
    local folder) whose architecture and weights are used; when empty, a randomly
    initialised BERT of the sizes below is built."""

    bert: str = ""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    visual_dropout: float = 0.1
    # Geometry embedding: 4 coordinates x geometry_freqs x (sin, cos).
    geometry_freqs: int = 256
    activation_checkpointing: bool = False


@dataclass
class DetectorConfig:
    """The MMDetection Faster R-CNN ResNet C4 that makes one feature per box.

    ``preset`` names a published architecture whose settings become this
    section's defaults (keys set in the same section still win); see
    ``detector_preset``. Without a preset the defaults are MMDetection's
    ``faster-rcnn_r50-caffe-c4`` layout.
    """

    # Where each box's appearance feature comes from: "pixels" runs this Faster R-CNN on the
    # decoded image every step (end to end); "features" reads the per-box features stored in
    # the shards (``<key>.features.npy``, docs/features.md): no image decode, no CNN, and none of
    # the fields below but ``feature_dim``, ``num_classes`` and ``roi_targets`` apply.
    source: str = "pixels"
    feature_dim: int = 2048  # with source "features": the width of the stored features
    preset: str = ""  # "" or one of DETECTOR_PRESETS
    depth: int = 101
    checkpoint: str = ""  # path or URL of a detector state dict (vlbert-convert-detector); empty = random init
    num_classes: int = 1601  # classes of the box head (Visual Genome detector: 1601)
    roi_size: int = 14
    frozen_stages: int = 1  # 1 = stem and res2 frozen, as in the paper
    freeze_batchnorm: bool = True  # statistics and affine parameters
    trainable: bool = True  # False freezes the whole detector
    activation_checkpointing: bool = False
    # Input normalisation, in the network's channel order: RGB, or BGR when ``bgr``
    # (the image's channels are reversed first, then (x - mean) / std).
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    bgr: bool = False
    # Stem max-pool: False = kernel 3, stride 2, pad 1 (PyTorch/MMDetection); True = Caffe's
    # pad 0 with the output size rounded up (the bottom-up-attention network).
    caffe_stem_pool: bool = False
    # res5 (the RoI head): dilation 1 = stride 2, RoI features roi_size -> roi_size/2;
    # dilation 2 = stride 1 with dilated 3x3 convs, roi_size kept (bottom-up attention, VL-BERT).
    res5_dilation: int = 1
    # RoI op on res4: "align" (mmcv RoIAlign) or "pool" (Caffe RoIPool, max over rounded bins).
    roi_op: str = "align"
    roi_sampling_ratio: int = 0  # RoIAlign samples per bin side; 0 = adaptive
    roi_aligned: bool = True  # RoIAlign half-pixel shift (False = the legacy/VL-BERT op)
    # RPN: anchors at stride 16 of sizes 16 x scale and height/width ratios, ratio-major order
    # (anchor index = ratio_index * len(scales) + scale_index, Caffe's order).
    rpn_channels: int = 0  # channels of the RPN's 3x3 conv; 0 = those of res4
    anchor_scales: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0, 16.0, 32.0])
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # Caffe's box arithmetic: anchors from py-faster-rcnn's generate_anchors (rounded
    # sizes, centre 7.5) and widths x2 - x1 + 1 when decoding RPN deltas.
    caffe_boxes: bool = False
    # Where masked-RoI targets come from for samples without ``regions.npy``:
    #   "precomputed": nowhere: such a batch is an error (run vlbert-extract-regions first);
    #   "frozen_copy": a frozen copy of the detector as loaded, never the one being trained;
    #   "detector": the detector itself, allowed only when it is not trainable.
    roi_targets: str = "frozen_copy"


DETECTOR_PRESETS = ("butd_r101_vg",)
REGION_SOURCES = ("pixels", "features")


def detector_preset(name: str) -> dict[str, Any]:
    """DetectorConfig field values of the named published architecture.

    ``butd_r101_vg``: the "bottom-up attention" Faster R-CNN ResNet-101 C4 trained
    on Visual Genome (Anderson et al. 2018; DESIGN.md section 6): 1600 classes +
    background, the Caffe network's stem pool (pad 0, size rounded up; VL-BERT's copy
    padded by 1), res5 at stride 1 with dilation 2 (14x14 RoI features, average-pooled
    to 2048), RoIAlign 14x14 without the half-pixel shift and one sample per bin
    (VL-BERT's op; ``roi_op: pool`` gives the Caffe network's RoIPool), RPN with a
    512-channel conv and 12 anchors (scales 4, 8, 16, 32 x ratios 0.5, 1, 2 at stride
    16, Caffe geometry and order), BGR input minus the Caffe means, std 1.
    """
    if name == "butd_r101_vg":
        return dict(
            depth=101, num_classes=1601, roi_size=14, res5_dilation=2, caffe_stem_pool=True,
            roi_op="align", roi_sampling_ratio=1, roi_aligned=False,
            rpn_channels=512, anchor_scales=[4.0, 8.0, 16.0, 32.0], anchor_ratios=[0.5, 1.0, 2.0],
            caffe_boxes=True, bgr=True, pixel_mean=[102.9801, 115.9465, 122.7717], pixel_std=[1.0, 1.0, 1.0],
        )
    raise ValueError(f"unknown detector preset {name!r}; valid presets: {', '.join(DETECTOR_PRESETS)}")


@dataclass
class CaptionDataConfig:
    """Captioned-image shards (WebDataset tar layout, docs/design.md section 4)."""

    urls: list[str] = field(default_factory=list)
    short_side: int = 600
    max_long_side: int = 1000
    flip_prob: float = 0.5
    max_caption_tokens: int = 32  # including [CLS] and [SEP]
    min_boxes: int = 10
    max_boxes: int = 100
    min_box_score: float = 0.5
    # Joint cap on caption tokens ([CLS] and [SEP] included) + RoIs (the whole-image box
    # included); 0 = no cap. Over the cap, the longer of the two loses one element at a
    # time (the lowest-scoring box, or the last word before [SEP]), as the reference does
    # with its cap of 64.
    max_sequence_length: int = 0
    # Caps on one sample (counted skips over them, docs/design.md section 4): decoded pixels
    # (width x height; 64 M pixels is 192 MB at 8 bits RGB, far above any photo of the corpora),
    # bytes of one tar member (image, JSON, regions) and of the caption, checked before decoding.
    max_image_pixels: int = 64_000_000
    max_member_bytes: int = 64 << 20
    max_caption_bytes: int = 64 << 10


@dataclass
class TextSourceConfig:
    """One text corpus (Parquet or JSON Lines with a ``text`` field)."""

    urls: list[str] = field(default_factory=list)
    weight: float = 1.0


@dataclass
class TextDataConfig:
    sources: dict[str, TextSourceConfig] = field(default_factory=dict)
    segment_length: int = 64  # tokens, including [CLS] and [SEP]
    # Caps in bytes before tokenising (counted skips over them): one JSON Lines line and one
    # document's UTF-8 text (a Wikipedia article is under 1 MB, a whole book a few MB).
    max_line_bytes: int = 32 << 20
    max_document_bytes: int = 16 << 20


@dataclass
class DataConfig:
    tokenizer: str = ""  # HF tokenizer name or folder; empty = model.bert
    captions: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    text: TextDataConfig = field(default_factory=TextDataConfig)
    validation: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    # Global samples per optimizer step; the recipe is 128 + 128.
    captions_per_step: int = 128
    text_per_step: int = 128
    num_workers: int = 2
    # Canonical partitions of the sample order, fixed at a run's start (each keeps its own
    # cursor; a resume on other ranks or workers reassigns them). 0 = the first attempt's
    # ranks x num_workers; a number with many divisors (48, 64) keeps reading even on more layouts.
    partitions: int = 0
    seed: int = 0
    read_retries: int = 3
    retry_backoff_s: float = 0.5
    # Waiting for a batch: a warning every wait_warn_s, an error after wait_timeout_s (0 = no limit).
    wait_warn_s: float = 60.0
    wait_timeout_s: float = 900.0


@dataclass
class MaskingConfig:
    mlm_prob: float = 0.15
    mlm_mask_frac: float = 0.8  # of the chosen: replaced by [MASK]
    mlm_random_frac: float = 0.1  # of the chosen: replaced by a random word; the rest kept
    whole_word: bool = True
    roi_prob: float = 0.15
    roi_mask_frac: float = 0.9  # of the chosen RoIs: pixels zeroed and mask token


@dataclass
class OptimConfig:
    lr: float = 2.56e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    weight_decay: float = 1e-4
    warmup_steps: int = 16000
    total_steps: int = 250000
    # 0: decay linearly to 0 over every step after the warmup (BERT, VL-BERT). N > 0: hold the
    # peak until the last N steps, then decay linearly to 0 over them (warmup-stable-decay).
    decay_steps: int = 0
    grad_clip: float = 10.0
    grad_accum: int = 1
    # "adamw" (betas, eps) or "sgd" with ``momentum`` (VL-BERT's VCR recipe); weight decay either way.
    optimizer: str = "adamw"
    momentum: float = 0.9
    # Step decay instead of the linear one: the learning rate times ``step_decay_factor`` at each
    # of these fractions of total_steps (VCR: [0.7, 0.9], epochs 14 and 18 of 20). Empty: linear.
    step_decay_at: list[float] = field(default_factory=list)
    step_decay_factor: float = 0.1
    # Peak learning rate of the detector's trainable parameters as a multiple of ``lr``
    # (a pretrained backbone usually takes a smaller step than the encoder); the schedule
    # scales every parameter group alike.
    detector_lr_mult: float = 1.0


@dataclass
class RuntimeConfig:
    deepspeed_config: str = "ds_configs/zero2_bf16.json"
    output_dir: str = "runs/default"
    checkpoint_dir: str = ""  # empty = <output_dir>/checkpoints; any fsspec URL
    checkpoint_every: int = 1000
    keep_last: int = 3
    resume: bool = True
    # The output folder's lease (vlbert/train/lease.py): a second job on the folder stops at once; a
    # lease whose holder wrote no heartbeat for this long is taken over (keep it above clock skew).
    lease_stale_minutes: float = 10.0
    log_every: int = 10  # steps between log lines and MLflow metrics
    val_every: int = 0  # 0 = no periodic validation
    val_batches: int = 10
    seed: int = 0
    # Write the keys of the samples each step consumed to <output_dir>/sample_keys/rank<r>.jsonl.
    log_sample_keys: bool = False


@dataclass
class TrackingConfig:
    experiment: str = "vlbert"
    run_name: str = ""
    tracking_uri: str = ""  # empty = $MLFLOW_TRACKING_URI, else a store in the working folder
    system_metrics: bool = True
    enabled: bool = True
    # What the store could not take yet waits in a local spool (vlbert/tracking/spool.py):
    spool_dir: str = ""  # empty = <runtime.output_dir>/mlflow_spool
    spool_max_records: int = 100_000  # metric records kept; past it new ones are dropped and counted
    retry_max_s: float = 60.0  # the longest pause between two tries of a store that fails
    drain_timeout_s: float = 60.0  # at the end, how long training waits for the spool to empty


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def global_batch_size(self) -> int:
        return self.data.captions_per_step + self.data.text_per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, convert and validate.

    ``check_files`` also checks that the DeepSpeed JSON it names exists; its
    contents are read and checked where the run starts
    (``vlbert.train.ds_config``): loading a config reads no other file.
    """
    raw, source = read_raw_config(path, overrides)
    where = source + (" + overrides" if overrides else "")
    _apply_detector_preset(raw, where)
    cfg = build(Config, raw, prefix="", source=where)
    validate(cfg, source, check_files=check_files)
    return cfg


def _apply_detector_preset(raw: dict[str, Any], source: str) -> None:
    """Fill the detector section from its ``preset``; keys written in the section win."""
    section = raw.get("detector")
    if not isinstance(section, dict) or not section.get("preset"):
        return
    try:
        values = detector_preset(str(section["preset"]))
    except ValueError as e:
        raise ConfigError(f"{source}: detector.preset: {e}") from None
    raw["detector"] = {**values, **section}


# --------------------------------------------------------------------------- validation


def validate_optimizer_choice(o: OptimConfig, source: str) -> None:
    """The optimizer and schedule fields, shared by pretraining and fine-tuning configs."""
    require(o.optimizer in ("adamw", "sgd"), source, "optim.optimizer", f"expected adamw or sgd, got {o.optimizer!r}")
    require(0 <= o.momentum < 1, source, "optim.momentum", f"expected a value in [0, 1), got {o.momentum}")
    at = list(o.step_decay_at)
    require(all(0 < f < 1 for f in at) and at == sorted(at), source, "optim.step_decay_at",
            f"expected increasing fractions of total_steps in (0, 1), got {at}")
    require(0 < o.step_decay_factor <= 1, source, "optim.step_decay_factor",
            f"expected a factor in (0, 1], got {o.step_decay_factor}")
    require(not (at and o.decay_steps), source, "optim.decay_steps",
            "set either decay_steps (linear decay at the end) or step_decay_at (step decay), not both")


def validate(cfg: Config, source: str = "<config>", check_files: bool = True) -> None:
    """Cross-field rules. Raise ConfigError naming the first problem."""
    m, d, k, o, r = cfg.model, cfg.data, cfg.masking, cfg.optim, cfg.runtime
    require(m.hidden_size % m.num_heads == 0, source, "model.hidden_size",
            f"must be divisible by model.num_heads ({m.num_heads}), got {m.hidden_size}")
    for name in ("hidden_dropout", "attention_dropout", "visual_dropout"):
        v = getattr(m, name)
        require(0.0 <= v < 1.0, source, f"model.{name}", f"expected a probability in [0, 1), got {v}")
    require(cfg.detector.depth in (18, 34, 50, 101, 152), source, "detector.depth",
            f"expected one of 18, 34, 50, 101, 152, got {cfg.detector.depth}")
    require(-1 <= cfg.detector.frozen_stages <= 4, source, "detector.frozen_stages",
            f"expected -1..4, got {cfg.detector.frozen_stages}")
    require(len(cfg.detector.pixel_mean) == 3 and len(cfg.detector.pixel_std) == 3, source,
            "detector.pixel_mean", "pixel_mean and pixel_std need 3 values each")
    validate_detector(cfg.detector, source)
    require(cfg.detector.source == "pixels" or k.roi_prob == 0 or cfg.detector.roi_targets == "precomputed",
            source, "detector.roi_targets",
            "with detector.source: features there is no detector to compute masked-RoI targets: set "
            "detector.roi_targets: precomputed (the shards' stored class scores, <key>.regions.npy), "
            "or masking.roi_prob: 0 to train without masked-RoI classification")
    require(d.captions.max_sequence_length == 0 or d.captions.max_sequence_length >= 4, source,
            "data.captions.max_sequence_length",
            f"0 (no cap) or at least 4 ([CLS] word [SEP] + the whole-image box), got {d.captions.max_sequence_length}")
    for name in ("mlm_prob", "mlm_mask_frac", "mlm_random_frac", "roi_prob", "roi_mask_frac"):
        v = getattr(k, name)
        require(0.0 <= v <= 1.0, source, f"masking.{name}", f"expected a probability in [0, 1], got {v}")
    require(k.mlm_mask_frac + k.mlm_random_frac <= 1.0, source, "masking.mlm_random_frac",
            "mlm_mask_frac + mlm_random_frac must be at most 1")
    require(d.captions_per_step >= 0 and d.text_per_step >= 0 and cfg.global_batch_size > 0, source,
            "data.captions_per_step", "captions_per_step + text_per_step must be positive")
    require(d.partitions >= 0, source, "data.partitions", f"must be 0 (automatic) or positive, got {d.partitions}")
    require(d.captions_per_step == 0 or bool(d.captions.urls), source, "data.captions.urls",
            "captions_per_step > 0 needs at least one caption shard URL")
    require(d.text_per_step == 0 or bool(d.text.sources), source, "data.text.sources",
            "text_per_step > 0 needs at least one text source")
    for name, src in d.text.sources.items():
        require(bool(src.urls), source, f"data.text.sources.{name}.urls", "expected at least one URL")
        require(src.weight > 0, source, f"data.text.sources.{name}.weight", f"must be positive, got {src.weight}")
    require(d.captions.max_caption_tokens >= 3, source, "data.captions.max_caption_tokens", "must be at least 3")
    require(d.text.segment_length >= 3, source, "data.text.segment_length", "must be at least 3")
    for key, value in (("text.max_line_bytes", d.text.max_line_bytes),
                       ("text.max_document_bytes", d.text.max_document_bytes),
                       *((f"{part}.{name}", getattr(getattr(d, part), name)) for part in ("captions", "validation")
                         for name in ("max_image_pixels", "max_member_bytes", "max_caption_bytes"))):
        require(value > 0, source, f"data.{key}", f"must be positive, got {value}")
    require(1 <= d.captions.min_boxes <= d.captions.max_boxes, source, "data.captions.min_boxes",
            f"expected 1 <= min_boxes <= max_boxes, got {d.captions.min_boxes} and {d.captions.max_boxes}")
    require(d.captions.short_side <= d.captions.max_long_side, source, "data.captions.short_side",
            "must not exceed data.captions.max_long_side")
    require(d.num_workers >= 0, source, "data.num_workers", "must be >= 0")
    require(d.wait_warn_s > 0 and d.wait_timeout_s >= 0, source, "data.wait_warn_s",
            "wait_warn_s must be positive and wait_timeout_s >= 0 (0 = no limit)")
    require(bool(m.bert) or bool(d.tokenizer), source, "data.tokenizer",
            "set data.tokenizer when model.bert is empty (random init)")
    require(o.lr > 0, source, "optim.lr", f"must be positive, got {o.lr}")
    validate_optimizer_choice(o, source)
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), source, "optim.betas",
            f"expected two values in [0, 1), got {o.betas}")
    require(0 <= o.warmup_steps <= o.total_steps and o.total_steps > 0, source, "optim.warmup_steps",
            f"expected 0 <= warmup_steps <= total_steps, got {o.warmup_steps} and {o.total_steps}")
    require(0 <= o.decay_steps <= o.total_steps - o.warmup_steps, source, "optim.decay_steps",
            f"expected 0 <= decay_steps <= total_steps - warmup_steps = {o.total_steps - o.warmup_steps}, "
            f"got {o.decay_steps}")
    require(o.grad_accum >= 1, source, "optim.grad_accum", "must be >= 1")
    require(o.detector_lr_mult > 0, source, "optim.detector_lr_mult",
            f"must be positive (to keep the detector fixed set detector.trainable: false), got {o.detector_lr_mult}")
    require(cfg.global_batch_size % o.grad_accum == 0, source, "optim.grad_accum",
            f"must divide the global batch {cfg.global_batch_size}")
    require(r.checkpoint_every > 0 and r.keep_last >= 1 and r.log_every > 0, source, "runtime.checkpoint_every",
            "checkpoint_every and log_every must be positive and keep_last >= 1")
    require(r.lease_stale_minutes > 0, source, "runtime.lease_stale_minutes", "must be positive")
    t = cfg.tracking
    require(t.spool_max_records >= 1 and t.retry_max_s > 0 and t.drain_timeout_s >= 0, source,
            "tracking.spool_max_records", "spool_max_records and retry_max_s must be positive, drain_timeout_s >= 0")
    if check_files:
        require(os.path.isfile(r.deepspeed_config), source, f"runtime.deepspeed_config ({r.deepspeed_config})",
                "file not found")


def validate_detector(det: DetectorConfig, source: str = "<config>") -> None:
    """Rules of the detector section alone (also used by tools that read only it)."""
    require(det.source in REGION_SOURCES, source, "detector.source",
            f"expected one of {', '.join(REGION_SOURCES)}, got {det.source!r}")
    require(det.feature_dim > 0, source, "detector.feature_dim", f"must be positive, got {det.feature_dim}")
    require(det.source == "pixels" or not det.checkpoint, source, "detector.checkpoint",
            "is not used with detector.source: features (the features were made by the detector already); "
            "leave it empty")
    require(det.res5_dilation in (1, 2), source, "detector.res5_dilation", f"expected 1 or 2, got {det.res5_dilation}")
    require(det.roi_op in ("align", "pool"), source, "detector.roi_op", f"expected align or pool, got {det.roi_op!r}")
    require(det.roi_sampling_ratio >= 0, source, "detector.roi_sampling_ratio", "must be >= 0")
    require(det.rpn_channels >= 0, source, "detector.rpn_channels", "must be >= 0 (0 = res4 channels)")
    require(bool(det.anchor_scales) and bool(det.anchor_ratios)
            and all(v > 0 for v in det.anchor_scales + det.anchor_ratios), source, "detector.anchor_scales",
            "anchor_scales and anchor_ratios need at least one positive value each")
    require(det.res5_dilation == 2 or det.roi_size % 2 == 0, source, "detector.roi_size",
            f"must be even when res5 halves it (res5_dilation 1), got {det.roi_size}")
    require(det.roi_targets in ("precomputed", "frozen_copy", "detector"), source, "detector.roi_targets",
            f"expected precomputed, frozen_copy or detector, got {det.roi_targets!r}")
    require(not (det.roi_targets == "detector" and det.trainable), source, "detector.roi_targets",
            "'detector' takes masked-RoI targets from the detector being trained, so they would drift; "
            "with detector.trainable use 'precomputed' (regions.npy from vlbert-extract-regions) "
            "or 'frozen_copy'")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again by ``load_config``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
