"""VL-BERT embeddings: geometry, sequence layout, element sums, zero-init visual part."""

import math

import pytest
import torch
from transformers import BertConfig

from vlbert.model.embeddings import (
    KIND_END,
    KIND_PAD,
    KIND_ROI,
    KIND_TEXT,
    SEGMENT_A,
    SEGMENT_B,
    VisualInputs,
    VLBertEmbeddings,
    geometry_embedding,
)

H, A, F = 32, 12, 4  # hidden, appearance dim, geometry frequencies


def tiny_bert_config(**kw) -> BertConfig:
    return BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=40, **kw)


def make_embeddings(seed=0) -> VLBertEmbeddings:
    torch.manual_seed(seed)
    return VLBertEmbeddings(tiny_bert_config(), appearance_dim=A, geometry_freqs=F, visual_dropout=0.1).eval()


def two_samples():
    """Sample 0: 4 tokens, 3 boxes; sample 1: 5 tokens, 1 box (T = 5, R = 3)."""
    input_ids = torch.tensor([[2, 7, 8, 3, 0], [2, 9, 10, 11, 3]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    boxes = torch.tensor([[[0, 0, 64, 48], [4, 4, 20, 30], [10, 5, 60, 40]],
                          [[0, 0, 32, 64], [0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float)
    visual = VisualInputs(
        appearance=torch.randn(2, 3, A),
        boxes=boxes,
        image_sizes=torch.tensor([[48, 64], [64, 32]]),
        box_mask=torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool),
        roi_masked=torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=torch.bool),
    )
    return input_ids, attention_mask, visual


# --------------------------------------------------------------------------- geometry


def test_geometry_embedding_matches_hand_computation():
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 50.0]]])
    sizes = torch.tensor([[50, 100]])  # (h, w)
    out = geometry_embedding(boxes, sizes, freqs=F)
    assert out.shape == (1, 2, 8 * F) and out.dtype == torch.float32

    def hand(v, size, i, fn):
        return fn(100.0 * (v / size) / 1000.0 ** (i / F))

    # Box 0: x1 = 10 / W, y1 = 20 / H, x2 = 30 / W, y2 = 40 / H.
    for c, (v, size) in enumerate([(10, 100), (20, 50), (30, 100), (40, 50)]):
        for i in range(F):
            assert out[0, 0, c * 2 * F + i].item() == pytest.approx(hand(v, size, i, math.sin), abs=1e-5)
            assert out[0, 0, c * 2 * F + F + i].item() == pytest.approx(hand(v, size, i, math.cos), abs=1e-5)
    # Whole-image box: x2/W = y2/H = 1 -> sin(100 / 1000^(i/F)).
    assert out[0, 1, 2 * 2 * F + 1].item() == pytest.approx(math.sin(100.0 / 1000.0 ** (1 / F)), abs=1e-5)
    assert out[0, 1, 0].item() == 0.0 and out[0, 1, F].item() == 1.0  # x1 = 0: sin 0, cos 0


def test_geometry_embedding_default_size_is_2048():
    """256 frequencies unless told otherwise (8 x 256 = 2048). Fails if the default changed."""
    out = geometry_embedding(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]), torch.tensor([[10, 10]]))
    assert out.shape == (1, 1, 2048)
    # Entry i = 255 of y2 (4/10 -> 40): cos(40 / 1000^(255/256)).
    assert out[0, 0, 3 * 512 + 256 + 255].item() == pytest.approx(math.cos(40.0 / 1000.0 ** (255 / 256)), abs=1e-5)


def test_geometry_embedding_rejects_bad_boxes():
    with pytest.raises(ValueError, match="4 coordinates"):
        geometry_embedding(torch.zeros(1, 2, 3), torch.tensor([[10, 10]]))


# --------------------------------------------------------------------------- layout


def test_sequence_layout_segments_and_positions():
    emb = make_embeddings()
    input_ids, attention_mask, visual = two_samples()
    out, layout = emb(input_ids, attention_mask, visual)
    assert out.shape == (2, 5 + 3 + 1, H)
    T, R, P, E = KIND_TEXT, KIND_ROI, KIND_PAD, KIND_END
    # [CLS] w w [SEP] RoI RoI RoI [END] pad  /  [CLS] w w w [SEP] RoI [END] pad pad
    assert layout.kind.tolist() == [[T, T, T, T, R, R, R, E, P], [T, T, T, T, T, R, E, P, P]]
    assert layout.attention_mask.tolist() == [[1] * 8 + [0], [1] * 7 + [0, 0]]
    real = layout.attention_mask
    assert layout.position_ids[0][real[0]].tolist() == [0, 1, 2, 3, 4, 4, 4, 5]
    assert layout.position_ids[1][real[1]].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert layout.token_type_ids[0][real[0]].tolist() == [0, 0, 0, 0, 2, 2, 2, 2]
    assert layout.token_type_ids[1][real[1]].tolist() == [0, 0, 0, 0, 0, 2, 2]
    # Indices map every input slot to its sequence slot; padding slots land in the padding.
    assert layout.text_index.tolist() == [[0, 1, 2, 3, 8], [0, 1, 2, 3, 4]]
    assert layout.roi_index[0].tolist() == [4, 5, 6]
    assert layout.roi_index[1, 0].item() == 5 and set(layout.roi_index[1, 1:].tolist()) == {7, 8}


def test_element_embeddings_are_token_visual_segment_position():
    emb = make_embeddings()
    with torch.no_grad():  # make the visual part visible (it starts at 0)
        emb.visual_layer_norm.weight.normal_()
        emb.visual_layer_norm.bias.normal_()
    input_ids, attention_mask, visual = two_samples()
    out, layout = emb(input_ids, attention_mask, visual)
    vis = emb.visual_layer_norm(torch.relu(emb.visual_projection(torch.cat(
        [visual.appearance, geometry_embedding(visual.boxes, visual.image_sizes, F)], -1))))
    pos, typ, ln = emb.position_embeddings.weight, emb.token_type_embeddings.weight, emb.LayerNorm
    # Text token 2 of sample 0: word + whole-image visual + segment A + position 2.
    want = ln(emb.word_embeddings.weight[8] + vis[0, 0] + typ[0] + pos[2])
    torch.testing.assert_close(out[0, 2], want)
    # RoI 1 of sample 0 is masked: masked-RoI token + its own visual + segment 2 + position n = 4.
    want = ln(emb.masked_roi_token + vis[0, 1] + typ[2] + pos[4])
    torch.testing.assert_close(out[0, 5], want)
    # RoI 2 of sample 0: [IMG] token.
    torch.testing.assert_close(out[0, 6], ln(emb.img_token + vis[0, 2] + typ[2] + pos[4]))
    # [END] of sample 1 (n = 5): end token + whole-image visual + segment 2 + position n + 1.
    torch.testing.assert_close(out[1, 6], ln(emb.end_token + vis[1, 0] + typ[2] + pos[6]))


def _bert_embeddings():
    """Hugging Face's BertEmbeddings at the tiny size with 3 token types (imported here, not at
    the top: the module is slow to import and most tests do not need it)."""
    from transformers.models.bert.modeling_bert import BertEmbeddings

    return BertEmbeddings(tiny_bert_config(type_vocab_size=3)).eval()


def test_text_only_layout_and_zero_init_equals_bert_embeddings():
    emb = make_embeddings()
    assert torch.all(emb.visual_layer_norm.weight == 0)
    ref = _bert_embeddings()
    ref.load_state_dict(emb.state_dict(), strict=False)
    input_ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    out, layout = emb(input_ids, mask)
    assert layout.roi_index is None
    assert layout.kind.tolist() == [[KIND_TEXT] * 4, [KIND_TEXT] * 3 + [KIND_PAD]]
    assert layout.token_type_ids.eq(0).all()
    torch.testing.assert_close(out, ref(input_ids=input_ids), rtol=0, atol=1e-6)
    # The auxiliary visual embedding is a real parameter that training can grow.
    with torch.no_grad():
        emb.visual_layer_norm.weight.fill_(1.0)
    assert not torch.allclose(emb(input_ids, mask)[0], out)


def test_caption_text_tokens_equal_bert_embeddings_at_zero_init():
    emb = make_embeddings()
    ref = _bert_embeddings()
    ref.load_state_dict(emb.state_dict(), strict=False)
    input_ids, attention_mask, visual = two_samples()
    out, layout = emb(input_ids, attention_mask, visual)
    want = ref(input_ids=input_ids)
    for b in range(2):
        n = int(attention_mask[b].sum())
        torch.testing.assert_close(out[b, layout.text_index[b, :n]], want[b, :n], rtol=0, atol=1e-6)


def test_visual_inputs_shape_mismatch_is_a_clear_error():
    emb = make_embeddings()
    input_ids, attention_mask, visual = two_samples()
    visual.appearance = visual.appearance[:, :2]
    with pytest.raises(ValueError, match="visual inputs disagree"):
        emb(input_ids, attention_mask, visual)
    with pytest.raises(ValueError, match="differ"):
        emb(input_ids, attention_mask[:, :3])


# --------------------------------------------------------------------------- contracts found by mutation testing


def _visible(emb: VLBertEmbeddings) -> VLBertEmbeddings:
    """The visual LayerNorm made non-zero, so that every visual term shows in the output."""
    with torch.no_grad():
        emb.visual_layer_norm.weight.normal_()
        emb.visual_layer_norm.bias.normal_()
    return emb


def _visual_features(emb, visual):
    """The visual feature of every box, written out (eval mode: no dropout)."""
    return emb.visual_layer_norm(torch.relu(emb.visual_projection(torch.cat(
        [visual.appearance, geometry_embedding(visual.boxes, visual.image_sizes, F)], -1))))


def test_text_only_element_is_word_aux_visual_segment_position():
    """Without images each text slot is LayerNorm(word + LayerNorm_visual(aux) + segment + position);
    a real token's position counts the real tokens before it (a hole in the mask does not count),
    a padding slot's position is its slot. Fails if the auxiliary visual embedding were subtracted
    or left out, or if the positions counted the hole."""
    emb = _visible(make_embeddings())
    input_ids = torch.tensor([[2, 5, 6, 3]])
    mask = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)
    types = torch.tensor([[SEGMENT_A, SEGMENT_A, SEGMENT_B, SEGMENT_B]])
    out, layout = emb(input_ids, mask, token_type_ids=types)
    assert layout.position_ids.tolist() == [[0, 1, 1, 2]] and layout.attention_mask.tolist() == [[1, 0, 1, 1]]
    assert layout.text_index.tolist() == [[0, 1, 2, 3]] and layout.token_type_ids.tolist() == types.tolist()
    aux = emb.visual_layer_norm(emb.aux_visual_embedding)
    word, pos, typ = emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight
    for slot, (tok, p, t) in enumerate([(2, 0, 0), (5, 1, 0), (6, 1, 1), (3, 2, 1)]):
        torch.testing.assert_close(out[0, slot], emb.LayerNorm(word[tok] + aux + typ[t] + pos[p]))


def test_segment_b_is_berts_second_token_type():
    """Tasks mark the second text segment with SEGMENT_B (VQA's answer slots, VCR's response); at
    zero init the text embeddings are BERT's with token type 1 there. Fails if SEGMENT_B were not
    BERT's type 1 or SEGMENT_A not its type 0."""
    emb = make_embeddings()
    ref = _bert_embeddings()
    ref.load_state_dict(emb.state_dict(), strict=False)
    input_ids = torch.tensor([[2, 5, 3, 6, 3]])
    types = torch.tensor([[SEGMENT_A] * 3 + [SEGMENT_B] * 2])
    out, _ = emb(input_ids, torch.ones_like(input_ids, dtype=torch.bool), token_type_ids=types)
    want = ref(input_ids=input_ids, token_type_ids=torch.tensor([[0, 0, 0, 1, 1]]))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_kinds_are_four_distinct_values():
    """The layout tells padding, text, RoIs and [END] apart: four different values. Fails if two
    kinds shared a value (a RoI reported as [END], text as a RoI or padding)."""
    assert len({KIND_PAD, KIND_TEXT, KIND_ROI, KIND_END}) == 4


def test_roi_masked_defaults_to_none_masked():
    """``roi_masked`` left out means no RoI is masked: the same output as an all-False mask, every
    RoI with the [IMG] token. Fails if the default were anything but None or were read as masked."""
    emb = _visible(make_embeddings())
    input_ids, attention_mask, visual = two_samples()
    assert VisualInputs(visual.appearance, visual.boxes, visual.image_sizes, visual.box_mask).roi_masked is None
    plain = VisualInputs(visual.appearance, visual.boxes, visual.image_sizes, visual.box_mask)
    unmasked = VisualInputs(visual.appearance, visual.boxes, visual.image_sizes, visual.box_mask,
                            roi_masked=torch.zeros(2, 3, dtype=torch.bool))
    out, _ = emb(input_ids, attention_mask, plain)
    torch.testing.assert_close(out, emb(input_ids, attention_mask, unmasked)[0], rtol=0, atol=0)
    vis = _visual_features(emb, visual)
    ln, typ, pos = emb.LayerNorm, emb.token_type_embeddings.weight, emb.position_embeddings.weight
    torch.testing.assert_close(out[0, 5], ln(emb.img_token + vis[0, 1] + typ[2] + pos[4]))


def test_text_regions_give_text_slots_their_box_feature():
    """With ``text_regions`` a text slot takes the visual feature of the box it names, an index
    below 0 takes box 0 (the whole image) and one past the last box the last box (clamped);
    the RoIs and [END] are unchanged. A [B, T] mismatch is a clear error. Fails if the clamp
    bounds moved (index 0 read as box 1, index R - 1 as R - 2) or the regions were ignored."""
    emb = _visible(make_embeddings())
    input_ids, attention_mask, visual = two_samples()
    # sample 0: 3 real boxes, 4 real tokens; sample 1: only box 0 is real
    regions = torch.tensor([[0, 2, 99, -1, 1], [0, -1, 0, 0, 0]])
    visual_r = VisualInputs(visual.appearance, visual.boxes, visual.image_sizes, visual.box_mask,
                            visual.roi_masked, text_regions=regions)
    out, layout = emb(input_ids, attention_mask, visual_r)
    vis = _visual_features(emb, visual)
    word, typ, pos, ln = emb.word_embeddings.weight, emb.token_type_embeddings.weight, \
        emb.position_embeddings.weight, emb.LayerNorm
    want_box = [[0, 2, 2, 0], [0, 0, 0, 0, 0]]
    for b in range(2):
        for t in range(int(attention_mask[b].sum())):
            slot = layout.text_index[b, t]
            want = ln(word[input_ids[b, t]] + vis[b, want_box[b][t]] + typ[0] + pos[t])
            torch.testing.assert_close(out[b, slot], want)
    plain, _ = emb(input_ids, attention_mask, visual)
    torch.testing.assert_close(out[0, 4:8], plain[0, 4:8])  # RoIs and [END] of sample 0
    visual_r.text_regions = regions[:, :4]
    with pytest.raises(ValueError) as e:
        emb(input_ids, attention_mask, visual_r)
    assert str(e.value) == "text_regions must be [B, T] = (2, 5), got (2, 4)"


def test_error_messages_name_the_shapes():
    """Each shape error says what disagrees, with the shapes. Fails if a message lost its words."""
    with pytest.raises(ValueError) as e:
        geometry_embedding(torch.zeros(1, 2, 3), torch.tensor([[10, 10]]))
    assert str(e.value) == "boxes must end in 4 coordinates, got shape (1, 2, 3)"
    emb = make_embeddings()
    input_ids, attention_mask, visual = two_samples()
    with pytest.raises(ValueError) as e:
        emb(input_ids, attention_mask[:, :3])
    assert str(e.value) == "input_ids (2, 5) and attention_mask (2, 3) differ"
    visual.boxes = visual.boxes[:, :2]
    with pytest.raises(ValueError) as e:
        emb(input_ids, attention_mask, visual)
    assert str(e.value) == "visual inputs disagree: appearance (2, 3, 12), boxes (2, 2, 4), box_mask (2, 3), batch 2"


def test_visual_part_runs_in_the_weights_dtype():
    """Detector features arrive in float32 while the model may run in another precision: the
    appearance and geometry are cast to the projection's dtype. A float64 model given float32
    features computes in float64, equal to the features cast by hand. Fails if the cast were
    dropped (float32 input to float64 weights is an error)."""
    emb = _visible(make_embeddings()).double()
    input_ids, attention_mask, visual = two_samples()
    assert visual.appearance.dtype == torch.float32
    got = emb.visual_features(visual)
    geometry = geometry_embedding(visual.boxes, visual.image_sizes, F).double()
    want = emb.visual_layer_norm(torch.relu(emb.visual_projection(torch.cat([visual.appearance.double(), geometry],
                                                                            -1))))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)
    out, _ = emb(input_ids, attention_mask, visual)
    assert out.dtype == torch.float64


def test_every_tensor_is_built_on_the_inputs_device():
    """Run on PyTorch's meta device (shapes only), standing in for a GPU: the segment, position
    and kind tensors the forward builds must be made on the inputs' device, or ``torch.cat`` mixes
    devices. Fails if any of them were made on the default (CPU) device."""
    emb = make_embeddings().to("meta")
    input_ids, attention_mask, visual = two_samples()
    meta = VisualInputs(*(getattr(visual, f).to("meta") for f in ("appearance", "boxes", "image_sizes", "box_mask",
                                                                 "roi_masked")))
    out, layout = emb(input_ids.to("meta"), attention_mask.to("meta"), meta)
    assert out.device.type == "meta" and out.shape == (2, 9, H)
    assert all(t.device.type == "meta" for t in (layout.attention_mask, layout.text_index, layout.roi_index,
                                                 layout.position_ids, layout.token_type_ids, layout.kind))
