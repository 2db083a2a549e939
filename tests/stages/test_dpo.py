"""Stage 3a: DPO learns the safety preference, and stages/dpo.py runs from its config with a reusable cache."""

import json
import math
from pathlib import Path

import pytest
import torch

from vlpost.config import FreezeConfig, TrainConfig
from vlpost.data.pipeline import ListSource, records_to_items
from vlpost.data.synthetic import SyntheticWorld
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.dpo_config import DPOLossConfig
from vlpost.train.freeze import apply_freeze
from vlpost.train.metrics import read_metrics
from vlpost.train.preference import DPOObjective, pair_stream, policy_logps, vision_features
from vlpost.train.reference import copy_reference
from vlpost.train.trainer import Trainer

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "dpo" / "tiny.yaml")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waits cost ~5x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_pairs(n: int) -> list:
    """The synthetic world's preference pairs: safety (refuse / answer look-alikes) and VQA pairs."""
    return records_to_items(SyntheticWorld(seed=0, image_size=32).records("preference", n))


@torch.no_grad()
def margins(model, reference, items) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference log-prob margins (chosen - rejected) per pair, (N,) each."""
    model.eval()
    policy, ref = [], []
    for batch in pair_stream(ListSource(items, shuffle=False), model, batch_size=16, max_length=256):
        features = vision_features(model, batch)
        sums, _ = policy_logps(model, batch, features)
        ref_sums = reference.logps(model, batch, features)
        pairs = batch["pairs"]
        policy.append(sums[:pairs] - sums[pairs:])
        ref.append(ref_sums[:pairs] - ref_sums[pairs:])
    model.train()
    return torch.cat(policy), torch.cat(ref)


def test_dpo_raises_the_preference_for_refusals_on_its_training_pairs(make_model, tmp_path):
    """A real learning check on the synthetic safety pairs: after 20 steps the policy prefers the refusal on
    sensitive questions (and the answer on benign look-alikes) by a wider margin than the reference."""
    model = make_model(seed=2)
    apply_freeze(model, FreezeConfig(lm="full", projector="frozen"))
    reference = copy_reference(model)
    items = synthetic_pairs(48)
    pair_type = [s["meta"]["pair_type"] for s, _ in items]
    sensitive = torch.tensor([t == "sensitive" for t in pair_type])
    benign = torch.tensor([t == "benign" for t in pair_type])
    assert int(sensitive.sum()) >= 10 and int(benign.sum()) >= 10
    cfg = TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup_ratio=0.1, log_every=5)
    stream = pair_stream(ListSource(items, loop=True), model, batch_size=8, max_length=256)
    trainer = Trainer(model, stream, DPOObjective(DPOLossConfig(beta=0.1), reference), cfg, tmp_path, stage="dpo")
    trainer.fit()
    policy, ref = margins(model, reference, items)
    gain = policy - ref  # > 0: the policy prefers the chosen answer more than the reference did
    assert float((gain[sensitive] > 0).float().mean()) >= 0.9, gain[sensitive]
    assert float((gain[benign] > 0).float().mean()) >= 0.9, gain[benign]
    assert float(gain[sensitive].mean()) > 5.0  # nats: log p(refusal) - log p(attribute answer) rose clearly
    assert trainer.history[0]["loss"] == float(torch.tensor(math.log(2)))  # policy == reference at init
    assert sum(h["loss"] for h in trainer.history[-5:]) / 5 < 0.45


def write_pair_shards(n: int, out) -> str:
    from vlpost.data.shards import write_shards

    write_shards(SyntheticWorld(seed=0, image_size=32).records("preference", n), out, kind="preference",
                 command="test", progress=False)
    return str(out)


def test_stage_runs_from_config_reuses_its_cache_and_resumes_exactly(tmp_path, tokenizer_dirs):
    """stages/dpo.py on shards: cache built once and reused by the next run; interrupted + resumed == whole."""
    from stages.dpo import main

    shards = write_pair_shards(16, tmp_path / "shards")

    def run(name, steps, extra=()):
        return main(["--config", CONFIG, "--out", str(tmp_path / name), "--data.shards", shards,
                     "--model.lm.tokenizer", tokenizer_dirs["chatml"], "--dpo.cache_dir", str(tmp_path / "cache"),
                     "--train.steps", str(steps), "--train.batch_size", "2", "--train.log_every", "1",
                     "--train.schedule", "constant", "--train.warmup_ratio", "0", *extra])

    summary = run("whole", 4)
    assert summary["reference"] == "cache" and summary["computed"] == 16 and summary["reused"] == 0
    assert summary["pairs_before"]["reward_accuracy"] == 0.0  # policy == reference: no pair gains yet
    whole = {r["step"]: r for r in read_metrics(tmp_path / "whole")}
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "logps/chosen", "logps/rejected", "kl"):
        assert key in whole[1], key
    assert abs(whole[1]["loss"] - math.log(2)) < 1e-5  # the cached reference is the initial policy
    assert json.loads((tmp_path / "whole" / "vlpost.json").read_text())["lineage"][-1]["stage"] == "dpo"

    first = run("parts", 2, ["--train.save_every", "1"])  # same init weights → same hash: the cache is reused
    assert first["computed"] == 0 and first["reused"] == 16 and first["cache_dir"] == summary["cache_dir"]
    run("parts", 4, ["--resume"])  # continues from checkpoints/step-1
    parts = {r["step"]: r for r in read_metrics(tmp_path / "parts")}
    for step in (2, 3, 4):
        assert abs(whole[step]["loss"] - parts[step]["loss"]) < 1e-6, step
        assert abs(whole[step]["rewards/margin"] - parts[step]["rewards/margin"]) < 1e-6, step
    # dpo.shared_prompt (each pair's prompt once, packed) reads the same cache and trains the same steps
    shared = run("shared", 4, ["--dpo.shared_prompt", "true"])
    assert shared["reused"] == 16
    packed = {r["step"]: r for r in read_metrics(tmp_path / "shared")}
    for step in (1, 2, 3, 4):
        assert abs(whole[step]["loss"] - packed[step]["loss"]) < 1e-5, step
        assert abs(whole[step]["rewards/margin"] - packed[step]["rewards/margin"]) < 1e-5, step


def test_stage_with_lora_uses_the_adapter_reference(tmp_path, tokenizer_dirs):
    from stages.dpo import main

    summary = main(["--config", CONFIG, "--out", str(tmp_path / "lora"), "--data.synthetic_samples", "8",
                    "--model.lm.tokenizer", tokenizer_dirs["chatml"], "--dpo.cache_dir", str(tmp_path / "cache"),
                    "--freeze.lm", "lora", "--freeze.lora_r", "4", "--dpo.sft_weight", "0.5",
                    "--train.steps", "2", "--train.batch_size", "4", "--train.log_every", "1"])
    assert summary["reference"] == "adapter" and "cache_dir" not in summary
    assert not (tmp_path / "cache").exists()
    rows = read_metrics(tmp_path / "lora")
    assert "sft_nll" in rows[0] and rows[0]["rewards/margin"] == 0.0
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "lora")  # adapter merged into the saved LM
    assert not hasattr(reloaded.lm, "peft_config")

