"""Caffe's RoI max pooling, one PyTorch implementation for every device.

The published Visual Genome detector (bottom-up attention) was trained with Caffe's
``ROIPoolingLayer`` (rbgirshick/caffe-fast-rcnn, src/caffe/layers/roi_pooling_layer.cpp,
the copy py-faster-rcnn and peteanderson80/bottom-up-attention build). Its definition, for a
RoI (batch index, x1, y1, x2, y2) in pixels, a feature map [C, H, W] and an S x S output:

- corners on the feature grid: ``round(coord * spatial_scale)``, C's round (halves away
  from zero), computed in the blob's float type;
- size ``max(end - start + 1, 1)`` per axis, bin size ``size / S`` (float);
- bin i covers ``floor(i * bin) + start`` .. ``ceil((i + 1) * bin) + start`` (end excluded),
  both clipped to [0, H] (or [0, W]); an empty bin gives 0;
- value: the maximum over the bin; backward: the output gradient goes to that maximum's
  element (``argmax``), summed over the bins that chose it.

Why not another op: mmcv's ``RoIPool`` does not round the corners (its CUDA kernel scales
x1 and x2 + 1 as floats) and has no CPU kernel; torchvision's ``roi_pool`` computes the same
definition, but the Linux wheels on PyPI are CUDA builds whose ops do not load with the CPU
build of torch that CPU hosts install (``scripts/env.sh``). This op is written with torch
tensor operations only, so CPU and GPU run the same code.

On exact ties inside a bin the argmax is the first maximum by column, then by row (Caffe: by
row, then by column); both send the gradient to one element holding the maximum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Elements of the largest temporary tensor of the forward (rois x bin rows x C x W).
_CHUNK_ELEMENTS = 1 << 25


def c_round(x: Tensor) -> Tensor:
    """C's ``round``: halves away from zero (``torch.round`` rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def caffe_bins(rois: Tensor, spatial_scale: float, output_size: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Bin bounds of every RoI: (lo, hi), long [N, 2, S] each, axis 0 = x, axis 1 = y; bin i of
    axis a covers [lo[n, a, i], hi[n, a, i]) on the feature map, already clipped to it."""
    coords = rois[:, 1:5].float()  # Caffe's arithmetic is in the blob's type: float32 here
    start = c_round(coords[:, 0:2] * spatial_scale)
    end = c_round(coords[:, 2:4] * spatial_scale)
    bin_size = (end - start + 1).clamp(min=1) / output_size  # [N, 2]
    i = torch.arange(output_size, dtype=torch.float32, device=rois.device)
    lo = torch.floor(i * bin_size[..., None]) + start[..., None]
    hi = torch.ceil((i + 1) * bin_size[..., None]) + start[..., None]
    limit = torch.tensor([width, height], dtype=torch.float32, device=rois.device).view(1, 2, 1)
    lo = torch.minimum(lo.clamp(min=0), limit).long()
    hi = torch.minimum(hi.clamp(min=0), limit).long()
    return lo, hi


def _pool(feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float) -> tuple[Tensor, Tensor]:
    """Forward without autograd: (values [N, C, S, S], flat argmax [N, C, S, S] into H*W, -1 if empty)."""
    N, C, S = len(rois), feat.shape[1], output_size
    H, W = feat.shape[-2:]
    values = feat.new_zeros(N, C, S, S)
    argmax = torch.full((N, C, S, S), -1, dtype=torch.long, device=feat.device)
    if N == 0:
        return values, argmax
    lo, hi = caffe_bins(rois, spatial_scale, S, H, W)
    k_x, k_y = ((hi - lo).amax(dim=(0, 2)).clamp(min=1)).tolist()  # the widest bin per axis (one sync)
    batch = rois[:, 0].long()
    neg_inf = float("-inf")
    chunk = max(1, _CHUNK_ELEMENTS // max(1, k_y * C * W))
    for n0 in range(0, N, chunk):
        sl = slice(n0, min(N, n0 + chunk))
        n = sl.stop - sl.start
        xs = lo[sl, 0, :, None] + torch.arange(k_x, device=feat.device)  # [n, S, k_x] columns of each x-bin
        x_ok = xs < hi[sl, 0, :, None]
        xs = xs.clamp(max=W - 1).reshape(n, 1, S * k_x).expand(n, C, S * k_x)
        for i in range(S):
            ys = lo[sl, 1, i, None] + torch.arange(k_y, device=feat.device)  # [n, k_y] rows of y-bin i
            y_ok = ys < hi[sl, 1, i, None]
            ys = ys.clamp(max=H - 1)
            rows = feat[batch[sl, None], :, ys]  # [n, k_y, C, W]
            rows = rows.masked_fill(~y_ok[:, :, None, None], neg_inf)
            col_max, row_at = rows.max(dim=1)  # [n, C, W]: the maximum over the bin's rows, per column
            row_at = ys.gather(1, row_at.flatten(1)).view(n, C, W)
            cand = col_max.gather(2, xs).view(n, C, S, k_x).masked_fill(~x_ok[:, None], neg_inf)
            best, col_k = cand.max(dim=-1)  # [n, C, S]
            col = xs.reshape(n, C, S, k_x).gather(-1, col_k[..., None]).squeeze(-1)
            row = row_at.gather(2, col)
            empty = ~(x_ok.any(-1)[:, None, :] & y_ok.any(-1)[:, None, None])  # [n, 1|C, S]
            values[sl, :, i] = best.masked_fill(empty, 0)
            argmax[sl, :, i] = (row * W + col).masked_fill(empty, -1)
    return values, argmax


class _CaffeRoIPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float) -> Tensor:
        values, argmax = _pool(feat.detach(), rois.detach(), output_size, spatial_scale)
        ctx.save_for_backward(rois, argmax)
        ctx.feat_shape = feat.shape
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        rois, argmax = ctx.saved_tensors
        B, C, H, W = ctx.feat_shape
        grad_feat = grad.new_zeros(B * C * H * W)
        # The flat index of every pooled element in the whole feature tensor [B, C, H, W].
        plane = (rois[:, 0].long()[:, None] * C + torch.arange(C, device=grad.device)) * (H * W)  # [N, C]
        index = plane[:, :, None, None] + argmax
        used = argmax >= 0
        grad_feat.index_add_(0, index[used], grad[used].to(grad_feat.dtype))
        return grad_feat.view(B, C, H, W), None, None, None


def caffe_roi_pool(feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float) -> Tensor:
    """feat [B, C, H, W] float; rois [N, 5] (batch index, x1, y1, x2, y2 in pixels) -> [N, C, S, S]
    with Caffe's ROIPooling forward and backward (module docstring)."""
    if feat.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"caffe_roi_pool: expected feat [B, C, H, W] and rois [N, 5], got "
                         f"{tuple(feat.shape)} and {tuple(rois.shape)}")
    return _CaffeRoIPoolFunction.apply(feat, rois, int(output_size), float(spatial_scale))


class CaffeRoIPool(nn.Module):
    """``caffe_roi_pool`` as the RoI layer of mmdet's ``SingleRoIExtractor`` (which reads
    ``output_size``); the same code on CPU and GPU."""

    def __init__(self, output_size: int, spatial_scale: float):
        super().__init__()
        self.output_size, self.spatial_scale = (output_size, output_size), spatial_scale

    def forward(self, feat: Tensor, rois: Tensor) -> Tensor:
        return caffe_roi_pool(feat, rois, self.output_size[0], self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
