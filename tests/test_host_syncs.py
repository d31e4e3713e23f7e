"""Host syncs on the training step's hot path, counted on CPU.

On CUDA the host waits for the device whenever an op's result shape or a Python value depends on
device data: ``.item()``/``bool()`` (aten._local_scalar_dense), ``nonzero``, ``masked_select`` and
indexing with a boolean mask (which runs ``nonzero`` inside). A dispatch mode sees those same ops
on CPU, so where they sit in one forward + backward can be checked without a GPU; bench/gpu_e2e.py
counts the real ones on a GPU (torch.cuda.set_sync_debug_mode).
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlbert.batch import CaptionBatch, PretrainBatch, TextBatch
from vlbert.config import DetectorConfig, ModelConfig
from vlbert.model.detector import RegionFeatureExtractor
from vlbert.model.pretraining import VLBertForPretraining

ROOT = Path(__file__).resolve().parents[1]
SYNCING_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}


class SyncCensus(TorchDispatchMode):
    """Counts ops that make the host wait on CUDA, by (op, first vlbert/ source line on the stack)."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        syncs = name in SYNCING_OPS
        if name.startswith("aten.index") and len(args) > 1 and isinstance(args[1], (list, tuple)):
            syncs = syncs or any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if syncs:
            ours = [f for f in traceback.extract_stack() if Path(f.filename).is_relative_to(ROOT / "vlbert")]
            where = f"{Path(ours[-1].filename).relative_to(ROOT)}:{ours[-1].name}" if ours else "outside vlbert/"
            self.sites[(name, where)] += 1
        return func(*args, **(kwargs or {}))


def test_census_sees_the_ops_that_sync():
    x = torch.arange(6.0)
    with SyncCensus() as census:
        x[x > 2].sum()
        bool((x > 1).any())
        torch.nonzero(x)
        x[torch.tensor([1, 2])]  # long indices: no sync
    assert sorted(n for n, _ in census.sites.elements()) == [
        "aten._local_scalar_dense.default", "aten.index.Tensor", "aten.nonzero.default"]


def _caption_batch(g: torch.Generator, B: int = 2, R: int = 4, T: int = 6, vocab: int = 50, classes: int = 5):
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False  # ragged captions: the attention mask is not all True
    labels = torch.full((B, T), -100)
    labels[0, 2], labels[1, 1] = 7, 9
    boxes = torch.tensor([[0.0, 0, 64, 48], [4, 4, 30, 30], [20, 10, 60, 40], [0, 0, 0, 0]]).expand(B, R, 4).clone()
    box_mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    chosen = torch.tensor([[False, True, False, False], [False, True, False, False]])
    targets = torch.softmax(torch.randn(B, R, classes, generator=g), -1)
    images = torch.randint(0, 256, (B, 3, 48, 64), generator=g, dtype=torch.uint8)
    return CaptionBatch(ids, mask, labels, images, torch.tensor([[48, 64]] * B), boxes, box_mask,
                        chosen.clone(), chosen, targets)


def test_one_host_sync_in_a_pretraining_step():
    """Forward + backward of captions and text: the detector's count of real boxes (it sizes RoIAlign's
    output) and the encoder's 'is there padding at all' test (it picks SDPA's unmasked kernels) remain;
    the heads and the losses add none."""
    torch.manual_seed(0)
    model = VLBertForPretraining(
        ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, geometry_freqs=4),
        DetectorConfig(depth=18, num_classes=5, roi_size=6)).train()
    g = torch.Generator().manual_seed(0)
    text = TextBatch(torch.randint(5, 50, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.bool),
                     torch.full((2, 8), -100).index_fill_(1, torch.tensor([3]), 11))
    batch = PretrainBatch(_caption_batch(g), text)
    with SyncCensus() as census:
        out = model(batch)
        out.loss.backward()
    assert out.mlm_caption_count.item() == 2 and out.roi_count.item() == 2 and out.mlm_text_count.item() == 2
    assert dict(census.sites) == {
        ("aten.nonzero.default", "vlbert/model/detector/extractor.py:_real_boxes"): 1,
        ("aten._local_scalar_dense.default", "vlbert/model/vlbert.py:forward"): 2,  # captions pass, text pass
    }


def test_detector_forward_syncs_once_before_the_backbone():
    torch.manual_seed(0)
    det = RegionFeatureExtractor(DetectorConfig(depth=18, num_classes=5, roi_size=6)).train()
    c = _caption_batch(torch.Generator().manual_seed(1))
    order = []
    hook = det.detector.backbone.conv1.register_forward_pre_hook(lambda m, a: order.append("backbone"))
    real = det._real_boxes

    def counted(box_mask):
        order.append("count")
        return real(box_mask)

    det._real_boxes = counted
    try:
        with SyncCensus() as census:
            feats = det(c.images, c.boxes, c.box_mask, c.roi_masked)
            feats.sum().backward()
    finally:
        hook.remove()
    assert order == ["count", "backbone"]  # the wait happens while the device queue is short
    assert sum(census.sites.values()) == 1
    assert torch.all(feats[~c.box_mask] == 0) and feats[c.box_mask].abs().sum(-1).gt(0).all()
