"""The config tree: every shipped YAML and DeepSpeed JSON loads, and each kind of bad
config fails at load time with a message naming the key, the file and what was expected."""

import json
from pathlib import Path

import pytest
import yaml

from vlbert.config import (
    Config,
    ConfigError,
    flatten,
    load_config,
    save_config,
)

from vlbert.train.ds_config import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
# Pretraining run configs; fine-tuning ones (a top-level vqa:/refcoco: section) load with their
# own loader (test_every_shipped_finetune_yaml_loads; their recipes in tests/test_vqa_recipe.py,
# tests/test_refcoco.py).
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml")
                 if not {"vqa", "refcoco", "vcr"} & set(yaml.safe_load(p.read_text()) or {}))
FINETUNE_CONFIGS = sorted(set((ROOT / "configs").glob("*.yaml")) - set(CONFIGS))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    # Configs name ds_configs/ relative to the repository root.
    monkeypatch.chdir(ROOT)


def _write(tmp_path, data, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_shipped_files_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "base_e2e", "large_e2e"} <= names
    ds = {p.stem for p in DS_CONFIGS}
    for prec in ("bf16", "fp16"):
        for stage in (1, 2, 3):
            assert f"zero{stage}_{prec}" in ds
        assert f"zero2_offload_{prec}" in ds and f"zero3_offload_{prec}" in ds


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_finetune_yaml_loads(path):
    """Every fine-tuning YAML (VQA, RefCOCO+, VCR) builds the typed tree and passes validation, its
    DeepSpeed file included. Fails if a shipped file names a key the schema lacks."""
    from vlbert.tasks.config import FinetuneConfig, load_finetune_config

    cfg = load_finetune_config(path)
    assert isinstance(cfg, FinetuneConfig) and cfg.task is not None
    assert {"vqa_base", "refcoco_base", "vcr_base"} <= {p.stem for p in FINETUNE_CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.global_batch_size == cfg.data.captions_per_step + cfg.data.text_per_step


def test_recipe_numbers_follow_the_paper():
    base = load_config(ROOT / "configs/base_e2e.yaml")
    assert (base.data.captions_per_step, base.data.text_per_step) == (128, 128)
    assert base.optim.lr == pytest.approx(1e-7 * 256)
    assert base.optim.eps == 1e-6 and base.optim.weight_decay == 1e-4 and base.optim.grad_clip == 10
    assert (base.optim.warmup_steps, base.optim.total_steps) == (16000, 250000)
    assert (base.data.captions.short_side, base.data.captions.max_long_side) == (600, 1000)
    assert (base.data.captions.min_boxes, base.data.captions.max_boxes) == (10, 100)
    assert base.detector.depth == 101 and base.detector.frozen_stages == 1 and base.detector.freeze_batchnorm
    assert base.masking.mlm_prob == 0.15 and base.masking.roi_prob == 0.15
    large = load_config(ROOT / "configs/large_e2e.yaml")
    assert large.model.bert == "bert-large-uncased"


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_deepspeed_json_validates(path):
    cfg = load_config(ROOT / "configs/base_e2e.yaml", [f"runtime.deepspeed_config={path.relative_to(ROOT)}"])
    ds = deepspeed_config(cfg.runtime.deepspeed_config, cfg.data, cfg.optim, world_size=1, cuda=True)
    assert ds["zero_optimization"]["stage"] in (1, 2, 3)
    assert not (ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"))


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        ["optim.lr=1e-4", "data.captions.urls=[a.tar,b.tar]", "model.num_layers=3", "runtime.resume=false",
         "data.text.sources.books.weight=2"],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.captions.urls == ["a.tar", "b.tar"]
    assert cfg.model.num_layers == 3 and cfg.runtime.resume is False
    assert cfg.data.text.sources["books"].weight == 2.0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/base_e2e.yaml", ["optim.lr=3e-5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    flat = flatten(cfg.to_dict())
    assert flat["optim.lr"] == 3e-5 and flat["data.text.sources.books.weight"] == 1.0


# --------------------------------------------------------------------------- bad configs


def _demo_raw():
    return yaml.safe_load((ROOT / "configs/demo.yaml").read_text())


def test_unknown_key_is_named(tmp_path):
    raw = _demo_raw()
    raw["optim"]["learning_rate"] = 1e-3
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "optim.learning_rate" in msg and str(path) in msg and "lr" in msg  # names the known keys


def test_unknown_section_and_override_key():
    with pytest.raises(ConfigError, match="unknown key optimiser"):
        load_config(ROOT / "configs/demo.yaml", ["optimiser.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key data\.captions\.url\b"):
        load_config(ROOT / "configs/demo.yaml", ["data.captions.url=[x.tar]"])


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("optim.lr=fast", "optim.lr", "expected float"),
        ("model.num_layers=2.5", "model.num_layers", "expected int"),
        ("runtime.resume=maybe", "runtime.resume", "expected bool"),
        ("data.captions.urls=demo.tar", "data.captions.urls", "expected a list"),
        ("optim=3", "optim", "expected a section"),
    ],
)
def test_wrong_type_is_named(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", [override])
    assert key in str(e.value) and expected in str(e.value) and "demo.yaml" in str(e.value)


def test_wrong_type_in_file(tmp_path):
    raw = _demo_raw()
    raw["data"]["captions_per_step"] = "sixteen"
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"run\.yaml.*data\.captions_per_step: expected int"):
        load_config(path)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"runtime\.deepspeed_config.*missing\.json.*file not found"):
        load_config(ROOT / "configs/demo.yaml", ["runtime.deepspeed_config=ds_configs/missing.json"])


def resolved_ds(config: Path, ds_path: Path) -> dict:
    """Load a run config naming ``ds_path``, then read and check the JSON as a run does."""
    cfg = load_config(config, [f"runtime.deepspeed_config={ds_path}"])
    return deepspeed_config(cfg.runtime.deepspeed_config, cfg.data, cfg.optim, world_size=1, cuda=True)


def test_batch_size_mismatch_with_deepspeed_json(tmp_path):
    ds = json.loads((ROOT / "ds_configs/zero2_bf16.json").read_text())
    ds["train_batch_size"] = 512
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        resolved_ds(ROOT / "configs/base_e2e.yaml", tmp_path / "ds.json")
    msg = str(e.value)
    assert "train_batch_size is 512" in msg and "256" in msg and "ds.json" in msg


def test_batch_size_that_agrees_or_auto_is_accepted(tmp_path):
    ds = json.loads((ROOT / "ds_configs/zero2_bf16.json").read_text())
    for value in (256, "auto"):
        ds["train_batch_size"] = value
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        resolved_ds(ROOT / "configs/base_e2e.yaml", tmp_path / "ds.json")


def test_deepspeed_json_must_not_define_the_optimizer(tmp_path):
    ds = json.loads((ROOT / "ds_configs/zero2_bf16.json").read_text())
    ds["optimizer"] = {"type": "Adam", "params": {"lr": 1e-4}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="defines 'optimizer'"):
        resolved_ds(ROOT / "configs/base_e2e.yaml", tmp_path / "ds.json")


def test_broken_json_and_yaml(tmp_path):
    (tmp_path / "ds.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolved_ds(ROOT / "configs/demo.yaml", tmp_path / "ds.json")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ROOT / "configs/demo.yaml", ["optim.lr"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.warmup_steps=500000", "optim.warmup_steps"),
        ("optim.decay_steps=100000", "optim.decay_steps"),  # more than the steps after the warmup
        ("optim.decay_steps=-1", "optim.decay_steps"),
        ("model.num_heads=5", "model.hidden_size"),
        ("masking.mlm_prob=1.5", "masking.mlm_prob"),
        ("data.captions.urls=[]", "data.captions.urls"),
        ("optim.grad_accum=5", "optim.grad_accum"),
        ("data.captions.min_boxes=20", "data.captions.min_boxes"),
        ("detector.depth=42", "detector.depth"),
        ("runtime.lease_stale_minutes=0", "runtime.lease_stale_minutes"),
    ],
)
def test_inconsistent_values_are_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", [override])
    assert key in str(e.value)


def test_a_moved_key_says_where_it_went(tmp_path):
    from vlbert.config import ConfigError, load_config

    path = tmp_path / "old.yaml"
    path.write_text((ROOT / "configs/tiny.yaml").read_text())
    with pytest.raises(ConfigError, match=r"tracking.log_every is now runtime.log_every"):
        load_config(path, ["tracking.log_every=5"])


def test_e2e_recipes_use_the_visual_genome_preset_and_fixed_targets():
    for name in ("base_e2e", "large_e2e"):
        det = load_config(ROOT / f"configs/{name}.yaml").detector
        assert det.preset == "butd_r101_vg"
        assert (det.depth, det.num_classes, det.res5_dilation, det.caffe_stem_pool, det.bgr) == (101, 1601, 2, True, True)
        assert det.pixel_mean == [102.9801, 115.9465, 122.7717] and det.pixel_std == [1.0, 1.0, 1.0]
        assert (det.rpn_channels, det.anchor_scales, det.roi_sampling_ratio, det.roi_aligned) == (
            512, [4.0, 8.0, 16.0, 32.0], 1, False)
        assert det.trainable and det.roi_targets == "precomputed"
    assert load_config(ROOT / "configs/base_e2e.yaml").data.captions.max_sequence_length == 64


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"detector.preset: unknown detector preset 'butd'; valid presets: butd_r101_vg"):
        load_config(ROOT / "configs/base_e2e.yaml", ["detector.preset=butd"])


def test_preset_values_yield_to_the_section_and_overrides():
    cfg = load_config(ROOT / "configs/base_e2e.yaml", ["detector.roi_op=pool", "detector.depth=50"])
    assert (cfg.detector.roi_op, cfg.detector.depth, cfg.detector.res5_dilation) == ("pool", 50, 2)


def test_targets_from_a_trainable_detector_fail_at_config_load():
    with pytest.raises(ConfigError, match="detector.roi_targets: 'detector' .* would drift"):
        load_config(ROOT / "configs/base_e2e.yaml", ["detector.roi_targets=detector"])
    cfg = load_config(ROOT / "configs/base_e2e.yaml", ["detector.roi_targets=detector", "detector.trainable=false"])
    assert cfg.detector.roi_targets == "detector"
    with pytest.raises(ConfigError, match="detector.roi_targets"):
        load_config(ROOT / "configs/base_e2e.yaml", ["detector.roi_targets=online"])
    with pytest.raises(ConfigError, match="detector.res5_dilation"):
        load_config(ROOT / "configs/base_e2e.yaml", ["detector.res5_dilation=3"])
    with pytest.raises(ConfigError, match="max_sequence_length"):
        load_config(ROOT / "configs/base_e2e.yaml", ["data.captions.max_sequence_length=2"])
