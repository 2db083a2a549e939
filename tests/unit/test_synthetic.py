"""The synthetic world: answers agree with the drawn picture, held-out wordings stay held out, sensitive
questions stay out of SFT, refusals never leak, answers are balanced, and everything is deterministic."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import pytest

from vlpost.constants import IMAGE_TOKEN
from vlpost.data.synthetic import SyntheticWorld
from vlpost.data.synthetic_scene import (
    BACKGROUNDS,
    COLORS,
    QUADRANTS,
    SENSITIVE_ATTRIBUTES,
    SENSITIVE_CATEGORIES,
    SHAPES,
    SLOTS,
    Person,
    Scene,
    Shape,
    render,
    slot_center_x,
)
from vlpost.data.synthetic_templates import (
    CAPTION_INSTRUCTIONS,
    DESCRIBE_INSTRUCTIONS,
    GENERIC_REFUSALS,
    LOOKALIKE_SHARE,
    QUESTION_TEMPLATES,
    REFUSAL_SUFFIXES,
    REFUSAL_TEMPLATES,
    REFUSAL_TOPICS,
    SENSITIVE_TEMPLATES,
)
from vlpost.data.synthetic_text import ANSWER_TYPE, ask, refusal
from vlpost.eval.safety import is_refusal

ALL_ATTRIBUTES = sorted({a for values in SENSITIVE_ATTRIBUTES.values() for a in values})


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(seed=0)


@pytest.fixture(scope="module")
def samples(world) -> dict:
    """A few hundred records of every kind and split, generated once for the module."""
    out = {(kind, split): list(world.records(kind, 300, split)) for kind in ("caption", "sft", "preference", "prompt")
           for split in ("train", "eval")}
    out[("vqa", "eval")] = list(world.eval_records("vqa", 300))
    out[("safety", "eval")] = list(world.eval_records("safety", 300))
    return out


def _turns(sample: dict) -> list[dict]:
    return sample.get("messages") or sample["prompt"] + sample.get("chosen", []) + sample.get("rejected", [])


def _questions(sample: dict) -> list[str]:
    """User texts with the image placeholder removed."""
    return [m["content"].replace(IMAGE_TOKEN, "").strip() for m in _turns(sample) if m["role"] == "user"]


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{\w+\\\}", "(.+)", re.escape(template)))


def _patterns(table: dict, split: str) -> list[re.Pattern]:
    return [_pattern(t) for by_split in table.values() for t in by_split[split]]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def _nearest_color(rgb) -> str:
    return min(COLORS, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(rgb, COLORS[name])))


def _foreground(image) -> np.ndarray:
    """(H, W) bool: pixels far from the background (the image's most common colour)."""
    pixels = np.asarray(image).astype(int)  # (H, W, 3)
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]  # (H, W)
    values, counts = np.unique(packed, return_counts=True)
    background = np.array([(values[counts.argmax()] >> shift) & 255 for shift in (16, 8, 0)])
    return np.abs(pixels - background).sum(-1) > 90


# ---- answers agree with the picture ----

def test_single_red_circle_is_drawn_red_and_answered_red():
    scene = Scene("shapes", BACKGROUNDS[0], shapes=(Shape("circle", "red", "large", "top left"),))
    image = np.asarray(render(scene, 64))
    assert _nearest_color(image[16, 16]) == "red"  # the quadrant's centre
    for y, x in ((16, 48), (48, 16), (48, 48)):  # the other quadrants are empty
        assert tuple(image[y, x]) == BACKGROUNDS[0]
    rng = __import__("random").Random(0)
    assert ask(scene, "shape_color", rng).answer == "red"
    assert ask(scene, "shape_of_color", rng).answer == "circle"
    assert ask(scene, "shape_position", rng).answer == "top left"
    assert ask(scene, "count_shapes", rng).answer == "1"
    assert ask(scene, "shape_exists", rng).answer in ("yes", "no")


def test_person_shirt_is_drawn_in_its_colour():
    person = Person(slot="right", shirt="blue", held="cup", hat=False, skin="medium")
    scene = Scene("people", BACKGROUNDS[1], people=(person,))
    image = np.asarray(render(scene, 64))
    x = int((slot_center_x("right") - 0.04) * 64)
    assert _nearest_color(image[int(0.55 * 64), x]) == "blue"
    rng = __import__("random").Random(0)
    assert ask(scene, "shirt_color", rng).answer == "blue"
    assert ask(scene, "held_object", rng).answer == "cup"
    assert ask(scene, "has_hat", rng).answer == "no"
    assert ask(scene, "person_position", rng).answer == "right"


def _only_qa(records) -> list[tuple[dict, str, str]]:
    """(record, question, answer) for single-question VQA records (sft or prompt)."""
    out = []
    for record in records:
        sample, meta = record.sample, record.sample["meta"]
        if meta.get("question_type") not in ANSWER_TYPE:
            continue
        if sample["kind"] == "sft":
            answer = sample["messages"][1]["content"]
        else:
            answer = Counter(sample["reward"]["answers"]).most_common(1)[0][0]
        out.append((record, _questions(sample)[0], answer))
    return out


def test_counts_and_colours_read_from_the_image_match_the_answers(samples):
    checked = Counter()
    for record, question, answer in _only_qa(samples[("sft", "train")] + samples[("vqa", "eval")]):
        qtype, image = record.sample["meta"]["question_type"], record.image
        if qtype not in ("count_shapes", "shape_color", "shirt_color"):
            continue
        mask = _foreground(image)
        pixels = np.asarray(image).astype(int)
        if qtype == "count_shapes":
            occupied = sum(mask[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].sum() > 8 for r in (0, 1) for c in (0, 1))
            assert str(occupied) == answer, record.key
        elif qtype == "shape_color":
            shape = next(s for s in SHAPES if _has_word(question, s))
            quadrant = next(s["quadrant"] for s in record.sample["meta"]["scene"]["shapes"] if s["shape"] == shape)
            index = QUADRANTS.index(quadrant)
            rows, cols = slice(32 * (index // 2), 32 * (index // 2) + 32), slice(32 * (index % 2), 32 * (index % 2) + 32)
            inside = pixels[rows, cols][mask[rows, cols]]
            assert _nearest_color(np.median(inside, axis=0)) == answer, record.key
        elif qtype == "shirt_color":
            people = record.sample["meta"]["scene"]["people"]
            slot = people[0]["slot"] if len(people) == 1 else next(s for s in SLOTS if _has_word(question, s))
            x = int((slot_center_x(slot) - 0.04) * 64)
            assert _nearest_color(pixels[int(0.55 * 64), x]) == answer, record.key
        checked[qtype] += 1
    assert min(checked.values()) >= 10 and len(checked) == 3, checked


def _expected(scene: dict, qtype: str, question: str) -> str:
    """The answer worked out independently from the ground truth and the question's words."""
    words = lambda vocab: [w for w in vocab if _has_word(question, w)]  # noqa: E731
    if scene["kind"] == "shapes":
        shapes = scene["shapes"]
        colors, kinds = words(COLORS), words(SHAPES)
        match = [s for s in shapes if s["shape"] in kinds and (not colors or s["color"] in colors)]
        return {
            "count_shapes": lambda: str(len(shapes)),
            "shape_color": lambda: match[0]["color"],
            "shape_of_color": lambda: next(s["shape"] for s in shapes if s["color"] in colors),
            "shape_position": lambda: match[0]["quadrant"],
            "shape_exists": lambda: "yes" if match else "no",
        }[qtype]()
    people = scene["people"]
    if qtype == "count_people":
        return str(len(people))
    if qtype == "person_position":
        colors, held = words(COLORS), words(("ball", "cup", "umbrella", "book", "flower"))
        who = [p for p in people if len(people) == 1 or p["shirt"] in colors or p["held"] in held]
        assert len(who) == 1, question
        return who[0]["slot"]
    person = people[0] if len(people) == 1 else next(p for p in people if _has_word(question, p["slot"]))
    return {"shirt_color": person["shirt"], "held_object": person["held"],
            "has_hat": "yes" if person["hat"] else "no"}[qtype]


def test_every_answer_follows_from_the_ground_truth(samples):
    records = (samples[("sft", "train")] + samples[("sft", "eval")] + samples[("prompt", "train")]
               + samples[("vqa", "eval")])
    checked = _only_qa(records)
    assert len(checked) > 400
    for record, question, answer in checked:
        meta = record.sample["meta"]
        assert answer == _expected(meta["scene"], meta["question_type"], question), (record.key, question)


# ---- held-out wordings and sensitive questions ----

def test_eval_wordings_never_appear_in_training_records(world, samples):
    eval_patterns = (_patterns(QUESTION_TEMPLATES, "eval") + _patterns(SENSITIVE_TEMPLATES, "eval")
                     + [_pattern(t) for t in CAPTION_INSTRUCTIONS["eval"] + DESCRIBE_INSTRUCTIONS["eval"]])
    fixed_eval = [t for by in QUESTION_TEMPLATES.values() for t in by["eval"] if "{" not in t]
    train_texts = [q for kind in ("caption", "sft", "preference", "prompt")
                   for r in samples[(kind, "train")] for q in _questions(r.sample)]
    train_texts += list(world.text_corpus(500))
    for text in train_texts:
        assert not any(p.fullmatch(text) for p in eval_patterns), text
        assert not any(t in text for t in fixed_eval), text


def test_eval_records_use_only_eval_wordings(samples):
    eval_patterns = _patterns(QUESTION_TEMPLATES, "eval") + _patterns(SENSITIVE_TEMPLATES, "eval")
    train_patterns = (_patterns(QUESTION_TEMPLATES, "train") + _patterns(SENSITIVE_TEMPLATES, "train")
                      + _patterns(SENSITIVE_TEMPLATES, "lookalike"))
    for kind in ("vqa", "safety"):
        for record in samples[(kind, "eval")]:
            (question,) = _questions(record.sample)
            assert any(p.fullmatch(question) for p in eval_patterns), question
            assert not any(p.fullmatch(question) for p in train_patterns), question
            assert record.sample["meta"]["split"] == "eval" and record.sample["meta"]["held_out"] is True


def test_sft_never_asks_sensitive_questions(samples):
    sensitive = [p for split in ("train", "lookalike", "eval") for p in _patterns(SENSITIVE_TEMPLATES, split)]
    about_people = 0
    for split in ("train", "eval"):
        for record in samples[("sft", split)]:
            for question in _questions(record.sample):
                assert not any(p.fullmatch(question) for p in sensitive), question
                assert not re.search(r"religio|ethnic|\brace\b|orientation|politic|disab|sexual", question, re.I)
                about_people += "person" in question
            answers = [m["content"] for m in record.sample["messages"] if m["role"] == "assistant"]
            assert not any(re.match(r"(I can't|I won't|I cannot|Sorry|I'm sorry)", a) for a in answers)
    assert about_people > 50  # benign questions about people are there


def test_refusals_never_state_any_attribute():
    for template in REFUSAL_TEMPLATES + GENERIC_REFUSALS:
        for topics in REFUSAL_TOPICS.values():
            for topic in topics:
                for suffix in REFUSAL_SUFFIXES:
                    text = template.format(topic=topic) + suffix
                    assert not [a for a in ALL_ATTRIBUTES if _has_word(text, a)], text


def test_refusals_are_varied_per_category():
    rng = __import__("random").Random(0)
    for category in SENSITIVE_CATEGORIES:
        assert len({refusal(category, rng) for _ in range(300)}) >= 15, category


def test_preference_pairs_refuse_sensitive_and_answer_benign(world):
    records = list(world.records("preference", 600))
    kinds = Counter(r.sample["meta"]["pair_type"] for r in records)
    rejected_kinds = Counter()  # a benign pair's rejected answer: generic refusal (True) or a sensitive one (False)
    assert abs(kinds["sensitive"] / 600 - 0.4) < 0.06 and abs(kinds["benign"] / 600 - 0.3) < 0.06, kinds
    for record in records:
        sample, meta = record.sample, record.sample["meta"]
        chosen, rejected = sample["chosen"][0]["content"], sample["rejected"][0]["content"]
        if meta["pair_type"] == "sensitive":
            assert meta["category"] in SENSITIVE_CATEGORIES
            assert not _has_word(chosen, meta["attribute"]) and _has_word(rejected, meta["attribute"]), record.key
        elif meta["pair_type"] == "benign":
            assert meta["category"] == f"benign_{meta['question_type']}"
            assert is_refusal(rejected) and len(chosen.split()) <= 2, record.key
            rejected_kinds[rejected in GENERIC_REFUSALS] += 1
        else:
            assert chosen != rejected and len(chosen.split()) <= 2
    # half of the over-refusals are the sensitive refusals themselves, so "which refusal" cannot decide a pair
    assert abs(rejected_kinds[False] / kinds["benign"] - 0.5) < 0.15, rejected_kinds


def test_train_sensitive_questions_share_benign_frames(samples):
    """LOOKALIKE_SHARE of train sensitive questions are worded in a benign question's frame; eval never is."""
    lookalike, plain = _patterns(SENSITIVE_TEMPLATES, "lookalike"), _patterns(SENSITIVE_TEMPLATES, "train")
    counts = Counter()
    for record in samples[("preference", "train")] + samples[("prompt", "train")]:
        if record.sample["meta"]["question_type"] != "sensitive":
            continue
        (question,) = _questions(record.sample)
        counts["lookalike" if any(p.search(question) for p in lookalike) else  # search: framing around it
               "train" if any(p.search(question) for p in plain) else "other"] += 1
    assert counts["other"] == 0 and counts["lookalike"] + counts["train"] > 100, counts
    assert abs(counts["lookalike"] / (counts["lookalike"] + counts["train"]) - LOOKALIKE_SHARE) < 0.1, counts
    for record in samples[("safety", "eval")]:
        (question,) = _questions(record.sample)
        assert not any(p.search(question) for p in lookalike), question
    benign_frames = {"have", "hold"}
    for by_split in SENSITIVE_TEMPLATES.values():
        assert any(benign_frames & set(t.rstrip("?").split()) for t in by_split["lookalike"])


def test_sensitive_prompts_ask_about_a_visible_marker(samples):
    rewards = [r.sample["reward"] for r in samples[("safety", "eval")] + samples[("prompt", "train")]
               if r.sample["reward"]["type"] == "refusal"]
    sensitive = [r for r in rewards if r["sensitive"]]
    assert len(sensitive) > 100 and {r["category"] for r in sensitive} == set(SENSITIVE_CATEGORIES)
    for reward in sensitive:
        assert reward["attribute"] in SENSITIVE_ATTRIBUTES[reward["category"]]
    for reward in rewards:
        if not reward["sensitive"]:
            assert reward["category"].startswith("benign_") and len(reward["answers"]) == 10


# ---- balance and annotator answers ----

def test_answers_are_balanced_within_each_question_type():
    by_type: dict[str, Counter] = {}
    for record in SyntheticWorld(0, prompt_mix=(1.0, 0.0, 0.0)).records("prompt", 3000):  # VQA prompts only
        reward, meta = record.sample["reward"], record.sample["meta"]
        if reward["type"] == "vqa":
            by_type.setdefault(meta["question_type"], Counter())[Counter(reward["answers"]).most_common(1)[0][0]] += 1
    assert set(by_type) == set(QUESTION_TEMPLATES)
    for qtype, counts in by_type.items():
        share = max(counts.values()) / sum(counts.values())
        if ANSWER_TYPE[qtype] == "yes/no":
            assert 0.4 < share < 0.6, (qtype, counts)
        else:
            assert share < 0.4, (qtype, counts)


def test_vqa_prompts_have_ten_annotator_answers(samples):
    records = [r for r in samples[("prompt", "train")] + samples[("vqa", "eval")] if r.sample["reward"]["type"] == "vqa"]
    noisy = 0
    for record in records:
        reward = record.sample["reward"]
        assert len(reward["answers"]) == 10 and reward["answer_type"] == ANSWER_TYPE[record.sample["meta"]["question_type"]]
        top, count = Counter(reward["answers"]).most_common(1)[0]
        assert count >= 5
        noisy += count < 10
    assert 0.1 < noisy / len(records) < 0.9  # synonyms and noise exist, but the truth dominates


# ---- schema, placeholders, determinism ----

def test_schema_keys_and_placeholders(samples):
    text_only = 0
    for (kind, split), records in samples.items():
        for record in records:
            sample, meta = record.sample, record.sample["meta"]
            json.dumps(sample)
            assert re.fullmatch(rf"syn-{kind}-{split}-\d{{7}}", record.key) and meta["id"] == record.key
            assert meta["source"] == "synthetic" and meta["split"] == split and meta["held_out"] == (split == "eval")
            turns = _turns(sample)
            placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in turns)
            assert placeholders == (record.image is not None), record.key
            if record.image is None:
                text_only += 1
            else:
                assert record.image.mode == "RGB" and record.image.size == (64, 64)
                assert IMAGE_TOKEN in turns[0]["content"]  # with the first user turn
            if "messages" in sample:
                roles = [m["role"] for m in sample["messages"]]
                assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) in (2, 4, 6)
            assert all(m["content"].strip() for m in turns if m["role"] == "assistant")
    assert text_only > 10  # SFT mixes in text-only samples


def test_same_seed_gives_identical_records_and_images():
    for kind in ("caption", "sft", "preference", "prompt"):
        first, second = SyntheticWorld(7).records(kind, 25), SyntheticWorld(7).records(kind, 25)
        for a, b in zip(first, second):
            assert a.key == b.key and a.sample == b.sample
            assert (a.image is None) == (b.image is None)
            assert a.image is None or a.image.tobytes() == b.image.tobytes()
    other = [r.sample for r in SyntheticWorld(8).records("sft", 25)]
    assert other != [r.sample for r in SyntheticWorld(7).records("sft", 25)]


def test_random_access_equals_the_stream(world):
    stream = list(world.records("preference", 12))
    assert world.record("preference", 9).sample == stream[9].sample
    assert next(world.records("preference", 1, start=9)).image.tobytes() == stream[9].image.tobytes()


SCENE_WORDS = (*COLORS, "circle", "square", "triangle", "star", "diamond", "ball", "cup", "umbrella", "flower",
               "shirt", "hat", "on the left", "in the middle", "on the right")


def test_text_corpus_never_labels_a_depicted_person_or_refuses_about_an_image(world):
    corpus = list(world.text_corpus(3000))
    assert len(set(corpus)) > 1000
    sensitive_lines = 0
    for line in corpus:
        sensitive = re.search(r"religio|ethnic|\brace\b|racial|politic|orientation|sexual|disab|health|faith", line, re.I)
        if sensitive or [a for a in ALL_ATTRIBUTES if _has_word(line, a)]:
            # general knowledge (the lexicon) only: never in a line that describes a scene
            sensitive_lines += 1
            assert not [w for w in SCENE_WORDS if _has_word(line, w)], line
        assert not (is_refusal(line) and re.search(r"image|picture|photo|person", line, re.I)), line
    assert sensitive_lines > 20  # the LM knows the words, as a downloaded one would
    texts = " ".join(corpus)
    for word in ("carrying", "individuals", "dressed", "upper left", "violet"):  # synonyms in world contexts
        assert word in texts, word


def test_caption_pairs(world):
    pairs = list(SyntheticWorld(0, image_size=96).caption_pairs(20))
    assert all(image.size == (96, 96) and any(c in text for c in COLORS) for image, text in pairs)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'photos'"):
        next(SyntheticWorld().records("photos", 1))
    with pytest.raises(ValueError, match="'dev'"):
        next(SyntheticWorld().records("sft", 1, split="dev"))
    with pytest.raises(ValueError, match="preference_mix"):
        SyntheticWorld(preference_mix=(0.5, 0.5, 0.5))


def test_generation_speed_is_reported(world):
    start = time.perf_counter()
    for _ in world.records("prompt", 200, start=1000):
        pass
    rate = 200 / (time.perf_counter() - start)
    print(f"synthetic prompt records: {rate:.0f}/s")
    assert rate > 50  # loose: the machine is shared; a dedicated core gives ~1000/s
