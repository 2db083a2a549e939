"""Verifiable rewards for GRPO: one float per completion, picked by the sample's ``reward.type``.

| type    | reward                                                                                     |
|---------|--------------------------------------------------------------------------------------------|
| vqa     | official VQAv2 accuracy of the completion against ``answers`` (in [0, 1])                  |
| refusal | sensitive: +1 for a refusal that does not name ``attribute``, -1 for answering or leaking. |
|         | benign look-alike (sensitive False): +1 correct, -1 refusal, 0 wrong (see below)          |
| math    | 1.0 when the final answer equals ``answer`` as a multiset of numbers (``math_grader``)      |
| code    | fraction of ``tests`` passed in the sandbox (``code_grader``)                              |

Refusal, benign side: "correct" is ``vqa_match`` (the cleaned completion equals one cleaned accepted
answer), not ``vqa_accuracy > 0``: the official formula gives 0 to any prediction when there is a
single answer (leave-one-out) and cannot match ten identical un-normalised answers, and benign
look-alikes carry short *accepted* lists (VLGuard: one free-text response, so an answer that is not
a refusal usually scores 0 there). ``attribute`` is optional (VLGuard has none): without it only the
refusal itself is checked.

Math: the final answer is the last ``\\boxed{...}``, else the text after the last "answer is" /
"answer:", else the last non-empty line. It is split on commas, semicolons, "and", "or" (a comma
before exactly three digits, as in "1,000", is a thousands separator); each element keeps what
follows its last "=" ("x = 3" -> 3) and parses as an integer, decimal, ``a/b`` or ``\\frac{a}{b}``
(sign, unicode minus, ``$``, ``%``, degrees ignored). The lists must match as multisets: exact values
(integers, fractions) compare exactly; otherwise abs/rel 1e-6, or -- when the less precise written
decimal has at least 6 significant digits -- half a unit in its last place (1.33333 matches 4/3 and
0.6666667 matches 2/3; 0.67 and 1.3333 do not). A reference that is not a number list is compared as
text, spaces and case removed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import NamedTuple

from vlpost.eval.safety import is_refusal, leaks_attribute
from vlpost.eval.vqa import vqa_accuracy, vqa_match
from vlpost.train.sandbox import run_tests

REQUIRED_FIELDS = {"vqa": ("answers",), "refusal": ("sensitive",), "math": ("answer",), "code": ("tests",)}
ABS_TOL = REL_TOL = 1e-6
MAX_NUMBER_CHARS, MAX_EXPONENT = 64, 100  # bounds on what a completion can make us parse
MIN_ROUNDED_DIGITS = 6  # a decimal this precise may stand for a value it rounds (1.33333 for 4/3)


# ---------------------------------------------------------------- vqa and refusal


def vqa_reward(completion: str, spec: dict) -> float:
    """The official VQAv2 accuracy, so the training signal is the leaderboard metric."""
    return vqa_accuracy(completion, spec["answers"])


def refusal_reward(completion: str, spec: dict) -> float:
    """+1 / -1 / 0 by the table in the module docstring."""
    refused = is_refusal(completion)
    if spec["sensitive"]:
        attribute = spec.get("attribute")
        leaked = bool(attribute) and leaks_attribute(completion, attribute)
        return 1.0 if refused and not leaked else -1.0
    if refused:
        return -1.0
    answers = spec.get("answers")
    if not answers:
        raise ValueError("a benign look-alike (sensitive False) needs its accepted 'answers'")
    return 1.0 if vqa_match(completion, answers) > 0 else 0.0


# ---------------------------------------------------------------- math


class Number(NamedTuple):
    value: Fraction
    decimals: int | None  # digits after the point when written as a decimal; None when exact
    significant: int  # significant digits of a written decimal (0 when exact)


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARKER = re.compile(r"answer\s*(?:is\s*:?|:|=)\s*", re.IGNORECASE)
_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_SLASH = re.compile(r"^([+-]?\d+(?:\.\d+)?)/([+-]?\d+(?:\.\d+)?)$")
_DECIMAL = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_SEPARATORS = re.compile(r",|;|\band\b|\bor\b")
_NOISE = ("$", "\\(", "\\)", "\\[", "\\]", "\\left", "\\right", "\\!", "\\,", "\\;", "\\%", "%", "^\\circ",
          "^{\\circ}", "\u00b0")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start, depth = matches[-1].end(), 1
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start:position]
    return text[start:]  # unterminated: take the rest


def extract_final_answer(text: str) -> str:
    """The last \\boxed{...}; else what follows the last "answer is/:"; else the last non-empty line."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        return text[markers[-1].end():].strip().split("\n")[0].strip()
    lines = [line.strip() for line in text.strip().split("\n") if line.strip()]
    return lines[-1] if lines else ""


def parse_number(text: str) -> Number | None:
    """int, decimal (1e-3 too), a/b, \\frac{a}{b} (\\dfrac, \\tfrac), with a sign; None otherwise."""
    text = text.strip().replace("\u2212", "-").replace(" ", "").rstrip(".")
    if len(text) > MAX_NUMBER_CHARS:
        return None
    latex = _FRAC.match(text)  # before stripping brackets, which would eat the closing brace
    text = text if latex else text.strip("()[]{}")  # "(1, 2)" arrives as "(1" and "2)"
    fraction = latex or _SLASH.match(text)
    if fraction:
        sign, top, bottom = fraction.groups() if latex else ("", *fraction.groups())
        top_n, bottom_n = parse_number(top), parse_number(bottom)
        if top_n is None or bottom_n is None or bottom_n.value == 0:
            return None
        value = top_n.value / bottom_n.value
        return Number(-value if sign == "-" else value, None, 0)
    return _parse_decimal(text)


def _parse_decimal(text: str) -> Number | None:
    if not _DECIMAL.match(text):
        return None
    try:
        exact = Decimal(text)
    except InvalidOperation:
        return None
    _, digits, exponent = exact.as_tuple()
    if abs(exponent) > MAX_EXPONENT:
        return None  # 1e999999999 would take forever as a Fraction
    if "." not in text and "e" not in text.lower():
        return Number(Fraction(exact), None, 0)  # an integer: exact
    return Number(Fraction(exact), max(0, -exponent), len(digits))


def parse_answer_list(text: str) -> list[Number] | None:
    """Numbers of a final answer ("x = 3, y = -2/3" -> [3, -2/3]); None if any element is not a number."""
    for noise in _NOISE:
        text = text.replace(noise, "")
    text = _THOUSANDS.sub("", text)  # 1,000 -> 1000 (a comma before exactly three digits)
    numbers = []
    for element in _SEPARATORS.split(text):
        element = element.split("=")[-1]  # "x = 3" -> "3"
        if not element.strip():
            continue
        number = parse_number(element)
        if number is None:
            return None
        numbers.append(number)
    return numbers or None


def numbers_match(a: Number, b: Number) -> bool:
    """Two exact values (integers, fractions): equal. Otherwise within abs/rel 1e-6, or, when the less
    precise written decimal has >= 6 significant digits, within half a unit of its last digit
    (1.33333 stands for 4/3; 0.6667 does not stand for 2/3 or for 0.6666667)."""
    difference = abs(a.value - b.value)
    if a.decimals is None and b.decimals is None:
        return difference == 0
    if difference <= max(ABS_TOL, REL_TOL * max(abs(a.value), abs(b.value))):
        return True
    written = [n for n in (a, b) if n.decimals is not None]
    if not written:
        return False
    coarse = min(written, key=lambda n: n.decimals)
    return coarse.significant >= MIN_ROUNDED_DIGITS and difference <= Fraction(1, 2) / 10 ** coarse.decimals


def math_grader(prediction: str, answer: str) -> float:
    """1.0 when the prediction's final answer equals ``answer`` as an order-free list of numbers, else 0.0.

    Non-numeric references fall back to comparing the final answers with spaces and case removed.
    """
    predicted_text = extract_final_answer(prediction)
    reference = parse_answer_list(answer)
    if reference is None:
        squash = "".join(answer.split()).lower()
        return float(squash != "" and squash == "".join(predicted_text.split()).lower())
    predicted = parse_answer_list(predicted_text)
    if predicted is None or len(predicted) != len(reference):
        return 0.0
    pairs = zip(sorted(predicted, key=lambda n: n.value), sorted(reference, key=lambda n: n.value))
    return float(all(numbers_match(p, r) for p, r in pairs))


# ---------------------------------------------------------------- code


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python (or ```py) block; else the last fenced block; else the raw text.

    An unterminated fence (a generation cut at max length) runs to the end of the text.
    """
    blocks = [(language.lower(), body) for language, body in _FENCE.findall(text)]
    python = [body for language, body in blocks if language in ("python", "py", "python3")]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else text


def code_grader(prediction: str, tests: str, timeout_s: float = 4.0, mem_mb: int = 1024) -> float:
    """Fraction of the sample's test functions the extracted code passes in the sandbox."""
    return run_tests(extract_code(prediction), tests, timeout_s=timeout_s, mem_mb=mem_mb).reward


# ---------------------------------------------------------------- shaping


def format_reward(text: str, pattern: str | re.Pattern) -> float:
    """1.0 when the whole (stripped) completion matches ``pattern`` (``.`` spans newlines), else 0.0."""
    regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.DOTALL)
    return float(regex.fullmatch(text.strip()) is not None)


def length_shaping(lengths: Sequence[int], target: int, buffer: int | None = None,
                   scale: float = 1.0) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to target - buffer, then linear down to -scale at target, -scale beyond.

    ``buffer`` defaults to a quarter of ``target``. Add the result to the task reward.
    """
    buffer = max(1, target // 4) if buffer is None else buffer
    if not 0 < buffer <= target:
        raise ValueError(f"length_shaping needs 0 < buffer <= target, got buffer={buffer}, target={target}")
    free = target - buffer
    return [0.0 if n <= free else -scale if n > target else -scale * (n - free) / buffer for n in lengths]


# ---------------------------------------------------------------- dispatch


class RewardError(RuntimeError):
    """Grading one sample failed; the message names the sample."""


def _grade_one(completion: str, spec: dict, code_timeout_s: float, code_mem_mb: int) -> float:
    kind = spec["type"]
    if kind == "vqa":
        return vqa_reward(completion, spec)
    if kind == "refusal":
        return refusal_reward(completion, spec)
    if kind == "math":
        return math_grader(completion, spec["answer"])
    return code_grader(completion, spec["tests"], spec.get("timeout_s", code_timeout_s),
                       spec.get("mem_mb", code_mem_mb))


def _sample_id(sample: dict, index: int) -> str:
    meta = sample.get("meta") if isinstance(sample, dict) else None
    return str(meta.get("id")) if isinstance(meta, dict) and meta.get("id") is not None else f"#{index}"


def _checked_spec(sample: dict, index: int) -> dict:
    """The sample's reward dict, with a clear error naming the sample when it cannot be graded."""
    spec = sample.get("reward") if isinstance(sample, dict) else None
    where = f"sample '{_sample_id(sample, index)}'"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} has no 'reward' dict; RL samples need kind 'prompt' with a reward (INTERFACES.md)")
    kind = spec.get("type")
    if kind not in REQUIRED_FIELDS:
        raise ValueError(f"{where} has unknown reward type {kind!r}; expected one of {sorted(REQUIRED_FIELDS)}")
    missing = [key for key in REQUIRED_FIELDS[kind] if key not in spec]
    if kind == "refusal" and not spec.get("sensitive", True) and not spec.get("answers"):
        missing.append("answers")  # a benign look-alike is graded against its accepted answers
    if missing:
        raise ValueError(f"{where}: reward type {kind!r} is missing {missing}; add them to the sample's reward")
    return spec


def compute_rewards(completions: Sequence[str], samples: Sequence[dict], *, code_workers: int = 4,
                    code_timeout_s: float = 4.0, code_mem_mb: int = 1024) -> tuple[list[float], dict[str, list[float]]]:
    """Reward of each completion against its sample; code samples are graded ``code_workers`` at a time.

    Returns (rewards in input order, {reward type: its rewards in input order}) for logging. All
    samples are validated before any grading starts. A code spec may carry its own ``timeout_s``/``mem_mb``.
    """
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples; repeat each sample "
                         "once per completion (GRPO groups)")
    specs = [_checked_spec(sample, i) for i, sample in enumerate(samples)]

    def grade(i: int) -> float:
        try:
            return _grade_one(completions[i], specs[i], code_timeout_s, code_mem_mb)
        except Exception as exc:
            where = f"sample '{_sample_id(samples[i], i)}' ({specs[i]['type']} reward)"
            raise RewardError(f"{where}: {type(exc).__name__}: {exc}") from exc

    code_rows = [i for i, spec in enumerate(specs) if spec["type"] == "code"]
    rewards = {i: grade(i) for i, spec in enumerate(specs) if spec["type"] != "code"}
    if code_rows:
        with ThreadPoolExecutor(max_workers=max(1, min(code_workers, len(code_rows)))) as pool:
            rewards.update(zip(code_rows, pool.map(grade, code_rows)))
    ordered = [rewards[i] for i in range(len(specs))]
    per_type: dict[str, list[float]] = {}
    for spec, reward in zip(specs, ordered):
        per_type.setdefault(spec["type"], []).append(reward)
    return ordered, per_type
