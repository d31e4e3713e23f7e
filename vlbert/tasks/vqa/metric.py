"""The official VQA accuracy (GT-Vision-Lab/VQA, ``vqaEval.py``, v2.0), reimplemented.

For one question with 10 human answers and a predicted answer:

1. Every answer (the 10 human ones and the prediction) has newlines and tabs
   replaced by spaces and surrounding whitespace stripped.
2. Only when the 10 human answers are *not* all the same string are they and
   the prediction normalised (``normalize_answer``): punctuation, then number
   words, articles and contractions. When all 10 agree, the raw strings are
   compared (so a prediction "Two" against ten "two" scores 0).
3. Accuracy = mean over the 10 humans of min(1, matches among the other 9 / 3).

Overall accuracy is the mean over questions; per answer type and per question
type the mean over the questions of that type. The official tool reports
``round(100 * mean, 2)``; ``VQAAccuracy`` holds the unrounded percentages.

Details kept from the official code on purpose, because they change scores:
- a punctuation mark is deleted (not turned into a space) when the answer has
  that mark next to a space, or when it contains a digit-comma-digit group
  anywhere ("1,000" -> "1000"; "yes,no" -> "yes no");
- the period rule removes a "." not followed by a digit, at most 32 of them
  (the official call passes ``re.UNICODE``, which is 32, as the count);
- "none" maps to "0" with the number words;
- the leave-one-out drops one answer by position (the official code drops by
  dict equality, which is the same thing because each answer has its own
  ``answer_id``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Marks handled by the punctuation rule, in the official order (the order matters:
# the "next to a space" test looks at the original text, the edits accumulate).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
# The official contraction table: a word (after punctuation, lower case) -> its spelling.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit. (The official pattern starts with "(?!<=\d)", a
# negative *lookahead* for the text "<=" plus a digit, which never matches before a ".";
# it is left out here because it changes nothing.)
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32  # re.UNICODE passed as the count argument in the official code


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip (applied to every answer first)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official punctuation rule (see the module docstring)."""
    out = text
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digits_articles(text: str) -> str:
    """Lower case; number words to digits; drop a/an/the; contraction table; single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The full official normalisation of one answer (whitespace, punctuation, digits/articles).

    This is what the evaluation applies when the human answers disagree, and
    what the answer vocabulary and training targets are built from.
    """
    return process_digits_articles(process_punctuation(clean_whitespace(text)))


def vqa_score(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy of one prediction against the human answers (in [0, 1]), the official way."""
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    humans = [clean_whitespace(a) for a in human_answers]
    pred = clean_whitespace(prediction)
    if len(set(humans)) > 1:
        humans = [process_digits_articles(process_punctuation(a)) for a in humans]
        pred = process_digits_articles(process_punctuation(pred))
    matches = sum(a == pred for a in humans)
    # Leave-one-out: a human who gave ``pred`` leaves matches - 1 among the others.
    total = 0.0
    for a in humans:
        total += min(1.0, (matches - (a == pred)) / 3.0)
    return total / len(humans)


def soft_score(count: int, num_humans: int = 10) -> float:
    """Official accuracy of an answer given by ``count`` of ``num_humans`` humans
    (0, 0.3, 0.6, 0.9, 1 for 0..4+ of 10): the training target of that answer."""
    if not 0 <= count <= num_humans:
        raise ValueError(f"count {count} not in 0..{num_humans}")
    given = count * min(1.0, (count - 1) / 3.0) if count else 0.0
    others = (num_humans - count) * min(1.0, count / 3.0)
    return (given + others) / num_humans


# --------------------------------------------------------------------------- data set level


@dataclass
class VQAAccuracy:
    """Percentages (unrounded; the official tool prints them rounded to 2 decimals)."""

    overall: float
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question_type: dict[str, float] = field(default_factory=dict)
    per_question: dict[int, float] = field(default_factory=dict)  # question_id -> 0..100
    num_questions: int = 0

    def metrics(self, prefix: str = "vqa_acc") -> dict[str, float]:
        """Flat names for a tracker: ``vqa_acc``, ``vqa_acc/yes/no``, ..."""
        out = {prefix: self.overall}
        out.update({f"{prefix}/{k}": v for k, v in sorted(self.per_answer_type.items())})
        return out


def evaluate_vqa(predictions: Mapping[int, str], annotations: Iterable[Mapping]) -> VQAAccuracy:
    """Score ``predictions`` (question_id -> answer) against official annotation dicts
    (``question_id``, ``answers`` [{"answer", ...}], ``answer_type``, ``question_type``).

    Every annotated question must have a prediction (the official tool requires
    the result file to cover the question set); a missing one raises KeyError.
    """
    per_question: dict[int, float] = {}
    scores: list[float] = []
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for ann in annotations:
        qid = int(ann["question_id"])
        if qid not in predictions:
            raise KeyError(f"no prediction for question {qid}")
        acc = vqa_score(predictions[qid], [a["answer"] for a in ann["answers"]])
        per_question[qid] = 100.0 * acc
        scores.append(acc)
        by_answer_type[ann.get("answer_type", "")].append(acc)
        by_question_type[ann.get("question_type", "")].append(acc)
    if not per_question:
        raise ValueError("no annotated questions to evaluate")

    def pct(xs: list[float]) -> float:
        return 100.0 * sum(xs) / len(xs)

    return VQAAccuracy(
        overall=pct(scores),
        per_answer_type={k: pct(v) for k, v in by_answer_type.items()},
        per_question_type={k: pct(v) for k, v in by_question_type.items()},
        per_question=per_question,
        num_questions=len(per_question),
    )
