"""Rollouts: batched greedy == one-by-one, one tower pass per prompt, shared prefill == per-row prefill (and one
LM pass per prompt), stop strings, exact stored-feature loss pass."""

import dataclasses

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


def mixed_prompts(model):
    """3 image prompts of different lengths + 1 text-only prompt, and their images."""
    prompts = encode(model, QUESTIONS) + encode(model, ["describe the image"], with_image=False)
    return prompts, [Image.new("RGB", (32, 32), c) for c in COLOURS] + [None]


def both_ways(engine, prompts, images, group_size, sampling, seed=None):
    """The same rollout with shared prefill off and on (re-seeded alike when `seed` is given)."""
    out = []
    for shared in (False, True):
        if seed is not None:
            torch.manual_seed(seed)
        out.append(engine.generate(prompts, images, group_size, dataclasses.replace(sampling, shared_prefill=shared)))
    return out


@pytest.mark.parametrize("arch,template", [("llama", "chatml"), ("qwen2", "chatml"), ("llama", "llama3")])
def test_shared_prefill_greedy_equals_per_row_prefill(make_model, arch, template):
    """G=3, mixed lengths, images + text-only, text-only alone, chunked: token-identical to the per-row path."""
    model = make_model(arch=arch, template=template, seed=6)
    prompts, images = mixed_prompts(model)
    assert len({len(p) for p in prompts}) == 4
    engine = HFRolloutEngine(model)
    greedy = RolloutConfig(temperature=0, max_new_tokens=9)
    cases = [(prompts, images, greedy), (prompts[3:] + encode(model, QUESTIONS, with_image=False), [None] * 4, greedy),
             (prompts, images, dataclasses.replace(greedy, generation_batch_size=7))]  # 2 prompts (6 rows) a call
    for case_prompts, case_images, sampling in cases:
        per_row, shared = both_ways(engine, case_prompts, case_images, 3, sampling)
        assert shared.completion_ids == per_row.completion_ids
        assert shared.texts == per_row.texts and shared.truncated == per_row.truncated
        assert shared.image_index == per_row.image_index and shared.prompt_ids == per_row.prompt_ids
        assert len({tuple(ids) for ids in shared.completion_ids}) > 1  # the prompts really answer differently


def test_shared_prefill_through_lora_adapters(make_model):
    """A peft-wrapped LM (adapters that change the answers): the prefill runs through the adapters too."""
    from vlpost.config import FreezeConfig
    from vlpost.train.freeze import apply_freeze

    model = make_model(seed=6)
    prompts, images = mixed_prompts(model)
    engine, greedy = HFRolloutEngine(model), RolloutConfig(temperature=0, max_new_tokens=8)
    plain = engine.generate(prompts, images, 3, greedy)
    apply_freeze(model, FreezeConfig(lm="lora", projector="frozen", lora_r=4))
    torch.manual_seed(0)
    for name, param in model.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    per_row, shared = both_ways(engine, prompts, images, 3, greedy)
    assert shared.completion_ids == per_row.completion_ids != plain.completion_ids


def test_shared_prefill_one_token_prompts(make_model):
    """A 1-token prompt next to a long one (an all-pad prefill row) and a batch of 1-token prompts (per-row path)."""
    model = make_model(seed=1)
    engine = HFRolloutEngine(model)
    greedy = RolloutConfig(temperature=0, max_new_tokens=6)
    for prompts in ([[40], encode(model, ["hello"], with_image=False)[0]], [[40], [41]]):
        per_row, shared = both_ways(engine, prompts, [None] * len(prompts), 3, greedy)
        assert shared.completion_ids == per_row.completion_ids


def count_layer_tokens(model) -> list[tuple[int, int]]:
    """(batch, positions) of every call of the LM's first decoder layer."""
    calls: list[tuple[int, int]] = []
    layer = model.lm.model.layers[0]
    layer.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape[:2])))
    return calls


def test_shared_prefill_runs_the_lm_over_each_prompt_once(make_model):
    """N=4 prompts × G=3: the LM sees N × (width - 1) prompt positions once, then only 1-token steps of N*G rows;
    the per-row path prefills N*G × width."""
    model = make_model(seed=2)
    prompts, images = mixed_prompts(model)
    width, n, G = max(len(p) for p in prompts), len(prompts), 3
    engine = HFRolloutEngine(model)
    calls = count_layer_tokens(model)
    engine.generate(prompts, images, G, RolloutConfig(temperature=1.0, max_new_tokens=5))
    assert calls[0] == (n, width - 1)  # the shared prefill: every prompt once, all but its last token
    assert calls[1:] and all(call == (n * G, 1) for call in calls[1:])  # last prompt token, then decoding
    calls.clear()
    engine.generate(prompts, images, G, RolloutConfig(temperature=1.0, max_new_tokens=5, shared_prefill=False))
    assert calls[0] == (n * G, width) and all(call == (n * G, 1) for call in calls[1:])


def test_shared_prefill_sampled_rollouts_are_valid(make_model):
    """Sampling with a fixed seed: valid lengths, truncation flags and texts, and the very rollout of the per-row
    path (same logits, same row order, so the same draws)."""
    model = make_model(seed=3)
    prompts, images = mixed_prompts(model)
    engine = HFRolloutEngine(model)
    tokenizer, eos = model.tokenizer, model.tokenizer.eos_token_id
    for sampling in (RolloutConfig(temperature=1.0, max_new_tokens=8),
                     RolloutConfig(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, stop=["e"])):
        per_row, shared = both_ways(engine, prompts, images, 3, sampling, seed=11)
        assert len(shared.completion_ids) == len(shared.texts) == len(shared.truncated) == 12
        assert shared.group_size == 3 and shared.image_index == [0, 1, 2, None]
        for ids, text, truncated in zip(shared.completion_ids, shared.texts, shared.truncated):
            assert 1 <= len(ids) <= sampling.max_new_tokens and model.image_token_id not in ids
            if truncated:
                assert len(ids) == sampling.max_new_tokens and eos not in ids
            assert finish_completion(ids, tokenizer, {eos}, sampling.stop)[1:] == (text, truncated)
            assert not any(stop in text for stop in sampling.stop)
        assert shared.completion_ids == per_row.completion_ids


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
    from vlpost.train.logprobs import token_logprobs

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


def test_eval_items_come_from_the_named_held_out_shards_not_the_training_prompts(tmp_path):
    """GRPO's before/after prompts: the first ones of each eval_shards folder (split evenly); without eval_shards
    the first training prompts, labelled as such (they are not held out)."""
    from vlpost.cli import main as vlpost
    from vlpost.config import DataConfig
    from vlpost.train.rollout_scoring import eval_items

    for name, args in (("train", ["--kind", "prompt"]), ("vqa", ["--kind", "vqa", "--split", "eval"]),
                       ("safety", ["--kind", "safety", "--split", "eval"])):
        assert vlpost(["prepare", "synthetic", "--out", str(tmp_path / name), "--num", "6", *args]) == 0
    data = DataConfig(shards=str(tmp_path / "train"))
    ids = lambda items: [sample["meta"]["id"] for sample, _ in items]  # noqa: E731
    items, source = eval_items(data, 5, [str(tmp_path / "vqa"), str(tmp_path / "safety")])
    assert ids(items) == [f"syn-vqa-eval-{i:07d}" for i in range(3)] + [f"syn-safety-eval-{i:07d}" for i in range(2)]
    assert source.startswith("held-out shards")
    items, source = eval_items(data, 3)
    assert ids(items) == [f"syn-prompt-train-{i:07d}" for i in range(3)] and source == "training shards"
    assert eval_items(data, 0, [str(tmp_path / "vqa")]) == ([], "none")
