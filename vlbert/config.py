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
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the file."""


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
    """The MMDetection Faster R-CNN ResNet C4 that makes one feature per box."""

    depth: int = 101
    checkpoint: str = ""  # path or URL of an MMDetection checkpoint; empty = random init
    num_classes: int = 1601  # classes of the box head (Visual Genome detector: 1601)
    roi_size: int = 14
    frozen_stages: int = 1  # 1 = stem and res2 frozen, as in the paper
    freeze_batchnorm: bool = True  # statistics and affine parameters
    trainable: bool = True  # False freezes the whole detector
    activation_checkpointing: bool = False
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # Caffe-style checkpoints (Detectron, bottom-up attention) expect BGR input: the
    # image is normalised with the RGB mean/std above, then its channels are reversed.
    bgr: bool = False


@dataclass
class CaptionDataConfig:
    """Captioned-image shards (WebDataset tar layout, DESIGN.md section 3)."""

    urls: list[str] = field(default_factory=list)
    short_side: int = 600
    max_long_side: int = 1000
    flip_prob: float = 0.5
    max_caption_tokens: int = 32  # including [CLS] and [SEP]
    min_boxes: int = 10
    max_boxes: int = 100
    min_box_score: float = 0.5


@dataclass
class TextSourceConfig:
    """One text corpus (Parquet or JSON Lines with a ``text`` field)."""

    urls: list[str] = field(default_factory=list)
    weight: float = 1.0


@dataclass
class TextDataConfig:
    sources: dict[str, TextSourceConfig] = field(default_factory=dict)
    segment_length: int = 64  # tokens, including [CLS] and [SEP]


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
    seed: int = 0
    read_retries: int = 3
    retry_backoff_s: float = 0.5


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
    grad_clip: float = 10.0
    grad_accum: int = 1


@dataclass
class RuntimeConfig:
    deepspeed_config: str = "ds_configs/zero2_bf16.json"
    output_dir: str = "runs/default"
    checkpoint_dir: str = ""  # empty = <output_dir>/checkpoints; any fsspec URL
    checkpoint_every: int = 1000
    keep_last: int = 3
    resume: bool = True
    log_every: int = 10
    val_every: int = 0  # 0 = no periodic validation
    val_batches: int = 10
    seed: int = 0


@dataclass
class TrackingConfig:
    experiment: str = "vlbert"
    run_name: str = ""
    tracking_uri: str = ""  # empty = $MLFLOW_TRACKING_URI, else a store in the working folder
    log_every: int = 10
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

    ``check_files`` also checks that referenced local files (the DeepSpeed
    JSON) exist and agree with the config.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, prefix="", source=source + (" + overrides" if overrides else ""))
    validate(cfg, source, check_files=check_files)
    return cfg


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command line: override {item!r} is not of the form key=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: value of {key} is not valid YAML: {e}") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line: {key}: {part} is not a section")
        node = child
    node[parts[-1]] = parsed


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Convert a YAML value to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: no type matched")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, prefix=key + ".", source=source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return {str(k): _convert(val_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - schema uses only the types above
        raise ConfigError(f"{source}: {key}: unsupported schema type {tp}")
    raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]} (in {where}; known keys: {', '.join(sorted(names))})"
        )
    kwargs = {name: _convert(hints[name], raw[name], prefix + name, source) for name in raw}
    return cls(**kwargs)


# --------------------------------------------------------------------------- validation


def _require(cond: bool, source: str, key: str, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {key}: {expected}")


def validate(cfg: Config, source: str = "<config>", check_files: bool = True) -> None:
    """Cross-field rules. Raise ConfigError naming the first problem."""
    m, d, k, o, r = cfg.model, cfg.data, cfg.masking, cfg.optim, cfg.runtime
    _require(m.hidden_size % m.num_heads == 0, source, "model.hidden_size",
             f"must be divisible by model.num_heads ({m.num_heads}), got {m.hidden_size}")
    for name in ("hidden_dropout", "attention_dropout", "visual_dropout"):
        v = getattr(m, name)
        _require(0.0 <= v < 1.0, source, f"model.{name}", f"expected a probability in [0, 1), got {v}")
    _require(cfg.detector.depth in (18, 34, 50, 101, 152), source, "detector.depth",
             f"expected one of 18, 34, 50, 101, 152, got {cfg.detector.depth}")
    _require(-1 <= cfg.detector.frozen_stages <= 4, source, "detector.frozen_stages",
             f"expected -1..4, got {cfg.detector.frozen_stages}")
    _require(len(cfg.detector.pixel_mean) == 3 and len(cfg.detector.pixel_std) == 3, source,
             "detector.pixel_mean", "pixel_mean and pixel_std need 3 values each")
    for name in ("mlm_prob", "mlm_mask_frac", "mlm_random_frac", "roi_prob", "roi_mask_frac"):
        v = getattr(k, name)
        _require(0.0 <= v <= 1.0, source, f"masking.{name}", f"expected a probability in [0, 1], got {v}")
    _require(k.mlm_mask_frac + k.mlm_random_frac <= 1.0, source, "masking.mlm_random_frac",
             "mlm_mask_frac + mlm_random_frac must be at most 1")
    _require(d.captions_per_step >= 0 and d.text_per_step >= 0 and cfg.global_batch_size > 0, source,
             "data.captions_per_step", "captions_per_step + text_per_step must be positive")
    _require(d.captions_per_step == 0 or bool(d.captions.urls), source, "data.captions.urls",
             "captions_per_step > 0 needs at least one caption shard URL")
    _require(d.text_per_step == 0 or bool(d.text.sources), source, "data.text.sources",
             "text_per_step > 0 needs at least one text source")
    for name, src in d.text.sources.items():
        _require(bool(src.urls), source, f"data.text.sources.{name}.urls", "expected at least one URL")
        _require(src.weight > 0, source, f"data.text.sources.{name}.weight", f"must be positive, got {src.weight}")
    _require(d.captions.max_caption_tokens >= 3, source, "data.captions.max_caption_tokens", "must be at least 3")
    _require(d.text.segment_length >= 3, source, "data.text.segment_length", "must be at least 3")
    _require(1 <= d.captions.min_boxes <= d.captions.max_boxes, source, "data.captions.min_boxes",
             f"expected 1 <= min_boxes <= max_boxes, got {d.captions.min_boxes} and {d.captions.max_boxes}")
    _require(d.captions.short_side <= d.captions.max_long_side, source, "data.captions.short_side",
             "must not exceed data.captions.max_long_side")
    _require(d.num_workers >= 0, source, "data.num_workers", "must be >= 0")
    _require(bool(m.bert) or bool(d.tokenizer), source, "data.tokenizer",
             "set data.tokenizer when model.bert is empty (random init)")
    _require(o.lr > 0, source, "optim.lr", f"must be positive, got {o.lr}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), source, "optim.betas",
             f"expected two values in [0, 1), got {o.betas}")
    _require(0 <= o.warmup_steps <= o.total_steps and o.total_steps > 0, source, "optim.warmup_steps",
             f"expected 0 <= warmup_steps <= total_steps, got {o.warmup_steps} and {o.total_steps}")
    _require(o.grad_accum >= 1, source, "optim.grad_accum", "must be >= 1")
    _require(cfg.global_batch_size % o.grad_accum == 0, source, "optim.grad_accum",
             f"must divide the global batch {cfg.global_batch_size}")
    _require(r.checkpoint_every > 0 and r.keep_last >= 1 and r.log_every > 0, source, "runtime.checkpoint_every",
             "checkpoint_every and log_every must be positive and keep_last >= 1")
    t = cfg.tracking
    _require(t.spool_max_records >= 1 and t.retry_max_s > 0 and t.drain_timeout_s >= 0, source,
             "tracking.spool_max_records", "spool_max_records and retry_max_s must be positive, drain_timeout_s >= 0")
    if check_files:
        check_deepspeed_config(cfg, source)


def load_deepspeed_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def check_deepspeed_config(cfg: Config, source: str = "<config>") -> dict[str, Any]:
    """Check the DeepSpeed JSON named by ``runtime.deepspeed_config`` against the config.

    Batch sizes, accumulation and clipping live in our config; the JSON may
    leave them out or say "auto", and where it states them they must agree.
    The optimizer and schedule are ours (parameter groups without weight decay
    on biases and LayerNorm), so the JSON must not define them.
    """
    path = cfg.runtime.deepspeed_config
    where = f"{source}: runtime.deepspeed_config ({path})"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: file not found")
    ds = load_deepspeed_json(path)
    if not isinstance(ds, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    expected = {
        "train_batch_size": cfg.global_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, want in expected.items():
        got = ds.get(key, "auto")
        if got != "auto" and got != want:
            raise ConfigError(
                f"{where}: {key} is {got} but the config gives {want} "
                f"(data.captions_per_step + data.text_per_step, optim.grad_accum, optim.grad_clip); "
                f"remove it from the JSON or set it to \"auto\""
            )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{where}: defines '{key}'; the optimizer and schedule come from the optim section")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0-3, got {stage}")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{where}: bf16 and fp16 are both enabled")
    return ds


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
