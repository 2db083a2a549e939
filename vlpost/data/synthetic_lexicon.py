"""General English for the tiny LM's pre-training corpus: what a real pre-trained LM already knows.

A downloaded LM arrives knowing that "carrying" is a way of holding, that individuals are people, or
that "faith" is about religion. Our stage-0 LM learns language only from `SyntheticWorld.text_corpus`,
so the corpus carries a small lexicon: word-meaning sentences, the world's facts said with common
synonyms, and everyday sentences (apologies, "I can't ...") in contexts that have nothing to do with
images. None of it is a question/answer pair, a question template or a refusal of a question; refusals
stay something only the DPO / GRPO stages teach.
"""

from __future__ import annotations

import random

from vlpost.data.synthetic_scene import COLORS, OBJECTS, SHAPES, Person, Scene

# (word, meaning) pairs, said as "X means Y." and similar frames.
MEANINGS: tuple[tuple[str, str], ...] = (
    ("carrying something", "holding it"), ("to carry", "to hold"), ("to grip", "to hold tightly"),
    ("an item", "an object or a thing"), ("an object", "a thing"), ("individuals", "people"),
    ("a person", "one individual"), ("persons", "people"), ("a figure", "a drawn shape or person"),
    ("to be dressed in a colour", "to wear clothes of that colour"), ("a top", "a shirt"),
    ("clothes", "what people wear"), ("a cap", "a kind of hat"), ("a picture", "an image"),
    ("a photo", "a picture"), ("a drawing", "a picture made with lines and colours"),
    ("a scene", "what a picture shows"), ("the position of a thing", "where it is"),
    ("a location", "a place"), ("a corner", "one of the four parts at the edges of a picture"),
    ("upper", "top"), ("lower", "bottom"), ("the centre", "the middle"), ("to appear", "to be seen"),
    ("visible", "able to be seen"), ("shown", "drawn or visible"), ("to include", "to contain"),
    ("to contain", "to have inside"), ("to notice", "to see"), ("to spot", "to see"),
    ("the total", "the whole number"), ("a count", "a number of things"), ("colour", "color"),
    ("coloured", "having a colour"), ("a kind of shape", "a type of shape"), ("violet", "purple"),
    ("a mug", "a cup"), ("a rhombus", "a diamond shape"), ("round", "shaped like a circle"),
    ("race", "a group people are put in by ancestry"), ("ethnicity", "a group with shared ancestry and culture"),
    ("a racial background", "a race or ethnicity"), ("religion", "a faith or set of religious beliefs"),
    ("a faith", "a religion"), ("to practise a faith", "to follow a religion"),
    ("sexual orientation", "whom a person is attracted to"), ("sexuality", "sexual orientation"),
    ("homosexual", "gay"), ("heterosexual", "straight"), ("politics", "political views and parties"),
    ("a political party", "a group that wants to govern"), ("to lean left or right", "to hold political views"),
    ("to vote", "to choose in an election"), ("health", "how well the body and mind work"),
    ("an illness", "a disease or medical condition"), ("an impairment", "a disability"),
    ("handicapped", "an old word for disabled"), ("a health problem", "an illness or medical condition"),
)
MEANING_FRAMES = ("{a} means {b}.", "The words {a} and {b} say the same thing.", "Another way to say {b} is {a}.",
                  "In other words, {a} is {b}.")

# The world's facts with synonyms, so they share contexts with the words questions use.
_HOLD = ("holds", "is holding", "carries", "is carrying", "has", "grips")
_WEAR = ("wears", "is wearing", "is dressed in", "has on")
_PEOPLE = ("people", "persons", "individuals", "figures")
_SEE = ("You can see", "The picture shows", "The image contains", "There is", "We see", "One can spot")
_WHERE = ("is in the", "appears in the", "can be found in the", "is placed in the", "sits in the")
_SYNONYM = {"top left": "upper left", "top right": "upper right", "bottom left": "lower left",
            "bottom right": "lower right"}

# Everyday sentences with the words apologies and refusals are made of, outside any image context.
EVERYDAY: tuple[str, ...] = (
    "I'm sorry, I can't come to the party today.", "Sorry, I don't know the way to the station.",
    "I can't find my keys anywhere.", "I won't be late again.", "I'd rather not eat too much sugar.",
    "I'm not able to lift that box on my own.", "I cannot read small letters without glasses.",
    "She didn't want to guess the end of the story.", "He won't make assumptions before he has the facts.",
    "It is hard to judge a book by its cover.", "We can't tell the weather from here.",
    "I'm happy to help you carry the bags.", "Please describe what you are looking for.",
    "I don't know, so I won't say.", "It wouldn't be fair to decide before we know more.",
    "I'm unable to answer the phone right now.", "Sorry, but the shop is closed.",
    "They are happy to describe the garden.", "I can describe the room instead.",
    "Personal matters are private.", "Many people keep their beliefs to themselves.",
    "People have many different backgrounds, faiths and views.", "Nobody likes to be labelled.",
    "We can determine the answer with a calculator.", "You can infer the time from the clock on the wall.",
    "Let's not speculate about tomorrow's weather.", "A quick guess is not always reliable.",
    "Wear clothes that are appropriate for the weather.", "Kindness and patience are personal characteristics.",
    "He can identify birds by their songs.", "Label the boxes before you move them.",
    "Appearances can be misleading.", "I'd rather not make assumptions about the results.",
    "I'm not able to judge the contest, because my sister is in it.", "Anyone can learn to cook.",
)


def _article(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def meaning_sentence(rng: random.Random) -> str:
    a, b = rng.choice(MEANINGS)
    sentence = rng.choice(MEANING_FRAMES).format(a=a, b=b)
    return sentence[0].upper() + sentence[1:]


def _person_sentence(person: Person, rng: random.Random, scene: Scene) -> str:
    slot = {"left": "on the left", "middle": "in the middle", "right": "on the right"}[person.slot]
    who = rng.choice(("The person", "The individual", "The figure")) + f" {slot}"
    if len(scene.people) == 1:
        who = rng.choice(("The person", "The individual", "This person"))
    shirt = f"{person.shirt} {rng.choice(('shirt', 'shirt', 'top'))}"
    parts = [f"{who} {rng.choice(_WEAR)} {_article(shirt)}", f"{rng.choice(_HOLD)} {_article(person.held)}"]
    if person.hat:
        parts.append(rng.choice(("has a hat on the head", "wears a hat", "has a hat on")))
    return " and ".join(parts) + "."


def varied_description(scene: Scene, rng: random.Random) -> str:
    """The scene's benign facts in freely chosen synonyms (never a sensitive marker)."""
    if scene.kind == "shapes":
        n = len(scene.shapes)
        head = f"{rng.choice(_SEE)} {n} {'shape' if n == 1 else 'shapes'}."
        parts = []
        for s in scene.shapes:
            where = _SYNONYM[s.quadrant] if rng.random() < 0.3 else s.quadrant
            colour = "violet" if s.color == "purple" and rng.random() < 0.2 else s.color
            parts.append(f"The {s.size} {colour} {s.shape} {rng.choice(_WHERE)} {where} corner.")
        return " ".join([head, *parts])
    n = len(scene.people)
    head = f"{rng.choice(_SEE)} {n} {'person' if n == 1 else rng.choice(_PEOPLE)}."
    return " ".join([head, *(_person_sentence(p, rng, scene) for p in scene.people)])


def vocabulary_note(rng: random.Random) -> str:
    """A line naming the world's words (colours, shapes, objects) so every one is a known token."""
    kind = rng.choice(("colours", "shapes", "objects"))
    words = {"colours": list(COLORS), "shapes": list(SHAPES), "objects": list(OBJECTS)}[kind]
    rng.shuffle(words)
    return f"Some {kind}: {', '.join(words)}."


def lexicon_sentence(rng: random.Random) -> str:
    draw = rng.random()
    if draw < 0.5:
        return meaning_sentence(rng)
    if draw < 0.85:
        return rng.choice(EVERYDAY)
    return vocabulary_note(rng)
