"""Resumed == uninterrupted: N steps, a checkpoint, a fresh process-like restart, N more steps give the same
losses and parameters as 2N steps in one go (weights, optimizer, scheduler, RNG and data position restored)."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlpost.config import FreezeConfig, TrainConfig
from vlpost.data.chat import ChatEncoder
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource
from vlpost.train import checkpointing
from vlpost.train.freeze import apply_freeze
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.trainer import Trainer, TrainingStopped

ANSWERS = ["red", "a small green circle", "blue", "two shapes: a square and a circle", "no", "the left one"]


def items(n: int) -> list:
    """Varied answer lengths, some text-only samples, images that differ per sample."""
    out = []
    for i in range(n):
        has_image = i % 3 != 2
        question = ("<image>\n" if has_image else "") + f"Question {i}: what is shown?"
        sample = {"kind": "sft", "meta": {"id": f"s{i}"}, "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]}
        image = Image.new("RGB", (32, 32), (40 * i % 255, 90, 200 - 10 * i)) if has_image else None
        out.append((sample, image))
    return out


def stream(model, batch_size: int = 2) -> BatchStream:
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    source = ListSource(items(10), seed=3, shuffle=True, loop=True)  # 5 batches per epoch: resume crosses epochs
    return BatchStream(source, ExampleEncoder(encoder, model.image_transform), batch_size=batch_size,
                       pad_id=model.tokenizer.pad_token_id)


class NoisyObjective(SFTObjective):
    """SFT loss scaled by draws from torch, numpy and python RNGs: equal losses need restored RNG states."""

    def __call__(self, model, batch):
        loss, metrics = super().__call__(model, batch)
        scale = 1.0 + 0.1 * float(torch.rand(())) + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        return loss * scale, metrics


class StopAt:
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.step == self.step:
            trainer.request_stop("test")


def config(**overrides) -> TrainConfig:
    base = dict(steps=6, batch_size=2, grad_accum=2, lr=5e-3, warmup_ratio=0.34, schedule="cosine",
                log_every=1, save_every=3, keep_last=2, report_to="none")
    return TrainConfig(**{**base, **overrides})


def trained(make_model, out, **kwargs) -> tuple[Trainer, torch.nn.Module]:
    model = make_model(seed=0)
    apply_freeze(model, FreezeConfig(lm="full"))
    trainer = Trainer(model, stream(model), NoisyObjective(), config(), out, **kwargs)
    return trainer, model


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resumed_run_equals_uninterrupted(make_model, tmp_path):
    seed_all(11)
    uninterrupted, model_c = trained(make_model, tmp_path / "c")
    uninterrupted.fit()

    seed_all(11)
    first, _ = trained(make_model, tmp_path / "r", callbacks=[StopAt(3)])
    with pytest.raises(TrainingStopped) as stopped:
        first.fit()
    assert stopped.value.code == 0 and stopped.value.step == 3
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "r")] == ["step-3"]

    seed_all(999)  # a different process state: everything that matters must come from the checkpoint
    resumed, model_r = trained(make_model, tmp_path / "r", resume_from="latest")
    resumed.fit()

    assert resumed.step == uninterrupted.step == 6
    losses_c = [h["loss"] for h in uninterrupted.history]
    losses_r = [h["loss"] for h in resumed.history]
    assert losses_r == pytest.approx(losses_c, abs=1e-6, rel=0)
    for (name, a), b in zip(model_c.named_parameters(), model_r.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    rows = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]  # no step logged twice


def test_keep_last_and_latest(make_model, tmp_path):
    model = make_model(seed=0)
    apply_freeze(model, FreezeConfig(lm="frozen"))
    cfg = config(steps=5, save_every=1, keep_last=2, grad_accum=1)
    trainer = Trainer(model, stream(model), SFTObjective(), cfg, tmp_path)
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-3", "step-4"]  # the last step is the final model (finish_run), not a checkpoint
    latest = checkpointing.resolve_resume(tmp_path, "latest")
    assert latest.name == "step-4"
    saved = checkpointing.load_file(str(latest / checkpointing.WEIGHTS_FILE))
    assert sorted(saved) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(k.startswith("projector.") for k in saved)  # only what trains is stored
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpointing.resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-9"))
