"""One description of the network travels with its weights.

A run's exported ``model.json`` (``vlbert.train.loop.export_weights``) holds, beside the
step and the MLflow run id, the ``model`` (encoder) and ``detector`` sections the weights were
trained in (``network_info``). Fine-tuning from ``model.pretrained`` and ``vlbert-evaluate``
on a fine-tuned ``model.safetensors`` build exactly that network (``resolve_network``):

- a fine-tuning config may leave the ``detector`` section (and the encoder's sizes) out
  entirely: they come from the weights' ``model.json``;
- a field that defines parameter shapes or what they mean (``NETWORK_FIELDS``: depth, classes,
  RoI op and size, res5 dilation, stem pool, RPN width and anchors, box arithmetic, input
  normalisation; the encoder's BERT and sizes) may be written only with the weights' value;
  another value is a ``ConfigError`` naming the field;
- a field that may legitimately differ at fine-tuning (``detector.trainable``, ``frozen_stages``,
  ``freeze_batchnorm``, ``roi_targets``, ``checkpoint``, activation checkpointing, dropouts) keeps
  the fine-tuning config's value (its default when the config does not write it). Which boxes
  an image gets (``<task>.image``: min/max boxes, score threshold) is the task's, not the network's.

Weights exported before the sections existed carry none: the config's sections are then used
as they are (and a mismatch shows as a shape error when the weights load).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlbert.config import DetectorConfig, ModelConfig
from vlbert.config_reader import ConfigError, build

# The fields that fix the network the weights belong to.
NETWORK_FIELDS = {
    "model": ("bert", "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position_embeddings", "geometry_freqs"),
    "detector": ("depth", "num_classes", "roi_size", "pixel_mean", "pixel_std", "bgr", "caffe_stem_pool",
                 "res5_dilation", "roi_op", "roi_sampling_ratio", "roi_aligned", "rpn_channels", "anchor_scales",
                 "anchor_ratios", "caffe_boxes"),
}


def network_info(model: ModelConfig, detector: DetectorConfig) -> dict[str, dict[str, Any]]:
    """The ``model`` and ``detector`` entries of an exported ``model.json``."""
    return {"model": {k: v for k, v in dataclasses.asdict(model).items() if k in _field_names(ModelConfig)},
            "detector": dataclasses.asdict(detector)}


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def written_keys(cfg) -> set[str]:
    """Dotted keys (``detector.depth``) the config wrote: recorded by ``load_finetune_config``;
    for a config built in code, the fields that differ from their defaults."""
    recorded = getattr(cfg, "_written_keys", None)
    if recorded is not None:
        return set(recorded)
    out = set()
    for section in NETWORK_FIELDS:
        value, default = getattr(cfg, section), type(getattr(cfg, section))()
        out |= {f"{section}.{f.name}" for f in dataclasses.fields(value)
                if getattr(value, f.name) != getattr(default, f.name)}
    return out


def resolve_network(cfg, info: dict[str, Any], source: str = "model.json"):
    """``cfg`` (a FinetuneConfig) with its ``model`` and ``detector`` sections set to the
    network in ``info`` (an exported ``model.json``), keeping the fields free to differ.
    Raises ConfigError naming the first network field the config wrote with another value."""
    written = written_keys(cfg)
    sections = {}
    for section, fields in NETWORK_FIELDS.items():
        mine = getattr(cfg, section)
        theirs = info.get(section)
        if not isinstance(theirs, dict):
            continue  # weights exported without the section: the config's stands
        try:
            trained = build(type(mine), {k: v for k, v in theirs.items() if k in _field_names(type(mine))},
                            prefix=section + ".", source=source)
        except ConfigError as e:
            raise ConfigError(f"{source}: the exported {section} section is not readable: {e}") from None
        for name in fields:
            key = f"{section}.{name}"
            if key in written and getattr(mine, name) != getattr(trained, name):
                raise ConfigError(
                    f"{key}: the config asks for {getattr(mine, name)!r} but the weights ({source}) were trained "
                    f"with {getattr(trained, name)!r}; this field changes the network, so remove it from the "
                    f"config (the weights' value is used) or set it to that value")
        sections[section] = dataclasses.replace(mine, **{name: getattr(trained, name) for name in fields})
    resolved = dataclasses.replace(cfg, **sections)
    if hasattr(cfg, "_written_keys"):
        resolved._written_keys = cfg._written_keys
    return resolved
