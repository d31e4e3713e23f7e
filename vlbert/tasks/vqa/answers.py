"""VQA answers: the answer vocabulary, soft-score targets, left/right flips, submission files.

Vocabulary and targets use the official normalisation (``normalize_answer``)
always; the evaluation (``vlbert.tasks.vqa.metric.vqa_score``) keeps the official quirk of
normalising only when the humans disagree.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Iterable, Mapping, Optional, Sequence

import fsspec

from vlbert.tasks.vqa.metric import normalize_answer, soft_score

MIN_ANSWER_COUNT = 9  # the 3129-answer vocabulary of VQA v2 train+val


class AnswerVocab:
    """An ordered list of normalised answers; index <-> answer."""

    def __init__(self, answers: Sequence[str]):
        if not answers:
            raise ValueError("the answer vocabulary is empty")
        if len(set(answers)) != len(answers):
            dup = next(a for a, n in Counter(answers).items() if n > 1)
            raise ValueError(f"the answer vocabulary lists {dup!r} twice")
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return answer in self.index

    def save(self, url: str) -> None:
        """One answer per line (the format of the reference's ``answers_vqa.txt``)."""
        with fsspec.open(url, "w") as f:
            f.write("".join(a + "\n" for a in self.answers))

    @classmethod
    def load(cls, url: str) -> "AnswerVocab":
        """A text file with one answer per line, or a JSON list of answers."""
        with fsspec.open(url, "r") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            answers = json.loads(text)
            if not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{url}: expected a JSON list of strings")
        else:
            answers = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
        return cls(answers)


def _answer_of_question(ann: Mapping) -> str:
    """The answer a question counts for: its ``multiple_choice_answer`` (the most
    common human answer, as the VQA v2 files give it), else the most common human answer."""
    mc = ann.get("multiple_choice_answer")
    if isinstance(mc, str):
        return normalize_answer(mc)
    counts = Counter(normalize_answer(a["answer"]) for a in ann["answers"])
    return max(sorted(counts), key=counts.__getitem__)


def build_answer_vocab(annotations: Iterable[Mapping], min_count: int = MIN_ANSWER_COUNT) -> AnswerVocab:
    """Answers that are the (normalised) answer of at least ``min_count`` questions,
    most frequent first (ties alphabetical). With VQA v2 train+val and 9: 3129 answers."""
    counts = Counter(_answer_of_question(ann) for ann in annotations)
    kept = sorted((a for a, n in counts.items() if n >= min_count and a), key=lambda a: (-counts[a], a))
    if not kept:
        raise ValueError(f"no answer occurs in at least {min_count} questions; lower the minimum count")
    return AnswerVocab(kept)


def answer_targets(human_answers: Sequence[str], vocab: AnswerVocab) -> dict[int, float]:
    """Soft score of every vocabulary answer a human gave: ``{answer index: score}``.

    The score of an answer given by c of the n humans is the official accuracy
    of predicting it: the mean over the n leave-one-out subsets of
    min(1, matches / 3), i.e. 0.3, 0.6, 0.9, 1.0 for c = 1, 2, 3, 4+ of 10.
    Answers outside the vocabulary get no target.
    """
    counts = Counter(normalize_answer(a) for a in human_answers)
    n = len(human_answers)
    return {vocab.index[a]: soft_score(c, n) for a, c in counts.items() if a in vocab.index}


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """"left" <-> "right" as whole words, keeping case ("Left" -> "Right")."""

    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.capitalize() if word[0].isupper() else new

    return _LEFT_RIGHT.sub(swap, text)


# --------------------------------------------------------------------------- submission


def write_submission(url: str, predictions: Mapping[int, str]) -> None:
    """The official result file: ``[{"question_id": int, "answer": str}, ...]`` by question id."""
    rows = [{"question_id": int(q), "answer": str(a)} for q, a in sorted(predictions.items())]
    with fsspec.open(url, "w") as f:
        json.dump(rows, f)


def read_submission(url: str, question_ids: Optional[Iterable[int]] = None) -> dict[int, str]:
    """Read and check a result file; with ``question_ids``, it must answer exactly those."""
    with fsspec.open(url, "r") as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{url}: expected a JSON list of {{question_id, answer}}")
    out: dict[int, str] = {}
    for i, row in enumerate(rows):
        if (not isinstance(row, dict) or set(row) != {"question_id", "answer"}
                or not isinstance(row["question_id"], int) or not isinstance(row["answer"], str)):
            raise ValueError(f"{url}: entry {i} is not {{'question_id': int, 'answer': str}}: {row!r}")
        if row["question_id"] in out:
            raise ValueError(f"{url}: question {row['question_id']} answered twice")
        out[row["question_id"]] = row["answer"]
    if question_ids is not None:
        want = set(int(q) for q in question_ids)
        if want != set(out):
            missing, extra = sorted(want - set(out)), sorted(set(out) - want)
            raise ValueError(f"{url}: {len(missing)} questions unanswered (first {missing[:3]}), "
                             f"{len(extra)} not in the question set (first {extra[:3]})")
    return out
