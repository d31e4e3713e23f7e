"""Write a VCR-format set on demo scenes, for the tests and the VCR fine-tuning demo.

    vlbert-make-demo-vcr --out demo_vcr [--train 1000 --val 300 --test 50 --seed 2 --size 64]

Layout under ``--out`` (the VCR release's files, rowanz/r2c dataloaders/vcr.py)::

    train.jsonl val.jsonl test.jsonl     one question per line: annot_id, objects, img_fn, metadata_fn,
                                         question, answer_choices (4), rationale_choices (4),
                                         answer_label, rationale_label (not in test)
    metadata/demo/<split>_<n>.json       boxes [[x1, y1, x2, y2, score]], segms [[polygon]], width, height
    images/<split>-00000.tar             caption-style shards; member demo/<split>_<n>.jpg = img_fn

Scenes are drawn as ``vlbert.demo.make_data`` draws them (2 or 3 shapes, other seed); each
shape is an object whose category is its shape word (``CATEGORIES``) and whose polygon is
its outline. A question asks for the colour of one object by index, ``["what", "colour",
"is", [i], "?"]``; the answers are ``["it", "is", <colour>, "."]`` for the right colour and
three others. The rationales, given the right answer, say where that object is relative to
another: ``[[i], "is", <colour>, "and", <relation>, [j], "."]`` for the four relations
(left of, right of, above, below), one of them true. The colour is only in the image (the
object's word is its shape), and so is the relation: text alone scores 25% on each.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from vlbert.cli.common import command_parser, console_script
from vlbert.demo.make_data import COLOURS, _add, _relation, make_scene

CATEGORIES = ["__background__", "circle", "square", "triangle"]
RELATIONS = ["left of", "right of", "above", "below"]


def outline(shape: str, box: list[int], vertices: int = 16) -> list[list[float]]:
    """The shape's polygon inside its pixel box (x2, y2 exclusive), as make_data draws it."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if shape == "square":
        return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
    if shape == "triangle":
        return [[(x1 + x2) / 2, y1], [x1, y2], [x2, y2]]
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return [[cx + rx * math.cos(2 * math.pi * k / vertices), cy + ry * math.sin(2 * math.pi * k / vertices)]
            for k in range(vertices)]


def scene_question(objects: list[dict], rng: np.random.Generator) -> dict:
    """One question about a scene of >= 2 objects, in the release's fields (without file names)."""
    i, j = (int(x) for x in rng.choice(len(objects), 2, replace=False))
    colour = objects[i]["colour"]
    others = [str(c) for c in rng.choice([c for c in COLOURS if c != colour], 3, replace=False)]
    colours = [colour, *others]
    order = rng.permutation(4)
    answers = [["it", "is", colours[k], "."] for k in order]
    answer_label = int(np.flatnonzero(order == 0)[0])
    true_rel = _relation(objects[i]["box"], objects[j]["box"])
    rels = [RELATIONS[k] for k in rng.permutation(4)]
    rationales = [[[i], "is", colour, "and", *rel.split(), [j], "."] for rel in rels]
    return {"objects": [o["shape"] for o in objects], "question": ["what", "colour", "is", [i], "?"],
            "answer_choices": answers, "rationale_choices": rationales, "answer_label": answer_label,
            "rationale_label": rels.index(true_rel)}


def write_split(out: Path, split: str, n: int, rng: np.random.Generator, size: int, labels: bool = True) -> dict:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "metadata" / "demo").mkdir(parents=True, exist_ok=True)
    lines = []
    with tarfile.open(out / "images" / f"{split}-00000.tar", "w") as tar:
        while len(lines) < n:
            img, objects = make_scene(rng, size, max_objects=3)
            if len(objects) < 2:
                continue
            k = len(lines)
            name = f"demo/{split}_{k:05d}"
            record = {"annot_id": f"{split}-{k}", "img_fn": f"{name}.jpg", "metadata_fn": f"{name}.json",
                      **scene_question(objects, rng)}
            if not labels:
                del record["answer_label"], record["rationale_label"]
            lines.append(record)
            meta = {"boxes": [[*o["box"], 1.0] for o in objects],
                    "segms": [[outline(o["shape"], o["box"])] for o in objects], "width": size, "height": size,
                    "names": [o["shape"] for o in objects]}
            (out / "metadata" / f"{name}.json").write_text(json.dumps(meta))
            jpg = io.BytesIO()
            img.save(jpg, format="JPEG", quality=95)
            _add(tar, f"{name}.jpg", jpg.getvalue())
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return {"split": split, "questions": len(lines)}


def make_demo_vcr(out: Path, train: int = 1000, val: int = 300, test: int = 50, seed: int = 2,
                  size: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    info = {"train": write_split(out, "train", train, rng, size), "val": write_split(out, "val", val, rng, size),
            "test": write_split(out, "test", test, rng, size, labels=False), "categories": CATEGORIES}
    (out / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: Optional[list[str]] = None) -> dict:
    p = command_parser("vlbert-make-demo-vcr", __doc__)
    p.add_argument("--out", type=Path, default=Path("demo_vcr"))
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--test", type=int, default=50)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)
    info = make_demo_vcr(args.out, args.train, args.val, args.test, args.seed, args.size)
    print(json.dumps(info))
    return info


cli = console_script(main)

if __name__ == "__main__":
    sys.exit(cli())
