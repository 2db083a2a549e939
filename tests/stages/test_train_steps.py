"""What each stage trains: stage 1 moves only the projector, stage 2 the projector and LM; the tower never."""

import random

import pytest
import torch
from PIL import Image

from vlpost.config import FreezeConfig, TrainConfig
from vlpost.data.chat import ChatEncoder
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource
from vlpost.train.freeze import apply_freeze
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.trainer import Trainer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def colour_items(n: int, seed: int = 0) -> list:
    """Solid-colour images; the answer is the colour, so it can only be learned by looking."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        sample = {"kind": "sft", "meta": {"id": f"c{i}"}, "messages": [
            {"role": "user", "content": "<image>\nWhat colour is the circle?"},
            {"role": "assistant", "content": name}]}
        items.append((sample, Image.new("RGB", (32, 32), COLOURS[name])))
    return items


def batches(model, items, batch_size=4, loop=True):
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    return BatchStream(ListSource(items, loop=loop), ExampleEncoder(encoder, model.image_transform),
                       batch_size=batch_size, pad_id=model.tokenizer.pad_token_id)


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module) -> bool:
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("stage,lm_mode", [("align", "frozen"), ("sft", "full")])
def test_stage_trains_the_right_modules(make_model, tmp_path, stage, lm_mode):
    model = make_model()
    apply_freeze(model, FreezeConfig(lm=lm_mode, projector="train"))
    tower, lm, projector = snapshot(model.vision), snapshot(model.lm), snapshot(model.projector)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_ratio=0.0, log_every=1)
    Trainer(model, batches(model, colour_items(16)), SFTObjective(), cfg, tmp_path, stage=stage).fit()
    assert not changed(tower, model.vision)
    assert all(p.grad is None for p in model.vision.parameters())
    assert changed(projector, model.projector)
    assert changed(lm, model.lm) == (lm_mode == "full")
    if lm_mode == "frozen":
        assert all(p.grad is None and not p.requires_grad for p in model.lm.parameters())


def test_loss_goes_down_over_50_steps(make_model, tmp_path):
    """A real learning check: SFT on colour questions gets clearly better than its start."""
    model = make_model(seed=1)
    apply_freeze(model, FreezeConfig(lm="full"))
    cfg = TrainConfig(steps=50, batch_size=8, lr=3e-3, warmup_ratio=0.1, log_every=10)
    trainer = Trainer(model, batches(model, colour_items(64), batch_size=8), SFTObjective(), cfg, tmp_path)
    trainer.fit()
    first = sum(h["loss"] for h in trainer.history[:5]) / 5
    last = sum(h["loss"] for h in trainer.history[-5:]) / 5
    assert last < 0.5 * first, (first, last)
