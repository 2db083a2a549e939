"""The synthetic world: seeded scenes with known ground truth, turned into all four sample kinds.

It is the embedded default (no hub downloads): a tiny CLIP and a tiny LM bootstrapped on it can learn
it in minutes. Record `i` of a (kind, split) stream depends only on (seed, kind, split, i), so any
slice can be regenerated, sharded or resumed without generating what comes before it.
See data/synthetic/README.md for the scenes, question types and templates.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace

from PIL import Image

from vlpost.constants import IMAGE_TOKEN
from vlpost.data.records import Record
from vlpost.data.synthetic_lexicon import lexicon_sentence, varied_description
from vlpost.data.synthetic_scene import (
    SENSITIVE_CATEGORIES,
    Scene,
    render,
    sample_people_scene,
    sample_shapes_scene,
    sensitive_attribute,
    with_marker,
)
from vlpost.data.synthetic_templates import CAPTION_INSTRUCTIONS, DESCRIBE_INSTRUCTIONS
from vlpost.data.synthetic_text import (
    QA,
    ask_any,
    ask_sensitive,
    attribute_answer,
    caption,
    describe,
    general_sentence,
    human_answers,
    over_refusal,
    refusal,
    text_only_qa,
    wrong_answer,
)

RECORD_KINDS = ("caption", "sft", "preference", "prompt")
EVAL_KINDS = ("vqa", "safety")
SPLITS = ("train", "eval")


def _user(text: str, has_image: bool, rng: random.Random) -> dict:
    """A user turn; with an image, the placeholder goes before (70%) or after the text."""
    if not has_image:
        return {"role": "user", "content": text}
    if not text:
        return {"role": "user", "content": IMAGE_TOKEN}
    content = f"{IMAGE_TOKEN}\n{text}" if rng.random() < 0.7 else f"{text}\n{IMAGE_TOKEN}"
    return {"role": "user", "content": content}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _check_mix(name: str, mix: tuple[float, ...], size: int) -> None:
    if len(mix) != size or any(p < 0 for p in mix) or abs(sum(mix) - 1.0) > 1e-6:
        raise ValueError(f"SyntheticWorld {name}={mix} must be {size} non-negative shares summing to 1")


class SyntheticWorld:
    """Seeded generator of captions, SFT conversations, preference pairs and RL/eval prompts."""

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        *,
        people_share: float = 0.5,
        sft_mix: tuple[float, float, float, float] = (0.1, 0.15, 0.25, 0.5),
        preference_mix: tuple[float, float, float] = (0.4, 0.3, 0.3),
        prompt_mix: tuple[float, float, float] = (0.5, 0.3, 0.2),
        safety_sensitive_share: float = 0.5,
    ) -> None:
        """sft_mix: text-only, description, multi-turn, single VQA; preference_mix: sensitive, benign
        look-alike, VQA; prompt_mix: VQA, sensitive, benign look-alike."""
        if image_size < 16:
            raise ValueError(f"SyntheticWorld image_size={image_size} is too small to draw scenes; use >= 16")
        _check_mix("sft_mix", sft_mix, 4)
        _check_mix("preference_mix", preference_mix, 3)
        _check_mix("prompt_mix", prompt_mix, 3)
        self.seed, self.image_size = seed, image_size
        self.people_share = people_share
        self.sft_mix, self.preference_mix, self.prompt_mix = sft_mix, preference_mix, prompt_mix
        self.safety_sensitive_share = safety_sensitive_share

    # ---- public API ----

    def records(self, kind: str, n: int, split: str = "train", start: int = 0) -> Iterator[Record]:
        """Records `start .. start+n-1` of `kind`; split "eval" uses other scenes and held-out wordings."""
        if kind not in RECORD_KINDS:
            raise ValueError(f"unknown synthetic record kind {kind!r}; expected one of {RECORD_KINDS}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        for index in range(start, start + n):
            yield self.record(kind, index, split)

    def eval_records(self, kind: str, n: int, start: int = 0) -> Iterator[Record]:
        """Held-out prompt records: "vqa" (VQA reward) or "safety" (sensitive + benign look-alikes)."""
        if kind not in EVAL_KINDS:
            raise ValueError(f"unknown eval kind {kind!r}; expected one of {EVAL_KINDS}")
        for index in range(start, start + n):
            rng = self._rng(kind, "eval", index)
            if kind == "vqa":
                mode = "vqa"
            else:
                mode = "sensitive" if rng.random() < self.safety_sensitive_share else "benign"
            yield self._finish(kind, "eval", index, *self._prompt(rng, "eval", mode), question_id=index)

    def record(self, kind: str, index: int, split: str = "train") -> Record:
        """Random access to one record (what `records` yields at position `index`)."""
        rng = self._rng(kind, split, index)
        if kind == "prompt":
            draw = rng.random()
            mix = self.prompt_mix
            mode = "vqa" if draw < mix[0] else "sensitive" if draw < mix[0] + mix[1] else "benign"
            return self._finish(kind, split, index, *self._prompt(rng, split, mode), question_id=index)
        build = {"caption": self._caption, "sft": self._sft, "preference": self._preference}[kind]
        return self._finish(kind, split, index, *build(rng, split))

    def text_corpus(self, n: int) -> Iterator[str]:
        """LM pre-training text: descriptions (plain and in synonyms), captions, train-wording Q/A lines, general
        sentences and a small English lexicon (synthetic_lexicon.py); no refusals, no safety behaviour."""
        for index in range(n):
            rng = self._rng("corpus", "train", index)
            draw = rng.random()
            if draw < 0.12:
                yield general_sentence(rng) if rng.random() < 0.6 else " ".join(text_only_qa(rng)[:2])
                continue
            if draw < 0.27:
                yield lexicon_sentence(rng)
                continue
            scene = self._scene(rng)
            if draw < 0.37:
                yield describe(scene)
            elif draw < 0.47:
                yield varied_description(scene, rng)
            elif draw < 0.57:
                yield caption(scene, rng)
            else:
                yield self._reading(scene, rng)

    def _reading(self, scene: Scene, rng: random.Random) -> str:
        """A description followed by questions about it and their answers: text where the answer has to be
        looked up earlier in the context, as it will have to be looked up in the image tokens later."""
        text = describe(scene) if rng.random() < 0.6 else varied_description(scene, rng)
        asked: list[QA] = []
        for _ in range(rng.randint(1, 3)):
            asked.append(ask_any(scene, rng, "train", exclude=tuple(qa.question_type for qa in asked)))
        return " ".join([text, *(f"{qa.question} {qa.answer}." for qa in asked)])

    def caption_pairs(self, n: int) -> Iterator[tuple[Image.Image, str]]:
        """(image, text) pairs for contrastive training of a tiny CLIP: full descriptions or captions."""
        for index in range(n):
            rng = self._rng("clip", "train", index)
            scene = self._scene(rng)
            text = describe(scene) if rng.random() < 0.5 else caption(scene, rng)
            yield self._render(scene, rng), text

    # ---- building blocks ----

    def _rng(self, stream: str, split: str, index: int) -> random.Random:
        return random.Random(f"vlpost-synthetic/{self.seed}/{stream}/{split}/{index}")

    def _scene(self, rng: random.Random, kind: str | None = None) -> Scene:
        if kind is None:
            kind = "people" if rng.random() < self.people_share else "shapes"
        return sample_people_scene(rng) if kind == "people" else sample_shapes_scene(rng)

    def _render(self, scene: Scene, rng: random.Random) -> Image.Image:
        return render(scene, self.image_size, color_seed=rng.getrandbits(32))

    def _finish(self, kind: str, split: str, index: int, sample: dict, scene: Scene | None, meta: dict,
                question_id: int | None = None) -> Record:
        key = f"syn-{kind}-{split}-{index:07d}"
        meta = {"source": "synthetic", "id": key, **meta, "split": split, "held_out": split == "eval"}
        if question_id is not None:
            meta["question_id"] = question_id
        if scene is not None:
            meta["scene"] = scene.to_dict()
        image = None if scene is None else render(scene, self.image_size, color_seed=index)
        return Record(key, {**sample, "meta": meta}, image)

    def _caption(self, rng: random.Random, split: str) -> tuple[dict, Scene, dict]:
        scene = self._scene(rng)
        instruction = rng.choice(CAPTION_INSTRUCTIONS[split])
        messages = [_user(instruction, True, rng), _assistant(caption(scene, rng))]
        return {"kind": "caption", "messages": messages}, scene, {"category": "caption", "question_type": "caption"}

    def _sft(self, rng: random.Random, split: str) -> tuple[dict, Scene | None, dict]:
        draw, mix = rng.random(), self.sft_mix
        if draw < mix[0]:
            question, answer, category = text_only_qa(rng)
            messages = [_user(question, False, rng), _assistant(answer)]
            return {"kind": "sft", "messages": messages}, None, {"category": f"text_{category}",
                                                                "question_type": category}
        scene = self._scene(rng)
        if draw < mix[0] + mix[1]:
            messages = [_user(rng.choice(DESCRIBE_INSTRUCTIONS[split]), True, rng), _assistant(describe(scene))]
            return {"kind": "sft", "messages": messages}, scene, {"category": "describe", "question_type": "describe"}
        if draw < mix[0] + mix[1] + mix[2]:
            return self._multi_turn(scene, rng, split)
        qa = ask_any(scene, rng, split)
        messages = [_user(qa.question, True, rng), _assistant(qa.answer)]
        return {"kind": "sft", "messages": messages}, scene, _qa_meta(qa)

    def _multi_turn(self, scene: Scene, rng: random.Random, split: str) -> tuple[dict, Scene, dict]:
        """2-3 questions of distinct types about one image; the image comes with the first turn."""
        asked: list[QA] = []
        for _ in range(rng.randint(2, 3)):
            asked.append(ask_any(scene, rng, split, exclude=tuple(qa.question_type for qa in asked)))
        messages = []
        for turn, qa in enumerate(asked):
            messages += [_user(qa.question, turn == 0, rng), _assistant(qa.answer)]
        meta = {"category": "multi_turn", "question_type": "multi_turn"}
        return {"kind": "sft", "messages": messages}, scene, meta

    def _sensitive_case(self, rng: random.Random, split: str) -> tuple[Scene, str, str, str]:
        """A people scene with the asked category's marker drawn on the target: (scene, question, category,
        attribute)."""
        scene = self._scene(rng, "people")
        category = rng.choice(SENSITIVE_CATEGORIES)
        target = rng.randrange(len(scene.people))
        person = with_marker(scene.people[target], category, rng)
        people = scene.people[:target] + (person,) + scene.people[target + 1:]
        scene = replace(scene, people=people)
        attribute = sensitive_attribute(person, category)
        assert attribute is not None, f"with_marker left no {category} marker on {person}"
        return scene, ask_sensitive(scene, person, category, rng, split), category, attribute

    def _benign_case(self, rng: random.Random, split: str) -> tuple[Scene, QA]:
        """A benign question about the people in a picture, worded like the sensitive ones."""
        scene = self._scene(rng, "people")
        return scene, ask_any(scene, rng, split)

    def _preference(self, rng: random.Random, split: str) -> tuple[dict, Scene, dict]:
        draw, mix = rng.random(), self.preference_mix
        if draw < mix[0]:
            scene, question, category, attribute = self._sensitive_case(rng, split)
            chosen, rejected = refusal(category, rng), attribute_answer(category, attribute, question, rng)
            meta = {"category": category, "question_type": "sensitive", "pair_type": "sensitive",
                    "attribute": attribute}
        elif draw < mix[0] + mix[1]:
            scene, qa = self._benign_case(rng, split)
            question, chosen, rejected = qa.question, qa.answer, over_refusal(rng)
            meta = {**_qa_meta(qa), "category": f"benign_{qa.question_type}", "pair_type": "benign"}
        else:
            scene = self._scene(rng)
            qa = ask_any(scene, rng, split)
            question, chosen, rejected = qa.question, qa.answer, wrong_answer(qa, rng)
            meta = {**_qa_meta(qa), "pair_type": "vqa"}
        sample = {"kind": "preference", "prompt": [_user(question, True, rng)],
                  "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)]}
        return sample, scene, meta

    def _prompt(self, rng: random.Random, split: str, mode: str) -> tuple[dict, Scene, dict]:
        """An RL / eval prompt; mode "vqa", "sensitive" or "benign" (look-alike)."""
        if mode == "sensitive":
            scene, question, category, attribute = self._sensitive_case(rng, split)
            reward = {"type": "refusal", "sensitive": True, "category": category, "attribute": attribute}
            meta = {"category": category, "question_type": "sensitive", "attribute": attribute}
        else:
            if mode == "benign":
                scene, qa = self._benign_case(rng, split)
            else:
                scene = self._scene(rng)
                qa = ask_any(scene, rng, split)
            question, answers = qa.question, human_answers(qa, rng)
            if mode == "benign":
                category = f"benign_{qa.question_type}"
                reward = {"type": "refusal", "sensitive": False, "category": category, "answers": answers,
                          "answer_type": qa.answer_type}
                meta = {**_qa_meta(qa), "category": category}
            else:
                reward = {"type": "vqa", "answers": answers, "answer_type": qa.answer_type}
                meta = _qa_meta(qa)
        return {"kind": "prompt", "prompt": [_user(question, True, rng)], "reward": reward}, scene, meta


def _qa_meta(qa: QA) -> dict:
    return {"category": qa.question_type, "question_type": qa.question_type, "answer_type": qa.answer_type}
