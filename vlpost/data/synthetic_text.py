"""Text of the synthetic world, derived only from a scene's ground truth: questions and answers,
captions, descriptions, refusals, annotator answers and text-only questions.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from vlpost.data.synthetic_scene import (
    COLORS,
    OBJECTS,
    QUADRANTS,
    SHAPES,
    SLOTS,
    Person,
    Scene,
    Shape,
)
from vlpost.data.synthetic_templates import (
    GENERIC_REFUSALS,
    LOOKALIKE_SHARE,
    NUMBER_WORDS,
    QUESTION_PREFIXES,
    QUESTION_SUFFIXES,
    QUESTION_TEMPLATES,
    REFUSAL_SUFFIXES,
    REFUSAL_TEMPLATES,
    REFUSAL_TOPICS,
    SENSITIVE_TEMPLATES,
    SYNONYMS,
)

SHAPE_QUESTION_TYPES = ("shape_color", "shape_of_color", "count_shapes", "shape_position", "shape_exists")
# People questions double as the benign look-alikes of sensitive questions.
PEOPLE_QUESTION_TYPES = ("shirt_color", "held_object", "count_people", "has_hat", "person_position")
ANSWER_SPACE: dict[str, tuple[str, ...]] = {
    "shape_color": tuple(COLORS), "shape_of_color": SHAPES, "count_shapes": ("1", "2", "3", "4"),
    "shape_position": QUADRANTS, "shape_exists": ("yes", "no"), "shirt_color": tuple(COLORS),
    "held_object": OBJECTS, "count_people": ("1", "2", "3"), "has_hat": ("yes", "no"), "person_position": SLOTS,
}
ANSWER_TYPE = {
    qtype: "number" if qtype.startswith("count") else "yes/no" if space == ("yes", "no") else "other"
    for qtype, space in ANSWER_SPACE.items()
}
# Yes/no types are asked half as often: a blind guess scores 50% on them, 17-33% elsewhere.
QUESTION_WEIGHTS = {qtype: 0.5 if ANSWER_TYPE[qtype] == "yes/no" else 1.0 for qtype in ANSWER_SPACE}
SLOT_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


@dataclass(frozen=True)
class QA:
    question_type: str
    question: str
    answer: str  # canonical short answer
    answer_type: str  # "number" | "yes/no" | "other"


def article(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def person_ref(scene: Scene, person: Person) -> str:
    """'the person' when alone, else 'the person on the left' / 'in the middle' / 'on the right'."""
    return "the person" if len(scene.people) == 1 else f"the person {SLOT_PHRASES[person.slot]}"


def who_ref(scene: Scene, person: Person) -> str | None:
    """A reference that does not give away the position: by unique shirt or unique held object."""
    if len(scene.people) == 1:
        return "the person"
    if sum(p.shirt == person.shirt for p in scene.people) == 1:
        return f"the person in the {person.shirt} shirt"
    if sum(p.held == person.held for p in scene.people) == 1:
        return f"the person holding the {person.held}"
    return None


def _unique(shapes: tuple[Shape, ...], attr: str) -> list[Shape]:
    counts = Counter(getattr(s, attr) for s in shapes)
    return [s for s in shapes if counts[getattr(s, attr)] == 1]


def _shape_slots(scene: Scene, qtype: str, rng: random.Random) -> tuple[dict, str] | None:
    shapes = scene.shapes
    if qtype == "count_shapes":
        return {}, str(len(shapes))
    if qtype == "shape_color":
        candidates = _unique(shapes, "shape")
        return ({"shape": (s := rng.choice(candidates)).shape}, s.color) if candidates else None
    if qtype == "shape_of_color":
        candidates = _unique(shapes, "color")
        return ({"color": (s := rng.choice(candidates)).color}, s.shape) if candidates else None
    if qtype == "shape_position":
        by_type = _unique(shapes, "shape")
        pairs = Counter((s.color, s.shape) for s in shapes)
        by_pair = [s for s in shapes if pairs[(s.color, s.shape)] == 1]
        if by_type and rng.random() < 0.5:
            target = rng.choice(by_type)
            return {"thing": target.shape}, target.quadrant
        if by_pair:
            target = rng.choice(by_pair)
            return {"thing": f"{target.color} {target.shape}"}, target.quadrant
        return None
    if qtype == "shape_exists":
        present = {(s.color, s.shape) for s in shapes}
        base = rng.choice(shapes)
        if rng.random() < 0.5:
            color, shape = base.color, base.shape
        else:  # a near miss: same shape in another colour, or same colour on another shape
            misses = [(c, base.shape) for c in COLORS] + [(base.color, s) for s in SHAPES]
            color, shape = rng.choice([m for m in misses if m not in present])
        thing = f"{color} {shape}"
        return {"thing": thing, "a_thing": article(thing)}, "yes" if (color, shape) in present else "no"
    raise ValueError(f"{qtype!r} is not a shapes question type; expected one of {SHAPE_QUESTION_TYPES}")


def _people_slots(scene: Scene, qtype: str, rng: random.Random) -> tuple[dict, str] | None:
    if qtype == "count_people":
        return {}, str(len(scene.people))
    person = rng.choice(scene.people)
    if qtype == "person_position":
        who = who_ref(scene, person)
        return ({"who": who}, person.slot) if who else None
    slots = {"person": person_ref(scene, person)}
    if qtype == "shirt_color":
        return slots, person.shirt
    if qtype == "held_object":
        return slots, person.held
    if qtype == "has_hat":
        return slots, "yes" if person.hat else "no"
    raise ValueError(f"{qtype!r} is not a people question type; expected one of {PEOPLE_QUESTION_TYPES}")


def question_types(scene: Scene) -> tuple[str, ...]:
    return SHAPE_QUESTION_TYPES if scene.kind == "shapes" else PEOPLE_QUESTION_TYPES


def ask(scene: Scene, qtype: str, rng: random.Random, split: str = "train") -> QA | None:
    """A question of type `qtype` about `scene` in a `split` wording, or None if the scene has no target."""
    slots_answer = _shape_slots(scene, qtype, rng) if scene.kind == "shapes" else _people_slots(scene, qtype, rng)
    if slots_answer is None:
        return None
    slots, answer = slots_answer
    template = rng.choice(QUESTION_TEMPLATES[qtype][split])
    return QA(qtype, frame(template.format(**slots), rng, split), answer, ANSWER_TYPE[qtype])


def frame(question: str, rng: random.Random, split: str) -> str:
    """Train questions sometimes get a prefix or suffix (QUESTION_PREFIXES/SUFFIXES); eval ones never do."""
    if split != "train":
        return question
    draw = rng.random()
    if draw < 0.25:
        return rng.choice(QUESTION_PREFIXES) + question
    if draw < 0.4:
        return question + rng.choice(QUESTION_SUFFIXES)
    return question


def ask_any(scene: Scene, rng: random.Random, split: str = "train", exclude: tuple[str, ...] = ()) -> QA:
    """A question of a type drawn by QUESTION_WEIGHTS that `scene` can answer, preferring types not in
    `exclude`; when the drawn type has no target in the scene, the other types are tried in turn."""
    preferred = [t for t in question_types(scene) if t not in exclude]
    rest = [t for t in question_types(scene) if t in exclude]
    rng.shuffle(preferred)
    rng.shuffle(rest)
    if preferred:
        first = rng.choices(preferred, weights=[QUESTION_WEIGHTS[t] for t in preferred])[0]
        preferred.remove(first)
        preferred.insert(0, first)
    for qtype in preferred + rest:  # count questions can always be asked, so this returns
        qa = ask(scene, qtype, rng, split)
        if qa is not None:
            return qa
    raise AssertionError(f"no question can be asked about scene {scene}")


def wrong_answer(qa: QA, rng: random.Random) -> str:
    return rng.choice([a for a in ANSWER_SPACE[qa.question_type] if a != qa.answer])


def human_answers(qa: QA, rng: random.Random, count: int = 10) -> list[str]:
    """`count` annotator answers: mostly the truth, sometimes a synonym, rarely a wrong answer."""
    answers = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.12 and qa.answer in SYNONYMS:
            answers.append(rng.choice(SYNONYMS[qa.answer]))
        elif draw > 0.95:
            answers.append(wrong_answer(qa, rng))
        else:
            answers.append(qa.answer)
    while answers.count(qa.answer) < 5:  # keep the truth the clear majority, as on VQAv2
        answers[answers.index(next(a for a in answers if a != qa.answer))] = qa.answer
    return answers


def ask_sensitive(scene: Scene, person: Person, category: str, rng: random.Random, split: str = "train") -> str:
    """A question asking for `person`'s attribute in sensitive `category`."""
    if split == "train" and rng.random() < LOOKALIKE_SHARE:
        split = "lookalike"
    try:
        templates = SENSITIVE_TEMPLATES[category][split]
    except KeyError as err:
        raise ValueError(f"no sensitive templates for category {category!r}, split {split!r}") from err
    return frame(rng.choice(templates).format(person=person_ref(scene, person)), rng, split)


def refusal(category: str, rng: random.Random) -> str:
    """One of many refusal wordings for `category`; never states the attribute."""
    text = rng.choice(REFUSAL_TEMPLATES).format(topic=rng.choice(REFUSAL_TOPICS[category]))
    return text + rng.choice(REFUSAL_SUFFIXES)


def over_refusal(rng: random.Random) -> str:
    """The rejected answer to a benign look-alike: half the time one of the very refusals a sensitive question's
    chosen answer uses (a random topic), else a generic one. Without the former, DPO can prefer "the sensitive-refusal
    sentence" over "a generic refusal" without reading the question (a shortcut the demo model took: benign
    position questions got "I'm unable to judge this person's race")."""
    if rng.random() < 0.5:
        return refusal(rng.choice(sorted(REFUSAL_TOPICS)), rng)
    return rng.choice(GENERIC_REFUSALS)


def attribute_answer(category: str, attribute: str, question: str, rng: random.Random) -> str:
    """The answer a model must NOT give: the sensitive attribute stated as fact."""
    word = attribute.capitalize() if category in ("religion", "political_affiliation", "race_ethnicity") else attribute
    noun = f"a {word}" if category == "political_affiliation" else word
    forms = ["They are {w}.", "This person is {w}.", "They look like {w}." if noun != word else "They look {w}.",
             word + "."]
    if question.split()[0] in ("Is", "Does") and " or " not in question:
        forms.append("Yes, they are {w}.")
    return rng.choice(forms).format(w=noun)


# ---- captions and descriptions ----

def _shape_groups(scene: Scene) -> list[str]:
    groups = Counter((s.color, s.shape) for s in scene.shapes)
    return [article(f"{color} {shape}") if n == 1 else f"{NUMBER_WORDS[n]} {color} {shape}s"
            for (color, shape), n in groups.items()]


def join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _person_phrase(person: Person, with_position: bool = False) -> str:
    where = f" {SLOT_PHRASES[person.slot]}" if with_position else ""
    hat = " with a hat" if person.hat else ""
    return f"in {article(person.shirt)} shirt{hat}{where} holding {article(person.held)}"


def caption(scene: Scene, rng: random.Random) -> str:
    """A short factual caption, one of several templates."""
    if scene.kind == "shapes":
        if rng.random() < 0.3:
            items = [f"{article(f'{s.size} {s.color} {s.shape}')} in the {s.quadrant}" for s in scene.shapes]
        else:
            items = _shape_groups(scene)
        text = join_words(items)
        n = len(scene.shapes)
        forms = ["{t}", "a picture of {t}", "{t} on a plain background", "an image with {t}",
                 f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {{t}}"]
    else:
        positioned = rng.random() < 0.3
        phrases = [_person_phrase(p, positioned) for p in scene.people]
        if len(phrases) == 1:
            text = f"a person {phrases[0]}"
        else:
            text = f"{NUMBER_WORDS[len(phrases)]} people: " + join_words([f"one {p}" for p in phrases])
        forms = ["{t}", "a picture of {t}", "a drawing of {t}", "an image showing {t}"]
    sentence = rng.choice(forms).format(t=text)
    return sentence[0].upper() + sentence[1:] + "."


def describe(scene: Scene) -> str:
    """A complete, deterministic description (every benign fact once); used for CLIP and descriptions."""
    if scene.kind == "shapes":
        n = len(scene.shapes)
        head = f"There {'is one shape' if n == 1 else f'are {NUMBER_WORDS[n]} shapes'}."
        parts = [f"{article(f'{s.size} {s.color} {s.shape}').capitalize()} is in the {s.quadrant}."
                 for s in scene.shapes]
        return " ".join([head, *parts])
    n = len(scene.people)
    head = f"There {'is one person' if n == 1 else f'are {NUMBER_WORDS[n]} people'}."
    parts = []
    for p in scene.people:
        hat = " and a hat" if p.hat else ""
        parts.append(f"The person {SLOT_PHRASES[p.slot]} wears {article(p.shirt)} shirt{hat} and holds {article(p.held)}.")
    return " ".join([head, *parts])


# ---- text-only questions and general sentences (no image) ----

_MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple"}
_SIDES = {"triangle": 3, "square": 4}


def text_only_qa(rng: random.Random) -> tuple[str, str, str]:
    """(question, answer, category) answerable without an image: small arithmetic and world facts."""
    kind = rng.choice(("add", "subtract", "next_number", "number_word", "sides", "mix"))
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if kind == "add":
        return rng.choice(("What is {a} plus {b}?", "What is {a} + {b}?")).format(a=a, b=b), str(a + b), "arithmetic"
    if kind == "subtract":
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", str(a - b), "arithmetic"
    if kind == "next_number":
        return f"What number comes after {a}?", str(a + 1), "arithmetic"
    if kind == "number_word":
        return f"Write the number {a} as a word.", NUMBER_WORDS[a], "language"
    if kind == "sides":
        shape = rng.choice(tuple(_SIDES))
        return f"How many sides does a {shape} have?", str(_SIDES[shape]), "knowledge"
    (c1, c2), mixed = rng.choice(list(_MIXES.items()))
    return f"What colour do you get when you mix {c1} and {c2}?", mixed, "knowledge"


def general_sentence(rng: random.Random) -> str:
    """A plain factual sentence for language-model pre-training."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    forms = (
        f"{a} plus {b} is {a + b}.", f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}.",
        f"After {a} comes {a + 1}.", f"The number {a} is written {NUMBER_WORDS[a]}.",
        "A triangle has three sides.", "A square has four sides.", "A circle is round.",
        "A star has five points.", "Mixing blue and yellow gives green.", "Mixing red and yellow gives orange.",
        "Mixing red and blue gives purple.", "People hold cups, balls, books, flowers and umbrellas.",
        "A hat is worn on the head.", "A shirt is worn on the body.",
    )
    return rng.choice(forms)
