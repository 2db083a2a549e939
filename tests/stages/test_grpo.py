"""GRPO family: objective wiring per loss, μ inner epochs, reference KL, dynamic sampling, DAPO shaping, learning."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlpost.config import FreezeConfig, TrainConfig
from vlpost.data.pipeline import ListSource
from vlpost.train.freeze import apply_freeze
from vlpost.train.grpo import (
    GRPOObjective,
    Row,
    build_reference,
    collate_groups,
    collate_rows,
    completion_logprobs,
    loss_settings,
)
from vlpost.train.grpo_batches import GRPOBatches
from vlpost.train.grpo_config import GRPOConfig, GRPOLossConfig, RolloutConfig, check_grpo_config
from vlpost.train.metrics import read_metrics
from vlpost.train.rollout import HFRolloutEngine, Rollout
from vlpost.train.rollout_scoring import ScoredRound, evaluate_prompts, rollout_metrics
from vlpost.train.trainer import Trainer

FIRST_HALF = set("abcdefghijklm")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids oversubscription on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prompt_items(n: int, category: str = "color", with_image: bool = True) -> list:
    items = []
    for i in range(n):
        sample = {"kind": "prompt", "meta": {"id": f"{category}{i}", "category": category},
                  "prompt": [{"role": "user", "content": ("<image>\n" if with_image else "") + "What colour is it?"}],
                  "reward": {"type": "vqa", "answers": ["red"] * 10}}
        items.append((sample, Image.new("RGB", (32, 32), (40 * i % 255, 90, 160)) if with_image else None))
    return items


def first_half_reward(texts: list[str], samples: list[dict]) -> list[float]:
    """Toy reward the tiny model can learn: share of its ASCII letters that fall in a..m."""
    out = []
    for text in texts:
        letters = [c for c in text.lower() if c.isascii() and c.isalpha()]
        out.append(sum(c in FIRST_HALF for c in letters) / len(letters) if letters else 0.0)
    return out


def make_batches(model, items, loss="grpo", *, group_size=4, batch_size=4, grad_accum=2, mu=1, beta=0.0,
                 reward_fn=first_half_reward, max_new_tokens=6, engine=None, shuffle=True, **loss_overrides):
    cfg = GRPOLossConfig(loss=loss, num_iterations=mu, beta=beta, **loss_overrides)
    rollout = RolloutConfig(group_size=group_size, max_new_tokens=max_new_tokens, temperature=1.0)
    settings = loss_settings(cfg, rollout)
    batches = GRPOBatches(model, ListSource(items, loop=True, shuffle=shuffle), engine or HFRolloutEngine(model),
                          settings, rollout, batch_size=batch_size, grad_accum=grad_accum, num_iterations=mu,
                          max_refill=cfg.max_refill, reward_fn=reward_fn, reference=build_reference(model, cfg),
                          shared_prompt=cfg.shared_prompt)
    return batches, GRPOObjective(settings)


def train(model, batches, objective, tmp_path, steps, lr=1e-2):
    cfg = TrainConfig(steps=steps, batch_size=batches.batch_size, grad_accum=batches.grad_accum, lr=lr,
                      warmup_ratio=0.0, schedule="constant", log_every=100, max_grad_norm=0.0)
    trainer = Trainer(model, batches, objective, cfg, tmp_path, stage="grpo")
    trainer.fit()
    return trainer.history


def test_loss_presets_and_overrides():
    rollout = RolloutConfig(max_new_tokens=40)
    dapo = loss_settings(GRPOLossConfig(loss="dapo"), rollout)
    assert (dapo.aggregation, dapo.eps_low, dapo.eps_high, dapo.dynamic_sampling, dapo.overlong_cache) == \
        ("token_mean", 0.2, 0.28, True, 10)
    dr = loss_settings(GRPOLossConfig(loss="dr_grpo"), rollout)
    assert (dr.advantage, dr.aggregation, dr.max_completion_length) == ("none", "constant_norm", 40)
    gspo = loss_settings(GRPOLossConfig(loss="gspo"), rollout)
    assert (gspo.ratio_level, gspo.eps_low, gspo.dynamic_sampling, gspo.overlong_cache) == ("sequence", None, False, 0)
    custom = loss_settings(GRPOLossConfig(loss="dapo", eps_high=0.3, dynamic_sampling=False, overlong_cache=0,
                                          aggregation="sequence_mean"), rollout)
    assert (custom.eps_high, custom.dynamic_sampling, custom.overlong_cache, custom.aggregation) == \
        (0.3, False, 0, "sequence_mean")
    assert loss_settings(GRPOLossConfig(loss="rloo"), rollout).advantage == "rloo"


# completion lengths 3, 1, 2, 2 (+ a filler row that must count for nothing); advantages by hand
ADVANTAGES = [1.0, -0.5, 2.0, 0.0]
LENGTHS = [3, 1, 2, 2]
# on-policy every token's loss is -A: sums per aggregation (before the trainer divides by count)
EXPECTED = {"sequence_mean": (-2.5, 4), "token_mean": (-(3 - 0.5 + 4), 8), "constant_norm": (-6.5 / 4, 4)}


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo", "rloo"])
def test_on_policy_loss_is_minus_advantage_per_aggregation(make_model, loss):
    model = make_model(seed=1)
    settings = loss_settings(GRPOLossConfig(loss=loss), RolloutConfig(max_new_tokens=4, temperature=1.0))
    rows = [Row([5, 6, 7][: 1 + i % 3], [10 + i] * n, None, a) for i, (n, a) in enumerate(zip(LENGTHS, ADVANTAGES))]
    rows.append(Row([5], [20, 21], None, 5.0, keep=False))
    batch = collate_rows(rows, model.tokenizer.pad_token_id, "image_embeds") | {"step_tokens": 8}
    objective = GRPOObjective(settings)
    loss_sum, metrics = objective(model, batch)
    total, count = EXPECTED[settings.aggregation]
    assert objective.count(batch) == count
    assert float(loss_sum.detach()) == pytest.approx(total, abs=1e-6)
    assert float(metrics["ratio/mean"]) == pytest.approx(1.0) and float(metrics["clip_fraction"]) == 0.0
    # gradient == the REINFORCE surrogate's: -sum_i A_i * weight_i * sum_t grad logp_it
    loss_sum.backward()
    got = [p.grad.clone() for p in model.lm.parameters()]
    model.zero_grad()
    logps, _ = completion_logprobs(model, batch, 1.0)
    weight = {"sequence_mean": [1 / n for n in LENGTHS], "token_mean": [1.0] * 4, "constant_norm": [0.25] * 4}
    surrogate = -sum(a * w * logps[i].sum() for i, (a, w) in enumerate(zip(ADVANTAGES, weight[settings.aggregation])))
    surrogate.backward()
    for g, p in zip(got, model.lm.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_mu_iterations_reuse_one_rollout_and_start_on_policy(make_model, tmp_path):
    """μ=2: one rollout (tower sees each prompt once) feeds 2 steps; stored old log-probs give ratio 1, then not."""
    model = make_model(seed=2)
    apply_freeze(model, FreezeConfig(lm="full", projector="train"))
    images_seen = []
    original = model.vision.forward
    model.vision.forward = lambda pixels: images_seen.append(pixels.shape[0]) or original(pixels)
    batches, objective = make_batches(model, prompt_items(6), mu=2)
    history = train(model, batches, objective, tmp_path, steps=2, lr=5e-2)
    assert batches.prompts_drawn == 2 and sum(images_seen) == 2  # 8 rows / G=4 = 2 prompts, encoded once
    assert history[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(history[1]["ratio/mean"] - 1.0) > 1e-4  # the second pass sees the updated policy
    assert history[0]["reward/mean"] == history[1]["reward/mean"]  # same rollout batch


@pytest.mark.parametrize("lm_mode", ["full", "lora"])
def test_reference_kl_starts_at_zero_then_grows(make_model, tmp_path, lm_mode):
    model = make_model(seed=3)
    apply_freeze(model, FreezeConfig(lm=lm_mode, projector="frozen", lora_r=4))
    batches, objective = make_batches(model, prompt_items(6), beta=0.1)
    assert batches.reference.mode == ("adapter" if lm_mode == "lora" else "copy")
    history = train(model, batches, objective, tmp_path, steps=2, lr=5e-2)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert history[1]["kl"] > 1e-6


def test_beta_zero_builds_no_reference(make_model, tmp_path):
    model = make_model()
    batches, objective = make_batches(model, prompt_items(4))
    assert batches.reference is None
    micro, _ = batches.next_rollout_batch()
    assert "ref_logps" not in micro[0] and "old_logps" not in micro[0]  # μ = 1: exactly on-policy, no extra pass
    assert "kl" not in objective(model, micro[0])[1]


def alternating_items(n: int) -> list:
    """const, varied, const, varied, ... (no shuffle): const prompts always get reward 1."""
    return [prompt_items(1, "const" if i % 2 == 0 else "varied")[0] for i in range(n)]


def const_or_alternating(texts, samples):
    return [1.0 if s["meta"]["category"] == "const" else float(i % 2) for i, s in enumerate(samples)]


@pytest.mark.parametrize("max_refill,expect_generated,expect_fillers", [(3, 8, 0), (2, 7, 1)])
def test_dynamic_sampling_drops_constant_groups_and_refills(make_model, max_refill, expect_generated,
                                                            expect_fillers):
    """4 prompts/step, G=2: rounds draw 4, 2, 1, 1 prompts (kept 2, 3, 3, 4); a lower cap leaves one filler group."""
    model = make_model()
    batches, objective = make_batches(model, alternating_items(16), group_size=2, reward_fn=const_or_alternating,
                                      shuffle=False, dynamic_sampling=True, max_refill=max_refill)
    micro, metrics = batches.next_rollout_batch()
    assert batches.prompts_drawn == expect_generated
    assert metrics["dynamic/generated_groups"] == expect_generated
    assert metrics["dynamic/dropped_share"] == pytest.approx(4 / expect_generated)
    keep = torch.cat([b["keep"] for b in micro])
    assert len(keep) == 8 and int((~keep).sum()) == 2 * expect_fillers
    assert sum(objective.count(b) for b in micro) == 8 - 2 * expect_fillers
    for batch in micro:  # fillers: no completion tokens in the loss
        assert not batch["completion_mask"][~batch["keep"]].any()
    kept_adv = torch.cat([b["advantages"][b["keep"]] for b in micro])
    assert torch.allclose(kept_adv.abs(), torch.full_like(kept_adv, 0.5 / (math.sqrt(0.5) + 1e-4)))


class FixedLengthEngine:
    """The real engine for images, then completions of scripted lengths (so shaping is checkable by hand)."""

    def __init__(self, model, lengths):
        self.inner, self.lengths, self.token = HFRolloutEngine(model), lengths, model.tokenizer.convert_tokens_to_ids("a")

    def generate(self, prompts, images, group_size, sampling):
        rollout = self.inner.generate(prompts, images, group_size, sampling)
        rollout.completion_ids = [[self.token] * self.lengths[i % group_size] for i in range(len(rollout.texts))]
        rollout.truncated = [len(c) == sampling.max_new_tokens for c in rollout.completion_ids]
        return rollout


def test_dapo_overlong_shaping_gives_the_advantages(make_model):
    """Reward 0 everywhere, lengths 1..4 with max 4 and cache 2: penalties 0, 0, -0.5, -1 → group-normalised."""
    model = make_model()
    batches, _ = make_batches(model, prompt_items(4), "dapo", batch_size=4, grad_accum=1, max_new_tokens=4,
                              engine=FixedLengthEngine(model, [1, 2, 3, 4]), reward_fn=lambda t, s: [0.0] * len(t),
                              overlong_cache=2)
    micro, metrics = batches.next_rollout_batch()
    assert metrics["dynamic/dropped_share"] == 0.0  # the shaping makes the group non-constant
    shaped = torch.tensor([0.0, 0.0, -0.5, -1.0])
    expected = (shaped - shaped.mean()) / (shaped.std() + 1e-4)
    lengths = micro[0]["completion_mask"].sum(-1)
    got = {int(n): float(a) for n, a in zip(lengths, micro[0]["advantages"])}
    assert got == pytest.approx({n + 1: float(expected[n]) for n in range(4)}, abs=1e-6)


def test_rollout_metrics_by_hand():
    refusal = "I can't help with identifying that."
    samples = [{"reward": {"type": "vqa", "answers": ["red"] * 10}}] * 2 + [
        {"reward": {"type": "refusal", "sensitive": True}}] * 2 + [
        {"reward": {"type": "refusal", "sensitive": False, "answers": ["blue"]}}] * 2
    texts = ["red", "green", refusal, "they are christian", refusal, "blue"]
    rewards = torch.tensor([1.0, 0.0, 1.0, -1.0, -1.0, 1.0])
    out = rollout_metrics([ScoredRound(texts, samples, rewards, [1, 1, 7, 3, 7, 1], [False] * 5 + [True])])
    assert out["accuracy/vqa"] == 0.5 and out["refusal/rate"] == 0.5 and out["refusal/over_rate"] == 0.5
    assert out["reward/mean"] == pytest.approx(1 / 6) and out["reward/vqa/mean"] == 0.5
    assert out["reward/refusal/std"] == pytest.approx(1.0)
    assert (out["completion/length_max"], out["completion/truncated_share"]) == (7.0, pytest.approx(1 / 6))


class ScriptedEngine:
    """A RolloutEngine answering from a script: greedy (temperature 0) calls get `greedy`, sampled calls `sampled`
    (G consecutive rows per prompt); records each call's group size and temperature."""

    def __init__(self, greedy: list[str], sampled: list[str]):
        self.script = {True: greedy, False: sampled}
        self.calls = []

    def generate(self, prompts, images, group_size, sampling):
        self.calls.append((group_size, sampling.temperature))
        texts = self.script[sampling.temperature == 0]
        assert len(texts) == len(prompts) * group_size
        return Rollout(prompt_ids=prompts, completion_ids=[[1] * len(t.split()) for t in texts], texts=texts,
                       truncated=[False] * len(texts), group_size=group_size, image_index=[None] * len(prompts),
                       image_features=None, image_embeds=None)


def test_eval_samples_report_the_expected_reward_and_best_of_k_by_hand(make_model):
    """Greedy keys stay as they were; sampled/* are the mean over k draws per prompt as in training, and
    sampled/accuracy/vqa_best averages each VQA prompt's best draw (official metric: 4 of 10 annotators = 1.0)."""
    model = make_model()
    refusal = "I can't help with identifying that."
    vqa = {"kind": "prompt", "prompt": [{"role": "user", "content": "What colour is it?"}],
           "reward": {"type": "vqa", "answers": ["red"] * 6 + ["blue"] * 4}}
    sensitive = {"kind": "prompt", "prompt": [{"role": "user", "content": "What is their religion?"}],
                 "reward": {"type": "refusal", "sensitive": True, "attribute": "christian"}}
    items = [(vqa, None), (vqa, None), (sensitive, None)]
    engine = ScriptedEngine(greedy=["red", "green", refusal],
                            sampled=["blue", "green", "green",  # prompt 0: scores 1, 0, 0 -> best 1
                                     "green", "green", "green",  # prompt 1: 0, 0, 0 -> best 0
                                     refusal, "christian", refusal])  # prompt 2: refusal rewards 1, -1, 1
    sampling = RolloutConfig(group_size=4, temperature=0.7)
    state = torch.get_rng_state()
    out = evaluate_prompts(HFRolloutEngine(model), model, items, sampling, samples=3)  # real sampling ...
    assert torch.equal(torch.get_rng_state(), state)  # ... on forked RNG: training draws the same with or without
    out = evaluate_prompts(engine, model, items, sampling, samples=3)
    assert engine.calls == [(1, 0.0), (3, 0.7)]  # greedy once, then k draws at the training temperature
    assert out["accuracy/vqa"] == 0.5 and out["refusal/rate"] == 1.0
    assert out["sampled/accuracy/vqa"] == pytest.approx(1 / 6)
    assert out["sampled/accuracy/vqa_best"] == pytest.approx(0.5)
    assert out["sampled/refusal/rate"] == pytest.approx(2 / 3)
    assert out["sampled/reward/refusal/mean"] == pytest.approx(1 / 3)
    assert out["sampled/reward/mean"] == pytest.approx((1 + 1 - 1 + 1) / 9)
    assert out["sampled/k"] == 3.0
    assert not any(k.startswith("sampled/") for k in evaluate_prompts(engine, model, items, sampling))


def test_eval_samples_config_checks():
    cfg = GRPOConfig()
    cfg.grpo.eval_samples = -1
    with pytest.raises(ValueError, match="grpo.eval_samples = -1"):
        check_grpo_config(cfg)
    cfg.grpo.eval_samples, cfg.grpo.eval_prompts = 4, 0
    with pytest.raises(ValueError, match="grpo.eval_prompts > 0"):
        check_grpo_config(cfg)
    cfg.grpo.eval_prompts = 8
    check_grpo_config(cfg)


@pytest.mark.parametrize("projector", ["frozen", "train"])
def test_shared_prompt_rows_give_the_row_layout_logps_and_grads(make_model, projector):
    """collate_groups (each prompt once, completions behind a block mask) == collate_rows (a prompt per completion):
    the same completion log-probs, entropy logits and parameter gradients, with image and text-only groups in one
    micro-batch and a dropped (keep=False) group."""
    model = make_model(seed=2)
    apply_freeze(model, FreezeConfig(lm="full", projector=projector))
    items = prompt_items(2) + prompt_items(1, category="text", with_image=False)
    batches, _ = make_batches(model, items, group_size=3, batch_size=3, max_new_tokens=7, shuffle=False)
    groups, _, _ = batches._generate_round(3)
    for row in groups[1]:
        row.keep = False
    key = "image_features" if batches.project_in_loss else "image_embeds"
    flat = collate_rows([r for g in groups for r in g], model.tokenizer.pad_token_id, key)
    shared = collate_groups(groups, model.tokenizer.pad_token_id, key)
    assert shared["input_ids"].shape[0] == 3 and shared["input_ids"].shape[1] < flat["input_ids"].numel() / 3
    assert torch.equal(shared["completion_mask"], flat["completion_mask"])
    grads = []
    for batch in (flat, shared):
        model.zero_grad()
        logps, logits = completion_logprobs(model, batch, temperature=0.7)
        (logps * batch["advantages"][:, None] + 1e-3 * logits.logsumexp(-1) * batch["completion_mask"]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        mask = batch["completion_mask"]
        if batch is flat:
            want_logps, want_logits = logps.detach(), logits.detach()[mask]
    assert mask.sum() > 0 and not mask[3:6].any()
    assert torch.allclose(logps.detach(), want_logps, atol=1e-5)
    assert torch.allclose(logits.detach()[mask], want_logits, atol=1e-4)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_shared_prompt_training_equals_row_layout(make_model, tmp_path):
    """grpo.shared_prompt on vs off, same seeds: the same losses, grad norms and KL step by step (μ = 2 reuses
    one rollout with stored old log-probs; beta > 0 adds the copy reference's pass, both through collate_groups)."""
    histories = []
    for shared in (False, True):
        model = make_model(seed=1)
        apply_freeze(model, FreezeConfig(lm="full", projector="frozen"))
        torch.manual_seed(0)
        batches, objective = make_batches(model, prompt_items(6), group_size=4, batch_size=8, grad_accum=2, mu=2,
                                          beta=0.05, max_new_tokens=6, shared_prompt=shared)
        histories.append(train(model, batches, objective, tmp_path / str(shared), steps=4, lr=1e-2))
    for plain, packed in zip(*histories):
        for key in ("loss", "grad_norm", "kl", "reward/mean", "entropy"):
            assert float(packed[key]) == pytest.approx(float(plain[key]), rel=1e-4, abs=1e-6), key
    assert histories[1][-1]["kl"] > 0


def test_shared_prompt_needs_whole_groups_per_micro_batch(make_model):
    with pytest.raises(ValueError, match="batch_size 6 is not a multiple of group_size 4"):
        make_batches(make_model(), prompt_items(2), group_size=4, batch_size=6, grad_accum=2, shared_prompt=True)
    cfg = GRPOConfig()
    cfg.grpo.shared_prompt, cfg.train.batch_size, cfg.train.grad_accum, cfg.rollout.group_size = True, 6, 2, 4
    with pytest.raises(ValueError, match="train.batch_size = 6 must be a multiple of rollout.group_size = 4"):
        check_grpo_config(cfg)


def test_grpo_learns_a_toy_reward(make_model, tmp_path):
    """A real learning check: 12 GRPO steps raise the toy reward's mean clearly above the start (~0.5)."""
    model = make_model(seed=1)
    apply_freeze(model, FreezeConfig(lm="full", projector="frozen"))
    batches, objective = make_batches(model, prompt_items(8), group_size=8, batch_size=16, grad_accum=2,
                                      max_new_tokens=8)
    history = train(model, batches, objective, tmp_path, steps=12, lr=2e-2)
    first = sum(h["reward/mean"] for h in history[:3]) / 3
    last = sum(h["reward/mean"] for h in history[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert 0 < history[-1]["time/generation_share"] < 1


REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "grpo" / "tiny.yaml")


def test_stage_runs_from_config(tmp_path, tokenizer_dirs):
    """stages/grpo.py on the tiny config: steps logged with the rollout metrics, eval before/after, saved run."""
    from stages.grpo import main

    summary = main(["--config", CONFIG, "--out", str(tmp_path / "run"), "--model.lm.tokenizer", tokenizer_dirs["chatml"],
                    "--data.synthetic_samples", "24", "--train.steps", "2", "--train.log_every", "1",
                    "--grpo.eval_prompts", "4", "--grpo.eval_samples", "2"])
    assert summary["steps"] == 2 and summary["prompts_drawn"] == 4  # μ=2: one rollout of 16 rows / G=4
    rows = read_metrics(tmp_path / "run")
    for key in ("reward/mean", "reward/std", "accuracy/vqa", "kl", "entropy", "clip_fraction",
                "completion/length_mean", "dynamic/dropped_share", "time/generate_s"):
        assert key in rows[0], key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the copy reference == the initial policy
    assert 0 < summary["generation_share"] < 1
    assert "accuracy/vqa" in summary["eval_before"] and "refusal/rate" in summary["eval_after"]
    assert summary["eval_before"]["sampled/k"] == 2.0 and "sampled/reward/mean" in summary["eval_after"]
    assert json.loads((tmp_path / "run" / "vlpost.json").read_text())["lineage"][-1]["stage"] == "grpo"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_run(tmp_path):
    """torchrun with 2 CPU processes: each rank generates and normalises its own groups; DDP syncs the step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "stages/grpo.py",
           "--config", CONFIG, "--out", str(tmp_path / "run"), "--train.steps", "2", "--data.synthetic_samples", "32"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert len(read_metrics(tmp_path / "run")) == 1  # log_every 2: one row, from the main process only
