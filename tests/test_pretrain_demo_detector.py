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
