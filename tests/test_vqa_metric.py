"""The official VQA accuracy against hand-computed cases, one rule at a time."""

import hashlib
import json

import pytest

from vlbert.tasks.vqa.answers import (AnswerVocab, answer_targets, build_answer_vocab, read_submission,
                                      swap_left_right, write_submission)
from vlbert.tasks.vqa.metric import (ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION, VQAAccuracy,
                                     clean_whitespace, evaluate_vqa, normalize_answer, process_digits_articles,
                                     process_punctuation, soft_score, vqa_score)

DISAGREE = ["other"]  # appended to human answers so that they are not all the same


# ----------------------------------------------------------------- normalisation rules


def test_punctuation_becomes_space_unless_next_to_a_space():
    assert process_punctuation("yes/no") == "yes no"
    assert process_punctuation("hot-dog") == "hot dog"
    assert process_punctuation("red, white") == "red white"  # ", " present: the comma is deleted
    assert process_punctuation("(left)") == " left "
    assert process_punctuation("what?!") == "what  "


def test_a_mark_after_a_space_is_deleted():
    """Fails if only "mark then space" is looked for (the official rule also deletes a mark with a
    space before it): "hot -dog" would become "hot  dog"."""
    assert process_punctuation("hot -dog") == "hot dog"
    assert process_punctuation("hot- dog") == "hot dog"


def test_newlines_and_tabs_inside_an_answer_become_spaces():
    """Fails if either replacement is dropped (strip alone only removes them at the ends)."""
    assert clean_whitespace(" two\nred\tdogs\n") == "two red dogs"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def test_tables_are_the_official_ones():
    """The contraction table, number words, articles and punctuation marks against the official
    evaluation's (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00:
    ``contractions``, ``manualMap``, ``articles``, ``punct``): their sizes, and sha256 digests of
    ``json.dumps(table, sort_keys=True)`` computed from that file's literals (articles sorted;
    punctuation in the file's order, which the rule depends on). Fails if any entry, key or value
    changes, goes or is added (a word of the 120 contractions misspelt scores answers wrongly)."""
    assert len(CONTRACTIONS) == 120
    assert _digest(CONTRACTIONS) == "52771f672b95913f862aae058e42219f9e1e4d7af64475a5cdf394301acf67a9"
    assert len(NUMBER_WORDS) == 12
    assert _digest(NUMBER_WORDS) == "524585ba19275a54801633a9f163e061695c76ac5cd9f19c2c335f94ba8d68bb"
    assert _digest(sorted(ARTICLES)) == "ad494141e74bb19bbb8c07d34ebfcc9ad3cfa7db7dd45f2e856a63448fe41a8f"
    assert len(PUNCTUATION) == 21
    assert _digest(list(PUNCTUATION)) == "3b9f2ee76c69e88435f0c6025b28651351f579aa1c9eefc94c702552a2ee7a89"


def test_a_digit_comma_digit_anywhere_deletes_every_mark():
    assert process_punctuation("1,000") == "1000"
    assert process_punctuation("t-shirt 1,2") == "tshirt 12"  # '-' deleted, not spaced, because of 1,2


def test_period_rule():
    assert process_punctuation("yes.") == "yes"
    assert process_punctuation("3.5") == "3.5"  # followed by a digit: kept
    assert process_punctuation("e.g.") == "eg"
    assert process_punctuation("." * 40) == "." * 8  # at most 32 removed, as the official call does


def test_apostrophe_and_colon_are_not_punctuation_in_v2():
    assert process_punctuation("don't") == "don't"
    assert process_punctuation("10:30") == "10:30"


def test_number_words_articles_and_contractions():
    assert process_digits_articles("Two") == "2"
    assert process_digits_articles("none") == "0"
    assert process_digits_articles("ten dogs") == "10 dogs"
    assert process_digits_articles("eleven") == "eleven"
    assert process_digits_articles("a dog") == "dog"
    assert process_digits_articles("The  man  AN apple") == "man apple"
    assert process_digits_articles("dont") == "don't"
    assert process_digits_articles("whats that") == "what's that"
    # Keys with capitals never match after lower-casing: "Im" stays "im".
    assert process_digits_articles("Im") == "im"


def test_normalize_answer_chains_the_rules():
    assert normalize_answer("  The Two dogs.\n") == "2 dogs"
    assert normalize_answer("Yes!") == "yes"


# ----------------------------------------------------------------- accuracy


def test_leave_one_out_scores():
    others = ["blue"] * 10
    assert vqa_score("red", ["red"] + others[:9]) == pytest.approx(0.3)  # 9 x 1/3 / 10
    assert vqa_score("red", ["red"] * 2 + others[:8]) == pytest.approx(0.6)  # (2 x 1/3 + 8 x 2/3) / 10
    assert vqa_score("red", ["red"] * 3 + others[:7]) == pytest.approx(0.9)  # (3 x 2/3 + 7) / 10
    assert vqa_score("red", ["red"] * 4 + others[:6]) == pytest.approx(1.0)
    assert vqa_score("green", ["red"] * 4 + others[:6]) == 0.0
    for c in range(11):
        assert soft_score(c) == pytest.approx(vqa_score("red", ["red"] * c + ["blue"] * (10 - c)))


def test_answers_normalised_only_when_the_humans_disagree():
    # All ten the same raw string: compared as they are.
    assert vqa_score("two", ["two"] * 10) == 1.0
    assert vqa_score("2", ["two"] * 10) == 0.0
    assert vqa_score("Two", ["two"] * 10) == 0.0
    assert vqa_score("yes.", ["yes"] * 10) == 0.0
    # Any disagreement: everything normalised ("two" -> "2", "Two" -> "2", "yes." -> "yes").
    assert vqa_score("2", ["two"] * 9 + ["three"]) == pytest.approx(1.0)
    assert vqa_score("Two", ["two"] * 9 + ["three"]) == pytest.approx(1.0)
    assert vqa_score("yes.", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    # Whitespace is cleaned before the all-same test: these count as the same answer.
    assert vqa_score(" two\t", ["two"] * 9 + ["two\n"]) == 1.0
    assert vqa_score("2", ["two"] * 9 + ["two\n"]) == 0.0


def test_evaluate_overall_and_per_type():
    anns = [
        {"question_id": 1, "answer_type": "yes/no", "question_type": "is the",
         "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 2, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["2"] * 2 + ["3"] * 8)]},
        {"question_id": 3, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["four"] * 5 + ["4"] * 5)]},
    ]
    preds = {1: "yes", 2: "two", 3: "4"}  # 1.0, 0.6 ("two" -> "2"), 1.0 (both spellings -> "4")
    acc = evaluate_vqa(preds, anns)
    assert acc.overall == pytest.approx(100 * (1.0 + 0.6 + 1.0) / 3)
    assert acc.per_answer_type == pytest.approx({"yes/no": 100.0, "number": 80.0})
    assert acc.per_question_type == pytest.approx({"is the": 100.0, "how many": 80.0})
    assert acc.per_question == pytest.approx({1: 100.0, 2: 60.0, 3: 100.0})
    assert acc.metrics()["vqa_acc/number"] == pytest.approx(80.0)
    assert acc.num_questions == 3
    with pytest.raises(KeyError, match="^'no prediction for question 3'$"):
        evaluate_vqa({1: "yes", 2: "2"}, anns)


def test_annotations_without_types_are_grouped_under_the_empty_name():
    """An annotation lacking ``answer_type``/``question_type`` (a hand-made split) counts under
    ``""``. Fails if the default name changes or a missing type raises."""
    acc = evaluate_vqa({1: "yes"}, [{"question_id": 1, "answers": [{"answer": "yes"}] * 10}])
    assert acc.per_answer_type == {"": 100.0} and acc.per_question_type == {"": 100.0}


def test_an_accuracy_with_only_its_overall_has_empty_breakdowns():
    """Fails if a breakdown defaults to None (``metrics()`` would raise) or the count to nonzero."""
    acc = VQAAccuracy(overall=42.0)
    assert (acc.per_answer_type, acc.per_question_type, acc.per_question, acc.num_questions) == ({}, {}, {}, 0)
    assert acc.metrics() == {"vqa_acc": 42.0}


def test_errors_say_what_is_wrong():
    """Fails if a message loses its words (each is matched whole)."""
    with pytest.raises(ValueError, match="^a VQA question needs at least one human answer$"):
        vqa_score("yes", [])
    with pytest.raises(ValueError, match=r"^count 11 not in 0\.\.10$"):
        soft_score(11)
    with pytest.raises(ValueError, match="^no annotated questions to evaluate$"):
        evaluate_vqa({}, [])


# ----------------------------------------------------------------- vocabulary and targets


def _ann(mc, answers):
    return {"multiple_choice_answer": mc, "answers": [{"answer": a} for a in answers]}


def test_vocab_counts_normalised_question_answers():
    anns = [_ann("Two", [])] * 2 + [_ann("2", [])] + [_ann("yes", [])] * 2 + [_ann("red", [])]
    vocab = build_answer_vocab(anns, min_count=2)
    assert vocab.answers == ["2", "yes"]  # "2" counts 3 (Two, Two, 2), "yes" 2, "red" 1 dropped
    with pytest.raises(ValueError, match="no answer"):
        build_answer_vocab(anns, min_count=5)


def test_vocab_file_round_trip(tmp_path):
    vocab = AnswerVocab(["yes", "no", "2"])
    vocab.save(str(tmp_path / "answers.txt"))
    assert AnswerVocab.load(str(tmp_path / "answers.txt")).answers == ["yes", "no", "2"]
    (tmp_path / "answers.json").write_text(json.dumps(["a b", "c"]))
    assert AnswerVocab.load(str(tmp_path / "answers.json")).answers == ["a b", "c"]
    with pytest.raises(ValueError, match="twice"):
        AnswerVocab(["yes", "yes"])


def test_answer_targets_are_soft_scores_of_normalised_answers():
    vocab = AnswerVocab(["yes", "no", "2", "red"])
    answers = ["yes"] * 4 + ["no"] * 3 + ["Two", "two", "2"]
    assert answer_targets(answers, vocab) == pytest.approx({0: 1.0, 1: 0.9, 2: 0.9})
    assert answer_targets(["blue"] * 10, vocab) == {}


def test_swap_left_right():
    assert swap_left_right("is the cup left of the plate?") == "is the cup right of the plate?"
    assert swap_left_right("Right or left") == "Left or right"
    assert swap_left_right("bright leftover") == "bright leftover"


# ----------------------------------------------------------------- submission


def test_submission_format(tmp_path):
    path = str(tmp_path / "results.json")
    write_submission(path, {5: "yes", 2: "2"})
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows == [{"question_id": 2, "answer": "2"}, {"question_id": 5, "answer": "yes"}]
    assert all(type(r["question_id"]) is int and type(r["answer"]) is str for r in rows)
    assert read_submission(path, [2, 5]) == {2: "2", 5: "yes"}
    with pytest.raises(ValueError, match="1 questions unanswered"):
        read_submission(path, [2, 5, 7])
    (tmp_path / "bad.json").write_text(json.dumps([{"question_id": "2", "answer": "x"}]))
    with pytest.raises(ValueError, match="entry 0"):
        read_submission(str(tmp_path / "bad.json"))
