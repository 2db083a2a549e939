"""Official VQAv2 accuracy (and ANLS), reproduced quirk for quirk so training-time eval equals the leaderboard.

Reference: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (the Python 3 version that
LAVIS and most VLM repos vendor). Behaviour reproduced on purpose, quirks included:

1. Prediction cleaning, always applied: '\\n' and '\\t' become spaces, then strip(), then punctuation
   processing, then digit/article processing (below).
2. Ground-truth answers are NOT cleaned that way. Only when the answers are not all identical
   (``len(set(answers)) > 1``) each one goes through punctuation processing -- and only that: no
   strip, no lower-casing, no number words, no article removal. So with ten identical answers "two"
   the prediction "two" (cleaned to "2") scores 0, and with ten identical "Yes" nothing can match.
   Real VQAv2 annotations are already lower-case with digits, which is why this rarely shows.
3. Punctuation processing: if the text contains a digit-comma-digit ("1,000") every mark in
   ``PUNCTUATION`` is deleted; otherwise a mark that touches a space somewhere in the *original*
   text (``p + " "`` or ``" " + p``) is deleted and any other mark becomes a space
   ("a,b" -> "a b", "a, b" -> "a b", "1,000" -> "1000"). The apostrophe, colon and period are not in
   the list. Then every period NOT followed by a digit is deleted ("3.5" kept, "3." -> "3",
   "a.b" -> "ab"). The official pattern ``(?!<=\\d)(\\.)(?!\\d)`` meant a look-behind but is a
   look-ahead that always passes at a period, so it is exactly ``\\.(?!\\d)``; and because
   ``re.UNICODE`` (= 32) is passed where ``sub`` expects ``count``, at most 32 periods are deleted.
4. Digit/article processing: lower-case, split on whitespace, number words "none", "zero" .. "ten"
   become digits ("none" -> "0"), the articles a/an/the are dropped, then whole words found in the
   contractions table are replaced ("dont" -> "don't"). Table keys with capitals ("Im", "Ive") can
   never match after lower-casing; "somebody'd" maps to "somebodyd". Words are re-joined with one space.
5. Matching is exact string equality. Accuracy = mean over the leave-one-annotator-out subsets of
   min(1, #matches among the other answers / 3). An answer that repeats counts once per occurrence.
   The official code drops an annotator by dict inequality; VQAv2 answer dicts carry a unique
   ``answer_id``, so that is dropping by position, which is what we do.
6. Reports round percentages to 2 decimals (Python ``round``) from the unrounded means.

Answer lists not of length 10 use the same leave-one-out over however many answers there are
(n subsets of n - 1). Consequences, by design of the formula: with fewer than 4 answers a perfect
match cannot reach 1.0 (max = (n - 1) / 3) and a single answer always scores 0. For a short list of
*accepted* answers (not annotator votes) use :func:`vqa_match` instead. An empty list is an error.

Departure from the official tool: it refuses a results file that misses questions; ``score_results``
scores a missing prediction as 0 and lists its id under ``missing``.
"""

from __future__ import annotations

import re
from collections import defaultdict

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")  # official order; "'", ":" and "." are not in it
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The official contractions table, as "key=value" pairs (keys are whole words after lower-casing).
_CONTRACTION_PAIRS = """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
    itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
    mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
    neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
    'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
    someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
    someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
    somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
    therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
    theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
    werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
    wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_LIMIT = 32  # int(re.UNICODE), passed as `count` by the official code


def process_punctuation(text: str) -> str:
    """Official processPunctuation: delete or space out marks, then drop periods not before a digit."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = (mark + " " in text) or (" " + mark in text)  # tested on the original text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Official processDigitArticle: lower-case, number words to digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize_prediction(text: str) -> str:
    """The full cleaning the official tool applies to a model's answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQAv2 accuracy of one prediction against its annotators' answers, in [0, 1]."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer, got an empty list")
    references = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    predicted = normalize_prediction(prediction)
    total_matches = sum(ref == predicted for ref in references)
    # leave annotator i out: the others hold total_matches minus annotator i's own match
    subset_scores = [min(1, float(total_matches - (ref == predicted)) / 3) for ref in references]
    return float(sum(subset_scores)) / len(subset_scores)


def vqa_match(prediction: str, accepted: list[str]) -> float:
    """1.0 when the cleaned prediction equals any cleaned accepted answer: for short accepted-answer lists."""
    if not accepted:
        raise ValueError("vqa_match needs at least one accepted answer, got an empty list")
    predicted = normalize_prediction(prediction)
    return float(any(normalize_prediction(answer) == predicted for answer in accepted))


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS (ST-VQA / DocVQA): max over answers of 1 - normalised edit distance, 0 when that distance >= threshold.

    Both sides are lower-cased, stripped and have inner whitespace collapsed (as the DocVQA script does);
    two empty strings count as identical.
    """
    if not answers:
        raise ValueError("anls needs at least one ground-truth answer, got an empty list")
    predicted = " ".join(prediction.lower().split())
    best = 0.0
    for answer in answers:
        reference = " ".join(answer.lower().split())
        longest = max(len(predicted), len(reference))
        distance = _levenshtein(predicted, reference) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def _percent(accuracies: list[float]) -> float:
    return round(100 * float(sum(accuracies)) / len(accuracies), 2)


def _index_annotations(annotations: dict, questions: dict) -> dict:
    """question_id -> annotation, in file order (the official summation order), with schema checks."""
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise ValueError("annotations must be the VQAv2 annotations JSON: a dict with an 'annotations' list")
    by_id: dict = {}
    for position, ann in enumerate(annotations["annotations"]):
        for key in ("question_id", "answers", "answer_type", "question_type"):
            if key not in ann:
                raise ValueError(f"annotation #{position} (question_id {ann.get('question_id')!r}) has no '{key}'")
        if ann["question_id"] in by_id:
            raise ValueError(f"question_id {ann['question_id']!r} appears twice in the annotations")
        if not ann["answers"]:
            raise ValueError(f"annotation for question_id {ann['question_id']!r} has an empty 'answers' list")
        by_id[ann["question_id"]] = ann
    known = {q["question_id"] for q in (questions or {}).get("questions", [])}
    unasked = [qid for qid in by_id if known and qid not in known]
    if unasked:
        raise ValueError(f"{len(unasked)} annotated question ids are not in the questions file "
                         f"(first: {unasked[:5]}); pass the questions JSON of the same split")
    return by_id


def _index_results(results: list[dict], annotated: dict) -> dict:
    """question_id -> predicted answer; unknown ids and conflicting duplicates are errors."""
    predicted: dict = {}
    for position, result in enumerate(results):
        if "question_id" not in result or not isinstance(result.get("answer"), str):
            raise ValueError(f"result #{position} must be {{'question_id': int, 'answer': str}}, got {result!r}")
        qid, answer = result["question_id"], result["answer"]
        if qid not in annotated:
            raise ValueError(f"result #{position}: question_id {qid!r} is not in the annotations "
                             "(results and annotations must come from the same split)")
        if predicted.get(qid, answer) != answer:
            raise ValueError(f"question_id {qid!r} has two different answers: {predicted[qid]!r} and {answer!r}")
        predicted[qid] = answer
    return predicted


def score_results(results: list[dict], questions: dict, annotations: dict) -> dict:
    """Score an official results file against VQAv2 questions/annotations; percentages like the official tool.

    Returns overall / per_answer_type / per_question_type (percent, 2 decimals), per_question
    (str id -> percent), num_questions, and missing (ids with no prediction, scored 0).
    """
    annotated = _index_annotations(annotations, questions)
    predicted = _index_results(results, annotated)
    accuracies: list[float] = []
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    per_question: dict[str, float] = {}
    missing = []
    for qid, ann in annotated.items():
        if qid in predicted:
            accuracy = vqa_accuracy(predicted[qid], [a["answer"] for a in ann["answers"]])
        else:
            missing.append(qid)
            accuracy = 0.0
        accuracies.append(accuracy)
        by_answer_type[ann["answer_type"]].append(accuracy)
        by_question_type[ann["question_type"]].append(accuracy)
        per_question[str(qid)] = round(100 * accuracy, 2)
    if not accuracies:
        raise ValueError("the annotations hold no questions to score")
    return {
        "overall": _percent(accuracies),
        "per_answer_type": {name: _percent(values) for name, values in by_answer_type.items()},
        "per_question_type": {name: _percent(values) for name, values in by_question_type.items()},
        "per_question": per_question,
        "num_questions": len(accuracies),
        "missing": missing,
    }
