"""Rollouts: batched greedy == one-by-one, one tower pass per prompt, stop strings, exact stored-feature loss pass."""

import pytest
import torch
from PIL import Image

from vlpost.data.chat import ChatEncoder
from vlpost.train.grpo import Row, _image_embeds, collate_rows, completion_logprobs
from vlpost.train.grpo_config import RolloutConfig
from vlpost.train.rollout import HFRolloutEngine, finish_completion

QUESTIONS = ["What colour is the circle?", "How many shapes are there? Tell me about the left one.", "yes"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids oversubscription on a shared 2-core box (10x faster under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encode(model, questions, with_image=True):
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    prefix = "<image>\n" if with_image else ""
    return [encoder.encode_prompt([{"role": "user", "content": prefix + q}], sample_id=f"q{i}",
                                  num_images=int(with_image)) for i, q in enumerate(questions)]


def count_tower_images(model) -> list[int]:
    """Wrap the tower's forward; the list collects the number of images per call."""
    calls: list[int] = []
    original = model.vision.forward

    def counted(pixel_values):
        calls.append(pixel_values.shape[0])
        return original(pixel_values)

    model.vision.forward = counted
    return calls


def test_greedy_batched_equals_one_by_one(make_model):
    """Left-padded batch with images + a text-only prompt == each prompt alone through VLM.generate(pixel_values)."""
    model = make_model(seed=3)
    prompts = encode(model, QUESTIONS) + encode(model, ["describe the image"], with_image=False)
    images = [Image.new("RGB", (32, 32), c) for c in COLOURS] + [None]
    assert len({len(p) for p in prompts}) == 4  # really different lengths, so left padding is exercised
    sampling = RolloutConfig(temperature=0, max_new_tokens=8)
    rollout = HFRolloutEngine(model).generate(prompts, images, group_size=2, sampling=sampling)
    for index, (prompt, image) in enumerate(zip(prompts, images)):
        ids = torch.tensor([prompt])
        pixels = None if image is None else model.pixel_values([image])
        alone = model.generate(ids, torch.ones_like(ids), pixel_values=pixels, max_new_tokens=8,
                               suppress_tokens=[model.image_token_id])[0].tolist()
        expected, _, _ = finish_completion(alone, model.tokenizer, {model.tokenizer.eos_token_id}, [])
        assert rollout.completion_ids[2 * index] == expected
        assert rollout.completion_ids[2 * index + 1] == expected  # greedy: both group members agree


def test_tower_runs_once_per_prompt_image(make_model):
    """3 image prompts × G=4: the tower sees exactly 3 images in one call; text-only prompts add none."""
    model = make_model()
    calls = count_tower_images(model)
    prompts = encode(model, QUESTIONS) + encode(model, ["hello"], with_image=False)
    images = [Image.new("RGB", (32, 32), c) for c in COLOURS] + [None]
    rollout = HFRolloutEngine(model).generate(prompts, images, group_size=4,
                                              sampling=RolloutConfig(temperature=1.0, max_new_tokens=4))
    assert calls == [3]
    assert len(rollout.completion_ids) == 16
    assert rollout.image_index == [0, 1, 2, None]
    assert rollout.image_features.shape[0] == 3 and rollout.image_embeds.shape[:2] == (3, model.tokens_per_image)


def test_finish_completion_eos_and_stop_strings(make_model):
    tokenizer = make_model().tokenizer
    eos = tokenizer.eos_token_id
    body = tokenizer("two people are standing", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" and a red circle", add_special_tokens=False)["input_ids"]
    kept, text, truncated = finish_completion(body + [eos] + tail, tokenizer, {eos}, [])
    assert kept == body + [eos] and text == "two people are standing" and not truncated
    # stop string inside the text: cut the text before it, keep tokens through the one that completes it
    kept, text, truncated = finish_completion(body + tail, tokenizer, {eos}, ["are"])
    assert text == "two people " and not truncated
    assert "are" in tokenizer.decode(kept) and "are" not in tokenizer.decode(kept[:-1])
    # earliest of several stop strings wins; no stop and no EOS means truncated
    assert finish_completion(body, tokenizer, {eos}, ["standing", "people"])[1] == "two "
    assert finish_completion(body, tokenizer, {eos}, ["circle"]) == (body, "two people are standing", True)


def test_generation_stops_at_stop_string(make_model):
    """Take a greedy completion's 3rd token as the stop string: the run ends there and masks the rest."""
    model = make_model(seed=5)
    prompts = encode(model, QUESTIONS[:1])
    images = [Image.new("RGB", (32, 32), COLOURS[0])]
    engine = HFRolloutEngine(model)
    free = engine.generate(prompts, images, 1, RolloutConfig(temperature=0, max_new_tokens=10))
    tokens = free.completion_ids[0]
    stop = model.tokenizer.decode(tokens[2:3])
    assert stop and stop not in model.tokenizer.decode(tokens[:2]), "pick another seed: stop not unique"
    stopped = engine.generate(prompts, images, 1, RolloutConfig(temperature=0, max_new_tokens=10, stop=[stop]))
    assert stopped.completion_ids[0] == tokens[:3]
    assert stopped.texts[0] == model.tokenizer.decode(tokens[:2]) and stopped.truncated == [False]


def rows_from(rollout, use_features: bool) -> list[Row]:
    images = rollout.image_features if use_features else rollout.image_embeds
    G = rollout.group_size
    return [Row(rollout.prompt_ids[i // G], ids, images[rollout.image_index[i // G]], 0.0)
            for i, ids in enumerate(rollout.completion_ids)]


def test_stored_tower_features_give_the_pixel_forward_and_its_projector_grad(make_model):
    """Loss pass on stored tower features == a full forward from pixels, logits and projector gradient alike."""
    model = make_model(seed=2)
    prompts = encode(model, QUESTIONS)
    images = [Image.new("RGB", (32, 32), c) for c in COLOURS]
    rollout = HFRolloutEngine(model).generate(prompts, images, 2, RolloutConfig(temperature=1.0, max_new_tokens=6))
    batch = collate_rows(rows_from(rollout, True), model.tokenizer.pad_token_id, "image_features")
    calls = count_tower_images(model)
    logps, _ = completion_logprobs(model, batch, temperature=1.0)
    logps.sum().backward()
    stored_grad = [p.grad.clone() for p in model.projector.parameters()]
    assert calls == []  # the loss pass never touched the tower
    model.zero_grad()
    pixels = model.pixel_values([images[i // 2] for i in range(6)])
    out = model(batch["input_ids"], batch["attention_mask"], pixel_values=pixels, position_ids=batch["position_ids"])
    labels = batch["input_ids"][:, batch["prompt_width"] - 1:].clone()
    labels[:, 1:][~batch["completion_mask"]] = -100
    labels[:, 0] = -100
    from vlpost.train.losses import token_logprobs

    direct, _ = token_logprobs(out.logits[:, batch["prompt_width"] - 1:], labels)
    direct.sum().backward()
    torch.testing.assert_close(logps, direct, rtol=1e-5, atol=1e-5)
    for got, want in zip(stored_grad, (p.grad for p in model.projector.parameters())):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_frozen_projector_reuses_projected_embeds(make_model):
    """With stored projected embeds the loss pass runs neither tower nor projector, and matches the feature path."""
    model = make_model(seed=2)
    rollout = HFRolloutEngine(model).generate(encode(model, QUESTIONS[:2]), [Image.new("RGB", (32, 32), c) for c in
                                              COLOURS[:2]], 2, RolloutConfig(temperature=1.0, max_new_tokens=5))
    with_embeds = collate_rows(rows_from(rollout, False), model.tokenizer.pad_token_id, "image_embeds")
    with_features = collate_rows(rows_from(rollout, True), model.tokenizer.pad_token_id, "image_features")
    projector_calls = []
    model.projector.register_forward_hook(lambda *args: projector_calls.append(1))
    assert torch.equal(_image_embeds(model, with_embeds), with_embeds["image_embeds"]) and not projector_calls
    with torch.no_grad():
        a, _ = completion_logprobs(model, with_embeds, 1.0)
        b, _ = completion_logprobs(model, with_features, 1.0)
    torch.testing.assert_close(a, b)


def test_loss_pass_reproduces_greedy_generation(make_model):
    """Alignment of the loss pass with generation: each greedy token is the argmax of the loss-pass logits."""
    model = make_model(seed=4)
    prompts = encode(model, QUESTIONS) + encode(model, ["describe the image"], with_image=False)
    images = [Image.new("RGB", (32, 32), c) for c in COLOURS] + [None]
    rollout = HFRolloutEngine(model).generate(prompts, images, 1, RolloutConfig(temperature=0, max_new_tokens=7))
    rows = [Row(rollout.prompt_ids[i], ids, None if rollout.image_index[i] is None else
                rollout.image_features[rollout.image_index[i]], 0.0) for i, ids in enumerate(rollout.completion_ids)]
    batch = collate_rows(rows, model.tokenizer.pad_token_id, "image_features")
    with torch.no_grad():
        _, logits = completion_logprobs(model, batch, temperature=1.0)
    for i, ids in enumerate(rollout.completion_ids):
        assert logits[i, :len(ids)].argmax(-1).tolist() == ids
