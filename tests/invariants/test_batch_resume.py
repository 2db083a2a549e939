"""BatchStream resumes exactly in every mode: the batches after a restore equal the uninterrupted ones."""

import pytest
import torch

from vlpost.data.chat import SampleError
from vlpost.data.collate import Example
from vlpost.data.pipeline import BatchStream, ListSource


def items(n: int) -> list:
    return [({"kind": "sft", "meta": {"id": str(i)}, "length": 3 + (i * 7) % 23}, None) for i in range(n)]


def encode(sample, image) -> Example:
    if sample["meta"]["id"] == "13":
        raise SampleError("13", "too long", "test skip")
    n = sample["length"]
    return Example(sample["meta"]["id"], [int(sample["meta"]["id"]) + 1] * n, [1] * n)


def stream(mode: str, loop: bool = True) -> BatchStream:
    options = {"plain": {}, "grouped": {"group_by_length": True, "buffer_size": 16},
               "packed": {"packing": True, "buffer_size": 16, "max_length": 40}}[mode]
    return BatchStream(ListSource(items(50), seed=3, loop=loop), encode, batch_size=4, pad_id=0, **options)


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "attention_mask"))


@pytest.mark.parametrize("mode", ["plain", "grouped", "packed"])
@pytest.mark.parametrize("cut", [1, 3, 7, 20])
def test_resume_equals_uninterrupted(mode, cut):
    reference = take(iter(stream(mode)), cut + 10)
    first = stream(mode)
    iterator = iter(first)
    take(iterator, cut)
    state = first.state_dict()
    resumed = stream(mode)
    resumed.load_state_dict(state)
    after = take(iter(resumed), 10)
    assert all(same(a, b) for a, b in zip(after, reference[cut:]))


def test_every_sample_once_per_epoch_and_skips_counted():
    seen = []
    batches = stream("packed", loop=False)
    for batch in batches:
        seen += [int(t) - 1 for t in batch["input_ids"].unique().tolist() if t != 0]
    assert sorted(seen) == [i for i in range(50) if i != 13]
    assert batches.skipped == {"too long": 1}


def test_grouped_batches_are_length_sorted():
    batches = take(iter(stream("grouped")), 4)
    for batch in batches:
        lengths = batch["attention_mask"].sum(1).tolist()
        assert lengths == sorted(lengths, reverse=True)
