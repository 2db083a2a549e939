"""`GRPOBatches`, the GRPO trainer's batch iterable.

When its buffer is empty it draws prompts, generates G completions each with the current policy (rollout.py),
scores them, drops constant-reward groups and refills (DAPO dynamic sampling), stores old / reference log-probs
once (no grad), and yields the rollout as `train.grad_accum` micro-batches, `grpo.num_iterations` times over.
The loss, advantages and log-prob helpers are in `vlpost.train.grpo` (its docstring: how image features travel).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

from vlpost.data.chat import ChatEncoder, SampleError
from vlpost.train import losses
from vlpost.train.grpo import (
    LossSettings,
    Reference,
    Row,
    collate_groups,
    collate_rows,
    completion_logprobs,
    compute_advantages,
)
from vlpost.train.grpo_config import RolloutConfig
from vlpost.train.rollout import Rollout, RolloutEngine
from vlpost.train.rollout_scoring import (
    ScoredRound,
    as_rewards,
    default_rewards,
    encode_prompt_sample,
    rollout_metrics,
)

log = logging.getLogger(__name__)


class GRPOBatches:
    """Micro-batches for the trainer; generates a fresh rollout with the current policy when the buffer is empty."""

    def __init__(self, model, source, engine: RolloutEngine, settings: LossSettings, rollout: RolloutConfig, *,
                 batch_size: int, grad_accum: int, num_iterations: int = 1, max_refill: int = 3,
                 reward_fn: Callable | None = None, reference: Reference | None = None,
                 max_prompt_length: int = 2048, autocast: Callable | None = None, gather: Callable | None = None,
                 shared_prompt: bool = False):
        rows = batch_size * grad_accum
        if rows % rollout.group_size:
            raise ValueError(f"{rows} completions per step is not a multiple of group_size {rollout.group_size}")
        if shared_prompt and batch_size % rollout.group_size:
            raise ValueError(f"shared_prompt packs whole groups: batch_size {batch_size} is not a multiple of "
                             f"group_size {rollout.group_size}")
        self.shared_prompt = shared_prompt
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
            key = "image_features" if self.project_in_loss else "image_embeds"
            pad_id = self.model.tokenizer.pad_token_id
            device = self.model.device
            if self.shared_prompt:  # whole groups, one packed row each, longest first
                groups = sorted(groups, key=lambda g: len(g[0].prompt_ids) + sum(len(r.completion_ids) for r in g),
                                reverse=True)
                per = self.batch_size // self.sampling.group_size
                micro = [collate_groups(groups[i:i + per], pad_id, key) for i in range(0, len(groups), per)]
            else:
                rows = sorted((row for group in groups for row in group),
                              key=lambda r: len(r.prompt_ids) + len(r.completion_ids), reverse=True)
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
