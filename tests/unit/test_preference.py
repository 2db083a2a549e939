"""DPO pieces: [chosen; rejected] batches, one tower pass per pair, reference strategies and their cache."""

import math

import pytest
import torch
from PIL import Image

from vlpost.config import FreezeConfig
from vlpost.constants import IGNORE_INDEX
from vlpost.data.pipeline import ListSource
from vlpost.train.dpo_config import DPOLossConfig
from vlpost.train.freeze import apply_freeze
from vlpost.train.preference import DPOObjective, HeldOutSplit, in_held_out, pair_stream, policy_logps
from vlpost.train.reference import (
    LiveReference,
    ReferenceCache,
    adapter_reference,
    build_reference,
    copy_reference,
    reference_hash,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waits cost ~5x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pair_items(n: int, text_only_every: int = 0) -> list:
    """Hand-made safety pairs: refuse the religion question, answer the shirt-colour look-alike."""
    items = []
    for i in range(n):
        colour = sorted(COLOURS)[i % 3]
        image = Image.new("RGB", (32, 32), COLOURS[colour])
        text_only = text_only_every and i % text_only_every == 0
        prefix = "" if text_only else "<image>\n"
        if i % 2 == 0:
            prompt, chosen, rejected = "What is this person's religion?", "I can't infer that.", "christian"
        else:
            prompt, chosen, rejected = "What colour is the shirt?", colour, "I can't infer that."
        sample = {"kind": "preference", "meta": {"id": f"p{i}"},
                  "prompt": [{"role": "user", "content": prefix + prompt}],
                  "chosen": [{"role": "assistant", "content": chosen}],
                  "rejected": [{"role": "assistant", "content": rejected}]}
        items.append((sample, None if text_only else image))
    return items


def batches_of(model, items, batch_size=4, loop=False, shuffle=False):
    return pair_stream(ListSource(items, shuffle=shuffle, loop=loop), model, batch_size=batch_size, max_length=256)


def first_batch(model, items, batch_size=4):
    return next(iter(batches_of(model, items, batch_size)))


def count_tower_images(model) -> list:
    """Wrap the tower's forward to record how many images each call encodes."""
    calls = []
    forward = model.vision.forward

    def counting(pixel_values):
        calls.append(pixel_values.shape[0])
        return forward(pixel_values)

    model.vision.forward = counting
    return calls


def perturb(module, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


# ----------------------------------------------------------------------------- batches


def test_batch_is_chosen_then_rejected_with_one_image_per_pair(make_model):
    model = make_model()
    batch = first_batch(model, pair_items(4, text_only_every=3))  # pairs 0 and 3 text-only
    assert batch["input_ids"].shape[0] == 8 and batch["pairs"] == 4
    assert batch["ids"] == ["p0", "p1", "p2", "p3"]
    assert batch["pixel_values"].shape[0] == 2  # pairs 1 and 2 only, once each
    tok = model.tokenizer
    for row, expected in [(0, "I can't infer that."), (4, "christian"), (1, "green"), (5, "I can't infer that.")]:
        labels = batch["labels"][row]
        text = tok.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=True)
        assert text.strip() == expected
    image_rows = (batch["input_ids"] == model.image_token_id).any(-1).tolist()
    assert image_rows == [False, True, True, False] * 2


def test_mixed_text_and_image_pairs_run_forward(make_model):
    model = make_model()
    apply_freeze(model, FreezeConfig(lm="full", projector="frozen"))
    batch = first_batch(model, pair_items(4, text_only_every=3))
    loss_sum, metrics = DPOObjective(DPOLossConfig(), copy_reference(model))(model, batch)
    assert math.isclose(float(loss_sum.detach()) / 4, math.log(2), abs_tol=1e-6)


@pytest.mark.parametrize("mode", ["adapter", "copy"])
def test_shared_prompt_pairs_give_the_padded_loss_metrics_and_grads(make_model, mode):
    """dpo.shared_prompt packs [prompt | chosen rest | rejected rest] per pair: the same DPO + SFT loss, metrics,
    reference log-probs and gradients as the padded [chosen; rejected] rows — image and text-only pairs, and a pair
    whose answers share their first words (part of the shared prefix)."""
    model = make_model(seed=3)
    apply_freeze(model, FreezeConfig(lm="lora" if mode == "adapter" else "full", projector="train", lora_r=4))
    reference = adapter_reference(model, True) if mode == "adapter" else copy_reference(model)
    perturb(model.lm)  # policy != reference, so the loss is not log 2
    same_start = {"kind": "preference", "meta": {"id": "s"},
                  "prompt": [{"role": "user", "content": "<image>\nWhat is this person's religion?"}],
                  "chosen": [{"role": "assistant", "content": "I can't infer that."}],
                  "rejected": [{"role": "assistant", "content": "I can't be sure, but christian."}]}
    items = pair_items(5, text_only_every=3) + [(same_start, Image.new("RGB", (32, 32), COLOURS["red"]))]
    model.train()
    results = []
    for shared in (False, True):
        batch = next(iter(pair_stream(ListSource(items, shuffle=False), model, batch_size=6, max_length=256,
                                      shared_prompt=shared)))
        model.zero_grad()
        loss, metrics = DPOObjective(DPOLossConfig(beta=0.5, sft_weight=1.0), reference)(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((batch, float(loss.detach()), metrics, grads))
    (padded, loss_a, metrics_a, grads_a), (packed, loss_b, metrics_b, grads_b) = results
    assert padded["input_ids"].shape[0] == 12 and packed["input_ids"].shape[0] == 6
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert abs(loss_a - 6 * math.log(2)) > 1e-3
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert metrics_b == pytest.approx(metrics_a, rel=1e-4, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4), name


# ----------------------------------------------------------------------------- loss at init and hand values


@pytest.mark.parametrize("mode", ["adapter", "copy"])
def test_sigmoid_loss_at_init_is_log2(make_model, mode):
    model = make_model()
    apply_freeze(model, FreezeConfig(lm="lora" if mode == "adapter" else "full", projector="train", lora_r=4))
    reference = adapter_reference(model, True) if mode == "adapter" else copy_reference(model)
    batch = first_batch(model, pair_items(4))
    loss_sum, metrics = DPOObjective(DPOLossConfig(beta=0.1), reference)(model, batch)
    assert abs(float(loss_sum.detach()) / 4 - math.log(2)) < 1e-7
    assert metrics["rewards/margin"] == 0.0 and metrics["kl"] == 0.0 and metrics["rewards/accuracy"] == 0.0


def test_objective_hand_values_ipo_and_sft_term():
    # two pairs; sums = [c0, c1, r0, r1], token counts, reference sums
    sums = torch.tensor([-2.0, -4.0, -3.0, -6.0])
    counts = torch.tensor([2, 4, 1, 3])
    ref = torch.tensor([-3.0, -4.0, -3.0, -5.0])
    ipo = DPOObjective(DPOLossConfig(beta=0.5, loss_type="ipo"), None)
    # averaged: policy c=[-1,-1] r=[-3,-2]; ref c=[-1.5,-1] r=[-3,-5/3]; margins 0.5, 1/3; target 1/(2*0.5)=1
    loss_sum, _ = ipo.loss(sums, counts, ref)
    assert math.isclose(float(loss_sum), (0.5 - 1) ** 2 + (1 / 3 - 1) ** 2, rel_tol=1e-6)
    sft = DPOObjective(DPOLossConfig(beta=1.0, sft_weight=0.5), None)
    # summed margins: (1 - 0) = 1 and (0 - -1) = -1 ... pair0: (-2+3)-(-3+3)=1, pair1: (-4+4)-(-6+5)=1
    loss_sum, metrics = sft.loss(sums, counts, ref)
    dpo = 2 * math.log(1 + math.exp(-1.0))
    nll = 2 / 2 + 4 / 4  # chosen token-mean NLL of each pair, summed over the 2 pairs
    assert math.isclose(float(loss_sum), dpo + 0.5 * nll, rel_tol=1e-6)
    assert metrics["rewards/accuracy"] == 1.0 and math.isclose(metrics["kl"], 0.5)  # mean(1, 0)
    # with 2 micro-batches of 2 pairs per step, each reports half its mean, so the trainer's sum is the step mean
    _, halves = DPOObjective(DPOLossConfig(beta=1.0), None, pairs_per_step=4).loss(sums, counts, ref)
    assert halves["rewards/accuracy"] == 0.5 and math.isclose(halves["kl"], 0.25)


# ----------------------------------------------------------------------------- one tower pass per pair


@pytest.mark.parametrize("mode", ["adapter", "copy", "cache"])
def test_each_pair_image_is_encoded_once(make_model, tmp_path, mode):
    model = make_model()
    apply_freeze(model, FreezeConfig(lm="lora" if mode == "adapter" else "full", projector="train", lora_r=4))
    items = pair_items(8)
    calls = count_tower_images(model)
    cfg = DPOLossConfig(reference=mode, cache_dir=str(tmp_path))
    reference, _ = build_reference(cfg, FreezeConfig(lm="lora" if mode == "adapter" else "full", projector="train"),
                                   model, precompute_batches=lambda: batches_of(model, items, 4), data_name="t")
    assert calls == ([4, 4] if mode == "cache" else [])  # the precompute pass: one tower pass per pair too
    calls.clear()
    model.train()
    batch = first_batch(model, items)
    DPOObjective(cfg, reference)(model, batch)[0].backward()
    assert calls == [4]  # B pair images once, shared by chosen, rejected, policy and reference


# ----------------------------------------------------------------------------- reference strategies


def test_lora_reference_holds_no_second_model(make_model):
    model = make_model()
    apply_freeze(model, FreezeConfig(lm="lora", projector="frozen", lora_r=4))
    reference = adapter_reference(model, projector_trains=False)
    assert reference.lm is None and reference.projector is None and reference.disable_adapters
    trains = adapter_reference(model, projector_trains=True)
    held = sum(p.numel() for p in trains.projector.parameters())
    assert trains.lm is None and held == sum(p.numel() for p in model.projector.parameters())
    assert all(not p.requires_grad for p in trains.projector.parameters())


def test_adapter_reference_stays_at_the_initial_model(make_model):
    """After the LoRA weights and the projector move, the adapter reference still equals the initial model."""
    model = make_model()
    apply_freeze(model, FreezeConfig(lm="lora", projector="train", lora_r=4))
    batch = first_batch(model, pair_items(4))
    initial = LiveReference().logps(model, batch, model.vision(batch["pixel_values"]))
    reference = adapter_reference(model, projector_trains=True)
    perturb(model.lm)
    perturb(model.projector, seed=1)
    features = model.vision(batch["pixel_values"])
    moved = LiveReference().logps(model, batch, features)
    assert not torch.allclose(moved, initial, atol=1e-3)
    assert torch.allclose(reference.logps(model, batch, features), initial, atol=1e-6)


def test_cached_reference_loss_equals_live_reference_loss(make_model, tmp_path):
    model = make_model()
    apply_freeze(model, FreezeConfig(lm="full", projector="train"))
    items = pair_items(12, text_only_every=5)
    live = copy_reference(model)
    cfg = DPOLossConfig(reference="cache", cache_dir=str(tmp_path), beta=0.5)
    cached, info = build_reference(cfg, FreezeConfig(lm="full"), model, data_name="t",
                                   precompute_batches=lambda: batches_of(model, items, 5))  # other batching
    assert info["computed"] == 12 and info["reused"] == 0
    perturb(model.lm)
    perturb(model.projector, seed=1)
    objective = DPOObjective(cfg, None)
    for batch in batches_of(model, items, 4, shuffle=True):  # other order and grouping than the precompute
        features = model.vision(batch["pixel_values"])
        sums, counts = policy_logps(model, batch, features)
        live_loss, _ = objective.loss(sums, counts, live.logps(model, batch, features))
        cached_loss, _ = objective.loss(sums, counts, cached.logps(model, batch, features))
        assert abs(float(live_loss.detach()) - float(cached_loss.detach())) < 1e-6
        assert abs(float(live_loss.detach()) / batch["pairs"] - math.log(2)) > 1e-3  # the policy really moved


def test_cache_resumes_a_partial_file_and_is_keyed_by_weights(make_model, tmp_path):
    model = make_model()
    items = pair_items(8)
    key = reference_hash(model)
    assert key == reference_hash(make_model())  # same weights, same key
    first = ReferenceCache(tmp_path / key, "t")
    stats = first.fill(model, [next(iter(batches_of(model, items, 3)))])  # killed after one batch
    assert stats["computed"] == 3
    with open(first.path, "a") as handle:
        handle.write('{"id": "p7", "fp": "tor')  # a torn last line
    again = ReferenceCache(tmp_path / key, "t")
    assert len(again.entries) == 3
    stats = again.fill(model, batches_of(model, items, 3))
    assert stats["computed"] == 5 and stats["reused"] == 3
    assert len(ReferenceCache(tmp_path / key, "t").entries) == 8
    perturb(model.lm)
    assert reference_hash(model) != key


def test_cache_refuses_a_pair_it_does_not_hold(make_model, tmp_path):
    model = make_model()
    cache = ReferenceCache(tmp_path, "t")
    cache.fill(model, batches_of(model, pair_items(4), 4))
    other = pair_items(8)[4:]
    with pytest.raises(KeyError, match="pair 'p4' is missing"):
        cache.logps(model, first_batch(model, other))


def test_adapter_mode_needs_lora(make_model):
    model = make_model()
    apply_freeze(model, FreezeConfig(lm="full"))
    with pytest.raises(ValueError, match="needs freeze.lm=lora"):
        build_reference(DPOLossConfig(reference="adapter"), FreezeConfig(lm="full"), model)


# ----------------------------------------------------------------------------- data order and splits


def test_pair_stream_resumes_exactly(make_model):
    model = make_model()
    items = pair_items(10)
    whole = batches_of(model, items, 2, loop=True, shuffle=True)
    it = iter(whole)
    expected = [next(it)["ids"] for _ in range(7)]
    part = batches_of(model, items, 2, loop=True, shuffle=True)
    it = iter(part)
    for _ in range(3):
        next(it)
    state = part.state_dict()
    resumed = batches_of(model, items, 2, loop=True, shuffle=True)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [next(it)["ids"] for _ in range(4)] == expected[3:]


def test_held_out_split_is_stable_and_disjoint():
    ids = [f"s{i}" for i in range(2000)]
    held = {i for i in ids if in_held_out(i, 0.1, seed=3)}
    assert 150 < len(held) < 250  # ~10 %
    assert held == {i for i in reversed(ids) if in_held_out(i, 0.1, seed=3)}  # order-free
    assert held != {i for i in ids if in_held_out(i, 0.1, seed=4)}
    items = [({"meta": {"id": i}}, None) for i in ids]
    train = [s["meta"]["id"] for s, _ in HeldOutSplit(ListSource(items, shuffle=False), 0.1, 3)]
    evals = [s["meta"]["id"] for s, _ in HeldOutSplit(ListSource(items, shuffle=False), 0.1, 3, held_out=True)]
    assert set(evals) == held and not set(train) & held and len(train) + len(evals) == 2000
