"""Gradient checkpointing of the LM changes memory, not maths: with the LM (and its embeddings) frozen in
stage 1, gradients still reach the projector, and training gives the same parameters as without it."""

import pytest
import torch
from PIL import Image

from vlpost.config import FreezeConfig, TrainConfig
from vlpost.data.chat import ChatEncoder
from vlpost.data.collate import pad_batch
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource
from vlpost.train.freeze import apply_freeze, enable_gradient_checkpointing
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.trainer import Trainer


def items(n: int = 8) -> list:
    out = []
    for i in range(n):
        sample = {"kind": "caption", "meta": {"id": f"g{i}"}, "messages": [
            {"role": "user", "content": "<image>\nDescribe the image."},
            {"role": "assistant", "content": ["a red square", "a blue circle and a hat"][i % 2]}]}
        out.append((sample, Image.new("RGB", (32, 32), (30 * i, 200 - 20 * i, 90))))
    return out


def batch_of(model, n: int = 4) -> dict:
    encoder = ExampleEncoder(ChatEncoder(model.tokenizer, model.tokens_per_image), model.image_transform)
    return pad_batch([encoder(sample, image) for sample, image in items(n)], model.tokenizer.pad_token_id)


@pytest.mark.parametrize("lm_mode", ["frozen", "lora"])
def test_grads_reach_trainable_modules_with_checkpointing(make_model, lm_mode):
    grads = {}
    for checkpointed in (False, True):
        model = make_model(seed=0)
        apply_freeze(model, FreezeConfig(lm=lm_mode, lora_r=4))
        if checkpointed:
            enable_gradient_checkpointing(model)
        calls = []
        layer = model.lm.get_base_model().model.layers[0] if lm_mode == "lora" else model.lm.model.layers[0]
        layer.mlp.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))  # pre: recompute stops early
        model.train()
        loss, _ = SFTObjective()(model, batch_of(model))
        loss.backward()
        assert len(calls) == (2 if checkpointed else 1)  # checkpointed: forward + recompute in backward
        grads[checkpointed] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        # lora_A gets zero gradient at init (lora_B starts at zero); the projector and lora_B must get some
        moving = {n: g for n, g in grads[checkpointed].items() if "lora_A" not in n}
        assert moving and all(g.abs().sum() > 0 for g in moving.values())
        assert any(n.startswith("projector.") for n in moving)
        assert (lm_mode == "lora") == any("lora_B" in n for n in moving)
        assert all(p.grad is None for p in model.vision.parameters())
    for name, grad in grads[False].items():
        assert torch.allclose(grad, grads[True][name], atol=1e-6, rtol=1e-5), name


def test_trainer_with_checkpointing_matches_without(make_model, tmp_path):
    params = []
    for checkpointed in (False, True):
        model = make_model(seed=0)
        apply_freeze(model, FreezeConfig(lm="frozen"))
        encoder = ExampleEncoder(ChatEncoder(model.tokenizer, model.tokens_per_image), model.image_transform)
        stream = BatchStream(ListSource(items(), loop=True), encoder, batch_size=4, pad_id=model.tokenizer.pad_token_id)
        cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_ratio=0.0, save_every=0, report_to="none",
                          gradient_checkpointing=checkpointed)
        Trainer(model, stream, SFTObjective(), cfg, tmp_path / str(checkpointed), stage="align").fit()
        assert model.lm.is_gradient_checkpointing == checkpointed
        params.append({n: p.detach().clone() for n, p in model.projector.named_parameters()})
    for name, value in params[0].items():
        assert not torch.equal(value, make_model(seed=0).projector.state_dict()[name])  # it trained
        assert torch.allclose(value, params[1][name], atol=1e-6, rtol=0), name
