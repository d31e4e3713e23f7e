"""RegionFeatureExtractor: features, pixel masking, freezing, checkpoints, class scores, detection."""

from __future__ import annotations

import dataclasses

import fsspec
import pytest
import torch

from vlbert.config import DetectorConfig
from vlbert.model.detector import RegionFeatureExtractor, zero_masked_regions
from vlbert.model.detector.parts import FrozenBatchNorm2d

NUM_CLASSES = 5  # 4 foreground + background


def make(seed: int = 0, **overrides) -> RegionFeatureExtractor:
    torch.manual_seed(seed)
    return RegionFeatureExtractor(DetectorConfig(depth=18, num_classes=NUM_CLASSES, **overrides))


@pytest.fixture(scope="module")
def det() -> RegionFeatureExtractor:
    return make().eval()


def images(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


BOXES = torch.tensor([[[0, 0, 64, 64], [8.5, 10, 40, 50.2], [0, 0, 0, 0]],
                      [[0, 0, 64, 64], [5, 5, 20, 20], [30, 30, 60, 60]]], dtype=torch.float)
MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_feature_shape_and_out_channels(det):
    feats = det(images(), BOXES, MASK)
    assert det.out_channels == 512
    assert feats.shape == (2, 3, 512)
    assert torch.all(feats[0, 2] == 0)  # padded slot
    assert feats[MASK].abs().sum(-1).gt(0).all()


def test_out_channels_depth50():
    torch.manual_seed(0)
    d = RegionFeatureExtractor(DetectorConfig(depth=50, num_classes=NUM_CLASSES)).eval()
    assert d.out_channels == 2048
    assert d(images(1), BOXES[:1, :2], MASK[:1, :2]).shape == (1, 2, 2048)


def test_padding_does_not_change_real_boxes(det):
    img = images(1)
    one = det(img, BOXES[:1, 1:2], torch.tensor([[True]]))
    padded_boxes = torch.cat([BOXES[:1, 1:2], torch.tensor([[[3.0, 4, 50, 60], [0, 0, 0, 0]]])], dim=1)
    padded = det(img, padded_boxes, torch.tensor([[True, False, False]]))
    torch.testing.assert_close(padded[:, :1], one, rtol=1e-5, atol=1e-5)
    assert torch.all(padded[:, 1:] == 0)


def test_zero_masked_regions_covers_overlapped_pixels():
    img = torch.full((1, 3, 8, 8), 7, dtype=torch.uint8)
    boxes = torch.tensor([[[1.5, 2.0, 3.2, 4.0], [0, 0, 8, 8]]])
    out = zero_masked_regions(img, boxes, torch.tensor([[True, False]]))
    expected = torch.full((8, 8), 7, dtype=torch.uint8)
    expected[2:4, 1:4] = 0  # rows [2, 4), columns floor(1.5)=1 .. ceil(3.2)=4
    assert torch.equal(out[0, 0], expected) and torch.equal(out[0, 2], expected)
    assert torch.all(img == 7)  # input untouched


def test_masked_pixels_are_zero_in_what_the_backbone_sees(det):
    seen = []
    hook = det.detector.backbone.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        img = images()
        roi_masked = torch.tensor([[False, True, True], [False, False, True]])  # [0, 2] is padding: ignored
        det(img, BOXES, MASK, roi_masked)
    finally:
        hook.remove()
    x = seen[0]
    zero = (-det.pixel_mean / det.pixel_std).view(3)  # raw 0 after normalisation
    # image 0, box 1 covers rows 10..50, columns 8..40 (floor/ceil of 8.5, 50.2)
    region = x[0, :, 10:51, 8:40]
    torch.testing.assert_close(region, zero.view(3, 1, 1).expand_as(region))
    # image 1, box 2: rows/columns 30..59
    torch.testing.assert_close(x[1, :, 30:60, 30:60], zero.view(3, 1, 1).expand(3, 30, 30))
    # everything else is the normalised original image
    normal = det.normalize(img)
    keep = torch.ones(2, 64, 64, dtype=torch.bool)
    keep[0, 10:51, 8:40] = False
    keep[1, 30:60, 30:60] = False
    assert torch.equal(x.permute(1, 0, 2, 3)[:, keep], normal.permute(1, 0, 2, 3)[:, keep])


def test_frozen_parts_unchanged_and_trainable_parts_move():
    d = make(activation_checkpointing=True)
    d.train()
    # Every BatchNorm is replaced by a frozen scale/shift that holds only buffers.
    assert not [m for m in d.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bns = [m for m in d.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(bns) > 10 and not any(list(m.parameters()) for m in bns)
    bb = d.detector.backbone
    for m in (bb.conv1, bb.layer1):
        assert not m.training
    before = {k: v.clone() for k, v in d.state_dict().items()}
    opt = torch.optim.AdamW(d.parameters(), lr=1e-2)
    for _ in range(2):
        feats = d(images(), BOXES, MASK, roi_masked=torch.tensor([[False, True, False], [False, False, True]]))
        loss = (feats[MASK] ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    after = d.state_dict()
    frozen = [k for k in before if k.startswith(("detector.backbone.conv1", "detector.backbone.bn1",
                                                 "detector.backbone.layer1", "detector.rpn_head"))
              or ".bn" in k or "downsample.1" in k]
    assert len(frozen) > 20
    for k in frozen:  # weights, BN affine and running statistics
        assert torch.equal(before[k], after[k]), k
    for p in list(bb.conv1.parameters()) + list(bb.layer1.parameters()):
        assert p.grad is None and not p.requires_grad
    for prefix in ("detector.backbone.layer2.0.conv1", "detector.backbone.layer3.0.conv1",
                   "detector.roi_head.shared_head.layer4.0.conv1"):
        assert not torch.equal(before[prefix + ".weight"], after[prefix + ".weight"]), prefix
    # The box head only gives targets under no_grad: it carries no optimizer state.
    assert not d.detector.roi_head.bbox_head.fc_cls.weight.requires_grad


def test_activation_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        d = make(activation_checkpointing=ckpt).train()
        d(images(), BOXES, MASK).sum().backward()
        grads.append({n: p.grad for n, p in d.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_freezing_options():
    d = make(trainable=False).train()
    assert not any(p.requires_grad for p in d.parameters())
    assert not any(m.training for m in d.detector.modules())
    d = make(frozen_stages=4).train()  # stem, res2..res4 and res5
    assert not any(p.requires_grad for p in d.detector.roi_head.shared_head.parameters())
    assert not any(p.requires_grad for p in d.detector.backbone.parameters())
    d = make(frozen_stages=2, freeze_batchnorm=False).train()
    bb = d.detector.backbone
    assert not bb.layer2.training and not any(p.requires_grad for p in bb.layer2.parameters())
    assert bb.layer3.training and bb.layer3[0].bn1.training and bb.layer3[0].bn1.weight.requires_grad
    d = make(frozen_stages=-1)
    assert d.detector.backbone.conv1.weight.requires_grad


def test_load_checkpoint_round_trip_memory_url(det):
    url = "memory://detector_test/ckpt.pth"
    with fsspec.open(url, "wb") as f:
        torch.save({"state_dict": det.detector.state_dict(), "meta": {"epoch": 3}}, f)
    fresh = make(seed=1).eval()
    img = images()
    assert not torch.allclose(fresh(img, BOXES, MASK), det(img, BOXES, MASK))
    fresh.load_checkpoint(url)
    torch.testing.assert_close(fresh(img, BOXES, MASK), det(img, BOXES, MASK), rtol=0, atol=0)
    # from_config loads the configured checkpoint, here a bare state dict of our own module;
    # the constructor reads no file and stays random
    with fsspec.open("memory://detector_test/bare.pth", "wb") as f:
        torch.save(det.state_dict(), f)
    cfg = DetectorConfig(depth=18, num_classes=NUM_CLASSES, checkpoint="memory://detector_test/bare.pth")
    torch.manual_seed(2)
    via_cfg = RegionFeatureExtractor.from_config(cfg).eval()
    torch.testing.assert_close(via_cfg.class_probs(img, BOXES, MASK), det.class_probs(img, BOXES, MASK))
    torch.manual_seed(2)
    built = RegionFeatureExtractor(cfg).eval()
    assert not torch.allclose(built.class_probs(img, BOXES, MASK), det.class_probs(img, BOXES, MASK))


def test_checkpoint_with_batchnorm_counters_loads_into_frozen_batchnorms(det):
    """Loading happens after the BatchNorms are frozen (which keep no counter): a checkpoint of a
    detector trained with live BatchNorm still loads, counters and all."""
    live = make(seed=3, freeze_batchnorm=False)
    state = live.detector.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state)
    with fsspec.open("memory://detector_test/live_bn.pth", "wb") as f:
        torch.save(state, f)
    frozen = make(seed=4)
    assert isinstance(frozen.detector.backbone.bn1, FrozenBatchNorm2d)
    frozen.load_checkpoint("memory://detector_test/live_bn.pth")
    torch.testing.assert_close(frozen.detector.backbone.bn1.running_var, state["backbone.bn1.running_var"])
    torch.testing.assert_close(frozen.detector.backbone.layer3[0].conv1.weight,
                               state["backbone.layer3.0.conv1.weight"])


@dataclasses.dataclass
class _Payload:
    x: int = 1


def test_load_checkpoint_refuses_pickled_objects_and_wrong_shapes(det):
    with fsspec.open("memory://detector_test/evil.pth", "wb") as f:
        torch.save({"state_dict": det.detector.state_dict(), "obj": _Payload()}, f)
    with pytest.raises(ValueError, match="refused torch zip file: Unsupported global"):
        make(seed=1).load_checkpoint("memory://detector_test/evil.pth")
    torch.manual_seed(0)
    other = RegionFeatureExtractor(DetectorConfig(depth=18, num_classes=7))
    with fsspec.open("memory://detector_test/other.pth", "wb") as f:
        torch.save(other.detector.state_dict(), f)
    with pytest.raises(ValueError, match="shape mismatch.*fc_cls"):
        make(seed=1).load_checkpoint("memory://detector_test/other.pth")
    state = {k: v for k, v in det.detector.state_dict().items() if not k.startswith("roi_head.bbox_head.fc_reg")}
    with fsspec.open("memory://detector_test/noreg.pth", "wb") as f:  # unused regressor may be absent
        torch.save(state, f)
    make(seed=1).load_checkpoint("memory://detector_test/noreg.pth")
    state = {k: v for k, v in state.items() if not k.startswith("backbone.layer3")}
    with fsspec.open("memory://detector_test/partial.pth", "wb") as f:
        torch.save(state, f)
    with pytest.raises(ValueError, match="missing"):
        make(seed=1).load_checkpoint("memory://detector_test/partial.pth")


def test_class_probs_rows_sum_to_one(det):
    probs = det.class_probs(images(), BOXES, MASK)
    assert probs.shape == (2, 3, NUM_CLASSES) and not probs.requires_grad
    torch.testing.assert_close(probs[MASK].sum(-1), torch.ones(int(MASK.sum())))
    assert torch.all(probs[~MASK] == 0)


def test_detect_boxes_inside_image_and_counts(det):
    img = images(2, size=64, seed=3)
    sizes = torch.tensor([[64, 64], [48, 40]])  # second image padded at the bottom/right
    results = det.detect(img, score_thr=0.0, min_boxes=4, max_boxes=20, image_sizes=sizes, num_proposals=40)
    assert len(results) == 2
    for (boxes, scores, probs), (h, w) in zip(results, sizes.tolist()):
        assert 4 <= len(boxes) <= 20 and scores.shape == (len(boxes),) and probs.shape == (len(boxes), NUM_CLASSES)
        assert torch.all(boxes >= 0) and torch.all(boxes[:, 2] <= w) and torch.all(boxes[:, 3] <= h)
        assert torch.all(boxes[:, 2] >= boxes[:, 0]) and torch.all(boxes[:, 3] >= boxes[:, 1])
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(boxes)))
        assert torch.all(scores[:-1] >= scores[1:])  # best first
    # nothing passes an impossible threshold: topped up to min_boxes by score
    # the same candidates with every box kept, best first: the top-up is their first six.
    (every, every_scores, _), _ = det.detect(img, score_thr=0.0, min_boxes=6, max_boxes=40, num_proposals=40)
    (boxes, scores, _), _ = det.detect(img, score_thr=1.01, min_boxes=6, max_boxes=20, num_proposals=40)
    assert len(boxes) == 6 and len(every) > 6  # fails if the top-up takes any six, or the last six
    torch.testing.assert_close(scores, every_scores[:6])
    torch.testing.assert_close(boxes, every[:6])
    assert torch.all(every_scores[:-1] >= every_scores[1:])
    # a threshold between two scores keeps exactly the boxes at or above it (min_boxes 1)
    thr = float(every_scores[3] + every_scores[4]) / 2
    (kept, kept_scores, _), _ = det.detect(img, score_thr=thr, min_boxes=1, max_boxes=40, num_proposals=40)
    expected = int((every_scores >= thr).sum())
    assert len(kept) == expected and torch.all(kept_scores >= thr)


def test_autocast_bf16_forward_and_backward():
    d = make().train()
    ref = d(images(), BOXES, MASK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = d(images(), BOXES, MASK, roi_masked=torch.zeros_like(MASK))
        probs = d.class_probs(images(), BOXES, MASK)
    assert feats.shape == ref.shape and torch.isfinite(feats).all()
    torch.testing.assert_close(feats.float(), ref, rtol=0.1, atol=0.05)
    assert probs.dtype == torch.float32
    feats.float().sum().backward()
    assert d.detector.backbone.layer3[0].conv1.weight.grad is not None


def test_normalize_rgb_and_bgr():
    img = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1)
    rgb = make().normalize(img).view(3)
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(rgb, (torch.tensor([10.0, 20, 30]) - mean) / std)
    # BGR: channels reversed first; mean and std are given in the network's (BGR) order.
    bgr = make(bgr=True, pixel_mean=[102.9801, 115.9465, 122.7717], pixel_std=[1.0, 1.0, 1.0]).normalize(img)
    torch.testing.assert_close(bgr.view(3), torch.tensor([30.0, 20, 10]) - torch.tensor([102.9801, 115.9465, 122.7717]))


def test_caffe_roi_pool_on_edges():
    """CaffeRoIPool against the loop of Caffe's kernel, incl. boxes over the border and x.5 rounding."""
    import math

    from vlbert.model.detector.roi_pool import CaffeRoIPool

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 5, 7, generator=g)
    rois = torch.tensor([[0, 0, 0, 111, 79], [1, 8, 24, 40, 56], [0, -20, 30, 200, 300], [1, 50, 10, 52, 12]])
    got = CaffeRoIPool(4, 1 / 16)(feat, rois.float())
    for n, (b, *box) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (int(math.copysign(math.floor(abs(v / 16) + 0.5), v)) for v in box)
        rw, rh = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        for i in range(4):
            hs, he = (min(max(f + y1, 0), 5) for f in (math.floor(i * rh / 4), math.ceil((i + 1) * rh / 4)))
            for j in range(4):
                ws, we = (min(max(f + x1, 0), 7) for f in (math.floor(j * rw / 4), math.ceil((j + 1) * rw / 4)))
                want = feat[b, :, hs:he, ws:we].amax((-2, -1)) if he > hs and we > ws else torch.zeros(3)
                torch.testing.assert_close(got[n, :, i, j], want)


def test_butd_preset_detector_shapes():
    from vlbert.config import detector_preset

    torch.manual_seed(0)
    det = RegionFeatureExtractor(DetectorConfig(**{**detector_preset("butd_r101_vg"), "depth": 50,
                                                   "num_classes": NUM_CLASSES})).eval()
    assert det.detector.rpn_head.num_base_priors == 12 and det.detector.rpn_head.rpn_conv.out_channels == 512
    assert det.detector.backbone.maxpool.ceil_mode and det.detector.backbone.maxpool.padding == 0
    rois = torch.tensor([[0.0, 0, 0, 64, 64]])
    res5 = det._res5(torch.zeros(1, 1024, 4, 4), rois)
    assert res5.shape == (1, 2048, 14, 14)  # dilated res5 keeps the 14x14 RoI grid
    with torch.no_grad():
        feats = det(images(1), torch.tensor([[[0.0, 0, 64, 64]]]), torch.ones(1, 1, dtype=torch.bool))
    assert feats.shape == (1, 1, 2048)


# bf16 keeps 8 significant bits: unit roundoff 2^-8 (about 3.9e-3).
BF16_ROUNDOFF = 2.0 ** -8


def test_frozen_batchnorm_matches_batchnorm_and_runs_in_bf16():
    """Same output as BatchNorm in eval mode; in bf16 the same function within bf16's rounding
    (the input rounded to bf16 first, then one multiply-add: a few roundoffs of the output).
    Fails if the bf16 path returns garbage of the right dtype (tried: ``torch.randn_like(x)``
    when ``x`` is bf16)."""
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(bn)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))
    low = frozen(x.bfloat16())
    assert low.dtype == torch.bfloat16
    want = bn(x.bfloat16().float())
    torch.testing.assert_close(low.float(), want, rtol=4 * BF16_ROUNDOFF, atol=4 * BF16_ROUNDOFF * float(want.abs().max()))
    # Same state-dict names as BatchNorm (so MMDetection checkpoints load), counter ignored.
    fresh = FrozenBatchNorm2d(torch.nn.BatchNorm2d(4))
    fresh.load_state_dict(bn.state_dict())
    torch.testing.assert_close(fresh(x), bn(x))


def test_bf16_weights_take_bf16_images():
    """The detector cast to bf16 gives each real box the float32 detector's feature within
    4 bf16 roundoffs (relative norm per box; measured about 1 roundoff on ResNet-18).
    Fails if the bf16 path returns garbage of the right dtype (tried: the features replaced by
    ``torch.randn_like`` when the weights are bf16)."""
    d = make().to(torch.bfloat16).eval()
    with torch.no_grad():
        feats = d(images(), BOXES, MASK)
        want = make().eval()(images(), BOXES, MASK)
    assert feats.dtype == torch.bfloat16 and torch.isfinite(feats[MASK]).all()
    err = (feats[MASK].float() - want[MASK]).norm(dim=-1) / want[MASK].norm(dim=-1)
    assert torch.all(err <= 4 * BF16_ROUNDOFF), err
    assert torch.all(feats[~MASK] == 0)
