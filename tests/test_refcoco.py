"""RefCOCO+: REFER files (refs pickle or JSON + COCO instances), IoU labels, flips, the per-RoI
head, and a short fine-tune with evaluation on demo scenes."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vlbert.config import CaptionDataConfig
from vlbert.tasks.config import load_finetune_config
from vlbert.tasks.images import ImageIndex
from vlbert.tasks.refcoco.data import RefDataset, box_iou, load_refcoco, read_refs

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parents[1]
IMAGE_CFG = CaptionDataConfig(short_side=64, max_long_side=64, min_boxes=1, max_boxes=4, flip_prob=0.0)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def refer(tmp_path_factory) -> Path:
    """REFER-style files on demo scenes: one ref per shape ("red circle"), 'detected' boxes =
    the shapes' boxes shifted by 2 pixels, plus a decoy box overlapping nothing."""
    from vlbert.demo.make_data import make_scene

    root = tmp_path_factory.mktemp("refer")
    rng = np.random.default_rng(0)
    images, anns, refs = [], [], []
    with tarfile.open(root / "images.tar", "w") as tar:
        for image_id in range(1, 9):
            img, objects = make_scene(rng, 64)
            jpg = io.BytesIO()
            img.save(jpg, format="JPEG", quality=95)
            detected = [[b[0] + 2, b[1], b[2] + 2, b[3]] for b in (o["box"] for o in objects)] + [[0, 0, 6, 6]]
            _add(tar, f"COCO_train2014_{image_id:012d}.jpg", jpg.getvalue())
            _add(tar, f"COCO_train2014_{image_id:012d}.json",
                 json.dumps({"boxes": detected, "box_scores": [0.9] * len(detected)}).encode())
            images.append({"id": image_id, "width": 64, "height": 64})
            split = "train" if image_id <= 5 else ("val" if image_id <= 7 else "testA")
            for o in objects:
                x1, y1, x2, y2 = o["box"]
                ann_id = len(anns) + 1
                anns.append({"id": ann_id, "image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "category_id": 1})
                refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                             "sentences": [{"sent": f"{o['colour']} {o['shape']}", "sent_id": 10 * ann_id},
                                           {"sent": f"the {o['shape']} that is {o['colour']}",
                                            "sent_id": 10 * ann_id + 1}]})
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    (root / "refs.json").write_text(json.dumps(refs))
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_data / "tokenizer"))


def test_refs_pickle_is_read_without_building_classes(refer, tmp_path):
    assert read_refs(str(refer / "refs(unc).p")) == read_refs(str(refer / "refs.json"))

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.p").write_bytes(pickle.dumps([{"x": Evil()}]))
    with pytest.raises(pickle.UnpicklingError, match="only plain data"):
        read_refs(str(tmp_path / "evil.p"))


def test_splits_and_boxes(refer):
    sets = load_refcoco(str(refer / "refs.json"), str(refer / "instances.json"), ["train", "val", "testA"])
    refs = json.loads((refer / "refs.json").read_text())
    assert len(sets["train"]) == 2 * sum(r["split"] == "train" for r in refs)
    e = sets["val"][0]
    ann = next(a for a in json.loads((refer / "instances.json").read_text())["annotations"] if a["id"] == e.ref_id)
    x, y, w, h = ann["bbox"]
    assert e.gt_box.tolist() == [x, y, x + w, y + h]


def test_box_iou():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    assert box_iou(boxes, np.array([0, 0, 10, 10])) == pytest.approx([1.0, 50 / 150, 0.0])


@pytest.mark.parametrize("boxes", ["detected", "gt"])
def test_labels_from_iou_and_flips(refer, tokenizer, boxes):
    sets = load_refcoco(str(refer / "refs.json"), str(refer / "instances.json"), ["train"])
    flipping = CaptionDataConfig(**{**IMAGE_CFG.__dict__, "flip_prob": 1.0})
    plain = RefDataset(sets["train"], ImageIndex([str(refer / "images.tar")]), IMAGE_CFG, tokenizer, 16,
                       boxes == "gt", 0.5).sample(0, 0)
    flipped = RefDataset(sets["train"], ImageIndex([str(refer / "images.tar")]), flipping, tokenizer, 16,
                         boxes == "gt", 0.5).sample(0, 0)
    ious = box_iou(plain.boxes, plain.gt_box)
    assert plain.labels.tolist() == [0.0] + [float(v > 0.5) for v in ious[1:]]
    assert plain.labels.sum() == 1  # exactly the referred shape's box (shifted by 2 px or exact)
    assert flipped.labels.tolist() == plain.labels.tolist()
    assert flipped.gt_box.tolist() == [64 - plain.gt_box[2], plain.gt_box[1], 64 - plain.gt_box[0], plain.gt_box[3]]
    words = tokenizer.convert_ids_to_tokens(plain.input_ids.tolist())
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"


def test_short_refcoco_finetune_runs_and_evaluates(demo_data, refer, tmp_path):
    from vlbert.tasks.finetune import finetune

    rc = {"tokenizer": str(demo_data / "tokenizer"), "refs": str(refer / "refs(unc).p"),
          "instances": str(refer / "instances.json"), "images": [str(refer / "images.tar")],
          "val_splits": ["val", "testA"], "image": IMAGE_CFG.__dict__, "batch_size": 4, "eval_batch_size": 8,
          "num_workers": 0, "max_expression_tokens": 8}
    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", [
        "vqa=null", f"refcoco={json.dumps(rc)}", f"runtime.output_dir={tmp_path / 'out'}",
        f"runtime.deepspeed_config={REPO / 'ds_configs/cpu_zero2_fp32.json'}", "optim.total_steps=3",
        "tracking.enabled=false"])
    result = finetune(cfg)
    assert result.step == 3 and set(result.eval_metrics) == {"val/refcoco_acc", "testA/refcoco_acc",
                                                             "val/missing_images", "testA/missing_images"}
    assert result.eval_metrics["val/missing_images"] == result.eval_metrics["testA/missing_images"] == 0
    assert all(0.0 <= v <= 100.0 for k, v in result.eval_metrics.items() if k.endswith("acc"))
    rows = json.loads((tmp_path / "out" / "val_predictions.json").read_text())
    sets = load_refcoco(str(refer / "refs.json"), str(refer / "instances.json"), ["val"])
    assert sorted(r["sent_id"] for r in rows) == sorted(e.sent_id for e in sets["val"])
    # The reported accuracy is recomputed from the written boxes.
    gt = {e.sent_id: e.gt_box for e in sets["val"]}
    hits = [box_iou(np.array([r["box"]]), gt[r["sent_id"]])[0] >= 0.5 for r in rows]
    assert result.eval_metrics["val/refcoco_acc"] == pytest.approx(100 * sum(hits) / len(hits))


def test_head_starts_from_the_pretrained_transform(demo_data, tmp_path):
    from vlbert.model.pretraining import VLBertForPretraining
    from vlbert.tasks.refcoco.model import VLBertForRefCOCO

    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", check_files=False)
    state = VLBertForPretraining(cfg.model, cfg.detector).state_dict()
    model = VLBertForRefCOCO(cfg.model, cfg.detector)
    model.load_pretrained(state)
    assert torch.equal(model.transform.dense.weight, state["mlm_head.predictions.transform.dense.weight"])
    assert model.scorer.out_features == 1
