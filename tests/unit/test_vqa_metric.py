"""Official VQAv2 accuracy, ANLS and the `vlpost eval vqa` command, against values worked out by hand."""

import argparse
import json

import pytest

from vlpost.eval import commands
from vlpost.eval.vqa import (
    anls,
    normalize_prediction,
    process_digit_article,
    process_punctuation,
    score_results,
    vqa_accuracy,
    vqa_match,
)

# ---------------------------------------------------------------- answer processing


@pytest.mark.parametrize("text, expected", [
    ("1,000", "1000"),        # digit-comma-digit: the comma is deleted
    ("yes, 1,5", "yes 15"),   # ... and then every mark is deleted, even the one after "yes"
    ("a,b", "a b"),           # a mark not touching a space becomes a space
    ("a, b", "a b"),          # a mark touching a space is deleted
    ("(x) y", " x y"),        # "(" touches no space -> space; ")" is followed by one -> deleted
    ("hi!", "hi "),
    ("don't", "don't"),       # the apostrophe is not in the official list
    ("12:30", "12:30"),       # neither is the colon
    ("3.5", "3.5"),           # a period before a digit is kept
    ("3.", "3"),              # any other period is deleted
    ("end.", "end"),
    ("a.b", "ab"),
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_at_most_32_periods_are_deleted():
    # the official code passes re.UNICODE (== 32) where re.sub expects `count`
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize("text, expected", [
    ("Two Dogs", "2 dogs"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),       # only zero..ten are mapped
    ("the cat", "cat"),
    ("A an THE", ""),
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("Im", "im"),               # the table's key "Im" is capitalised, so it never matches
    ("somebody'd", "somebodyd"),  # an official entry that removes the apostrophe
    ("red   and  blue", "red and blue"),
])
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("  Two\n", "2"),
    ("yes\t", "yes"),
    ("The answer.\n", "answer"),
    ("a\tred\nball", "red ball"),
])
def test_normalize_prediction(text, expected):
    assert normalize_prediction(text) == expected


# ---------------------------------------------------------------- leave-one-out accuracy


def test_two_of_ten_annotators_give_0_6():
    # Leave out one of the 2 "yes" annotators (2 subsets): 1 match left -> 1/3.
    # Leave out one of the 8 others (8 subsets): 2 matches -> 2/3.
    # Mean: (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10 = 0.6
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)


def test_three_of_ten_annotators_give_0_9():
    # 3 subsets without a "yes": 2 matches -> 2/3; 7 subsets: 3 matches -> 1. (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)


@pytest.mark.parametrize("agree", [4, 5, 10])
def test_four_or_more_annotators_give_1(agree):
    # even without one "yes" annotator, 3 or more remain -> min(1, >=3/3) = 1 in every subset
    assert vqa_accuracy("yes", ["yes"] * agree + ["no"] * (10 - agree)) == 1.0


def test_one_and_zero_annotators():
    # one "yes": 9 subsets keep it -> 1/3 each, 1 subset loses it -> 0. 9 * (1/3) / 10 = 0.3
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("maybe", ["yes"] * 5 + ["no"] * 5) == 0.0


def test_repeated_answers_count_once_per_occurrence():
    # "2" twice and "two" once: the GT is not number-processed, so only the two "2" count -> 0.6
    answers = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("2", answers) == pytest.approx(0.6)


def test_prediction_normalisation_applies():
    assert vqa_accuracy(" Yes \n", ["yes"] * 10) == 1.0          # strip, newline, case
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0                # number word
    assert vqa_accuracy("a dog.", ["dog"] * 10) == 1.0           # article and final period
    assert vqa_accuracy("3.5", ["3.5"] * 10) == 1.0              # decimal point kept
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0           # digit comma
    # "dont" -> "don't"; 3 annotators say it -> 0.9 as above
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_ground_truth_processed_only_when_answers_differ():
    # all ten identical: the GT "1,000" stays as written, the prediction becomes "1000" -> no match
    assert vqa_accuracy("1,000", ["1,000"] * 10) == 0.0
    # answers differ: every GT answer gets punctuation processing, "1,000" -> "1000": 3 matches -> 0.9
    assert vqa_accuracy("1,000", ["1,000"] * 3 + ["5"] * 7) == pytest.approx(0.9)
    # GT gets punctuation processing only: no number words, no lower-casing
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 5 + ["Three"] * 5) == 0.0
    assert vqa_accuracy("x,y", ["x,y"] * 4 + ["c"] * 6) == 1.0   # "x,y" -> "x y" on both sides
    # but the prediction also loses articles: "a,b" -> "a b" -> "b", while the GT stays "a b"
    assert vqa_accuracy("a,b", ["a,b"] * 4 + ["c"] * 6) == 0.0


def test_answer_lists_of_other_lengths_use_the_same_leave_one_out():
    # ["yes", "yes", "no"], prediction "yes": without a "yes" (2 subsets) 1 match -> 1/3,
    # without "no" 2 matches -> 2/3. (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    assert vqa_accuracy("yes", ["yes"] * 4) == 1.0
    assert vqa_accuracy("yes", ["yes"]) == 0.0     # a single answer leaves nobody to agree with
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("yes", [])


def test_vqa_match_for_short_accepted_lists():
    assert vqa_match("Red.", ["red", "crimson"]) == 1.0
    assert vqa_match("the crimson", ["red", "crimson"]) == 1.0
    assert vqa_match("blue", ["red", "crimson"]) == 0.0


# ---------------------------------------------------------------- ANLS


def test_anls():
    assert anls("Hello", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)          # 1 edit / 5 chars
    assert anls("abc", ["xyz"]) == 0.0
    assert anls("ab", ["ax"]) == 0.0                              # 1/2 = threshold -> 0
    assert anls("ab", ["ax"], threshold=0.6) == pytest.approx(0.5)
    assert anls("cat", ["dog", "cart"]) == pytest.approx(0.75)    # best answer: 1 insertion / 4
    assert anls("  New   York ", ["new york"]) == 1.0
    assert anls("", [""]) == 1.0


# ---------------------------------------------------------------- results files


def _vqa_files():
    def ann(qid, answer_type, question_type, answers):
        return {"question_id": qid, "image_id": 1, "answer_type": answer_type, "question_type": question_type,
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)]}
    annotations = {"annotations": [
        ann(1, "yes/no", "is the", ["yes"] * 2 + ["no"] * 8),
        ann(2, "number", "how many", ["2"] * 10),
        ann(3, "other", "what color is the", ["red"] * 3 + ["dark red"] * 7),
        ann(4, "yes/no", "is the", ["no"] * 10),
    ]}
    questions = {"questions": [{"question_id": q, "image_id": 1, "question": f"q{q}?"} for q in (1, 2, 3, 4)]}
    results = [{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "two"},
               {"question_id": 3, "answer": "red"}]
    return results, questions, annotations


def test_score_results_by_hand():
    results, questions, annotations = _vqa_files()
    scores = score_results(results, questions, annotations)
    # q1 0.6 (2 of 10), q2 1.0 ("two" -> "2"), q3 0.9 (3 of 10), q4 missing -> 0
    assert scores["overall"] == 62.5                          # (0.6 + 1 + 0.9 + 0) / 4
    assert scores["per_answer_type"] == {"yes/no": 30.0, "number": 100.0, "other": 90.0}
    assert scores["per_question_type"] == {"is the": 30.0, "how many": 100.0, "what color is the": 90.0}
    assert scores["per_question"] == {"1": 60.0, "2": 100.0, "3": 90.0, "4": 0.0}
    assert scores["num_questions"] == 4
    assert scores["missing"] == [4]


def test_score_results_rounds_to_two_decimals():
    results, questions, annotations = _vqa_files()
    results = [{"question_id": 2, "answer": "2"}, {"question_id": 1, "answer": "maybe"},
               {"question_id": 3, "answer": "blue"}, {"question_id": 4, "answer": "maybe"}]
    assert score_results(results, questions, annotations)["overall"] == 25.0
    del annotations["annotations"][3]
    assert score_results(results[:3], questions, annotations)["overall"] == 33.33   # 1/3


def test_score_results_errors():
    results, questions, annotations = _vqa_files()
    with pytest.raises(ValueError, match="question_id 99 is not in the annotations"):
        score_results(results + [{"question_id": 99, "answer": "x"}], questions, annotations)
    with pytest.raises(ValueError, match="two different answers"):
        score_results(results + [{"question_id": 1, "answer": "no"}], questions, annotations)
    # an identical duplicate (padding from a distributed sampler) is accepted
    assert score_results(results + [results[0]], questions, annotations)["overall"] == 62.5
    with pytest.raises(ValueError, match="not in the questions file"):
        score_results(results, {"questions": questions["questions"][:2]}, annotations)


def _eval_parser():
    parser = argparse.ArgumentParser(prog="vlpost")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_eval_vqa_writes_json(tmp_path, capsys):
    for name, data in zip(("r", "q", "a"), _vqa_files()):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    out = tmp_path / "scores.json"
    args = _eval_parser().parse_args(["eval", "vqa", "--results", str(tmp_path / "r.json"), "--questions",
                                      str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                                      "--out", str(out), "--report-dir", str(tmp_path / "report")])
    assert args.func(args) == 0
    written = json.loads(out.read_text())
    assert written["overall"] == 62.5 and written["per_answer_type"]["yes/no"] == 30.0
    assert "overall: 62.50" in capsys.readouterr().out
    assert (tmp_path / "report" / "report.html").exists()
