"""Gradient accumulation is exact: batch 1 × accumulation 8 == batch 8 × accumulation 1 (== 2 × 4).

The samples have different numbers of assistant tokens, so averaging per micro-batch (instead of over all
tokens of the optimizer step) would give different gradients; clipping acts on the accumulated gradient. The same
holds for the per-sample mean (`train.loss_reduction: sample`): its normaliser is the step's sample count.
"""

import pytest
import torch
from PIL import Image

from vlpost.config import FreezeConfig, TrainConfig
from vlpost.data.chat import ChatEncoder
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource
from vlpost.train.freeze import apply_freeze
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.trainer import Trainer

ANSWERS = ["red", "a small green circle next to a large blue square", "two", "the person on the left wears a hat"]


def items(n: int) -> list:
    out = []
    for i in range(n):
        has_image = i % 4 != 3  # every fourth sample is text-only
        sample = {"kind": "sft", "meta": {"id": f"a{i}"}, "messages": [
            {"role": "user", "content": ("<image>\n" if has_image else "") + "What do you see?"},
            {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]}
        out.append((sample, Image.new("RGB", (32, 32), (20 * i % 255, 120, 60)) if has_image else None))
    return out


def train(make_model, tmp_path, batch_size: int, grad_accum: int,
          reduction: str = "token") -> tuple[Trainer, torch.nn.Module]:
    model = make_model(seed=0)
    apply_freeze(model, FreezeConfig(lm="full"))
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    stream = BatchStream(ListSource(items(24), seed=0, loop=True), ExampleEncoder(encoder, model.image_transform),
                         batch_size=batch_size, pad_id=model.tokenizer.pad_token_id)
    cfg = TrainConfig(steps=3, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup_ratio=0.0,
                      max_grad_norm=1.0, log_every=1, save_every=0, report_to="none")
    trainer = Trainer(model, stream, SFTObjective(reduction), cfg, tmp_path / f"{reduction}-b{batch_size}a{grad_accum}")
    trainer.fit()
    return trainer, model


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_batch_1_accum_8_equals_batch_8_accum_1(make_model, tmp_path, reduction):
    runs = [train(make_model, tmp_path, b, a, reduction) for b, a in ((8, 1), (1, 8), (2, 4))]
    (reference, ref_model), others = runs[0], runs[1:]
    assert reference.history[0]["grad_norm"] > 1.0  # clipping is active, so it must act on the whole step
    for trainer, model in others:
        assert [h["units"] for h in trainer.history] == [h["units"] for h in reference.history]
        for key in ("loss", "grad_norm"):  # Adam hides a uniform gradient scale error; the norm does not
            assert [h[key] for h in trainer.history] == pytest.approx([h[key] for h in reference.history],
                                                                       abs=1e-5, rel=0), key
        for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
            # float noise of other micro-batch shapes, amplified by Adam over 3 steps at lr 1e-2, reaches ~1.2e-5;
            # a per-micro-batch averaging error moves parameters by ~lr
            assert torch.allclose(a, b, atol=5e-5, rtol=0), name
