"""GRPO family on rollouts: rewards → group advantages → clipped policy loss, μ optimizer steps per rollout.

This module: loss presets, group advantages, rollout rows and their log-probs, the KL reference and
`GRPOObjective` (the loss). The batch iterable that makes rollouts is `vlpost.train.grpo_batches.GRPOBatches`.

Image features: the tower is frozen, so the rollout keeps its output per prompt and no later pass runs
the tower again. If the projector trains, micro-batches carry those TOWER features and every loss /
log-prob pass re-runs the (cheap) projector with grad, so the projector gets its gradient; if it is
frozen they carry the projected embeddings from generation and the projector does not run again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vlpost.constants import IGNORE_INDEX
from vlpost.data.collate import shared_prefix_mask
from vlpost.train import logprobs, losses
from vlpost.train.grpo_config import GRPOLossConfig, RolloutConfig
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


def collate_groups(groups: list[list[Row]], pad_id: int, image_key: str) -> dict:
    """One row per group, [prompt | completion 1 | ... | completion G]: each completion attends to the prompt and
    to itself (4D block mask; positions continue from the prompt, as in generate), so the prompt — its image tokens
    included — goes through the LM once per group instead of G times, with the same log-probs as `collate_rows`.

    Per completion (B = groups x G rows, as collate_rows gives them): `completion_mask`, `advantages`, `keep`, and
    `labels` (B, C + 1) with `select_rows` / `select_positions` (B, C + 1): the packed position whose logits
    predict each label (the last prompt token for every completion's first token).
    """
    rows = [row for group in groups for row in group]
    width = max(1, max(len(r.completion_ids) for r in rows))
    seq_len = max(len(g[0].prompt_ids) + sum(len(r.completion_ids) for r in g) for g in groups)
    input_ids = torch.full((len(groups), seq_len), pad_id, dtype=torch.long)
    position_ids = torch.zeros_like(input_ids)
    segment = torch.full_like(input_ids, -2)  # -1 prompt, j >= 0 completion j, -2 padding
    select_rows = torch.zeros((len(rows), width + 1), dtype=torch.long)
    select_positions = torch.zeros_like(select_rows)
    labels = torch.full_like(select_rows, IGNORE_INDEX)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    i = 0
    for g, group in enumerate(groups):
        prompt = group[0].prompt_ids
        if any(r.prompt_ids != prompt or (r.image is None) != (group[0].image is None) for r in group):
            raise ValueError("collate_groups needs groups of completions of one prompt (and one image)")
        start = n_prompt = len(prompt)
        input_ids[g, :n_prompt] = torch.tensor(prompt)
        position_ids[g, :n_prompt] = torch.arange(n_prompt)
        segment[g, :n_prompt] = -1
        for j, row in enumerate(group):
            n = len(row.completion_ids)
            input_ids[g, start:start + n] = torch.tensor(row.completion_ids, dtype=torch.long)
            position_ids[g, start:start + n] = torch.arange(n_prompt, n_prompt + n)
            segment[g, start:start + n] = j
            select_rows[i] = g
            if n:
                select_positions[i, 0] = n_prompt - 1  # the last prompt token predicts the first completion token
                select_positions[i, 1:n] = torch.arange(start, start + n - 1)
                if row.keep:
                    labels[i, 1:n + 1] = torch.tensor(row.completion_ids, dtype=torch.long)
            completion_mask[i, :n] = row.keep
            start += n
            i += 1
    attention_mask = shared_prefix_mask(segment)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
             "completion_mask": completion_mask, "labels": labels, "select_rows": select_rows,
             "select_positions": select_positions,
             "advantages": torch.tensor([r.advantage for r in rows], dtype=torch.float32),
             "keep": torch.tensor([r.keep for r in rows])}
    images = [g[0].image for g in groups if g[0].image is not None]
    if images:
        batch[image_key] = torch.stack(images)  # one per group, in row order
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
    if "select_rows" in batch:  # collate_groups: gather each completion's predicting positions
        logits = out.logits[batch["select_rows"], batch["select_positions"]]  # (B, C + 1, V)
        labels = batch["labels"]
    else:
        start = batch["prompt_width"] - 1  # logits at the last prompt token predict the first completion token
        logits = out.logits[:, start:]  # (B, C + 1, V)
        labels = batch["input_ids"][:, start:].masked_fill(
            torch.nn.functional.pad(~batch["completion_mask"], (1, 0), value=True), IGNORE_INDEX)
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    logps, _ = logprobs.token_logprobs(logits, labels)
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
                metrics["entropy"] = logprobs.entropy_from_logits(logits.detach(), mask) * share
        metrics.update(batch.get("rollout_metrics", {}))
        return loss, metrics
