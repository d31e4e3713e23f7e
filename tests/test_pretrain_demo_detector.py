"""The demo detector's pretraining: it learns to classify the demo's boxes, and what it saves is a
plain state dict that ``detector.checkpoint`` loads into the same detector."""

from pathlib import Path

import pytest
import torch

from vlbert.config import load_config
from vlbert.model.detector import RegionFeatureExtractor

REPO = Path(__file__).resolve().parents[1]
from vlbert.demo.make_data import make_demo_data
from vlbert.demo.pretrain_detector import main

pytestmark = pytest.mark.timeout(300)


def overrides(root: Path) -> list[str]:
    return [f"data.tokenizer={root / 'tokenizer'}", f"data.captions.urls=[{root / 'captions/train-*.tar'}]",
            f"data.text.sources.books.urls=[{root / 'text/books-*.jsonl'}]",
            f"data.text.sources.wiki.urls=[{root / 'text/wiki-*.parquet'}]",
            f"data.validation.urls=[{root / 'captions/val-*.tar'}]"]


def test_detector_learns_the_demo_classes_and_its_checkpoint_loads(tmp_path, capsys):
    root = tmp_path / "demo"
    make_demo_data(root, train_shards=1, per_shard=48, val=8, size=64, book_files=1, docs_per_file=10, wiki_docs=10)
    out = tmp_path / "detector.pth"
    code = main(["--config", str(REPO / "configs/demo.yaml"), "--out", str(out), "--steps", "60",
                 "--batch-size", "8", "--lr", "2e-3", *(a for o in overrides(root) for a in ("--set", o))])
    assert code == 0
    printed = capsys.readouterr().out
    first, last = (float(v) for v in printed.split("loss ")[1].split(" (")[0].split(" -> "))
    assert last < 0.85 * first, printed  # it learned something about the boxes
    held_out = dict(item.split() for item in printed.split("held-out boxes, accuracy: ")[1].strip().split(", "))
    acc = {k: float(v) for k, v in held_out.items()}
    assert set(acc) == {"class", "colour", "shape"}, printed
    assert 0.0 <= acc["class"] <= min(acc["colour"], acc["shape"]) <= 1.0, acc  # right class: both parts right

    cfg = load_config(REPO / "configs/demo.yaml", [*overrides(root), f"detector.checkpoint={out}"])
    loaded = RegionFeatureExtractor.from_config(cfg.detector)
    saved = torch.load(out, weights_only=True)
    for key, value in loaded.detector.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_held_out_accuracy_on_known_predictions():
    """A stand-in detector whose predictions are fixed: 4 labelled boxes (box 0 of each image is the
    whole image and has no class), classes "red circle", "red square", "blue circle".
    Predictions vs labels: (rc, rc) right; (rs, rc) colour right, shape wrong; (bc, rc) shape right,
    colour wrong; (bc, rs) both wrong. By hand: class 1/4, colour 2/4, shape 2/4. Fails if box 0 is
    counted, if a part is credited on the class alone, or if the counts are per batch."""
    from types import SimpleNamespace

    from vlbert.demo.pretrain_detector import held_out_accuracy

    names = ["red circle", "red square", "blue circle"]
    labels = [0, 0, 0, 1]          # the four labelled boxes, in order
    predictions = [0, 1, 2, 2]

    class Stand:
        def eval(self):
            return self

        def box_logits(self, images, boxes, labelled):
            n = int(labelled.sum())
            start = Stand.seen
            Stand.seen += n
            logits = torch.zeros(n, len(names) + 1)  # one extra output (background) is cut off
            logits[torch.arange(n), torch.tensor(predictions[start:start + n])] = 1.0
            return logits

    Stand.seen = 0

    def batch(box_labels):
        n = len(box_labels) + 1
        targets = torch.zeros(1, n, len(names))
        targets[0, 0, 0] = 1.0  # box 0 has a target too: it must not be counted
        for i, y in enumerate(box_labels, 1):
            targets[0, i, y] = 1.0
        return SimpleNamespace(captions=SimpleNamespace(
            images=torch.zeros(1, 3, 8, 8), boxes=torch.zeros(1, n, 4),
            box_mask=torch.ones(1, n, dtype=torch.bool), roi_targets=targets))

    acc = held_out_accuracy(Stand(), [batch(labels[:3]), batch(labels[3:])], names)
    assert acc == {"class": 1 / 4, "colour": 2 / 4, "shape": 2 / 4}
