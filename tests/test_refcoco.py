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
from vlbert.tasks.refcoco.data import RefDataset, load_refcoco, read_refs
from vlbert.tasks.refcoco.metric import box_iou

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


@pytest.mark.parametrize("boxes", ["detected", "gt"])
def test_labels_from_iou_and_flips(refer, tokenizer, boxes):
    sets = load_refcoco(str(refer / "refs.json"), str(refer / "instances.json"), ["train"])
    flipping = CaptionDataConfig(**{**IMAGE_CFG.__dict__, "flip_prob": 1.0})
    plain = RefDataset(sets["train"], ImageIndex([str(refer / "images.tar")]), IMAGE_CFG, tokenizer, 16,
                       boxes == "gt", 0.5).sample(0, 0)
    flipped = RefDataset(sets["train"], ImageIndex([str(refer / "images.tar")]), flipping, tokenizer, 16,
                         boxes == "gt", 0.5).sample(0, 0)
    ious = box_iou(plain.boxes, plain.gt_box)
    assert plain.labels.tolist() == [float(v > 0.5) for v in ious]  # box 0 labelled like the others
    assert plain.labels.sum() == 1  # exactly the referred shape's box (shifted by 2 px or exact)
    assert flipped.labels.tolist() == plain.labels.tolist()
    assert flipped.gt_box.tolist() == [64 - plain.gt_box[2], plain.gt_box[1], 64 - plain.gt_box[0], plain.gt_box[3]]
    words = tokenizer.convert_ids_to_tokens(plain.input_ids.tolist())
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"


def _iou(a, b) -> float:
    """IoU of two [x1, y1, x2, y2] boxes, written out corner by corner (not the code's ``box_iou``)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = w * h if w > 0 and h > 0 else 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _accuracy(rows, expressions) -> float:
    """Percent of ``expressions`` whose written box has IoU >= 0.5 with the ground truth; an
    expression without a written row counts as wrong."""
    boxes = {r["sent_id"]: r["box"] for r in rows}
    hits = sum(1 for e in expressions if e.sent_id in boxes and _iou(boxes[e.sent_id], e.gt_box.tolist()) >= 0.5)
    return 100.0 * hits / len(expressions)


def test_short_refcoco_finetune_runs_and_evaluates(demo_data, refer, tmp_path):
    """Each split's reported accuracy equals the one recomputed here from the boxes the run wrote
    (``<split>_predictions.json``) and the REFER ground truth, exactly, for val and testA alike.
    Fails if the hit counter in ``RefCOCOTask.score`` is stuck at 0 (tried: every hit multiplied
    by 0.0), or if a split's written boxes and its reported accuracy disagree."""
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
    sets = load_refcoco(str(refer / "refs.json"), str(refer / "instances.json"), ["val", "testA"])
    for split in ("val", "testA"):
        rows = json.loads((tmp_path / "out" / f"{split}_predictions.json").read_text())
        assert sorted(r["sent_id"] for r in rows) == sorted(e.sent_id for e in sets[split]), split
        assert all(len(r["box"]) == 4 for r in rows), split
        assert result.eval_metrics[f"{split}/refcoco_acc"] == _accuracy(rows, sets[split]), split


def test_score_counts_hits_misses_and_missing_expressions(demo_data, refer, tmp_path):
    """``RefCOCOTask.score`` on hand-made predictions for the val split: one box exactly the
    ground truth (IoU 1), one twice as wide from the same corner (IoU exactly 0.5: a hit at the
    >= 0.5 threshold), one shifted by half its width (IoU 1/3), the rest without a prediction
    (wrong, counted as missing). Expected: 2 hits over all expressions.
    Fails if the counter is stuck at 0, if ``>= 0.5`` becomes ``> 0.5``, if missing expressions
    leave the denominator, or if ``missing_images`` is not their count."""
    from vlbert.tasks.refcoco.task import RefEvalSet

    task = _task(demo_data, refer, tmp_path)
    task.cfg.eval.max_missing_fraction = 1.0  # the unpredicted expressions are the point here
    (val,) = task.eval_sets()
    exprs = val.expressions
    assert len(exprs) >= 4
    gts = [e.gt_box.astype(float).tolist() for e in exprs[:3]]
    x1, y1, x2, y2 = gts[1]
    x1b, y1b, x2b, y2b = gts[2]
    preds = {exprs[0].sent_id: gts[0], exprs[1].sent_id: [x1, y1, x1 + 2 * (x2 - x1), y2],
             exprs[2].sent_id: [x1b + (x2b - x1b) / 2, y1b, x2b + (x2b - x1b) / 2, y2b]}
    assert [_iou(preds[e.sent_id], g) for e, g in zip(exprs, gts)] == pytest.approx([1.0, 0.5, 1 / 3])
    got = task.score(RefEvalSet("val", val.dataset, exprs), preds)
    assert got == {"val/refcoco_acc": pytest.approx(100.0 * 2 / len(exprs)),
                   "val/missing_images": float(len(exprs) - 3)}


def test_an_evaluation_split_without_expressions_is_refused_at_the_start(demo_data, refer, tmp_path):
    """The refs file has train, val and testA only: asking to evaluate testB is an error when the
    task is built, naming the setting and the split, not a failure when testB is scored after
    training. Fails if the check were removed (the task would build; scoring would then find no
    expression)."""
    with pytest.raises(ValueError, match=r"^refcoco\.val_splits: .*refs\.json has no referring expression in "
                                         r"split\(s\) testB$"):
        _task(demo_data, refer, tmp_path, val_splits=["val", "testB"])
    assert [s.name for s in _task(demo_data, refer, tmp_path, val_splits=["val", "testA"]).eval_sets()] == \
        ["val", "testA"]


def test_head_starts_from_the_masked_roi_transform(demo_data, tmp_path):
    """The reference (jackroos/VL-BERT cfgs/refcoco/base_detected_regions_4x16G.yaml) maps
    ``vlbert.mvrc_head.transform`` onto its head: our masked-RoI head is ``roi_head``, not the
    MLM head. The scorer starts Xavier-uniform with zero bias (resnet_vlbert_for_refcoco.py).
    Fails if the transform is taken from ``mlm_head.predictions.transform`` (the old start), or
    if the scorer keeps normal(0.02)."""
    from vlbert.model.pretraining import VLBertForPretraining
    from vlbert.tasks.refcoco.model import VLBertForRefCOCO

    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", check_files=False)
    state = VLBertForPretraining(cfg.model, cfg.detector).state_dict()
    g = torch.Generator().manual_seed(0)
    for k in list(state):  # both transforms distinct and non-default, so a mix-up cannot pass
        if k.startswith(("roi_head.transform.", "mlm_head.predictions.transform.")):
            state[k] = torch.randn(state[k].shape, generator=g)
    model = VLBertForRefCOCO(cfg.model, cfg.detector)
    model.load_pretrained(state)
    got = model.transform.state_dict()
    assert set(got) == {k[len("roi_head.transform."):] for k in state if k.startswith("roi_head.transform.")}
    for k, v in got.items():
        assert torch.equal(v, state["roi_head.transform." + k]), k
        assert not torch.equal(v, state["mlm_head.predictions.transform." + k]), k
    # Xavier uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)); fan_out 1.
    hidden = cfg.model.hidden_size
    bound = (6.0 / (hidden + 1)) ** 0.5
    w = model.scorer.weight
    assert model.scorer.out_features == 1 and torch.all(model.scorer.bias == 0)
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound  # normal(0.02) stays far below a ~ 0.43


def test_plain_bert_start_keeps_the_xavier_transform(demo_data):
    """BERT has no masked-RoI head; the reference without VL-BERT weights keeps final_mlp's Xavier
    start, so the MLM transform of a BERT checkpoint must not be copied into the RefCOCO+ head.
    Fails if RefCOCO+'s ``load_bert`` copies ``cls.predictions.transform``."""
    from vlbert.tasks.refcoco.model import VLBertForRefCOCO

    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", check_files=False)
    model = VLBertForRefCOCO(cfg.model, cfg.detector)
    before = {k: v.clone() for k, v in model.transform.state_dict().items()}
    bert_state = {k.replace("backbone.vlbert.", "bert."): v for k, v in model.state_dict().items()
                  if k.startswith("backbone.vlbert.")}
    bert_state["cls.predictions.transform.dense.weight"] = torch.ones_like(before["dense.weight"])
    try:
        model.load_bert(bert_state)
    except (KeyError, RuntimeError, ValueError) as e:  # the encoder's own key check; not what is tested
        pytest.skip(f"the encoder's BERT loader wants another key layout: {e}")
    assert all(torch.equal(v, before[k]) for k, v in model.transform.state_dict().items())


# --------------------------------------------------------------------------- boxes


def _task(demo_data, refer, tmp_path, **refcoco):
    from transformers import AutoTokenizer

    from vlbert.tasks.refcoco.task import RefCOCOTask

    rc = {"tokenizer": str(demo_data / "tokenizer"), "refs": str(refer / "refs.json"),
          "instances": str(refer / "instances.json"), "images": [str(refer / "images.tar")],
          "val_splits": ["val"], "image": IMAGE_CFG.__dict__, "batch_size": 4, "num_workers": 0, **refcoco}
    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", [
        "vqa=null", f"refcoco={json.dumps(rc)}", f"runtime.output_dir={tmp_path / 'out'}"], check_files=False)
    return RefCOCOTask(cfg, AutoTokenizer.from_pretrained(str(demo_data / "tokenizer")))


def _coco_boxes(refer, image_id):
    anns = json.loads((refer / "instances.json").read_text())["annotations"]
    return [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns if a["image_id"] == image_id]


def _json_boxes(refer, image_id):
    with tarfile.open(refer / "images.tar") as tar:
        return json.loads(tar.extractfile(f"COCO_train2014_{image_id:012d}.json").read())["boxes"]


def test_gt_boxes_are_added_in_training_only(demo_data, refer, tmp_path):
    """``train_add_gt`` (the reference's TRAIN_BOXES "proposal+gt", VAL_BOXES "proposal"): training
    samples carry the whole image, the detected boxes, then every COCO box of the image; evaluation
    samples only the whole image and the detected boxes. The 64-px scenes are stored at 64 px, so
    boxes are in stored pixels. Fails if the ground-truth boxes are not appended, or are also
    appended to the evaluation sets."""
    task = _task(demo_data, refer, tmp_path, train_add_gt=True)
    train, (val,) = task.train_set(), task.eval_sets()
    for dataset, with_gt in ((train, True), (val.dataset, False)):
        e = dataset.expressions[0]
        sample = dataset.sample(0, 0)
        detected = _json_boxes(refer, e.image_id)[:IMAGE_CFG.max_boxes]  # all score 0.9: file order
        expected = [[0, 0, 64, 64]] + detected + (_coco_boxes(refer, e.image_id) if with_gt else [])
        assert sample.boxes.tolist() == expected
        # The referred object's own COCO box is a positive besides the shifted detection.
        assert sample.labels.sum() == (2 if with_gt else 1)
    plain = _task(demo_data, refer, tmp_path).train_set()
    assert len(plain.sample(0, 0).boxes) == 1 + len(_json_boxes(refer, plain.expressions[0].image_id)[:4])


def test_gt_box_setting_uses_coco_boxes_everywhere(demo_data, refer, tmp_path):
    """``boxes: gt`` (cfgs/refcoco/base_gt_boxes_4x16G.yaml): train and evaluation on the COCO boxes;
    ``train_add_gt`` does not duplicate them. Fails if the gt setting appends the boxes twice."""
    task = _task(demo_data, refer, tmp_path, boxes="gt", train_add_gt=True)
    for dataset in (task.train_set(), task.eval_sets()[0].dataset):
        e = dataset.expressions[0]
        assert dataset.sample(0, 0).boxes.tolist() == [[0, 0, 64, 64]] + _coco_boxes(refer, e.image_id)


def test_whole_image_box_is_labelled_and_can_win(refer, tokenizer):
    """The reference labels the image box like any box (IoU > 0.5) and its argmax runs over it.
    A referred object covering the whole 64x64 image: box 0 is its only positive.
    Fails if box 0's label is forced to 0."""
    from vlbert.tasks.refcoco.data import Expression, make_ref_sample

    with tarfile.open(refer / "images.tar") as tar:
        files = {"jpg": tar.extractfile("COCO_train2014_000000000001.jpg").read(),
                 "json": json.dumps({"boxes": [[0, 0, 10, 10]], "box_scores": [0.9]}).encode()}
    e = Expression(1, 1, 1, "the whole picture", np.array([0.0, 0.0, 64.0, 64.0]), np.zeros((0, 4)))
    sample = make_ref_sample(e, files, IMAGE_CFG, tokenizer, 8, False, 0.5, False)
    assert sample.labels.tolist() == [1.0, 0.0]  # IoU 1 and 100 / 4096


# --------------------------------------------------------------------------- detections file


def _mattnet_dets(rows):
    """Records as lichengunc/MAttNet tools/run_detect.py writes them (box = [x1, y1, x2-x1+1, y2-y1+1])."""
    return [{"det_id": i, "h5_id": i, "box": box, "image_id": image_id, "category_id": 1,
             "category_name": "person", "score": 0.9} for i, (image_id, box) in enumerate(rows)]


def test_detections_file_is_read_in_mattnet_format(tmp_path):
    """Boxes [x, y, w, h] become [x, y, x + w, y + h] (the reference: ``boxes[:, [2, 3]] +=
    boxes[:, [0, 1]]``), grouped by image in file order; bad entries are counted by reason.
    Fails if w/h are taken as x2/y2, or if a bad entry raises or passes silently."""
    from vlbert.tasks.refcoco.detections import read_detections

    rows = _mattnet_dets([(5, [10, 20, 30, 40]), (7, [0.5, 1.5, 2, 3]), (5, [1, 2, 3, 4])])
    rows += ["not a record", {"box": [1, 2, 3, 4]}, {"image_id": "5", "box": [1, 2, 3, 4]},
             {"image_id": 5, "box": [1, 2, 3]}, {"image_id": 5, "box": [1, 2, -3, 4]},
             {"image_id": 5, "box": [1, 2, "3", 4]}, {"image_id": 5, "box": [1, 2, float("nan"), 4]}]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(rows))
    boxes, skipped = read_detections(str(path))
    assert {k: v.tolist() for k, v in boxes.items()} == {5: [[10, 20, 40, 60], [1, 2, 4, 6]], 7: [[0.5, 1.5, 2.5, 4.5]]}
    assert skipped == {"not_a_record": 1, "bad_image_id": 2, "bad_box": 4}
    path.write_text(json.dumps({"dets": rows}))
    with pytest.raises(ValueError, match=r"dets\.json: expected a JSON list of detections"):
        read_detections(str(path))
    path.write_text("[{")
    with pytest.raises(ValueError, match=r"dets\.json: not valid JSON"):
        read_detections(str(path))


def test_detections_file_replaces_the_shard_boxes(demo_data, refer, tmp_path):
    """With ``refcoco.detections`` the detected boxes of every set are the file's (all kept, as the
    reference keeps every MAttNet box), the shard JSON's are unused; training still appends the COCO
    boxes; an image the file lacks has only the whole-image box (counted). Fails if the shard
    JSON's boxes are used, or if an image without detections breaks the set."""
    images = sorted({r["image_id"] for r in json.loads((refer / "refs.json").read_text())})
    dets = [(i, [1 + i, 2, 5 + j, 6]) for i in images[1:] for j in range(6)]  # 6 > max_boxes 4
    (tmp_path / "dets.json").write_text(json.dumps(_mattnet_dets(dets) + [{"image_id": 1}]))
    task = _task(demo_data, refer, tmp_path, detections=str(tmp_path / "dets.json"), train_add_gt=True)
    val = task.eval_sets()[0].dataset
    e = val.expressions[0]
    expected = [[1 + e.image_id, 2, 1 + e.image_id + 5 + j, 8] for j in range(6)]
    assert val.sample(0, 0).boxes.tolist() == [[0, 0, 64, 64]] + expected
    train = task.train_set()
    assert train.without_detections == 1  # image 1 is not in the file
    first = next(k for k, x in enumerate(train.expressions) if x.image_id == images[0])
    assert train.sample(first, 0).boxes.tolist() == [[0, 0, 64, 64]] + _coco_boxes(refer, images[0])


# --------------------------------------------------------------------------- recipe


def test_refcoco_base_yaml_is_the_reference_recipe():
    """configs/refcoco_base.yaml against jackroos/VL-BERT cfgs/refcoco/base_detected_regions_4x16G.yaml:
    4 GPUs x BATCH_IMAGES 4 x GRAD_ACCUMULATE_STEPS 2 = 32; lr = LR 8e-7 x 32 (refcoco/function/train.py);
    WARMUP_STEPS 3750; END_EPOCH 20; WD 1e-4; CLIP_GRAD_NORM 1.0; CLASSIFIER_DROPOUT 0; AdamW
    betas (0.9, 0.999), eps 1e-6; TRAIN_BOXES proposal+gt, VAL/TEST_BOXES proposal. Fails if a
    value drifts from the reference or the file stops loading against the schema."""
    cfg = load_finetune_config(REPO / "configs/refcoco_base.yaml", check_files=False)
    rc, o = cfg.refcoco, cfg.optim
    assert cfg.vqa is None and rc is not None
    assert rc.batch_size == 4 * 4 * 2 and o.grad_accum == 1
    assert o.lr == pytest.approx(8e-7 * 4 * 4 * 2)
    assert (o.warmup_steps, o.total_steps, o.decay_steps, cfg.epochs) == (3750, 0, 0, 20)
    assert (o.weight_decay, o.grad_clip, o.betas, o.eps) == (1e-4, 1.0, [0.9, 0.999], 1e-6)
    assert cfg.model.head_dropout == 0.0 and cfg.model.hidden_dropout == 0.1
    assert (rc.boxes, rc.train_add_gt, rc.positive_iou) == ("detected", True, 0.5)
    assert rc.detections.endswith("res101_coco_minus_refer_notime_dets.json")
    assert rc.val_splits == ["val", "testA", "testB"] and rc.image.flip_prob == 0.5
    assert (rc.image.short_side, rc.image.max_long_side) == (600, 1000)
    gt = load_finetune_config(REPO / "configs/refcoco_base.yaml", ["refcoco.boxes=gt"], check_files=False)
    assert gt.refcoco.boxes == "gt"
