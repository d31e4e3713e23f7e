"""End-to-end BASE pretraining step on one GPU: detector + VL-BERT trained jointly, synthetic tensors.

VL-BERT-base + ResNet-101 C4 detector (random init), 600x1000 uint8 images on the device, 36 boxes (box 0 =
whole image), captions of 32 tokens, text segments of 64. Optimizer: DeepSpeed ZeRO-2 bf16 via
``vlbert.train.engine`` on CUDA, else ``torch.optim.AdamW`` (bf16 = autocast over fp32 weights). Each
variant (checkpointing x speed options) is built afresh, warmed up, timed between two CUDA events, profiled.

- Split: a separate profiling pass records CUDA events (perf_counter on CPU) at the detector's forward
  pre-hook and forward hook, at a gradient hook on its output (its backward starts) and at a multi-grad
  hook over its trainable parameters (its backward ends: it runs first in the forward, so its backward is
  the tail of the backward pass). detector = both intervals; optimizer = end of detector backward -> end
  of step (ZeRO epilogue, clipping, AdamW); encoder = the rest (embeddings, encoder, heads, text pass).
- FLOPs: torch.utils.flop_counter.FlopCounterMode over forward + backward of one caption sample and one
  text sample without activation checkpointing (model FLOPs), scaled by the micro-batch (every counted op
  is per sample; masks have fixed counts per sample). Detector and VL-BERT body are counted alone the
  same way; heads = total - detector - body. MFU = FLOPs / (time x peak).

    python bench/gpu_e2e.py --checkpointing both --channels-last --compile --ablate --json-out e2e.json
    python bench/gpu_e2e.py --tiny --device cpu          # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time
import traceback
import warnings
import weakref
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]

from vlbert.config import DataConfig, DetectorConfig, ModelConfig, OptimConfig  # noqa: E402
from vlbert.train.ds_config import load_deepspeed_json  # noqa: E402
from vlbert.batch import IGNORE_INDEX, CaptionBatch, PretrainBatch, TextBatch  # noqa: E402
from vlbert.model.embeddings import VisualInputs  # noqa: E402
from vlbert.model.pretraining import VLBertForPretraining  # noqa: E402

# Dense bf16 peak TFLOP/s by device-name substring, most specific first.
PEAK_BF16_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("B200", 2250.0))
BASE = dict(hidden=768, layers=12, heads=12, vocab=30522, geometry_freqs=256, depth=101, num_classes=1601,
            roi_size=14, image_size="600x1000", boxes=36, caption_len=32, text_len=64, captions=16, text=16,
            warmup=3, steps=10, profile_steps=3, precision="bf16")
# roi_size 6 (res5 on 3x3) keeps the CPU run short; the code path is the same.
TINY = dict(hidden=32, layers=2, heads=2, vocab=1000, geometry_freqs=8, depth=18, num_classes=16, roi_size=6,
            image_size="64x96", boxes=4, caption_len=8, text_len=16, captions=2, text=2, warmup=2, steps=2,
            profile_steps=2, precision="fp32")
SIZES = ("hidden", "layers", "heads", "vocab", "geometry_freqs", "depth", "num_classes", "roi_size", "boxes",
         "caption_len", "text_len")
COLUMNS = (("ms/step", ".1f"), ("samp/s", ".1f"), ("det%", ".1%"), ("enc%", ".1%"), ("opt%", ".1%"),
           ("MFUenc", ".1%"), ("MFUstep", ".1%"), ("peakGiB", ".2f"), ("syncs", "d"), ("x base", ".2f"))


Shapes = collections.namedtuple("Shapes", SIZES + ("image_h", "image_w", "captions", "text"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--tiny", action="store_true", help="hidden 32, 2 layers, R18, 64x96, 4 boxes, 2+2, fp32, no DeepSpeed")
    add("--device", help="default: cuda when available, else cpu")
    add("--captions", type=int, help="captioned images per micro-batch (16; at least 1)")
    add("--text", type=int, help="text segments per micro-batch (16)")
    add("--warmup", type=int, help="untimed steps per variant (3)")
    add("--steps", type=int, help="timed steps per variant (10)")
    add("--profile-steps", type=int, help="steps of the split-profiling pass (3)")
    add("--checkpointing", choices=("on", "off", "both"), default="both", help="activation checkpointing")
    add("--channels-last", action="store_true", help="detector activations channels-last (see apply_options)")
    add("--autocast-bf16", action="store_true", help="detector forward under bf16 autocast")
    add("--compile", action="store_true", help="torch.compile each encoder layer")
    add("--ablate", action="store_true", help="baseline, each chosen option alone, all together")
    add("--attention", choices=("sdpa", "eager"), default="sdpa")
    add("--precision", choices=("bf16", "fp32"), help="bf16 (tiny: fp32)")
    ds = p.add_mutually_exclusive_group()
    ds.add_argument("--deepspeed", action="store_const", const=True, help="ZeRO via vlbert.train.engine")
    ds.add_argument("--no-deepspeed", dest="deepspeed", action="store_const", const=False, help="torch AdamW")
    add("--ds-config", help="default ds_configs/zero2_bf16.json (bf16) or cpu_zero2_fp32.json (fp32)")
    add("--no-sync-debug", action="store_true", help="skip the one-step CUDA host-sync census")
    add("--peak-tflops", type=float, help="peak for MFU (default: dense bf16 peak from the device name)")
    add("--time-budget-s", type=float, help="skip variants that would end past this many seconds")
    add("--json-out", help="one JSON line with all figures (rewritten after each variant)")
    for key in SIZES:
        add("--" + key.replace("_", "-"), type=int)
    add("--image-size", help="HxW (600x1000)")
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else BASE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.deepspeed is None:
        args.deepspeed = args.device.startswith("cuda") and not args.tiny
    if args.ds_config is None:
        name = "zero2_bf16.json" if args.precision == "bf16" else "cpu_zero2_fp32.json"
        args.ds_config = str(ROOT / "ds_configs" / name)
    if args.captions < 1 or args.text < 0:
        p.error("need --captions >= 1 (the split times the detector) and --text >= 0")
    h, w = (int(v) for v in args.image_size.lower().split("x"))
    args.shapes = Shapes(*(getattr(args, k) for k in SIZES), h, w, args.captions, args.text)
    return args


# --------------------------------------------------------------------------- model, batch, FLOPs


def build_model(s: Shapes, checkpointing: bool, seed: int = 0) -> VLBertForPretraining:
    torch.manual_seed(seed)
    model_cfg = ModelConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                            intermediate_size=4 * s.hidden, geometry_freqs=s.geometry_freqs,
                            max_position_embeddings=max(512, s.text_len, s.caption_len + 2),
                            activation_checkpointing=checkpointing)
    det_cfg = DetectorConfig(depth=s.depth, num_classes=s.num_classes, roi_size=s.roi_size,
                             activation_checkpointing=checkpointing)
    model = VLBertForPretraining(model_cfg, det_cfg)
    with torch.no_grad():  # a trained model's image path is live; at init the visual LayerNorm gates it to 0
        model.vlbert.embeddings.visual_layer_norm.weight.fill_(1.0)
    return model.train()


def _mlm(g: torch.Generator, n: int, length: int, vocab: int, ragged: bool):
    """ids, mask, labels [n, length], ragged (captions: lengths in [length/2, length]) or full (packed text);
    every sample has the same number of MLM labels, 15% of the mean inner length."""
    lengths = torch.randint(max(3, length // 2), length + 1, (n,), generator=g) if ragged else torch.full((n,), length)
    mask = torch.arange(length) < lengths[:, None]
    ids = torch.randint(5, vocab, (n, length), generator=g) * mask
    labels, k = torch.full_like(ids, IGNORE_INDEX), max(1, round(0.15 * ((length * 3 // 4 if ragged else length) - 2)))
    for i in range(n):
        pos = 1 + torch.randperm(int(lengths[i]) - 2, generator=g)[:k]
        labels[i, pos], ids[i, pos] = ids[i, pos], 4  # 4 stands for [MASK]
    return ids, mask, labels


def make_batch(s: Shapes, captions: int, text: int, device, seed: int = 0) -> PretrainBatch:
    """Synthetic micro-batch with fixed per-sample counts of MLM tokens and chosen/masked RoIs."""
    g, cap = torch.Generator().manual_seed(seed), None
    if captions:
        B, R, H, W = captions, s.boxes, s.image_h, s.image_w
        images = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
        m = max(4.0, min(H, W) / 20)  # smallest box side
        x1, y1 = torch.rand(B, R, generator=g) * (W - m), torch.rand(B, R, generator=g) * (H - m)
        x2 = x1 + m + torch.rand(B, R, generator=g) * (W - m - x1)
        y2 = y1 + m + torch.rand(B, R, generator=g) * (H - m - y1)
        boxes = torch.stack([x1, y1, x2, y2], -1)
        boxes[:, 0] = torch.tensor([0.0, 0.0, W, H])
        chosen, masked = torch.zeros(B, R, dtype=torch.bool), torch.zeros(B, R, dtype=torch.bool)
        k = max(1, round(0.15 * (R - 1))) if R > 1 else 0
        for i in range(B):  # box 0 is never chosen
            pos = 1 + torch.randperm(R - 1, generator=g)[:k]
            chosen[i, pos] = True
            masked[i, pos[:round(0.9 * k)]] = True
        ids, mask, labels = _mlm(g, B, s.caption_len, s.vocab, ragged=True)
        targets = torch.softmax(2 * torch.randn(B, R, s.num_classes, generator=g), -1)
        cap = CaptionBatch(ids, mask, labels, images, torch.tensor([[H, W]]).expand(B, 2).clone(), boxes,
                           torch.ones(B, R, dtype=torch.bool), masked, chosen, targets)
    return PretrainBatch(cap, TextBatch(*_mlm(g, text, s.text_len, s.vocab, ragged=False)) if text else None).to(device)


def count_params(model: VLBertForPretraining) -> dict[str, int]:
    def n(mod, trainable_only=False):
        return sum(p.numel() for p in mod.parameters() if p.requires_grad or not trainable_only)
    unique = {id(p): p for p in model.parameters()}.values()  # the MLM decoder is tied to the word embeddings
    return dict(encoder_layers=n(model.vlbert.encoder), vlbert=n(model.vlbert), detector=n(model.detector),
                detector_trainable=n(model.detector, True), total=sum(p.numel() for p in unique),
                trainable=sum(p.numel() for p in unique if p.requires_grad))


def _flops(forward) -> int:
    """FLOPs of ``forward()`` and the backward of its output (a scalar loss or a tensor, with a ones grad)."""
    with FlopCounterMode(display=False) as counter:
        out = forward()
        out.backward(torch.ones_like(out))
    return counter.get_total_flops()


def count_step_flops(model: VLBertForPretraining, batch: PretrainBatch) -> dict[str, int]:
    """Forward + backward FLOPs of ``batch``: total, detector, vlbert (embeddings + encoder), heads."""
    total = _flops(lambda: model(batch).loss)
    detector = vlbert = 0
    c, t = batch.captions, batch.text
    if c is not None:
        detector = _flops(lambda: model.detector(c.images, c.boxes, c.box_mask, c.roi_masked))
        leaf = model.detector(c.images, c.boxes, c.box_mask, c.roi_masked).detach().requires_grad_()  # as in a step
        visual = VisualInputs(leaf, c.boxes, c.image_sizes, c.box_mask, c.roi_masked)
        vlbert += _flops(lambda: model.vlbert(c.input_ids, c.attention_mask, visual).last_hidden_state)
    if t is not None:
        vlbert += _flops(lambda: model.vlbert(t.input_ids, t.attention_mask).last_hidden_state)
    model.zero_grad(set_to_none=True)
    return dict(total=total, detector=detector, vlbert=vlbert, heads=total - detector - vlbert)


def model_flops(s: Shapes, device) -> tuple[dict, dict]:
    """FLOPs per micro-batch (one sample of each kind, scaled) and parameter counts."""
    model = build_model(s, checkpointing=False).to(device)
    per = [(n, count_step_flops(model, make_batch(s, int(kind == 0), int(kind == 1), device)))
           for kind, n in enumerate((s.captions, s.text)) if n]
    flops = {k: sum(n * f[k] for n, f in per) for k in ("total", "detector", "vlbert", "heads")}
    flops["encoder_side"] = flops["total"] - flops["detector"]
    params = count_params(model)
    # The hand formula: 6 x encoder-layer params x tokens + 12 x layers x seq^2 x hidden, per sample.
    flops["encoder_layers_formula"] = sum(
        n * (6 * params["encoder_layers"] * seq + 12 * s.layers * seq * seq * s.hidden)
        for n, seq in ((s.captions, s.caption_len + s.boxes + 1), (s.text, s.text_len)))
    del model
    gc.collect()
    return flops, params


# --------------------------------------------------------------------------- options and trainers


def apply_options(model: VLBertForPretraining, v: dict, device_type: str) -> None:
    """Speed options as instance-level wraps: no model file changes, parameter names unchanged."""
    det = model.detector
    if v["channels_last"]:
        # Emulates the proposed detector change. The normalised images go channels-last and cuDNN follows
        # the input's layout; weights stay contiguous (DeepSpeed's broadcast and ZeRO's flat buffers need
        # that). The res4 map is made contiguous for mmcv's RoIAlign, which reads any input as NCHW.
        normalize, extractor = det.normalize, det.detector.roi_head.bbox_roi_extractor
        extract = extractor.forward
        det.normalize = lambda images: normalize(images).contiguous(memory_format=torch.channels_last)
        extractor.forward = lambda feats, *a, **k: extract(tuple(f.contiguous() for f in feats), *a, **k)
    model.vlbert.config._attn_implementation = v["attention"]  # read by every BertSelfAttention at call time
    if v["compile"]:
        for layer in model.vlbert.encoder.layer:
            layer.compile(dynamic=False)  # in place: parameter names stay
    inner = det.forward

    def forward(*a, **k):  # explicit state: disabled means fp32 even inside the trainer's autocast
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=v["detector_autocast"]):
            return inner(*a, **k)
    det.forward = forward


class TorchTrainer:
    def __init__(self, model, precision: str, device):
        self.model, self.device_type, self.bf16 = model.to(device), device.type, precision == "bf16"
        self.name = "torch AdamW, fp32 weights" + (", bf16 autocast" if self.bf16 else "")
        self.params, o = [p for p in model.parameters() if p.requires_grad], OptimConfig()
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay)

    def step(self, batch):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, OptimConfig().grad_clip)  # as DeepSpeed's clipping
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out


class DeepSpeedTrainer:
    def __init__(self, model, s: Shapes, ds_config: str, device):
        from vlbert.train.ds_config import resolve_deepspeed_config
        from vlbert.train.engine import Engine, init_distributed
        world = init_distributed().world_size
        raw = load_deepspeed_json(ds_config)
        bf16_buffers = raw.get("bf16", {}).get("enabled") and "buffer_dtype" not in raw.get("data_types", {})
        if bf16_buffers:  # DeepSpeed 0.19 casts parameters only: frozen BatchNorms would hold bf16 affine
            # parameters next to fp32 running statistics, which batch_norm rejects. Cast buffers too.
            raw.setdefault("data_types", {})["buffer_dtype"] = "bf16"
        ds = resolve_deepspeed_config(raw, DataConfig(captions_per_step=s.captions * world,
                                      text_per_step=s.text * world), OptimConfig(), world, source=ds_config)
        self.engine = Engine(model.to(device), OptimConfig(), ds)
        self.name = (f"DeepSpeed ZeRO-{self.engine.zero_stage} {self.engine.precision} via vlbert.train.engine "
                     f"({Path(ds_config).name}{' + data_types.buffer_dtype=bf16' if bf16_buffers else ''})")

    def step(self, batch):
        return self.engine.step(batch)

    def close(self):  # DeepSpeed's gradient hooks keep the engine and the model alive until it is destroyed
        close = getattr(self.engine, "close", None) or getattr(getattr(self.engine, "_ds", None), "destroy", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------- timing


class Clock:
    """CUDA events on GPU (readable after ``sync()``), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else lambda: None

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def profile_split(trainer, detector, batch, steps: int, clock: Clock) -> dict:
    """Detector / encoder / optimizer shares of the step, from marks set by hooks (module docstring)."""
    marks, rows = {}, []

    def mark(key) -> None:  # returns None: a tensor hook that returned a value would replace the gradient
        marks[key] = clock.mark()

    def forward_done(module, args, out):
        mark("fwd1")
        if out.requires_grad:
            out.register_hook(lambda g: mark("bwd0"))
    params = [p for p in detector.parameters() if p.requires_grad]
    handles = [detector.register_forward_pre_hook(lambda m, a: mark("fwd0")),
               detector.register_forward_hook(forward_done),
               torch.autograd.graph.register_multi_grad_hook(params, lambda g: mark("bwd1"))]
    try:
        for _ in range(steps):
            marks.clear()
            mark("start")
            trainer.step(batch)
            mark("end")
            rows.append(dict(marks))
        clock.sync()
    finally:
        for h in handles:
            h.remove()
    spans = dict(profiled_step_s=("start", "end"), detector_fwd_s=("fwd0", "fwd1"),
                 detector_bwd_s=("bwd0", "bwd1"), optimizer_s=("bwd1", "end"))
    if any(len(m) != 6 for m in rows):
        raise RuntimeError(f"detector hooks did not all fire (got {sorted(rows[0])}); is the detector trainable?")
    out = {k: sum(clock.seconds(m[a], m[b]) for m in rows) / len(rows) for k, (a, b) in spans.items()}
    total = out["profiled_step_s"]
    out["encoder_s"] = total - out["detector_fwd_s"] - out["detector_bwd_s"] - out["optimizer_s"]
    out.update(detector_frac=(out["detector_fwd_s"] + out["detector_bwd_s"]) / total,
               encoder_frac=out["encoder_s"] / total, optimizer_frac=out["optimizer_s"] / total)
    return out


def count_host_syncs(trainer, batch) -> dict:
    """Where the host waits for the GPU in one step (set_sync_debug_mode; main thread only, not backward)."""
    sites = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(batch)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for path, line in ((Path(w.filename), w.lineno) for w in caught if "synchroniz" in str(w.message)):
        sites[f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{line}"] += 1
    return dict(total=sum(sites.values()), sites=dict(sites.most_common(12)))


def run_variant(args, s: Shapes, v: dict, device, flops: dict, peak) -> dict:
    clock, res = Clock(device), dict(v)
    if clock.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        res["mem_before_gb"] = torch.cuda.memory_allocated() / 2**30
    model = build_model(s, v["checkpointing"], seed=0)
    apply_options(model, v, device.type)
    trainer = (DeepSpeedTrainer(model, s, args.ds_config, device) if args.deepspeed
               else TorchTrainer(model, args.precision, device))
    res["engine"], ref, det = trainer.name, weakref.ref(model), model.detector
    try:
        batch = make_batch(s, s.captions, s.text, device)
        res["static_mem_gb"] = torch.cuda.memory_allocated() / 2**30 if clock.cuda else None
        for _ in range(args.warmup):
            out = trainer.step(batch)
        clock.sync()
        t0 = clock.mark()
        for _ in range(args.steps):
            out = trainer.step(batch)
        t1 = clock.mark()
        clock.sync()
        step_s = clock.seconds(t0, t1) / args.steps
        res.update(loss=float(out.loss.detach()), step_s=step_s, samples_per_s=(s.captions + s.text) / step_s,
                   captions_per_s=s.captions / step_s, text_per_s=s.text / step_s,
                   tflops_achieved=flops["total"] / step_s / 1e12)
        split = res["split"] = profile_split(trainer, det, batch, args.profile_steps, clock)
        for key, flop_key, frac in (("step", "total", 1.0), ("encoder", "encoder_side", split["encoder_frac"]),
                                    ("detector", "detector", split["detector_frac"])):
            res[f"mfu_{key}"] = flops[flop_key] / (frac * step_s * peak * 1e12) if peak and frac > 0 else None
        res["host_syncs"] = count_host_syncs(trainer, batch) if clock.cuda and not args.no_sync_debug else None
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if clock.cuda else None
    finally:
        if hasattr(trainer, "close"):
            trainer.close()
        del trainer, model, det
        gc.collect()
        if v["compile"]:
            torch._dynamo.reset()
        res["model_freed"] = ref() is None
    return res


# --------------------------------------------------------------------------- driver


def variants(args) -> list[dict]:
    flags = dict(channels_last=args.channels_last, autocast=args.autocast_bf16, compile=args.compile)
    # DeepSpeed bf16 casts the detector's weights to bf16; normalize() returns float32: autocast is needed.
    forced = args.deepspeed and args.precision == "bf16"
    chosen = [option for option, on in flags.items() if on and not (option == "autocast" and forced)]
    sets = [[]] + [[o] for o in chosen] + ([chosen] if len(chosen) > 1 else []) if args.ablate else [chosen]
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    return [dict(name=f"{'+'.join(opts) or 'base'}/{'ckpt' if ckpt else 'no-ckpt'}", checkpointing=ckpt,
                 channels_last="channels_last" in opts, compile="compile" in opts,
                 detector_autocast=forced or "autocast" in opts, detector_autocast_forced=forced,
                 attention=args.attention)
            for opts in sets for ckpt in modes]  # baselines first: a time budget cuts options, not them


def peak_tflops(args, device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and args.precision == "bf16" else None
    return args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS if name and k in name), None)


def print_table(report: dict) -> None:
    sh, f, T = report["shapes"], report["flops_per_step"], 1e12
    head = f"{'variant':32s}" + "".join(f"{c:>8s}" for c, _ in COLUMNS)
    print(f"\n{report['device']} | {report['engine']} | {report['precision']} | peak {report['peak_tflops'] or '?'} "
          f"TFLOP/s | torch {report['torch']}\nmicro-batch {sh['captions']} captions ({sh['image_h']}x{sh['image_w']}, "
          f"{sh['boxes']} boxes, seq {sh['caption_len'] + sh['boxes'] + 1}) + {sh['text']} text (seq "
          f"{sh['text_len']}); hidden {sh['hidden']} x {sh['layers']} layers; detector R{sh['depth']}\nmodel "
          f"TFLOP/step {f['total'] / T:.4g} = detector {f['detector'] / T:.4g} + body {f['vlbert'] / T:.4g} + heads "
          f"{f['heads'] / T:.4g}; encoder formula 6PN+12LS^2H {f['encoder_layers_formula'] / T:.4g}\n{head}\n"
          + "-" * len(head))
    base = {}
    for r in report["variants"]:
        if "step_s" not in r:
            print(f"{r['name']:32s} {r.get('error') or r.get('skipped')}")
            continue
        base.setdefault(r["checkpointing"], r["step_s"])  # the first of each mode: the baseline
        sp, syncs = r["split"], r.get("host_syncs")
        cells = (r["step_s"] * 1e3, r["samples_per_s"], sp["detector_frac"], sp["encoder_frac"], sp["optimizer_frac"],
                 r["mfu_encoder"], r["mfu_step"], r["peak_mem_gb"], syncs and syncs["total"],
                 base[r["checkpointing"]] / r["step_s"])
        print(f"{r['name']:32s}" + "".join(f"{'-' if x is None else format(x, spec):>8s}"
                                           for x, (_, spec) in zip(cells, COLUMNS)))
    print("\n".join(["split: " + report["split_method"], "FLOPs: " + report["flops_method"]]
                    + ["note: " + n for n in report["notes"]]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    started, s = time.perf_counter(), args.shapes
    flops, params = model_flops(s, device)
    todo = variants(args)
    notes = []
    if todo[0]["detector_autocast_forced"]:
        notes.append("detector autocast forced on: DeepSpeed bf16 weights + float32 normalize() (vlbert/model/detector/extractor.py)")
    if args.channels_last:
        notes.append("channels-last emulates a detector change (input-side layout, contiguous RoIAlign input)")
    report = dict(
        bench="gpu_e2e", argv=sys.argv[1:] if argv is None else list(argv),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device), torch=torch.__version__,
        precision=args.precision, peak_tflops=peak_tflops(args, device),
        engine="DeepSpeed (vlbert.train.engine)" if args.deepspeed else "torch AdamW",
        ds_config=args.ds_config if args.deepspeed else None, shapes=s._asdict(), params=params,
        flops_per_step=flops, notes=notes, variants=[],
        flops_method="FlopCounterMode on fwd+bwd of 1 caption + 1 text sample x micro-batch, no recomputation",
        split_method="CUDA events (perf_counter on CPU) at the detector's forward pre/post hooks, a grad hook on "
                     "its output and a multi-grad hook on its trainable params; optimizer = end of detector "
                     "backward -> end of step; encoder = the rest")
    last = 0.0
    for v in todo:
        spent = time.perf_counter() - started
        if args.time_budget_s and spent + last > args.time_budget_s:
            report["variants"].append(dict(v, skipped=f"time budget ({spent:.0f} s spent)"))
            continue
        t = time.perf_counter()
        try:
            res = run_variant(args, s, v, device, flops, report["peak_tflops"])
        except Exception as e:  # record it and go on: the other variants still measure
            traceback.print_exc()
            res = dict(v, error=f"{type(e).__name__}: {str(e)[:300]}")
        gc.collect()  # the traceback held the failed variant's model
        res["wall_s"] = last = time.perf_counter() - t
        report["engine"] = res.get("engine", report["engine"])
        report["variants"].append(res)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report) + "\n")
    print_table(report)
    print("JSON " + json.dumps(report))
    if any("error" in r for r in report["variants"]):
        sys.exit(1)
    return report


if __name__ == "__main__":
    from vlbert.cli.common import skip_garbage_collection_at_exit

    skip_garbage_collection_at_exit()
    main()
