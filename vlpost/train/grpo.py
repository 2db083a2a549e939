"""GRPO family on rollouts: rewards → group advantages → clipped policy loss, μ optimizer steps per rollout.

`GRPOBatches` is the trainer's batch iterable: when its buffer is empty it draws prompts, generates G
completions each with the current policy (rollout.py), scores them, drops constant-reward groups and
refills (DAPO dynamic sampling), stores old / reference log-probs once (no grad), and yields the
rollout as `train.grad_accum` micro-batches, `grpo.num_iterations` times over. `GRPOObjective` is the loss.

Image features: the tower is frozen, so the rollout keeps its output per prompt and no later pass runs
the tower again. If the projector trains, micro-batches carry those TOWER features and every loss /
log-prob pass re-runs the (cheap) projector with grad, so the projector gets its gradient; if it is
frozen they carry the projected embeddings from generation and the projector does not run again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from vlpost.constants import IGNORE_INDEX
from vlpost.data.chat import ChatEncoder, SampleError
from vlpost.train import losses
from vlpost.train.grpo_config import GRPOLossConfig, RolloutConfig
from vlpost.train.rollout import (
    Rollout,
    RolloutEngine,
    ScoredRound,
    as_rewards,
    default_rewards,
    encode_prompt_sample,
    rollout_metrics,
)
from vlpost.train.zero import plain_copy

log = logging.getLogger(__name__)

# Per loss: advantage estimator, aggregation, ratio level, (eps_low, eps_high) or None for the default,
# dynamic sampling + overlong shaping. Papers: Dr.GRPO (Liu 2025), DAPO (Yu 2025), GSPO (Zheng 2025).
PRESETS = {
    "grpo": ("std", "sequence_mean", "token", None, False),
    "dr_grpo": ("none", "constant_norm", "token", None, False),
    "dapo": ("std", "token_mean", "token", (0.2, 0.28), True),
    "gspo": ("std", "sequence_mean", "sequence", None, False),
    "rloo": ("rloo", "sequence_mean", "token", None, False),
}
POLICY_METRICS = ("clip_fraction", "clip_fraction/low", "clip_fraction/high", "ratio/mean", "kl")


@dataclass(frozen=True)
class LossSettings:
    """A GRPO variant resolved to losses.policy_loss arguments plus its data-side switches."""

    advantage: str  # std | none | rloo
    aggregation: str
    ratio_level: str
    eps_low: float | None
    eps_high: float | None
    dynamic_sampling: bool
    overlong_cache: int  # 0 = no overlong shaping
    beta: float
    max_completion_length: int
    temperature: float


def loss_settings(cfg: GRPOLossConfig, rollout: RolloutConfig) -> LossSettings:
    """Apply `grpo.loss`'s preset, then any explicit overrides in the config."""
    advantage, aggregation, ratio_level, eps, dapo_like = PRESETS[cfg.loss]
    eps_low, eps_high = eps or (None, None)
    overlong = cfg.overlong_cache if cfg.overlong_cache is not None else (
        max(1, rollout.max_new_tokens // 4) if dapo_like else 0)
    return LossSettings(
        advantage=advantage, aggregation=cfg.aggregation or aggregation, ratio_level=ratio_level,
        eps_low=cfg.eps_low if cfg.eps_low is not None else eps_low,
        eps_high=cfg.eps_high if cfg.eps_high is not None else eps_high,
        dynamic_sampling=dapo_like if cfg.dynamic_sampling is None else cfg.dynamic_sampling,
        overlong_cache=overlong, beta=cfg.beta, max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
    )


def compute_advantages(rewards: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """(B,) rewards in contiguous groups → (B,) advantages: group-normalised, centred only, or RLOO."""
    if kind == "rloo":
        return losses.rloo_advantages(rewards, group_size)
    return losses.group_advantages(rewards, group_size, scale=kind)


# ---------------------------------------------------------------- batches and log-probs


@dataclass
class Row:
    """One completion of a rollout, ready to collate."""

    prompt_ids: list[int]
    completion_ids: list[int]
    image: torch.Tensor | None  # (P_v, D_v) tower features or (tpi, D) projected embeds of its prompt
    advantage: float
    keep: bool = True  # False: filler for a dropped group (no loss, no count)


def collate_rows(rows: list[Row], pad_id: int, image_key: str) -> dict:
    """[left-padded prompt | right-padded completion] rows, completion mask and positions as in generate."""
    prompt_width = max(len(r.prompt_ids) for r in rows)
    width = max(1, max(len(r.completion_ids) for r in rows))
    input_ids = torch.full((len(rows), prompt_width + width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        start, n = prompt_width - len(row.prompt_ids), len(row.completion_ids)
        input_ids[i, start:prompt_width + n] = torch.tensor(row.prompt_ids + row.completion_ids)
        attention_mask[i, start:prompt_width + n] = 1
        completion_mask[i, :n] = row.keep
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # what HF generate uses for left padding
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
             "completion_mask": completion_mask, "prompt_width": prompt_width,
             "advantages": torch.tensor([r.advantage for r in rows], dtype=torch.float32),
             "keep": torch.tensor([r.keep for r in rows])}
    images = [r.image for r in rows if r.image is not None]
    if images:
        batch[image_key] = torch.stack(images)  # rows with images, in row order
    return batch


def _image_embeds(model, batch: dict, projector=None) -> torch.Tensor:
    """Projected image embeddings: re-run the projector on stored tower features, or the stored embeds.

    A text-only micro-batch gets zero rows, so the forward runs no vision pass of its own: every rank then calls
    the same modules in the same order (ZeRO-3 gathers their shards in collectives). When the projector trains
    (and grad is on), the zero rows come from projecting blank features, which keeps the projector in the graph
    with a zero gradient, like the image ranks' projector pass.
    """
    core = getattr(model, "module", model)  # unwrap DDP / DeepSpeed
    projector = projector or core.projector
    if "image_features" in batch:
        return projector(batch["image_features"].to(next(projector.parameters()).dtype))
    if "image_embeds" in batch:
        return batch["image_embeds"]
    device, dtype = batch["input_ids"].device, next(projector.parameters()).dtype
    if torch.is_grad_enabled() and any(p.requires_grad for p in projector.parameters()):
        blank = torch.zeros(1, core.vision.num_patches, core.vision.hidden_size, device=device, dtype=dtype)
        return projector(blank)[:0]
    width = core.lm.get_input_embeddings().embedding_dim
    return torch.zeros(0, core.tokens_per_image, width, device=device, dtype=dtype)


def completion_logprobs(model, batch: dict, temperature: float, projector=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the completion tokens under `model` → (logps (B, C), logits (B, C, V)), temperature-scaled."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], image_embeds=_image_embeds(model, batch, projector))
    start = batch["prompt_width"] - 1  # logits at the last prompt token predict the first completion token
    logits = out.logits[:, start:]  # (B, C + 1, V)
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    labels = batch["input_ids"][:, start:].masked_fill(
        torch.nn.functional.pad(~batch["completion_mask"], (1, 0), value=True), IGNORE_INDEX)
    logps, _ = losses.token_logprobs(logits, labels)
    return logps, logits[:, :-1]


class Reference:
    """KL anchor, built before training: the LoRA policy with adapters disabled (plus a frozen copy of the
    projector if it trains), or a frozen copy of projector + LM (the frozen tower is shared)."""

    def __init__(self, policy, mode: str):
        if mode not in ("adapter", "copy"):
            raise ValueError(f"reference mode {mode!r}; expected adapter | copy")
        if mode == "adapter" and not hasattr(policy.lm, "disable_adapter"):
            raise ValueError("grpo.reference = 'adapter' needs a LoRA policy (freeze.lm: lora)")
        self.policy, self.mode = policy, mode
        self.copy = self.projector = None
        if mode == "copy":  # ordinary parameters even under ZeRO-3 (build it inside vlpost.train.zero.whole_model)
            memo = {id(policy.vision): policy.vision, id(policy.tokenizer): policy.tokenizer}
            self.copy = plain_copy(policy, memo).requires_grad_(False).eval()
        elif any(p.requires_grad for p in policy.projector.parameters()):
            self.projector = plain_copy(policy.projector).requires_grad_(False).eval()

    @torch.no_grad()
    def logps(self, batch: dict, temperature: float) -> torch.Tensor:
        device = self.policy.device
        if self.mode == "adapter":
            projector = self.projector.to(device) if self.projector is not None else None
            with self.policy.lm.disable_adapter():
                return completion_logprobs(self.policy, batch, temperature, projector)[0]
        return completion_logprobs(self.copy.to(device), batch, temperature)[0]


def build_reference(model, cfg: GRPOLossConfig) -> Reference | None:
    """None when beta = 0 (no reference pass at all); `auto` picks adapter for LoRA, else a copy."""
    if cfg.beta == 0 or cfg.reference == "none":
        return None
    mode = cfg.reference
    if mode == "auto":
        mode = "adapter" if hasattr(model.lm, "disable_adapter") else "copy"
    return Reference(model, mode)


# ---------------------------------------------------------------- rollout batches


class GRPOBatches:
    """Micro-batches for the trainer; generates a fresh rollout with the current policy when the buffer is empty."""

    def __init__(self, model, source, engine: RolloutEngine, settings: LossSettings, rollout: RolloutConfig, *,
                 batch_size: int, grad_accum: int, num_iterations: int = 1, max_refill: int = 3,
                 reward_fn: Callable | None = None, reference: Reference | None = None,
                 max_prompt_length: int = 2048, autocast: Callable | None = None, gather: Callable | None = None):
        rows = batch_size * grad_accum
        if rows % rollout.group_size:
            raise ValueError(f"{rows} completions per step is not a multiple of group_size {rollout.group_size}")
        self.model, self.source, self.engine = model, source, engine
        self.settings, self.sampling = settings, rollout
        self.batch_size, self.grad_accum, self.num_iterations = batch_size, grad_accum, num_iterations
        self.prompts_per_step, self.max_refill = rows // rollout.group_size, max_refill
        self.reward_fn, self.reference = reward_fn or default_rewards, reference
        self.encoder = ChatEncoder(model.tokenizer, model.tokens_per_image, max_length=max_prompt_length)
        self.autocast = autocast or nullcontext
        # entered once per rollout on every rank (generation + old / reference log-probs): e.g.
        # vlpost.train.zero.whole_model under ZeRO-3, so each rank generates at its own pace without collectives
        self.gather = gather or nullcontext
        self.project_in_loss = any(p.requires_grad for p in model.projector.parameters())
        self.skipped: Counter = Counter()
        self.prompts_drawn, self.gen_seconds, self.first_start = 0, 0.0, None
        self._prompts: Iterator | None = None

    def __iter__(self) -> Iterator[dict]:
        while True:
            built = self.next_rollout_batch()
            if built is None:
                return
            micro, metrics = built
            for _ in range(self.num_iterations):
                for index, batch in enumerate(micro):
                    yield {**batch, "rollout_metrics": metrics} if index == 0 else batch

    # ------------------------------------------------------------------ prompts

    def _take_prompts(self, n: int) -> list[tuple[dict, object, list[int]]]:
        """Up to n encodable prompt samples (sample, image, ids); bad samples are skipped and counted."""
        if self._prompts is None:
            self._prompts = iter(self.source)
        taken = []
        for sample, image in self._prompts:
            try:
                taken.append((sample, image, encode_prompt_sample(self.encoder, sample, image)))
            except SampleError as err:
                self.skipped[err.reason] += 1
                log.warning("skipped %s", err)
                continue
            if len(taken) == n:
                break
        self.prompts_drawn += len(taken)
        return taken

    # ------------------------------------------------------------------ one rollout batch

    def _generate_round(self, n: int) -> tuple[list[list[Row]], torch.Tensor, ScoredRound] | None:
        """Generate G completions for n new prompts → (groups of rows, shaped rewards (n*G,), round)."""
        prompts = self._take_prompts(n)
        if not prompts:
            return None
        G = self.sampling.group_size
        rollout: Rollout = self.engine.generate([p[2] for p in prompts], [p[1] for p in prompts], G, self.sampling)
        self.gen_seconds += rollout.seconds
        samples = [p[0] for p in prompts for _ in range(G)]
        raw = as_rewards(self.reward_fn(rollout.texts, samples), len(samples))
        shaped = raw
        if self.settings.overlong_cache:
            shaped = raw + losses.overlong_penalty(torch.tensor(rollout.lengths), self.settings.max_completion_length,
                                                   self.settings.overlong_cache)
        advantages = compute_advantages(shaped, G, self.settings.advantage)
        images = rollout.image_features if self.project_in_loss else rollout.image_embeds
        groups = []
        for p in range(len(prompts)):
            img = rollout.image_index[p]
            groups.append([Row(rollout.prompt_ids[p], rollout.completion_ids[i], None if img is None else images[img],
                               float(advantages[i])) for i in range(p * G, (p + 1) * G)])
        return groups, shaped, ScoredRound(rollout.texts, samples, raw, rollout.lengths, rollout.truncated)

    def _collect_groups(self) -> tuple[list[list[Row]], list[ScoredRound], int, int] | None:
        """Groups for one optimizer step; dynamic sampling drops constant groups and refills (capped)."""
        need, G = self.prompts_per_step, self.sampling.group_size
        kept: list[list[Row]] = []
        dropped: list[list[Row]] = []
        rounds: list[ScoredRound] = []
        attempts = 0
        while len(kept) < need and attempts <= (self.max_refill if self.settings.dynamic_sampling else 0):
            made = self._generate_round(need - len(kept))
            attempts += 1
            if made is None:
                break
            groups, shaped, round_ = made
            rounds.append(round_)
            varied = losses.dynamic_sampling_mask(shaped, G) if self.settings.dynamic_sampling else None
            for index, group in enumerate(groups):
                (kept if varied is None or bool(varied[index]) else dropped).append(group)
        if not rounds:
            return None
        generated, num_dropped = len(kept) + len(dropped), len(dropped)
        for group in dropped[: max(0, need - len(kept))]:  # fillers keep shapes fixed; they add nothing
            for row in group:
                row.keep = False
            kept.append(group)
        return kept, rounds, generated, num_dropped

    def next_rollout_batch(self) -> tuple[list[dict], dict] | None:
        """The next optimizer step's micro-batches (old / reference log-probs filled in) and rollout metrics."""
        started = time.perf_counter()
        gen_before = self.gen_seconds
        share = None if self.first_start is None else self.gen_seconds / max(started - self.first_start, 1e-9)
        self.first_start = self.first_start or started
        with self.gather():  # every rank, once per rollout, whatever its data
            collected = self._collect_groups()
            if collected is None:
                return None
            groups, rounds, generated, dropped = collected
            rows = sorted((row for group in groups for row in group),
                          key=lambda r: len(r.prompt_ids) + len(r.completion_ids), reverse=True)
            key = "image_features" if self.project_in_loss else "image_embeds"
            pad_id = self.model.tokenizer.pad_token_id
            device = self.model.device
            micro = [collate_rows(rows[i:i + self.batch_size], pad_id, key)
                     for i in range(0, len(rows), self.batch_size)]
            step_tokens = sum(int(b["completion_mask"].sum()) for b in micro)
            for index, batch in enumerate(micro):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                micro[index] = self._fill_logps(batch) | {"step_tokens": step_tokens}
        metrics = rollout_metrics(rounds)
        metrics["dynamic/dropped_share"] = dropped / max(generated, 1)
        metrics["dynamic/generated_groups"] = generated
        metrics["time/generate_s"] = self.gen_seconds - gen_before
        metrics["time/rollout_s"] = time.perf_counter() - started
        if share is not None:
            metrics["time/generation_share"] = share
        return micro, metrics

    @torch.no_grad()
    def _fill_logps(self, batch: dict) -> dict:
        """Old log-probs (only when μ > 1; μ = 1 is exactly on-policy) and reference log-probs, no grad."""
        temperature = self.settings.temperature
        was_training = self.model.training
        self.model.train()  # the same mode as the loss pass, so old == current before any update
        try:
            with self.autocast():
                if self.num_iterations > 1:
                    batch["old_logps"] = completion_logprobs(self.model, batch, temperature)[0]
                if self.reference is not None:
                    batch["ref_logps"] = self.reference.logps(batch, temperature)
        finally:
            self.model.train(was_training)
        return batch

    def generation_share(self) -> float | None:
        """Generation seconds over wall seconds since the first rollout began (whole run so far)."""
        if self.first_start is None:
            return None
        return self.gen_seconds / max(time.perf_counter() - self.first_start, 1e-9)

    def state_dict(self) -> dict:
        """Prompt position only: a resumed run generates a fresh rollout from there."""
        state = self.source.state_dict() if hasattr(self.source, "state_dict") else {}
        return {"source": state, "skipped": dict(self.skipped), "prompts_drawn": self.prompts_drawn}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(state["source"])
        self.skipped = Counter(state.get("skipped", {}))
        self.prompts_drawn = state.get("prompts_drawn", 0)
        self._prompts = None


# ---------------------------------------------------------------- the objective


class GRPOObjective:
    """Clipped policy loss as a SUM; `count` gives the trainer its normaliser (tokens or sequences)."""

    def __init__(self, settings: LossSettings, entropy: bool = True):
        self.settings, self.entropy = settings, entropy

    def count(self, batch: dict) -> int:
        if self.settings.aggregation == "token_mean":
            return int(batch["completion_mask"].sum())
        return int(batch["keep"].sum())

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        s = self.settings
        mask = batch["completion_mask"]
        logps, logits = completion_logprobs(model, batch, s.temperature)
        loss, policy_metrics = losses.policy_loss(
            logps, batch.get("old_logps"), batch["advantages"], mask, eps_low=s.eps_low, eps_high=s.eps_high,
            aggregation=s.aggregation, max_completion_length=s.max_completion_length, ratio_level=s.ratio_level,
            ref_logps=batch.get("ref_logps"), beta=s.beta, num_tokens=1.0 if s.aggregation == "token_mean" else None)
        if s.aggregation != "token_mean":
            loss = loss * mask.shape[0]  # mean over rows → sum; the trainer divides by the kept rows
        # token-weighted shares of this rank's step, so the trainer's sum over micro-batches is the step mean
        share = mask.sum() / max(batch.get("step_tokens", 1), 1)
        metrics = {k: policy_metrics[k] * share for k in POLICY_METRICS if k in policy_metrics}
        if self.entropy:
            with torch.no_grad():
                metrics["entropy"] = losses.entropy_from_logits(logits.detach(), mask) * share
        metrics.update(batch.get("rollout_metrics", {}))
        return loss, metrics
