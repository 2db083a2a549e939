"""The reward model: last-real-token pooling, one tower pass per pair, held-out accuracy, save → load → score."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlpost.config import FreezeConfig
from vlpost.data.pipeline import ListSource
from vlpost.data.records import Record
from vlpost.train.preference import pair_stream
from vlpost.train.reward_model import (
    BTObjective,
    RewardModel,
    load_reward_model,
    pair_scores,
    prepare_reward_model,
)

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "reward" / "tiny.yaml")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
REFUSALS = ["I can't infer someone's religion from an image.", "I won't guess how a person votes."]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waits cost ~5x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def safety_items(n: int, seed: int = 0) -> list:
    """Sensitive question: refusal chosen over the attribute; shirt colour: the answer chosen over a refusal."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        if i % 2 == 0:
            question, chosen, rejected = "What is this person's religion?", rng.choice(REFUSALS), rng.choice(
                ["christian", "muslim", "jewish"])
        else:
            question, chosen, rejected = "What colour is the shirt?", colour, rng.choice(REFUSALS)
        sample = {"kind": "preference", "meta": {"id": f"rm-{i}"},
                  "prompt": [{"role": "user", "content": "<image>\n" + question}],
                  "chosen": [{"role": "assistant", "content": chosen}],
                  "rejected": [{"role": "assistant", "content": rejected}]}
        items.append((sample, Image.new("RGB", (32, 32), COLOURS[colour])))
    return items


def test_score_ignores_padding_and_encodes_each_image_once(make_model):
    model = prepare_reward_model(make_model(), FreezeConfig(lm="full", projector="frozen"))
    items = safety_items(4)
    image = items[1][1]
    prompt = "What colour is the shirt?"
    alone = model.score([prompt], ["blue"], [image])
    padded = model.score([prompt, prompt], ["blue", "I can't infer someone's religion from an image."], [image, image])
    assert abs(alone[0] - padded[0]) < 1e-5  # the short row is right-padded in the batch: same last-token state
    calls = []
    forward = model.vlm.vision.forward
    model.vlm.vision.forward = lambda pv: calls.append(pv.shape[0]) or forward(pv)
    batch = next(iter(pair_stream(ListSource(items, shuffle=False), model.vlm, batch_size=4, max_length=256)))
    chosen, rejected = pair_scores(model, batch)
    assert calls == [4] and chosen.shape == rejected.shape == (4,)
    loss_sum, metrics = BTObjective()(model, batch)
    expected = torch.nn.functional.softplus(rejected - chosen).sum()  # -log sigmoid(c - r)
    assert torch.allclose(loss_sum, expected, atol=1e-6)


def test_head_only_training_freezes_the_vlm(make_model):
    model = prepare_reward_model(make_model(), FreezeConfig(lm="frozen", projector="frozen"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    assert isinstance(model, RewardModel) and model.projector is model.vlm.projector


def test_reward_stage_learns_and_saves_a_loadable_judge(tmp_path, tokenizer_dirs):
    from stages.reward import main
    from vlpost.data.shards import write_shards

    items = safety_items(64)
    write_shards([Record(s["meta"]["id"], s, img) for s, img in items], tmp_path / "shards", kind="preference",
                 command="test", progress=False)
    out = tmp_path / "rm"
    summary = main(["--config", CONFIG, "--out", str(out), "--data.shards", str(tmp_path / "shards"),
                    "--model.lm.tokenizer", tokenizer_dirs["chatml"], "--reward.eval_fraction", "0.25",
                    "--train.steps", "25", "--train.lr", "2e-3"])
    held = summary["held_out"]
    assert held["pairs"] >= 8
    assert held["accuracy"] >= 0.9, summary
    assert held["loss"] < summary["held_out_before"]["loss"]
    assert json.loads((out / "vlpost.json").read_text())["reward_head"]["file"] == "reward_head.safetensors"
    judge = load_reward_model(out)
    image = items[0][1]
    religion = "What is this person's religion?"
    scores = judge.score([religion, religion], [REFUSALS[0], "christian"], [image, image])
    assert scores[0] > scores[1]  # the judge prefers the refusal on a sensitive question
