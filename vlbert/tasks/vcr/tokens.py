"""VCR text: words and object references -> WordPiece ids, each tagged with its region.

A VCR sentence (question, answer or rationale) is a list whose items are words
(strings) or lists of object indices into the example's ``objects``; e.g.
``["Why", "is", [0, 2], "smiling", "?"]``. As the VL-BERT reference does
(jackroos/VL-BERT, vcr/data/datasets/vcr.py, ``retokenize_and_convert_to_ids_with_tag``):

- an index into a ``person`` object becomes a gender-neutral name from a fixed
  list (``GENDER_NEUTRAL_NAMES``), any other object its category word;
- several indices in one item are joined with "and" ("Casey and Riley");
- every WordPiece of a name or category word is tagged with that object's region,
  index + 1 (region 0 is the whole image); plain words and "and" are tagged 0.

Names: the reference hands them out from one counter that runs across examples (so
a person's name depends on loading order); rowanz/r2c (dataloaders/vcr.py) names a
person by its object index. Here the k-th person of an example is named
``NAMES[(offset + k) % 13]`` with an offset the caller fixes per example (its index in
the file): deterministic, and still varied across examples as the reference's are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# jackroos/VL-BERT, vcr/data/datasets/vcr.py (13 names; r2c's list repeats "Peyton").
GENDER_NEUTRAL_NAMES = ("Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody",
                        "Kendall", "Frankie", "Pat", "Quinn")

# The 81 detection classes of the VCR release (COCO's 80 written as one word, plus background),
# in the reference's order (vcr/data/datasets/vcr.py ``categories``): the auxiliary
# classification's targets; the whole-image region is class 0.
COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "trafficlight", "firehydrant", "stopsign", "parkingmeter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sportsball", "kite", "baseballbat", "baseballglove", "skateboard", "surfboard",
    "tennisracket", "bottle", "wineglass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hotdog", "pizza", "donut", "cake", "chair", "couch", "pottedplant", "bed",
    "diningtable", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cellphone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddybear", "hairdrier", "toothbrush",
)


def object_words(objects: list[str], offset: int = 0) -> list[str]:
    """The word each object is called: persons get names in turn from ``offset``, others their category."""
    out, k = [], 0
    for category in objects:
        if category == "person":
            out.append(GENDER_NEUTRAL_NAMES[(offset + k) % len(GENDER_NEUTRAL_NAMES)])
            k += 1
        else:
            out.append(category)
    return out


def referenced_objects(sentence: list) -> list[int]:
    """Every object index a sentence refers to, in order."""
    return [int(o) for item in sentence if isinstance(item, list) for o in item]


def expand_references(sentence: list, names: list[str]) -> tuple[list[str], list[int]]:
    """(words, region tag per word): object references replaced by their names."""
    words, tags = [], []
    for item in sentence:
        if isinstance(item, list):
            for j, o in enumerate(item):
                if j:
                    words.append("and")
                    tags.append(0)
                words.append(names[o])
                tags.append(int(o) + 1)
        else:
            words.append(str(item))
            tags.append(0)
    return words, tags


@dataclass
class TaggedText:
    """ids int64 [n]; tags int64 [n], the region each WordPiece takes its visual feature from."""

    ids: np.ndarray
    tags: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def __add__(self, other: "TaggedText") -> "TaggedText":
        return TaggedText(np.concatenate([self.ids, other.ids]), np.concatenate([self.tags, other.tags]))

    def head(self, n: int) -> "TaggedText":
        return TaggedText(self.ids[:n], self.tags[:n])


def encode_sentence(sentence: list, names: list[str], tokenizer) -> TaggedText:
    """WordPiece ids and region tags of a VCR sentence (a fast Hugging Face tokenizer)."""
    words, word_tags = expand_references(sentence, names)
    if not words:
        return TaggedText(np.zeros(0, np.int64), np.zeros(0, np.int64))
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    word_ids = enc.word_ids()
    tags = [word_tags[w] if w is not None else 0 for w in word_ids]
    return TaggedText(np.asarray(enc["input_ids"], np.int64), np.asarray(tags, np.int64))
