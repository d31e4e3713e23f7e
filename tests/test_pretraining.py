"""VLBertForPretraining with the real depth-18 detector: losses by hand, gradients, tying, checkpointing."""

import copy
import dataclasses

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from vlbert.config import DetectorConfig, ModelConfig
from vlbert.batch import IGNORE_INDEX, CaptionBatch, PretrainBatch, TextBatch
from vlbert.model.embeddings import VisualInputs
from vlbert.model.pretraining import PretrainingOutput, VLBertForPretraining

V, C = 60, 5  # vocab, detector classes


def tiny_cfgs(checkpointing=False, bert="", **detector_kw):
    model = ModelConfig(bert=bert, vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_position_embeddings=64, geometry_freqs=8, activation_checkpointing=checkpointing)
    detector = DetectorConfig(depth=18, num_classes=C, activation_checkpointing=checkpointing, **detector_kw)
    return model, detector


def make_model(seed=0, **kw) -> VLBertForPretraining:
    torch.manual_seed(seed)
    return VLBertForPretraining(*tiny_cfgs(**kw))


def caption_batch(seed=0, with_targets=True) -> CaptionBatch:
    g = torch.Generator().manual_seed(seed)
    B, T, R = 2, 6, 4
    input_ids = torch.randint(5, V, (B, T), generator=g)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    input_ids[~attention_mask] = 0
    mlm_labels = torch.full((B, T), IGNORE_INDEX)
    mlm_labels[0, 2], mlm_labels[0, 4], mlm_labels[1, 1] = 11, 12, 13
    sizes = torch.tensor([[64, 64], [48, 64]])
    boxes = torch.tensor([[[0, 0, 64, 64], [4, 4, 30, 30], [20, 10, 60, 50], [8, 30, 40, 62]],
                          [[0, 0, 64, 48], [10, 10, 40, 40], [0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float)
    box_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    roi_masked = torch.tensor([[0, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    roi_labels_mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    targets = torch.softmax(torch.randn(B, R, C, generator=g) * 2, -1) if with_targets else None
    images = torch.randint(0, 256, (B, 3, 64, 64), generator=g, dtype=torch.uint8)
    images[1, :, 48:] = 0
    return CaptionBatch(input_ids, attention_mask, mlm_labels, images, sizes, boxes, box_mask, roi_masked,
                        roi_labels_mask, targets)


def text_batch(seed=0) -> TextBatch:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(5, V, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[2, 5:] = False
    labels = torch.full((3, 8), IGNORE_INDEX)
    labels[0, 1], labels[1, 6], labels[2, 3] = 20, 21, 22
    return TextBatch(ids, mask, labels)


def hand_ce(logits, label):
    return torch.logsumexp(logits, 0) - logits[label]


# --------------------------------------------------------------------------- losses by hand


def test_losses_equal_hand_computation():
    model = make_model().eval()
    with torch.no_grad():  # let the image matter
        model.vlbert.embeddings.visual_layer_norm.weight.fill_(1.0)
    c, t = caption_batch(), text_batch()
    with torch.no_grad():
        out = model(PretrainBatch(captions=c, text=t))
        assert isinstance(out, PretrainingOutput)
        # Caption pass by hand from the encoder's own outputs.
        app = model.detector(c.images, c.boxes, c.box_mask, c.roi_masked)
        enc = model.vlbert(c.input_ids, c.attention_mask, VisualInputs(app, c.boxes, c.image_sizes, c.box_mask,
                                                                       c.roi_masked))
        h, lay = enc.last_hidden_state, enc.layout
        W = model.vlbert.embeddings.word_embeddings.weight
        bias = model.mlm_head.predictions.bias

        def mlm_logits(x):
            return model.mlm_head.predictions.transform(x) @ W.T + bias

        terms, correct = [], 0
        for b, i, y in [(0, 2, 11), (0, 4, 12), (1, 1, 13)]:
            z = mlm_logits(h[b, lay.text_index[b, i]])
            terms.append(hand_ce(z, y))
            correct += int(z.argmax() == y)
        assert out.mlm_caption_loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
        assert out.mlm_caption_acc.item() == pytest.approx(correct / 3)
        assert out.mlm_caption_count.item() == 3

        soft, correct = [], 0
        for b, r in [(0, 1), (0, 2), (1, 1)]:
            p = model.roi_head(h[b, lay.roi_index[b, r]])
            q = c.roi_targets[b, r]
            soft.append(-(q * (p - torch.logsumexp(p, 0))).sum())
            correct += int(p.argmax() == q.argmax())
        assert out.roi_loss.item() == pytest.approx(torch.stack(soft).mean().item(), rel=1e-5)
        assert out.roi_acc.item() == pytest.approx(correct / 3)
        assert out.roi_count.item() == 3

        # Text-only pass.
        ht = model.vlbert(t.input_ids, t.attention_mask).last_hidden_state
        text_terms = [hand_ce(mlm_logits(ht[b, i]), y) for b, i, y in [(0, 1, 20), (1, 6, 21), (2, 3, 22)]]
        assert out.mlm_text_loss.item() == pytest.approx(torch.stack(text_terms).mean().item(), rel=1e-5)
        assert out.mlm_text_count.item() == 3
        total = out.mlm_caption_loss + out.roi_loss + out.mlm_text_loss
        assert out.loss.item() == pytest.approx(total.item(), rel=1e-6)


def test_roi_targets_default_to_frozen_copy_on_unmasked_image(monkeypatch):
    model = make_model().eval()
    assert model.target_detector is not None
    assert not any(p.requires_grad for p in model.target_detector.parameters())
    c = caption_batch(with_targets=False)
    seen = []
    real = model.target_detector.class_probs

    def spy(images, boxes, box_mask):
        seen.append(images.clone())
        probs = real(images, boxes, box_mask)
        seen.append(probs)
        return probs

    monkeypatch.setattr(model.target_detector, "class_probs", spy)
    monkeypatch.setattr(model.detector, "class_probs", lambda *a: pytest.fail("the trained detector gave targets"))
    with torch.no_grad():
        out = model(PretrainBatch(captions=c))
    assert len(seen) == 2 and torch.equal(seen[0], c.images)  # the unmasked image
    q = seen[1]
    assert q.shape == (2, 4, C) and torch.allclose(q[c.box_mask].sum(-1), torch.ones(6))
    with torch.no_grad():
        c.roi_targets = q
        given = model(PretrainBatch(captions=c))
        c.roi_targets = torch.zeros_like(q)
        c.roi_targets[..., 0] = 1.0
        one_hot = model(PretrainBatch(captions=c))
    assert len(seen) == 2  # given targets: the detector is not asked
    assert out.roi_loss.item() == pytest.approx(given.roi_loss.item(), rel=1e-6)
    assert out.roi_loss.item() != pytest.approx(one_hot.roi_loss.item(), rel=1e-3)


def test_online_targets_do_not_drift_while_the_detector_trains():
    model = make_model()
    c = caption_batch(with_targets=False)
    before = model.target_detector.class_probs(c.images, c.boxes, c.box_mask)
    # Move the detector as training would (its box head is frozen; change the trainable res4 and
    # also the box head here, so that its own distributions certainly move).
    with torch.no_grad():
        for p in model.detector.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.detector.detector.roi_head.bbox_head.fc_cls.bias.add_(1.0 * torch.arange(C))
    moved = model.detector.class_probs(c.images, c.boxes, c.box_mask)
    after = model.target_detector.class_probs(c.images, c.boxes, c.box_mask)
    assert not torch.allclose(moved, before, atol=1e-3)
    torch.testing.assert_close(after, before)
    model.train()
    assert not model.target_detector.training
    # The copy is in the state dict, so a resumed run keeps the initial detector's targets.
    assert any(k.startswith("target_detector.") for k in model.state_dict())


def test_frozen_target_copy_holds_the_loaded_detector_not_a_random_one(tmp_path):
    """from_config loads the detector checkpoint and only then takes the frozen target copy:
    online masked-RoI targets come from the trained detector's distributions."""
    model_cfg, detector_cfg = tiny_cfgs()
    torch.manual_seed(7)
    trained = VLBertForPretraining(model_cfg, detector_cfg).detector.eval()
    with torch.no_grad():  # distributions that no random init gives
        trained.detector.roi_head.bbox_head.fc_cls.bias.copy_(torch.arange(C) * 2.0)
    path = tmp_path / "detector.pth"
    torch.save(trained.detector.state_dict(), path)
    c = caption_batch(with_targets=False)
    want = trained.class_probs(c.images, c.boxes, c.box_mask)

    cfg = dataclasses.replace(detector_cfg, checkpoint=str(path))
    torch.manual_seed(0)
    model = VLBertForPretraining.from_config(model_cfg, cfg)
    torch.testing.assert_close(model.target_detector.class_probs(c.images, c.boxes, c.box_mask), want)
    torch.testing.assert_close(model._online_targets(c), want)
    assert model.target_detector is not model.detector
    assert not any(p.requires_grad for p in model.target_detector.parameters())
    torch.manual_seed(0)
    built = VLBertForPretraining(model_cfg, cfg)  # the constructor reads no file: random detector and copy
    assert not torch.allclose(built._online_targets(c), want, atol=1e-3)


def test_from_config_reads_what_the_config_names_and_the_constructor_nothing(tmp_path):
    model_cfg, detector_cfg = tiny_cfgs(bert=str(tmp_path / "no_bert"), checkpoint=str(tmp_path / "no.pth"))
    VLBertForPretraining(model_cfg, detector_cfg)
    with pytest.raises(OSError):
        VLBertForPretraining.from_config(model_cfg, dataclasses.replace(detector_cfg, checkpoint=""))
    with pytest.raises(FileNotFoundError):
        VLBertForPretraining.from_config(dataclasses.replace(model_cfg, bert=""), detector_cfg)


def test_precomputed_targets_required_raises_on_a_batch_without_them():
    torch.manual_seed(0)
    model = VLBertForPretraining(*tiny_cfgs(roi_targets="precomputed"))
    assert model.target_detector is None
    with pytest.raises(ValueError, match="extract-regions"):
        model(PretrainBatch(captions=caption_batch(with_targets=False)))
    model(PretrainBatch(captions=caption_batch(with_targets=True)))  # with regions.npy: fine


def test_targets_from_the_trained_detector_are_refused():
    with pytest.raises(ValueError, match="drift"):
        VLBertForPretraining(*tiny_cfgs(roi_targets="detector"))
    model = VLBertForPretraining(*tiny_cfgs(roi_targets="detector", trainable=False))  # a frozen detector may
    assert model.target_detector is None


def test_no_masked_tokens_gives_zero_not_nan():
    model = make_model()
    c, t = caption_batch(), text_batch()
    c.mlm_labels.fill_(IGNORE_INDEX)
    c.roi_labels_mask.zero_()
    t.mlm_labels.fill_(IGNORE_INDEX)
    out = model(PretrainBatch(captions=c, text=t))
    for name in ("loss", "mlm_caption_loss", "roi_loss", "mlm_text_loss", "mlm_caption_acc", "roi_acc"):
        assert getattr(out, name).item() == 0.0, name
    assert out.mlm_caption_count.item() == 0 and out.roi_count.item() == 0
    out.loss.backward()  # still a graph: heads get zero gradients, not None
    assert model.mlm_head.predictions.transform.dense.weight.grad is not None


def test_absent_tasks_are_zero_and_left_out_of_the_loss():
    model = make_model().eval()
    with torch.no_grad():
        text_only = model(PretrainBatch(text=text_batch()))
        caption_only = model(PretrainBatch(captions=caption_batch()))
    assert text_only.loss.item() == pytest.approx(text_only.mlm_text_loss.item())
    assert text_only.mlm_caption_loss.item() == 0 and text_only.roi_loss.item() == 0
    assert caption_only.mlm_text_loss.item() == 0 and caption_only.mlm_text_count.item() == 0
    assert caption_only.loss.item() == pytest.approx((caption_only.mlm_caption_loss + caption_only.roi_loss).item())
    assert set(caption_only.metrics()) >= {"loss", "roi_acc", "mlm_text_count"}
    with pytest.raises(ValueError, match="neither"):
        model(PretrainBatch())


# --------------------------------------------------------------------------- gradients and tying


def test_decoder_is_tied_to_word_embeddings():
    model = make_model()
    dec = model.mlm_head.predictions.decoder
    words = model.vlbert.embeddings.word_embeddings.weight
    assert dec.weight is words and dec.weight.data_ptr() == words.data_ptr()
    assert dec.bias is model.mlm_head.predictions.bias
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(id(p) for p in model.parameters()))  # shared, listed once


def test_gradients_reach_encoder_and_detector_res3_to_res5():
    model = make_model().train()
    # At init the visual LayerNorm weight is 0: only that weight gets an image gradient.
    out = model(PretrainBatch(captions=caption_batch(), text=text_batch()))
    out.loss.backward()
    assert model.vlbert.embeddings.visual_layer_norm.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.vlbert.embeddings.visual_layer_norm.weight.fill_(1.0)
    model(PretrainBatch(captions=caption_batch(), text=text_batch())).loss.backward()

    def grad_norm(module):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), module.__class__.__name__
        return sum(g.abs().sum().item() for g in grads)

    det = model.detector.detector
    for name, module in [("encoder", model.vlbert.encoder), ("projection", model.vlbert.embeddings.visual_projection),
                         ("res3", det.backbone.layer2), ("res4", det.backbone.layer3),
                         ("res5", det.roi_head.shared_head)]:
        assert grad_norm(module) > 0, name
    assert all(not p.requires_grad for p in det.backbone.layer1.parameters())  # res2 frozen
    assert model.vlbert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_same_loss_and_grads():
    plain = make_model()
    ckpt = make_model(checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):
        with torch.no_grad():
            m.vlbert.embeddings.visual_layer_norm.weight.fill_(1.0)
    losses = []
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(123)  # same dropout masks
        out = m(PretrainBatch(captions=caption_batch(), text=text_batch()))
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    grads = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- checkpoint, precision


def test_mlm_head_loaded_from_checkpoint_when_present(tmp_path):
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()
    bert.save_pretrained(tmp_path)
    model = VLBertForPretraining.from_config(*tiny_cfgs(bert=str(tmp_path)))
    torch.testing.assert_close(model.mlm_head.predictions.transform.dense.weight,
                               bert.cls.predictions.transform.dense.weight)
    torch.testing.assert_close(model.mlm_head.predictions.decoder.bias, bert.cls.predictions.bias)
    torch.testing.assert_close(model.vlbert.embeddings.word_embeddings.weight,
                               bert.bert.embeddings.word_embeddings.weight)
    assert model.mlm_head.predictions.decoder.weight is model.vlbert.embeddings.word_embeddings.weight


# bf16 keeps 8 significant bits: its unit roundoff is 2^-8 (about 3.9e-3). A tiny two-layer model's
# losses, reduced in float32, stay within a few roundoffs of float32's; gradients, carried in bf16
# through every layer, within some more.
BF16_ROUNDOFF = 2.0 ** -8
LOSS_RTOL = 4 * BF16_ROUNDOFF
GRAD_RTOL = 16 * BF16_ROUNDOFF


def _bf16_and_fp32_runs(cast):
    """The same tiny model (dropout off, so both see the same function) in float32 and cast by
    ``cast``, run in train mode on the same batch, losses backpropagated. Returns
    ``(fp32_model, bf16_model, fp32_out, bf16_out)``."""
    model_cfg, detector_cfg = tiny_cfgs()
    model_cfg = dataclasses.replace(model_cfg, hidden_dropout=0.0, attention_dropout=0.0, visual_dropout=0.0)
    torch.manual_seed(0)
    ref = VLBertForPretraining(model_cfg, detector_cfg).train()
    with torch.no_grad():
        ref.vlbert.embeddings.visual_layer_norm.weight.fill_(1.0)
    low = copy.deepcopy(ref)
    cast(low)
    batch = PretrainBatch(captions=caption_batch(), text=text_batch())
    out32, out16 = ref(batch), low(batch)
    out32.loss.backward()
    out16.loss.backward()
    return ref, low, out32, out16


def _assert_agrees_with_fp32(ref, low, out32, out16, grads):
    assert out16.loss.dtype == torch.float32 and torch.isfinite(out16.loss)
    for term in ("loss", "mlm_caption_loss", "roi_loss", "mlm_text_loss"):
        want, got = float(getattr(out32, term)), float(getattr(out16, term))
        assert abs(got - want) <= LOSS_RTOL * abs(want), (term, got, want)
    params32, params16 = dict(ref.named_parameters()), dict(low.named_parameters())
    for name in grads:
        g32, g16 = params32[name].grad, params16[name].grad
        assert g16.dtype == params16[name].dtype, name
        assert float((g16.float() - g32).norm()) <= GRAD_RTOL * float(g32.norm()), name


def test_bfloat16_encoder_and_heads_agree_with_float32():
    """Encoder and heads in bf16, the detector in float32 (its features are cast on entry): every
    loss within 4 bf16 roundoffs (relative) of the float32 model's, gradients within 16.
    Fails if the bf16 path returns float32 garbage of the right dtype (tried: the MLM loss's
    logits replaced by ``torch.randn_like(logits.float())`` when they arrive in bf16)."""
    def cast(model):
        for part in (model.vlbert, model.mlm_head, model.roi_head):
            part.to(torch.bfloat16)

    ref, low, out32, out16 = _bf16_and_fp32_runs(cast)
    assert low.vlbert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    _assert_agrees_with_fp32(ref, low, out32, out16, ["vlbert.encoder.layer.0.attention.self.query.weight",
                                                      "roi_head.classifier.weight"])
    res4 = low.detector.detector.backbone.layer3
    assert sum(p.grad.abs().sum() for p in res4.parameters() if p.grad is not None) > 0


def test_bfloat16_whole_model_agrees_with_float32():
    """As DeepSpeed bf16 runs it: every parameter in bf16, uint8 images, float32 boxes; losses and
    gradients (encoder, RoI classifier, detector res5) against the float32 model as above.
    Fails if the bf16 path returns float32 garbage of the right dtype (same break as above)."""
    ref, low, out32, out16 = _bf16_and_fp32_runs(lambda model: model.to(torch.bfloat16))
    res5 = [n for n, p in low.named_parameters()
            if n.startswith("detector.detector.roi_head.shared_head.") and p.grad is not None and p.dim() == 4]
    assert res5 and all(p.dtype == torch.bfloat16 for p in low.parameters())
    _assert_agrees_with_fp32(ref, low, out32, out16, ["vlbert.encoder.layer.0.attention.self.query.weight",
                                                      "roi_head.classifier.weight", res5[0]])
