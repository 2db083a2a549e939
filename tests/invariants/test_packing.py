"""Packing is exact: several samples in one row give the same loss and logits as one sample per row."""

import pytest
import torch

from vlpost.data.chat import ChatEncoder
from vlpost.data.collate import Example, pack_rows, packed_batch, pad_batch, padding_waste, shared_prefix_mask
from vlpost.train.logprobs import label_positions, loss_weights, selected_nll_sum, sft_nll_sum

QUESTIONS = [
    ("<image>\nWhat colour is the circle?", "red"),
    ("How many shapes are there?", "three shapes on a white background"),
    ("<image>\nWho holds a cup?", "the person on the left"),
    ("Is there a hat?\n<image>", "yes"),
    ("Describe the scene.", "a blue square and a green circle, both small"),
]


def examples(model) -> list[Example]:
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    out = []
    for i, (question, answer) in enumerate(QUESTIONS):
        n = question.count("<image>")
        enc = encoder.encode([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                             sample_id=str(i), num_images=n)
        pixels = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(i)) if n else None
        out.append(Example(str(i), enc.input_ids, enc.labels, pixels))
    return out


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "position_ids") if k in batch}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(make_model, attn):
    model = make_model(attn=attn).eval()
    exs = examples(model)
    pad_id = model.tokenizer.pad_token_id
    unpacked = pad_batch(exs, pad_id)
    loss_u, count_u = sft_nll_sum(model(**model_inputs(unpacked)).logits, unpacked["labels"])
    rows = pack_rows(exs, max_length=max(len(e) for e in exs) * 2)
    assert len(rows) < len(exs)  # really packed
    packed = packed_batch(rows, pad_id)
    loss_p, count_p = sft_nll_sum(model(**model_inputs(packed)).logits, packed["labels"])
    assert int(count_u) == int(count_p)
    assert abs(float(loss_u) - float(loss_p)) < 1e-5 * max(1.0, abs(float(loss_u)))


@pytest.mark.parametrize("reduction", ["sample", "square"])
def test_per_sample_reductions_are_the_same_packed(make_model, reduction):
    """Per-sample loss weights find the samples inside packed rows: packed == one sample per row."""
    model = make_model().eval()
    exs = examples(model)
    pad_id = model.tokenizer.pad_token_id
    losses = []
    for batch in (pad_batch(exs, pad_id), packed_batch(pack_rows(exs, max_length=max(len(e) for e in exs) * 2), pad_id)):
        weights, normaliser = loss_weights(batch["labels"], batch.get("position_ids"), reduction)
        _, targets = label_positions(batch["labels"])
        logits = model(**model_inputs(batch)).logits[label_positions(batch["labels"])[0]]
        losses.append((float(selected_nll_sum(logits, targets, weights=weights)), normaliser))
    (loss_u, norm_u), (loss_p, norm_p) = losses
    assert norm_u == pytest.approx(norm_p) and (reduction != "sample" or norm_u == len(exs))
    assert loss_u == pytest.approx(loss_p, rel=1e-5)


def test_packed_logits_match_per_sample(make_model):
    model = make_model().eval()
    exs = examples(model)
    rows = pack_rows(exs, max_length=sum(len(e) for e in exs))
    assert len(rows) == 1
    packed = packed_batch(rows, model.tokenizer.pad_token_id)
    logits = model(**model_inputs(packed)).logits[0]
    start = 0
    for ex in rows[0]:
        alone = pad_batch([ex], model.tokenizer.pad_token_id)
        single = model(**model_inputs(alone)).logits[0]
        assert torch.allclose(logits[start:start + len(ex)], single, atol=1e-5), ex.id
        start += len(ex)


def test_without_block_mask_samples_would_leak(make_model):
    """The control: restarting position_ids alone (2D mask) changes the later samples' logits."""
    model = make_model().eval()
    exs = examples(model)
    rows = pack_rows(exs, max_length=sum(len(e) for e in exs))
    packed = packed_batch(rows, model.tokenizer.pad_token_id)
    leaky = dict(model_inputs(packed), attention_mask=torch.ones_like(packed["input_ids"]))
    second = rows[0][1]
    first_len = len(rows[0][0])
    alone = model(**model_inputs(pad_batch([second], model.tokenizer.pad_token_id))).logits[0]
    mixed = model(**leaky).logits[0, first_len:first_len + len(second)]
    assert not torch.allclose(mixed, alone, atol=1e-3)


def test_padding_waste_drops_with_packing():
    exs = [Example(str(i), [1] * n, [1] * n) for i, n in enumerate([10, 90, 15, 85, 50, 50])]
    padded = pad_batch(exs, 0)
    assert padding_waste([padded]) == pytest.approx(1 - 300 / 540)
    packed = packed_batch(pack_rows(exs, 100), 0)
    assert padding_waste([packed]) == pytest.approx(0.0)


def test_shared_prefix_mask_by_hand():
    """Row [p p | a a | b | pad]: answers see the prefix and themselves (causally), never each other; padding sees
    only itself."""
    allowed = shared_prefix_mask(torch.tensor([[-1, -1, 0, 0, 1, -2]]))[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
