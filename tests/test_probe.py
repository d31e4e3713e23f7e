"""The colour probe: one query per colour word, only that word masked; blanking zeroes pixels;
the accuracy it reports is the model's own MLM prediction counted per query."""

import torch

from vlbert.config import DetectorConfig, ModelConfig
from vlbert.batch import IGNORE_INDEX, CaptionBatch, PretrainBatch
from vlbert.model.pretraining import VLBertForPretraining
from vlbert.demo.probe import colour_fill_accuracy, colour_queries

MASK, COLOURS = 4, torch.tensor([10, 11, 12])


def captions() -> CaptionBatch:
    # sample 0: "[CLS] 10 20 11 21 [SEP]" (two colours); sample 1: "[CLS] 12 22 [SEP] pad pad" (one colour)
    ids = torch.tensor([[2, 10, 20, 11, 21, 3], [2, 12, 22, 3, 0, 0]])
    att = ids != 0
    images = torch.full((2, 3, 64, 64), 200, dtype=torch.uint8)
    boxes = torch.tensor([[[0, 0, 64, 64], [4, 4, 30, 30]], [[0, 0, 64, 64], [10, 10, 40, 40]]], dtype=torch.float)
    mask = torch.ones(2, 2, dtype=torch.bool)
    return CaptionBatch(ids, att, torch.full_like(ids, IGNORE_INDEX), images, torch.tensor([[64, 64], [64, 64]]),
                        boxes, mask, mask.clone(), mask.clone(), torch.full((2, 2, 5), 0.2))


def test_one_query_per_colour_word_with_only_it_masked():
    c = captions()
    q = colour_queries(c, COLOURS, MASK, blank=False)
    assert q.input_ids.shape == (3, 6)
    assert (q.input_ids == MASK).sum(1).tolist() == [1, 1, 1]
    masked_at = (q.input_ids == MASK).nonzero()[:, 1].tolist()
    assert masked_at == [1, 3, 1]
    assert q.mlm_labels[q.mlm_labels != IGNORE_INDEX].tolist() == [10, 11, 12]
    assert not q.roi_masked.any() and not q.roi_labels_mask.any()
    assert torch.equal(q.images[2], c.images[1]) and (q.images > 0).all()
    assert c.input_ids[0, 1] == 10  # the input batch is left as it was
    blank = colour_queries(c, COLOURS, MASK, blank=True)
    assert (blank.images == 0).all() and torch.equal(blank.input_ids, q.input_ids)
    assert colour_queries(c, torch.tensor([99]), MASK, blank=False) is None


def tiny_model() -> VLBertForPretraining:
    torch.manual_seed(0)
    return VLBertForPretraining(
        ModelConfig(vocab_size=30, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                    max_position_embeddings=32, geometry_freqs=8),
        DetectorConfig(depth=18, num_classes=5),
    )


def test_accuracy_counts_the_queries_it_gets_right():
    """A model made to answer one colour everywhere (its MLM bias) is right on exactly the
    queries of that colour: 1 of 3 for colour 10 or 12 (one query each), and with the image as
    blanked, since the answer does not depend on it. Fails if the counter is stuck at 0, counts
    every query as right, or counts per batch instead of per query."""
    model = tiny_model()
    c = captions()
    for forced in (10, 12):
        with torch.no_grad():
            model.mlm_head.predictions.bias.zero_()
            model.mlm_head.predictions.bias[forced] = 1e4
        result = colour_fill_accuracy(model, [PretrainBatch(captions=c)], COLOURS, MASK)
        for name in ("with_image", "blanked"):
            assert (result[name].correct, result[name].total) == (1, 3), (forced, name, result[name])
    # Colour 10 appears twice in a batch of the same caption twice: 2 of 6, summed over batches.
    with torch.no_grad():
        model.mlm_head.predictions.bias.zero_()
        model.mlm_head.predictions.bias[10] = 1e4
    result = colour_fill_accuracy(model, [PretrainBatch(captions=c), PretrainBatch(captions=c)], COLOURS, MASK)
    assert (result["with_image"].correct, result["with_image"].total) == (2, 6)
    assert result["with_image"].accuracy == 2 / 6


def test_accuracy_matches_the_model_query_by_query():
    """On an untrained model the probe's count equals the model's own prediction, asked one query
    at a time; the model is left in the mode it was in."""
    model = tiny_model()
    c = captions()
    result = colour_fill_accuracy(model, [PretrainBatch(captions=c)], COLOURS, MASK)
    assert result["with_image"].total == 3 and result["blanked"].total == 3
    # The same predictions by hand: argmax of the MLM logits at each masked colour.
    with torch.no_grad():
        model.eval()
        for name, blank in (("with_image", False), ("blanked", True)):
            q = colour_queries(c, COLOURS, MASK, blank)
            correct = 0
            for i in range(3):
                single = CaptionBatch(*[v[i:i + 1] if isinstance(v, torch.Tensor) else v for v in vars(q).values()])
                out = model(PretrainBatch(captions=single))
                correct += int(out.mlm_caption_acc.item() == 1.0)
            assert result[name].correct == correct
    model.train()
    colour_fill_accuracy(model, [PretrainBatch(captions=c)], COLOURS, MASK)
    assert model.training


def test_blanking_zeroes_stored_features():
    """With stored box features (detector.source: features) there are no pixels: blanking zeroes
    every box feature, so the model's whole-image region, their mean, is 0 as well; the queries
    are otherwise those of the pixel batch. Fails if blanking leaves the features (the probe
    would then report the with-image figure twice) or expects images."""
    import dataclasses

    from vlbert.model.regions import PrecomputedRegions

    c = captions()
    feats = torch.zeros(2, 2, 8)
    feats[:, 1] = torch.arange(1, 9, dtype=torch.float)  # slot 0 (whole image) is 0 as stored
    c = dataclasses.replace(c, images=None, features=feats)
    q = colour_queries(c, COLOURS, MASK, blank=False)
    assert q.images is None and torch.equal(q.features[2], feats[1])
    blank = colour_queries(c, COLOURS, MASK, blank=True)
    assert blank.images is None and blank.features.shape == q.features.shape
    assert (blank.features == 0).all() and torch.equal(blank.input_ids, q.input_ids)
    appearance = PrecomputedRegions(8)(blank.features, blank.box_mask)
    assert (appearance == 0).all()  # the whole-image mean included
    assert (PrecomputedRegions(8)(q.features, q.box_mask)[:, 0] != 0).all()
