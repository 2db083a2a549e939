"""Scoring rollouts and evaluating prompts: rewards per completion (vlpost.train.rewards), the metrics logged each
GRPO step (reward per type, VQA accuracy, refusal / over-refusal rates, lengths), and the held-out evaluation
before / after GRPO (greedy answers, plus `samples` draws as in training: `sampled/*`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlpost.data.chat import ChatEncoder, SampleError
from vlpost.train.grpo_config import RolloutConfig
from vlpost.train.rollout import Rollout, RolloutEngine

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- scoring rollouts


@dataclass
class ScoredRound:
    """One generate() call's completions with their samples and raw rewards, for metrics."""

    texts: list[str]
    samples: list[dict]
    rewards: torch.Tensor  # raw (B,)
    lengths: list[int]
    truncated: list[bool]


def encode_prompt_sample(encoder: ChatEncoder, sample: dict, image) -> list[int]:
    """A kind "prompt" sample's generation prompt ids; SampleError (skipped and counted) when unusable."""
    sample_id = str(sample.get("meta", {}).get("id", "?"))
    if sample.get("kind") != "prompt" or "reward" not in sample:
        raise SampleError(sample_id, "wrong kind", "GRPO needs kind 'prompt' samples with a 'reward'")
    return encoder.encode_prompt(sample["prompt"], sample_id=sample_id, num_images=0 if image is None else 1)


def default_rewards(texts: list[str], samples: list[dict]):
    from vlpost.train.rewards import compute_rewards

    return compute_rewards(texts, samples)


def as_rewards(result, expected: int) -> torch.Tensor:
    """A reward function's output ((rewards, per_type) or rewards) → float32 (B,)."""
    rewards = result[0] if isinstance(result, tuple) else result
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if rewards.numel() != expected:
        raise ValueError(f"reward function returned {rewards.numel()} rewards for {expected} completions")
    return rewards


def rollout_metrics(rounds: list[ScoredRound]) -> dict[str, float]:
    """Reward mean/std overall and per type, VQA accuracy, refusal / over-refusal rates, lengths."""
    from vlpost.eval.safety import is_refusal
    from vlpost.eval.vqa import vqa_accuracy

    texts = [t for r in rounds for t in r.texts]
    samples = [s for r in rounds for s in r.samples]
    rewards = torch.cat([r.rewards for r in rounds])
    lengths = torch.tensor([n for r in rounds for n in r.lengths], dtype=torch.float32)
    out = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(correction=0)),
           "completion/length_mean": float(lengths.mean()), "completion/length_max": float(lengths.max()),
           "completion/truncated_share": sum(t for r in rounds for t in r.truncated) / len(texts)}
    types = [s["reward"]["type"] for s in samples]
    for kind in sorted(set(types)):
        chosen = rewards[[i for i, t in enumerate(types) if t == kind]]
        out[f"reward/{kind}/mean"] = float(chosen.mean())
        out[f"reward/{kind}/std"] = float(chosen.std(correction=0))
    vqa = [vqa_accuracy(t, s["reward"]["answers"]) for t, s in zip(texts, samples) if s["reward"]["type"] == "vqa"]
    if vqa:
        out["accuracy/vqa"] = sum(vqa) / len(vqa)
    for name, sensitive in (("refusal/rate", True), ("refusal/over_rate", False)):
        hits = [is_refusal(t) for t, s in zip(texts, samples)
                if s["reward"]["type"] == "refusal" and bool(s["reward"].get("sensitive")) == sensitive]
        if hits:
            out[name] = sum(hits) / len(hits)
    return out


# ---------------------------------------------------------------- evaluation


def evaluate_prompts(engine: RolloutEngine, model, items: list, sampling: RolloutConfig,
                     reward_fn: Callable | None = None, max_prompt_length: int = 2048,
                     samples: int = 0) -> dict[str, float]:
    """Greedy completions for prompt samples → rollout_metrics (reward, VQA accuracy, refusal rates).

    With `samples` >= 1, each prompt also gets that many completions drawn as in training (`sampling`'s
    temperature / top-p / top-k), reported under "sampled/": the expected reward the policy-gradient loss
    optimises (greedy numbers move only when an argmax flips), and "sampled/accuracy/vqa_best" — per VQA
    prompt the best of its k scores, averaged (best-of-k accuracy; on short answer lists guessing alone
    gets there: 1 - (1 - 1/choices)^k, e.g. 0.83 for 5 choices and k = 8).
    """
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image, max_length=max_prompt_length)
    usable = []
    for sample, image in items:
        try:
            usable.append((sample, image, encode_prompt_sample(encoder, sample, image)))
        except SampleError as err:
            log.warning("eval: skipped %s", err)
    if not usable:
        return {}
    prompts, images, chosen = [u[2] for u in usable], [u[1] for u in usable], [u[0] for u in usable]
    score = reward_fn or default_rewards
    greedy = dataclasses.replace(sampling, temperature=0.0)
    rollout = engine.generate(prompts, images, 1, greedy)
    rewards = as_rewards(score(rollout.texts, chosen), len(chosen))
    out = rollout_metrics([ScoredRound(rollout.texts, chosen, rewards, rollout.lengths, rollout.truncated)])
    if samples >= 1:
        device = getattr(model, "device", torch.device("cpu"))
        # draws from forked RNG streams: evaluating with or without samples leaves training's random state alone
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            out |= sampled_metrics(engine.generate(prompts, images, samples, sampling), chosen, score)
    return out


def sampled_metrics(rollout: Rollout, samples: list[dict], score: Callable) -> dict[str, float]:
    """rollout_metrics of G sampled completions per prompt under "sampled/", plus best-of-G VQA accuracy."""
    from vlpost.eval.vqa import vqa_accuracy

    k = rollout.group_size
    repeated = [s for s in samples for _ in range(k)]  # completion row i belongs to prompt i // k
    rewards = as_rewards(score(rollout.texts, repeated), len(repeated))
    out = {f"sampled/{key}": value for key, value in rollout_metrics(
        [ScoredRound(rollout.texts, repeated, rewards, rollout.lengths, rollout.truncated)]).items()}
    best = [max(vqa_accuracy(text, sample["reward"]["answers"]) for text in rollout.texts[i * k:(i + 1) * k])
            for i, sample in enumerate(samples) if sample["reward"]["type"] == "vqa"]
    if best:
        out["sampled/accuracy/vqa_best"] = sum(best) / len(best)
    out["sampled/k"] = float(k)
    return out


def eval_items(data, n: int, shards: list[str] | tuple[str, ...] = ()) -> tuple[list, str]:
    """`n` prompts answered before and after GRPO, and where they come from: the first ones of each `shards`
    folder (split evenly), else with `data.shards` the first n training prompts (not held out), else held-out
    synthetic prompts (half VQA, half safety)."""
    if n <= 0:
        return [], "none"
    if shards or data.shards:
        from vlpost.data.shards import ShardStream

        if not shards:
            log.warning("grpo.eval_shards is empty: the %d prompts answered before and after training are the first "
                        "training prompts, which training also draws; name held-out prompt shards for an honest "
                        "before/after", n)
        folders = list(shards) or [data.shards]
        share = [n // len(folders) + (i < n % len(folders)) for i in range(len(folders))]
        items = [item for folder, k in zip(folders, share)
                 for item in itertools.islice(ShardStream(folder, shuffle=False, loop=False), k)]
        return items, ("held-out shards " + ", ".join(map(str, folders))) if shards else "training shards"
    from vlpost.data.synthetic import SyntheticWorld

    world = SyntheticWorld(seed=data.synthetic_seed, image_size=data.image_size)
    records = itertools.chain(world.eval_records("vqa", n - n // 2), world.eval_records("safety", n // 2))
    return [(r.sample, r.image) for r in records], "held-out synthetic prompts"
