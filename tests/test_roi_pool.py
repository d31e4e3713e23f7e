"""``roi_op: pool`` is Caffe's ROIPooling on every device: forward and backward against a direct
implementation of the layer written here from its source, rbgirshick/caffe-fast-rcnn
src/caffe/layers/roi_pooling_layer.cpp (Forward_cpu: corners round(x * scale), size
max(end - start + 1, 1), bin = size / pooled in float32, floor/ceil bin bounds offset by the
start and clipped to the map, an empty bin is 0, the maximum's index kept as argmax;
Backward_cpu: each output's gradient goes to its argmax)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlbert.model.detector.roi_pool import CaffeRoIPool, caffe_roi_pool

pytestmark = pytest.mark.timeout(120)


def caffe_reference(feat: np.ndarray, rois: np.ndarray, pooled: int, scale: float):
    """Caffe's Forward_cpu as loops: (top [N, C, S, S], argmax [N, C, S, S] flat in H*W or -1)."""
    _, C, H, W = feat.shape
    f32 = np.float32
    top = np.zeros((len(rois), C, pooled, pooled), np.float32)
    arg = np.full(top.shape, -1, np.int64)

    def c_round(v):  # C's round() of a float: halves away from zero
        return int(math.copysign(math.floor(abs(v) + 0.5), v))

    for n, roi in enumerate(rois):
        b = int(roi[0])
        x1, y1, x2, y2 = (c_round(float(f32(roi[k]) * f32(scale))) for k in range(1, 5))
        bin_h = f32(max(y2 - y1 + 1, 1)) / f32(pooled)
        bin_w = f32(max(x2 - x1 + 1, 1)) / f32(pooled)
        for c in range(C):
            for ph in range(pooled):
                for pw in range(pooled):
                    hs = min(max(int(math.floor(f32(ph) * bin_h)) + y1, 0), H)
                    he = min(max(int(math.ceil(f32(ph + 1) * bin_h)) + y1, 0), H)
                    ws = min(max(int(math.floor(f32(pw) * bin_w)) + x1, 0), W)
                    we = min(max(int(math.ceil(f32(pw + 1) * bin_w)) + x1, 0), W)
                    if he <= hs or we <= ws:
                        continue  # empty: 0, argmax -1
                    best, at = -np.inf, -1
                    for h in range(hs, he):
                        for w in range(ws, we):
                            if feat[b, c, h, w] > best:
                                best, at = feat[b, c, h, w], h * W + w
                    top[n, c, ph, pw], arg[n, c, ph, pw] = best, at
    return top, arg


def caffe_backward(grad_top: np.ndarray, arg: np.ndarray, rois: np.ndarray, shape) -> np.ndarray:
    """Caffe's Backward_cpu in effect: every output's gradient added to its argmax element."""
    grad = np.zeros(shape, np.float64)
    B, C, H, W = shape
    for n, c, ph, pw in np.ndindex(*arg.shape):
        a = arg[n, c, ph, pw]
        if a >= 0:
            grad[int(rois[n, 0]), c, a // W, a % W] += grad_top[n, c, ph, pw]
    return grad


def random_rois(g: np.random.Generator, n: int, batch: int, height_px: float, width_px: float) -> np.ndarray:
    """Boxes with fractional corners, some past the border, some tiny or inverted, some landing
    on x.5 after scaling (C's round differs from round-half-even there)."""
    x = g.uniform(-0.3, 1.3, (n, 2)) * width_px
    y = g.uniform(-0.3, 1.3, (n, 2)) * height_px
    boxes = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1)
    boxes[: n // 4, 2:] = boxes[: n // 4, :2] + g.uniform(0, 20, (n // 4, 2))  # small boxes
    boxes[n // 4: n // 4 + 2] = [[8.0, 24.0, 40.0, 56.0], [24.0, 40.0, 8.0, 8.0]]  # x.5 after /16; inverted
    return np.concatenate([g.integers(0, batch, (n, 1)).astype(np.float64), boxes], 1).astype(np.float32)


@pytest.mark.parametrize("pooled", [3, 7])
def test_forward_and_gradient_match_caffe(pooled):
    """Fails if the corners are not rounded (mmcv's RoIPool scales them as floats), if rounding is
    half-to-even, if the bin bounds are not floor/ceil of the float bin size, if bins are not
    clipped, or if the gradient goes anywhere but the argmax."""
    g = np.random.default_rng(pooled)
    feat = g.standard_normal((2, 3, 11, 13)).astype(np.float32)
    rois = random_rois(g, 24, 2, 11 * 16, 13 * 16)
    want, arg = caffe_reference(feat, rois, pooled, 1 / 16)

    x = torch.tensor(feat, requires_grad=True)
    got = CaffeRoIPool(pooled, 1 / 16)(x, torch.tensor(rois))
    np.testing.assert_array_equal(got.detach().numpy(), want)
    assert (arg == -1).any() and (arg >= 0).any()  # the boxes reach empty bins (off the map) and real ones

    grad_top = g.standard_normal(want.shape).astype(np.float32)
    got.backward(torch.tensor(grad_top))
    np.testing.assert_allclose(x.grad.numpy(), caffe_backward(grad_top, arg, rois, feat.shape), rtol=1e-6, atol=1e-6)


def test_many_rois_in_chunks_and_no_rois(monkeypatch):
    """The forward in several chunks gives the one-chunk result; no RoIs give an empty output.
    Fails if the chunks are misaligned with their RoIs."""
    import vlbert.model.detector.roi_pool as rp

    g = np.random.default_rng(0)
    feat = torch.tensor(g.standard_normal((1, 4, 9, 9)).astype(np.float32))
    rois = torch.tensor(random_rois(g, 30, 1, 144, 144))
    whole = caffe_roi_pool(feat, rois, 4, 1 / 16)
    monkeypatch.setattr(rp, "_CHUNK_ELEMENTS", 1)  # one RoI per chunk
    torch.testing.assert_close(caffe_roi_pool(feat, rois, 4, 1 / 16), whole, rtol=0, atol=0)
    assert caffe_roi_pool(feat, rois[:0], 4, 1 / 16).shape == (0, 4, 4, 4)


def test_same_result_on_gpu():
    """The one implementation runs on CUDA too and gives the CPU's values and gradients."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this host")
    g = np.random.default_rng(3)
    feat = g.standard_normal((2, 5, 12, 15)).astype(np.float32)
    rois = torch.tensor(random_rois(g, 40, 2, 12 * 16, 15 * 16))
    grads, outs = [], []
    for device in ("cpu", "cuda"):
        x = torch.tensor(feat, device=device, requires_grad=True)
        out = caffe_roi_pool(x, rois.to(device), 7, 1 / 16)
        out.sum().backward()
        outs.append(out.detach().cpu()), grads.append(x.grad.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="rois \\[N, 5\\]"):
        caffe_roi_pool(torch.zeros(1, 1, 4, 4), torch.zeros(3, 4), 2, 1.0)
