"""The DeepSpeed engine (vlbert/train/engine/) on a tiny module in one gloo process:
schedule, parameter groups, config resolution, overfitting with accumulation,
and save/load through DeepSpeed with weights_only loading (ZeRO 2/3, fp32/bf16)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vlbert.config import ConfigError, DataConfig, OptimConfig
from vlbert.train.ds_config import micro_batch_counts, resolve_deepspeed_config
from vlbert.train.engine import Engine, count_parameters, init_distributed, param_groups
from vlbert.train.schedule import warmup_linear_decay, warmup_step_decay

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::FutureWarning")]


@dataclass
class Out:
    loss: torch.Tensor


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor

    def to(self, device, non_blocking=False):
        return Batch(self.x.to(device), self.y.to(device))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, batch: Batch) -> Out:
        h = self.emb(batch.x).mean(1)
        pred = self.net(h).squeeze(-1).float()
        return Out(((pred - batch.y) ** 2).mean())


@pytest.fixture(scope="module", autouse=True)
def process_group():
    return init_distributed()


def fixed_batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, 10, (n, 5), generator=g), torch.randn(n, generator=g))


def make_engine(stage=2, bf16=False, accum=1, lr=1e-2, warmup=2, total=50, seed=0):
    torch.manual_seed(seed)
    data = DataConfig(captions_per_step=4 * accum, text_per_step=4 * accum)
    optim = OptimConfig(lr=lr, warmup_steps=warmup, total_steps=total, grad_accum=accum, weight_decay=0.01,
                        grad_clip=1.0)
    ds = {"zero_optimization": {"stage": stage}}
    if bf16:
        ds["bf16"] = {"enabled": True}
    return Engine(Tiny(), optim, resolve_deepspeed_config(ds, data, optim, world_size=1))


def test_schedule_warms_up_then_decays_linearly_to_zero():
    f = [warmup_linear_decay(s, 4, 12) for s in range(14)]
    assert f[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f[8] == pytest.approx(0.5) and f[12] == 0.0 and f[13] == 0.0
    assert warmup_linear_decay(0, 0, 10) == 1.0


def test_schedule_can_hold_the_peak_and_decay_over_the_last_steps():
    f = [warmup_linear_decay(s, 2, 12, decay_steps=4) for s in range(14)]
    assert f == pytest.approx([0.0, 0.5, 1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0, 0.0])
    # A decay as long as the steps after the warmup (or longer) is the plain linear schedule.
    for decay in (10, 50):
        assert [warmup_linear_decay(s, 2, 12, decay) for s in range(14)] == [warmup_linear_decay(s, 2, 12)
                                                                              for s in range(14)]


def test_step_schedule_warms_up_then_drops_at_its_points():
    """VCR's recipe in miniature: warmup 2, x0.1 at 0.7 and 0.9 of 20 steps (steps 14 and 18), by
    hand. Fails if a drop comes a step early or late or compounds wrongly."""
    f = [warmup_step_decay(s, 2, 20, [0.7, 0.9], 0.1) for s in range(21)]
    assert f == pytest.approx([0.0, 0.5] + [1.0] * 12 + [0.1] * 4 + [0.01] * 3)


def test_engine_with_sgd_takes_momentum_steps_on_the_step_schedule():
    """optim.optimizer: sgd runs torch's SGD with momentum under DeepSpeed, at the step schedule's
    rate. The weights after two steps equal SGD with momentum worked out by hand on one parameter
    group (fails if the momentum, the learning rate or the schedule is not the configured one)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    data = DataConfig(captions_per_step=4, text_per_step=4)
    optim = OptimConfig(optimizer="sgd", momentum=0.5, lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.0,
                        grad_clip=0.0, step_decay_at=[0.1], step_decay_factor=0.5)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, batch):
            return Out(self.lin(batch.x.float()).sum())

    engine = Engine(Wrap(), optim, resolve_deepspeed_config({"zero_optimization": {"stage": 1}}, data, optim, 1))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    batch = Batch(x, torch.zeros(1))
    engine.step(batch)
    engine.step(batch)
    # grad is x every step; lr 0.1 at step 0, 0.05 from step 1 (0.1 x 10 = step 1); v1 = g, v2 = 0.5 v1 + g
    g = x[0]
    expected = w0[0] - 0.1 * g - 0.05 * (0.5 * g + g)
    torch.testing.assert_close(model.weight.detach()[0].cpu(), expected, rtol=1e-5, atol=1e-6)
    assert type(engine.optimizer.optimizer).__name__ == "SGD" or "SGD" in type(engine.optimizer).__name__


def test_optimizer_choice_is_checked():
    from vlbert.config import validate_optimizer_choice

    for bad, field in ((dict(optimizer="adam"), "optim.optimizer"), (dict(step_decay_at=[0.9, 0.7]), "optim.step_decay_at"),
                       (dict(step_decay_at=[1.0]), "optim.step_decay_at"), (dict(momentum=1.0), "optim.momentum"),
                       (dict(step_decay_at=[0.5], decay_steps=3), "optim.decay_steps")):
        with pytest.raises(ConfigError, match=field):
            validate_optimizer_choice(OptimConfig(**bad), "<test>")


def test_param_groups_exempt_biases_and_normalisation_but_not_embeddings():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.Linear(4, 5))
    model[4].weight = model[0].weight  # tied, as the MLM decoder
    model[3].weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(model[0].weight), id(model[1].weight)}
    assert no_decay == {id(model[1].bias), id(model[2].weight), id(model[2].bias), id(model[3].bias),
                        id(model[4].bias)}
    assert count_parameters(model) == 20 + 20 + 8 + 8 + 5 and count_parameters(model, ("0.",)) == 41


def test_resolve_fills_batch_sizes_and_rejects_disagreement():
    data, optim = DataConfig(captions_per_step=8, text_per_step=16), OptimConfig(grad_accum=2, grad_clip=3.0)
    ds = resolve_deepspeed_config({"train_batch_size": "auto", "zero_optimization": {"stage": 2}}, data, optim, 4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 3.0
    assert ds["zero_allow_untested_optimizer"] is True
    assert micro_batch_counts(data, optim, 4) == (1, 2)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 4"):
        resolve_deepspeed_config({"train_micro_batch_size_per_gpu": 4}, data, optim, 4)
    with pytest.raises(ConfigError, match="data.captions_per_step = 8 must be divisible"):
        micro_batch_counts(data, optim, 8)
    with pytest.raises(ConfigError, match="optimizer"):
        resolve_deepspeed_config({"optimizer": {"type": "Adam"}}, data, optim, 1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a GPU"):
            resolve_deepspeed_config({"fp16": {"enabled": True}}, data, optim, 1)


def test_engine_overfits_a_fixed_batch_with_accumulation_and_schedule():
    engine = make_engine(stage=2, accum=2, lr=3e-2, warmup=2, total=40)
    batch = fixed_batch()
    first = engine.step(batch).loss.item()
    assert not engine.boundary and engine.global_step == 0
    engine.step(batch)
    assert engine.boundary and engine.global_step == 1
    assert engine.lr == pytest.approx(3e-2 * 0.5)  # the lr of the next step: warmup 1/2
    losses = []
    for _ in range(38):
        losses.append(engine.step(batch).loss.item())
    assert engine.global_step == 20
    assert engine.lr == pytest.approx(3e-2 * (40 - 20) / 38)
    assert losses[-1] < 0.2 * first, (first, losses[-5:])
    assert engine.grad_norm is not None and engine.grad_norm > 0
    assert engine.loss_scale == 1.0 and engine.precision == "fp32"


@pytest.mark.parametrize("stage,bf16", [(2, False), (3, False), (1, True)])
def test_save_load_roundtrip_is_exact_and_weights_only(tmp_path, monkeypatch, stage, bf16):
    a = make_engine(stage=stage, bf16=bf16, warmup=1, total=10)
    batch = fixed_batch()
    for _ in range(3):
        a.step(batch)
    a.save_state(str(tmp_path))
    assert (tmp_path / "ds").is_dir()

    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    b = make_engine(stage=stage, bf16=bf16, warmup=1, total=10, seed=123)  # different init
    b.load_state(str(tmp_path))
    monkeypatch.undo()
    assert calls and all(w is True for w in calls), calls  # DeepSpeed's files, loaded safely

    sa, sb = a.full_state_dict(), b.full_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.global_step == a.global_step == 3 and b.lr == pytest.approx(a.lr)
    for _ in range(2):  # optimizer moments restored: the next updates agree exactly
        la, lb = a.step(batch).loss.item(), b.step(batch).loss.item()
        assert la == lb
    sa, sb = a.full_state_dict(), b.full_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_follows_a_changed_schedule(tmp_path):
    a = make_engine(warmup=1, total=10, lr=1e-2)
    for _ in range(4):
        a.step(fixed_batch())
    a.save_state(str(tmp_path))
    torch.manual_seed(0)
    data = DataConfig(captions_per_step=4, text_per_step=4)
    optim = OptimConfig(lr=2e-2, warmup_steps=1, total_steps=21, weight_decay=0.01, grad_clip=1.0)
    b = Engine(Tiny(), optim, resolve_deepspeed_config({"zero_optimization": {"stage": 2}}, data, optim, 1))
    b.load_state(str(tmp_path))
    assert b.global_step == 4 and b.lr == pytest.approx(2e-2 * (21 - 4) / 20)


class TinyWithDetector(Tiny):
    """Tiny with a ``detector`` submodule, named as in VLBertForPretraining."""

    def __init__(self):
        super().__init__()
        self.detector = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))

    def forward(self, batch: Batch) -> Out:
        h = self.detector(self.emb(batch.x)).mean(1)
        return Out(((self.net(h).squeeze(-1).float() - batch.y) ** 2).mean())


def detector_engine(mult: float, lr=1e-2, warmup=2, total=20, seed=0) -> Engine:
    torch.manual_seed(seed)
    data = DataConfig(captions_per_step=4, text_per_step=4)
    optim = OptimConfig(lr=lr, warmup_steps=warmup, total_steps=total, weight_decay=0.01, grad_clip=1.0,
                        detector_lr_mult=mult)
    return Engine(TinyWithDetector(), optim,
                  resolve_deepspeed_config({"zero_optimization": {"stage": 2}}, data, optim, world_size=1))


def test_param_groups_give_prefixed_parameters_their_own_multiplier():
    model = TinyWithDetector()
    model.detector[1].weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, 0.1, {"detector.": 0.25})
    assert [(g["weight_decay"], g["lr_mult"]) for g in groups] == [(0.1, 1.0), (0.0, 1.0), (0.1, 0.25), (0.0, 0.25)]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[2] == {id(model.detector[0].weight)}
    assert ids[3] == {id(model.detector[0].bias), id(model.detector[1].bias)}
    assert not (ids[0] | ids[1]) & (ids[2] | ids[3])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(i) for i in ids) == n_trainable
    assert all(g["lr_mult"] == 1.0 for g in param_groups(model, 0.1))  # no mapping: one multiplier


def test_detector_groups_follow_the_schedule_at_their_own_peak(tmp_path):
    engine = detector_engine(mult=0.1, lr=1e-2, warmup=2, total=20)
    mults = [g["lr_mult"] for g in engine.scheduler.optimizer.param_groups]
    assert mults == [1.0, 1.0, 0.1, 0.1]
    assert engine.group_lrs == [0.0] * 4  # step 0 of the warmup
    before = {k: v.clone() for k, v in engine.full_state_dict().items()}
    for _ in range(6):
        engine.step(fixed_batch())
    factor = warmup_linear_decay(6, 2, 20)
    assert engine.group_lrs == pytest.approx([1e-2 * factor * m for m in mults])
    after = engine.full_state_dict()
    # Adam's first steps move each weight by about its lr: the detector's 10x less.
    enc = (after["net.0.weight"] - before["net.0.weight"]).abs().mean()
    det = (after["detector.0.weight"] - before["detector.0.weight"]).abs().mean()
    assert 0.03 < det / enc < 0.3, (float(det), float(enc))

    engine.save_state(str(tmp_path))
    resumed = detector_engine(mult=0.5, lr=1e-2, warmup=2, total=20, seed=1)  # a changed multiplier
    resumed.load_state(str(tmp_path))
    assert resumed.global_step == 6
    assert resumed.group_lrs == pytest.approx([1e-2 * factor * m for m in (1.0, 1.0, 0.5, 0.5)])
    resumed.step(fixed_batch())
    assert resumed.group_lrs == pytest.approx([1e-2 * warmup_linear_decay(7, 2, 20) * m for m in (1, 1, .5, .5)])


def test_detector_lr_mult_must_be_positive():
    from pathlib import Path

    from vlbert.config import load_config

    demo = Path(__file__).resolve().parents[1] / "configs/demo.yaml"
    assert load_config(demo, ["optim.detector_lr_mult=0.1"], check_files=False).optim.detector_lr_mult == 0.1
    with pytest.raises(ConfigError, match="optim.detector_lr_mult: must be positive"):
        load_config(demo, ["optim.detector_lr_mult=0"], check_files=False)


# --------------------------------------------------------------------------- fp16 loss scaling


@dataclass
class GainBatch:
    x: torch.Tensor
    gain: torch.Tensor  # scalar: multiplies the loss, so a batch can make the scaled gradients overflow

    def to(self, device, non_blocking=False):
        return GainBatch(self.x.to(device), self.gain.to(device))


class Linear1(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, batch: GainBatch) -> Out:
        return Out(self.lin(batch.x.to(self.lin.weight.dtype)).float().sum() * batch.gain)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="fp16 loss scaling runs on CUDA only (DeepSpeed fp16 needs a GPU; the config check refuses it here)")
def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    """ds_configs/zero2_fp16.json on a one-layer model. The loss is ``sum(lin(x)) * gain``: with
    gain 1e4 the gradient of the weight is gain x scale x sum(x), far past fp16's 65504, so every
    such step overflows; with gain 1e-6 it is about 1. DeepSpeed's dynamic scaler
    (deepspeed/runtime/fp16/loss_scaler.py, ``update_scale``) keeps the scale for the first
    ``hysteresis - 1`` overflows, then halves it on each; an overflowing step leaves the weights
    as they were and counts as skipped; a clean step updates them and keeps the scale (the
    window of 1000 clean steps before it doubles is far away).
    Fails if an overflowing step is applied (weights change), not counted in ``skipped_steps``,
    or if ``Engine.loss_scale`` does not report the scaler's current scale."""
    import json
    from pathlib import Path

    ds = json.loads((Path(__file__).resolve().parents[1] / "ds_configs/zero2_fp16.json").read_text())
    fp16 = ds["fp16"]
    assert fp16["loss_scale"] == 0  # dynamic
    scale0, hysteresis = 2.0 ** fp16["initial_scale_power"], fp16["hysteresis"]
    data = DataConfig(captions_per_step=4, text_per_step=4)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=100, grad_accum=1, weight_decay=0.0, grad_clip=0.0)
    torch.manual_seed(0)
    engine = Engine(Linear1(), optim, resolve_deepspeed_config(ds, data, optim, world_size=1))
    assert engine.precision == "fp16" and engine.loss_scale == scale0
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).abs() + 0.5  # sum(x) > 0: no cancelling
    weights = lambda: engine.full_state_dict()["lin.weight"].float()  # noqa: E731
    before = weights()
    expected = scale0
    for k in range(1, hysteresis + 2):  # the last two halve the scale
        engine.step(GainBatch(x, torch.tensor(1e4)))
        if k >= hysteresis:
            expected /= 2
        assert engine.skipped_steps == k and engine.global_step == k
        assert engine.loss_scale == expected, (k, engine.loss_scale)
        assert torch.equal(weights(), before), f"overflowing step {k} changed the weights"
    engine.step(GainBatch(x, torch.tensor(1e-6)))
    assert engine.skipped_steps == hysteresis + 1 and engine.global_step == hysteresis + 2
    assert engine.loss_scale == expected
    after = weights()
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    engine.close()
