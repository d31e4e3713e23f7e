"""Write a VQA set on demo scenes, in the official VQA v2 formats, for the fine-tuning demo.

    vlbert-make-demo-vqa --out demo_vqa [--train-questions 1000 --val-questions 500 --seed 1 --size 64]

Layout under ``--out``::

    images/train-00000.tar          caption-style shards: KEY.jpg, KEY.json ({"image_id", "boxes",
    images/val-00000.tar            "box_scores", ...}), KEY.txt (a caption, for the caption tools)
    train_questions.json            {"questions": [{"image_id", "question", "question_id"}]}
    train_annotations.json          {"annotations": [{"question_id", "image_id", "answers": [10 x
    val_questions.json               {"answer", "answer_confidence", "answer_id"}], "answer_type",
    val_annotations.json             "question_type", "multiple_choice_answer"}]}

Scenes are drawn as ``vlbert.demo.make_data`` draws them (new images, other
seed). Questions ask for colours, shapes, counts, existence and left/right/
above/below relations; existence, count and relation questions are about
something in the scene half the time (``scene_questions``); each has 10 human answers, most of them right, some
wrong, and spelled variously ("2"/"two", "Yes"/"yes", "none" for 0) so that the
official normalisation and the soft scores matter.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from vlbert.cli.common import command_parser, console_script

from vlbert.demo.make_data import COLOURS, NUMBERS, SHAPES, _add, _relation, make_scene

P_RIGHT = 0.8  # chance that a simulated human gives the right answer
COLOUR_NAMES = list(COLOURS)
DIGIT_WORDS = {str(i + 1): w for i, w in enumerate(NUMBERS)} | {"0": "none"}


def _variant(answer: str, answer_type: str, rng: np.random.Generator) -> str:
    """How one human writes ``answer``: numbers as digits or words, occasional capitals and periods."""
    if answer_type == "number" and rng.random() < 0.4:
        return DIGIT_WORDS.get(answer, answer)
    if rng.random() < 0.1:
        answer = answer.capitalize()
    if rng.random() < 0.05:
        answer += "."
    return answer


def _wrong(answer: str, answer_type: str, rng: np.random.Generator) -> str:
    pool = {"yes/no": ["yes", "no"], "number": ["0", "1", "2", "3"]}.get(answer_type)
    if pool is None:
        pool = COLOUR_NAMES if answer in COLOURS else list(SHAPES)
    return str(rng.choice([a for a in pool if a != answer]))


P_PRESENT = 0.5  # share of existence and count questions about something in the scene
RELATIONS = ("left of", "right of", "above", "below")


def _count_question(colours: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """(colour, answer) of a "how many <colour> shapes" question: with probability ``P_PRESENT`` a
    colour in the scene, the count drawn uniformly among the scene's distinct non-zero counts (so
    that 2 and 3 come up as often as the scenes allow); otherwise a colour absent from it (0)."""
    absent = [c for c in COLOUR_NAMES if c not in colours]
    if rng.random() < P_PRESENT or not absent:
        count = int(rng.choice(sorted({colours.count(c) for c in colours})))
        colour = str(rng.choice(sorted(c for c in set(colours) if colours.count(c) == count)))
    else:
        colour, count = str(rng.choice(absent)), 0
    return colour, str(count)


def _existence_question(objects: list[dict], rng: np.random.Generator) -> tuple[str, str, str]:
    """(colour, shape, answer) of an "is there a <colour> <shape>" question: with probability
    ``P_PRESENT`` an object of the scene (yes); otherwise a near miss (no): a shape of the scene in
    a colour it does not have there, or a colour of the scene on a shape that does not have it,
    so that "no" needs the colour tied to its shape as much as "yes" does."""
    if rng.random() < P_PRESENT:
        o = objects[int(rng.integers(len(objects)))]
        return o["colour"], o["shape"], "yes"
    present = {(o["colour"], o["shape"]) for o in objects}
    near = sorted({(c, o["shape"]) for o in objects for c in COLOUR_NAMES}
                  | {(o["colour"], s) for o in objects for s in SHAPES})
    misses = [pair for pair in near if pair not in present]  # never empty: each shape has one colour
    colour, shape = misses[int(rng.integers(len(misses)))]
    return colour, shape, "no"


def scene_questions(objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """Candidate (question, answer, answer_type, question_type) about one scene.

    Existence, count and relation questions are about something present (yes, a count above 0,
    the true relation) half the time, so that no answer is right from the question alone more
    often than the scenes make it.
    """
    out = []
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    for o in objects:
        if shapes.count(o["shape"]) == 1:
            out.append((f"what colour is the {o['shape']}", o["colour"], "other", "what colour is the"))
        if colours.count(o["colour"]) == 1:
            out.append((f"what shape is the {o['colour']} shape", o["shape"], "other", "what shape is the"))
    c, n = _count_question(colours, rng)
    out.append((f"how many {c} shapes are there", n, "number", "how many"))
    c, s, there = _existence_question(objects, rng)
    out.append((f"is there a {c} {s}", there, "yes/no", "is there a"))
    if len(objects) >= 2:
        a, b = (objects[i] for i in rng.choice(len(objects), 2, replace=False))
        rel = _relation(a["box"], b["box"])
        asked = rel if rng.random() < P_PRESENT else str(rng.choice([r for r in RELATIONS if r != rel]))
        out.append((f"is the {a['colour']} {a['shape']} {asked} the {b['colour']} {b['shape']}",
                    "yes" if asked == rel else "no", "yes/no", "is the"))
    return out


def _annotation(qid: int, image_id: int, answer: str, answer_type: str, question_type: str,
                rng: np.random.Generator) -> dict:
    humans = [_variant(answer if rng.random() < P_RIGHT else _wrong(answer, answer_type, rng), answer_type, rng)
              for _ in range(10)]
    counts = {a: humans.count(a) for a in humans}
    return {
        "question_id": qid, "image_id": image_id, "answer_type": answer_type, "question_type": question_type,
        "multiple_choice_answer": max(sorted(counts), key=counts.__getitem__),
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(humans)],
    }


def write_split(out: Path, split: str, n_questions: int, first_image_id: int, rng: np.random.Generator,
                size: int, per_image: int = 3) -> dict:
    questions, annotations = [], []
    (out / "images").mkdir(parents=True, exist_ok=True)
    image_id = first_image_id
    with tarfile.open(out / "images" / f"{split}-00000.tar", "w") as tar:
        while len(questions) < n_questions:
            img, objects = make_scene(rng, size)
            candidates = scene_questions(objects, rng)
            picked = rng.choice(len(candidates), min(per_image, len(candidates)), replace=False)
            for k, j in enumerate(sorted(picked)):
                if len(questions) == n_questions:
                    break
                question, answer, answer_type, question_type = candidates[j]
                qid = image_id * 10 + k
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append(_annotation(qid, image_id, answer, answer_type, question_type, rng))
            key = f"COCO_demo_{image_id:012d}"
            jpg = io.BytesIO()
            img.save(jpg, format="JPEG", quality=95)
            meta = {"image_id": image_id, "width": size, "height": size, "boxes": [o["box"] for o in objects],
                    "box_scores": [1.0] * len(objects), "labels": [f"{o['colour']} {o['shape']}" for o in objects]}
            _add(tar, f"{key}.jpg", jpg.getvalue())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            image_id += 1
    info = {"split": split, "images": image_id - first_image_id, "questions": len(questions)}
    (out / f"{split}_questions.json").write_text(json.dumps({"questions": questions, "data_subtype": split}))
    (out / f"{split}_annotations.json").write_text(json.dumps({"annotations": annotations, "data_subtype": split}))
    return info


def make_demo_vqa(out: Path, train_questions: int = 1000, val_questions: int = 500, seed: int = 1,
                  size: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    info = {"train": write_split(out, "train", train_questions, 1, rng, size),
            "val": write_split(out, "val", val_questions, 1_000_001, rng, size)}
    (out / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: Optional[list[str]] = None) -> dict:
    p = command_parser("vlbert-make-demo-vqa", __doc__)
    p.add_argument("--out", type=Path, default=Path("demo_vqa"))
    p.add_argument("--train-questions", type=int, default=1000)
    p.add_argument("--val-questions", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)
    info = make_demo_vqa(args.out, args.train_questions, args.val_questions, args.seed, args.size)
    print(json.dumps(info))
    return info


cli = console_script(main)

if __name__ == "__main__":
    sys.exit(cli())
