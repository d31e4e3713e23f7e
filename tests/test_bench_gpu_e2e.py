"""bench/gpu_e2e.py in its tiny CPU mode: the JSON it writes, its FLOP counts, its speed-option wraps.

Timings are printed by the bench and never asserted here; what is checked is that the figures are
present, consistent with each other and plausible against hand estimates for the tiny shapes.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_e2e.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_e2e", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, *extra):
    out = tmp_path / "e2e.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--json-out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert "JSON " + lines[0] in proc.stdout  # the same line is printed for sessions that only see stdout
    return report, proc.stdout


def resnet18_c4_flops(h: int, w: int, rois: int, roi_size: int) -> int:
    """One image's forward + backward FLOPs in the detector, counted by hand, conv by conv, as
    FlopCounterMode counts them (2 x MACs; a convolution's backward costs its forward once for the
    weight gradient and once for the input gradient): ResNet-18 trunk to res4 (stride 16), res5 on
    ``rois`` RoIs of roi_size^2. The stem and res2 are frozen: no backward. The first convolutions
    of res3 (conv1 and the 1x1 shortcut) read res2's output, which needs no gradient: backward for
    the weight only. Plus the one matrix product outside the convolutions: the masked-RoI pixel mask,
    an [h, rois] x [rois, w] product per image (forward only)."""
    def conv(cin, cout, k, hw):
        return 2 * cin * cout * k * k * hw[0] * hw[1]

    def half(hw):
        return (math.ceil(hw[0] / 2), math.ceil(hw[1] / 2))

    def stage(cin, cout, hw):  # two basic blocks, the first strided with a 1x1 shortcut
        return conv(cin, cout, 3, hw) + 3 * conv(cout, cout, 3, hw) + conv(cin, cout, 1, hw)
    s2 = half((h, w))
    frozen = conv(3, 64, 7, s2) + 4 * conv(64, 64, 3, half(s2))
    s8 = half(half(s2))
    trained = stage(64, 128, s8) + stage(128, 256, half(s8)) + rois * stage(256, 512, (roi_size // 2,) * 2)
    no_input_grad = conv(64, 128, 3, s8) + conv(64, 128, 1, s8)
    pixel_mask = 2 * h * rois * w
    return frozen + 3 * trained - no_input_grad + pixel_mask


def test_tiny_cpu_run_reports_consistent_figures(tmp_path):
    report, stdout = _run(tmp_path)
    sh, f, params = report["shapes"], report["flops_per_step"], report["params"]
    assert report["engine"].startswith("torch AdamW") and report["device"] == "cpu"
    assert report["peak_tflops"] is None  # no peak known on CPU
    assert [v["name"] for v in report["variants"]] == ["base/no-ckpt", "base/ckpt"]

    # FLOPs: parts add up; the encoder layers match 6 x params x tokens + attention; the detector equals
    # a conv-by-conv count of ResNet-18 C4 (fails on a miscounted stage, stride or frozen part).
    assert f["total"] == f["detector"] + f["vlbert"] + f["heads"] and min(f.values()) > 0
    assert f["encoder_side"] == f["total"] - f["detector"]
    tokens = sh["captions"] * (sh["caption_len"] + sh["boxes"] + 1) + sh["text"] * sh["text_len"]
    assert 0.5 < f["vlbert"] / (6 * params["encoder_layers"] * tokens) < 2
    assert 0.5 < f["vlbert"] / f["encoder_layers_formula"] < 2
    per_image = resnet18_c4_flops(sh["image_h"], sh["image_w"], sh["boxes"], sh["roi_size"])
    assert f["detector"] == sh["captions"] * per_image

    for v in report["variants"]:
        assert "error" not in v and v["model_freed"]
        assert v["step_s"] > 0 and v["samples_per_s"] > 0
        assert v["samples_per_s"] == pytest.approx((sh["captions"] + sh["text"]) / v["step_s"])
        assert v["captions_per_s"] + v["text_per_s"] == pytest.approx(v["samples_per_s"])
        sp = v["split"]
        fracs = [sp["detector_frac"], sp["encoder_frac"], sp["optimizer_frac"]]
        assert all(0 <= x <= 1 for x in fracs) and sum(fracs) == pytest.approx(1.0)
        assert sp["detector_frac"] > 0 and sp["encoder_frac"] > 0 and sp["detector_bwd_s"] > 0
        assert v["mfu_step"] is None and v["mfu_encoder"] is None  # CPU, no --peak-tflops
        assert v["peak_mem_gb"] is None and v["host_syncs"] is None  # CUDA-only figures
        assert math.isfinite(v["loss"])
        assert v["checkpointing"] == (v["name"] == "base/ckpt")
    assert "samp/s" in stdout and "base/ckpt" in stdout


def test_tiny_deepspeed_path_with_options_and_peak(tmp_path):
    """The engine path a GPU run takes by default (here ZeRO-2 fp32 on CPU), with the speed options."""
    report, _ = _run(tmp_path, "--deepspeed", "--checkpointing", "on", "--channels-last", "--autocast-bf16",
                     "--peak-tflops", "2.5", "--steps", "1", "--warmup", "1", "--profile-steps", "1")
    assert report["peak_tflops"] == 2.5 and "DeepSpeed ZeRO-2" in report["engine"]
    (v,) = report["variants"]
    assert "error" not in v and v["model_freed"]  # the engine was destroyed, so the model was freed
    assert v["name"] == "channels_last+autocast/ckpt" and v["channels_last"] and v["detector_autocast"]
    f, sp = report["flops_per_step"], v["split"]
    assert v["mfu_step"] == pytest.approx(f["total"] / (v["step_s"] * 2.5e12))
    assert v["mfu_encoder"] == pytest.approx(f["encoder_side"] / (sp["encoder_frac"] * v["step_s"] * 2.5e12))
    assert sum(sp[k] for k in ("detector_frac", "encoder_frac", "optimizer_frac")) == pytest.approx(1.0)


def test_ablation_plan():
    bench = _load_bench()
    args = bench.parse_args(["--tiny", "--ablate", "--channels-last", "--compile", "--checkpointing", "both"])
    names = [v["name"] for v in bench.variants(args)]
    assert names == ["base/no-ckpt", "base/ckpt", "channels_last/no-ckpt", "channels_last/ckpt", "compile/no-ckpt",
                     "compile/ckpt", "channels_last+compile/no-ckpt", "channels_last+compile/ckpt"]
    # DeepSpeed bf16 needs the detector under autocast, so "autocast alone" would repeat the baseline.
    args = bench.parse_args(["--ablate", "--autocast-bf16", "--compile", "--deepspeed", "--checkpointing", "off"])
    plan = bench.variants(args)
    assert [v["name"] for v in plan] == ["base/no-ckpt", "compile/no-ckpt"]
    assert all(v["detector_autocast"] and v["detector_autocast_forced"] for v in plan)


@pytest.fixture(scope="module")
def tiny():
    bench = _load_bench()
    args = bench.parse_args(["--tiny", "--device", "cpu"])
    torch.set_num_threads(1)
    return bench, args.shapes


def test_flops_scale_linearly_with_the_micro_batch(tiny):
    """The bench counts one sample of each kind and scales; that must equal counting the whole batch."""
    bench, s = tiny
    model = bench.build_model(s, checkpointing=False)
    one_c = bench.count_step_flops(model, bench.make_batch(s, 1, 0, "cpu"))
    one_t = bench.count_step_flops(model, bench.make_batch(s, 0, 1, "cpu"))
    both = bench.count_step_flops(model, bench.make_batch(s, 2, 3, "cpu", seed=1))
    for key in ("total", "detector", "vlbert", "heads"):
        assert both[key] == 2 * one_c[key] + 3 * one_t[key], key
    assert one_t["detector"] == 0 and one_c["heads"] > 0


def test_speed_option_wraps_keep_the_features(tiny):
    """Channels-last (with the contiguous RoIAlign input) and the autocast wrap change speed, not results."""
    bench, s = tiny
    batch = bench.make_batch(s, 2, 0, "cpu").captions
    model = bench.build_model(s, checkpointing=False).eval()
    with torch.no_grad():
        ref = model.detector(batch.images, batch.boxes, batch.box_mask, batch.roi_masked)
        plan = dict(channels_last=True, attention="sdpa", compile=False, detector_autocast=False)
        bench.apply_options(model, plan, "cpu")
        got = model.detector(batch.images, batch.boxes, batch.box_mask, batch.roi_masked)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # Without the contiguous copy mmcv's RoIAlign reads the channels-last map as NCHW: the wrap matters.
    det = bench.build_model(s, checkpointing=False).eval().detector
    extractor = det.detector.roi_head.bbox_roi_extractor
    with torch.no_grad():
        feat = det.res4(det.normalize(batch.images)).contiguous(memory_format=torch.channels_last)
        rois = det._rois(batch.boxes, det._real_boxes(batch.box_mask))
        assert not torch.allclose(extractor((feat,), rois), extractor((feat.contiguous(),), rois))
