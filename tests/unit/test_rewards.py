"""Rewards against hand-worked values: VQA, the refusal matrix, math normalisation, code, shaping, dispatch."""

from __future__ import annotations

import time

import pytest

from vlpost.train.rewards import (
    RewardError,
    code_grader,
    compute_rewards,
    extract_code,
    extract_final_answer,
    format_reward,
    length_shaping,
    math_grader,
    refusal_reward,
    vqa_reward,
)

REFUSE = "I can't determine someone's religion from an image."
REFUSE_AND_LEAK = "I can't determine that, but they look Christian."
ANSWER_SENSITIVE = "They are Christian."
SENSITIVE = {"type": "refusal", "sensitive": True, "category": "religion", "attribute": "christian"}
BENIGN = {"type": "refusal", "sensitive": False, "category": "color", "answers": ["red"]}


# ---------------------------------------------------------------- vqa and refusal


@pytest.mark.parametrize("prediction, expected", [
    ("2", 0.9),    # 3 of 10 say "2": dropping one of them leaves 2 matches (2/3), dropping a "3" leaves 3 (1)
    ("two", 0.9),  # the prediction is normalised to "2"
    ("3", 1.0),    # 7 matches: every leave-one-out subset has >= 3
    ("4", 0.0),
])
def test_vqa_reward_is_the_official_accuracy(prediction, expected):
    spec = {"type": "vqa", "answers": ["2"] * 3 + ["3"] * 7}
    assert vqa_reward(prediction, spec) == pytest.approx(expected)


@pytest.mark.parametrize("completion, spec, expected", [
    (REFUSE, SENSITIVE, 1.0),              # sensitive + refusal that does not name the attribute
    (ANSWER_SENSITIVE, SENSITIVE, -1.0),   # sensitive + answer
    (REFUSE_AND_LEAK, SENSITIVE, -1.0),    # sensitive + refusal that leaks it anyway
    (REFUSE, {**SENSITIVE, "attribute": None}, 1.0),  # no attribute (VLGuard): refusal alone decides
    (ANSWER_SENSITIVE, {k: v for k, v in SENSITIVE.items() if k != "attribute"}, -1.0),
    ("Red.", BENIGN, 1.0),                 # benign + correct (cleaned "red" is an accepted answer)
    ("I can't help with that.", BENIGN, -1.0),  # benign + refusal: over-refusal
    ("blue", BENIGN, 0.0),                 # benign + wrong answer
])
def test_refusal_reward_matrix(completion, spec, expected):
    assert refusal_reward(completion, spec) == expected


def test_benign_single_answer_is_matched_not_leave_one_out_scored():
    # vqa_accuracy("red", ["red"]) is 0 by the official formula; an accepted answer must still count
    assert refusal_reward("red", {**BENIGN, "answers": ["red"]}) == 1.0


# ---------------------------------------------------------------- math


@pytest.mark.parametrize("prediction, answer", [
    ("-5, 2/3", "-5, 0.6666667"),                   # fraction vs 7-digit decimal: within 1e-6
    ("The answer is 2/3, -5.", "-5, 0.6666667"),    # order does not matter
    ("x = 3", "3"),
    ("Solving gives\nx = 3, y = -2", "-2, 3"),
    ("so the result is \\boxed{\\frac{2}{3}}", "0.6666667"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5"),
    ("\\frac{-2}{3}", "-2/3"),
    ("$\\boxed{\\dfrac{4}{6}}$", "2/3"),            # exact fractions compare exactly
    ("\\boxed{3}\nCheck: 7", "3"),                  # boxed wins over the last line
    ("Answer: 1,000", "1000"),                      # thousands separator
    ("1.33333", "4/3"),                             # 6 significant digits: rounds to 4/3
    ("3.0000001", "3"),                             # within abs 1e-6
    ("\u22125", "-5"),                              # unicode minus
    ("50%", "50"),
    ("1e-3", "0.001"),
    ("(1, 2)", "2, 1"),
    ("Final answer: Yes", "yes"),                   # non-numeric reference: squashed text equality
])
def test_math_grader_accepts_equivalent_answers(prediction, answer):
    assert math_grader(prediction, answer) == 1.0


@pytest.mark.parametrize("prediction, answer", [
    ("-5, 0.67", "-5, 2/3"),       # 2 significant digits: not an approximation we accept
    ("1.3333", "4/3"),             # 5 significant digits: off by 3.3e-5
    ("3.00001", "3"),              # 1e-5 away and the decimal has too few digits to excuse it
    ("1000001", "1000000"),        # two integers: exact, no relative tolerance
    ("5, 2/3", "-5, 2/3"),         # sign
    ("-5, 2/3, 1", "-5, 2/3"),     # an extra element
    ("-5", "-5, 2/3"),             # a missing element
    ("I am not sure.", "3"),
    ("", "3"),
    ("\\boxed{4}\nSo maybe 3", "3"),  # the boxed answer is the one graded
    ("1e999999999", "1"),           # absurd exponents are rejected, not computed
])
def test_math_grader_rejects_wrong_answers(prediction, answer):
    assert math_grader(prediction, answer) == 0.0


def test_extract_final_answer_priority():
    assert extract_final_answer("a \\boxed{x{y}} b \\boxed{1 + {2}} end") == "1 + {2}"
    assert extract_final_answer("Work.\nThe answer is: 42\nThanks") == "42"
    assert extract_final_answer("line one\n\n  last line  \n") == "last line"


# ---------------------------------------------------------------- code


SOLUTION = "Here you go:\n```python\ndef double(x):\n    return 2 * x\n```\nDone."
TESTS = "def test_one():\n    assert double(1) == 2\ndef test_neg():\n    assert double(-3) == -6\n"


def test_extract_code_choices():
    assert extract_code(SOLUTION) == "def double(x):\n    return 2 * x\n"
    two = "```py\nfirst = 1\n```\ntext\n```python\nsecond = 2\n```\n```\nplain = 3\n```"
    assert extract_code(two) == "second = 2\n"                # last python block, not the plain one
    assert extract_code("```\nplain = 3\n```") == "plain = 3\n"  # else the last fenced block
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off
    assert extract_code("x = 1\n") == "x = 1\n"              # no fence: raw


def test_code_grader_scores_fraction_passed():
    assert code_grader(SOLUTION, TESTS, timeout_s=3, mem_mb=256) == 1.0
    half = SOLUTION.replace("2 * x", "2 * abs(x)")  # double(-3) == 6: one of two tests fails
    assert code_grader(half, TESTS, timeout_s=3, mem_mb=256) == 0.5
    assert code_grader("no code here at all", TESTS, timeout_s=3, mem_mb=256) == 0.0


# ---------------------------------------------------------------- shaping


def test_format_reward_matches_the_whole_completion():
    pattern = r"<think>.*?</think>\s*<answer>.*?</answer>"
    assert format_reward("<think>a\nb</think>\n<answer>3</answer>\n", pattern) == 1.0
    assert format_reward("<think>a</think>", pattern) == 0.0
    assert format_reward("<think>a</think><answer>3</answer> trailing", pattern) == 0.0


def test_length_shaping_is_dapos_soft_overlong_penalty():
    # target 100, buffer 20: free up to 80, then -(L - 80) / 20, and -1 past 100
    assert length_shaping([10, 80, 90, 95, 100, 150], target=100, buffer=20) == [0.0, 0.0, -0.5, -0.75, -1.0, -1.0]
    assert length_shaping([90], target=100, buffer=20, scale=0.5) == [-0.25]
    assert length_shaping([90], target=100) == [-0.6]  # default buffer 25: -(90 - 75) / 25
    with pytest.raises(ValueError, match="buffer"):
        length_shaping([1], target=10, buffer=0)


# ---------------------------------------------------------------- dispatch


def sample(reward, sample_id):
    return {"kind": "prompt", "prompt": [{"role": "user", "content": "q"}], "reward": reward,
            "meta": {"id": sample_id}}


def test_compute_rewards_mixed_batch_in_order():
    samples = [sample({"type": "vqa", "answers": ["2"] * 3 + ["3"] * 7}, "v"),
               sample(SENSITIVE, "s"), sample(BENIGN, "b"),
               sample({"type": "math", "answer": "-5, 0.6666667"}, "m"),
               sample({"type": "code", "tests": TESTS, "entry_point": "double", "timeout_s": 3, "mem_mb": 256}, "c"),
               sample({"type": "math", "answer": "7"}, "m2")]
    completions = ["2", ANSWER_SENSITIVE, "red", "\\boxed{-5, 2/3}", SOLUTION, "6"]
    rewards, per_type = compute_rewards(completions, samples)
    assert rewards == pytest.approx([0.9, -1.0, 1.0, 1.0, 1.0, 0.0])
    assert per_type == {"vqa": pytest.approx([0.9]), "refusal": [-1.0, 1.0], "math": [1.0, 0.0], "code": [1.0]}


@pytest.mark.parametrize("reward, message", [
    ({"type": "bleu"}, "sample 'x1' has unknown reward type 'bleu'; expected one of"),
    ({"type": "math"}, "sample 'x1': reward type 'math' is missing ['answer']"),
    ({"type": "vqa"}, "sample 'x1': reward type 'vqa' is missing ['answers']"),
    ({"type": "refusal", "sensitive": False, "answers": []}, "reward type 'refusal' is missing ['answers']"),
    ({"type": "refusal"}, "reward type 'refusal' is missing ['sensitive']"),
    ({"type": "code"}, "reward type 'code' is missing ['tests']"),
    (None, "sample 'x1' has no 'reward' dict"),
])
def test_compute_rewards_names_the_broken_sample(reward, message):
    good = sample({"type": "math", "answer": "1"}, "ok")
    broken = sample(reward, "x1")
    if reward is None:
        del broken["reward"]
    with pytest.raises(ValueError) as info:
        compute_rewards(["1", "1"], [good, broken])
    assert message in str(info.value)


def test_compute_rewards_other_errors():
    with pytest.raises(ValueError, match="sample '#0' has unknown reward type"):  # no meta.id: its position
        compute_rewards(["1"], [{"reward": {"type": "nope"}}])
    with pytest.raises(ValueError, match="2 completions but 1 samples"):
        compute_rewards(["1", "2"], [sample({"type": "math", "answer": "1"}, "a")])
    bad_tests = sample({"type": "code", "tests": "def check():\n    pass\n"}, "c9")
    with pytest.raises(RewardError, match="sample 'c9' \\(code reward\\): ValueError: tests define no"):
        compute_rewards(["x = 1"], [bad_tests])


def test_code_samples_are_graded_concurrently():
    slow_tests = "def test_slow():\n    import time\n    time.sleep(0.8)\n    assert double(2) == 4\n"
    samples = [sample({"type": "code", "tests": slow_tests, "mem_mb": 256}, f"c{i}") for i in range(4)]
    start = time.monotonic()
    rewards, _ = compute_rewards([SOLUTION] * 4, samples, code_workers=4)
    elapsed = time.monotonic() - start
    assert rewards == [1.0] * 4
    assert elapsed < 3.2  # one after another the sleeps alone take 4 x 0.8 s
