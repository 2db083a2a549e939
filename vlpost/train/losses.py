"""Training losses as pure tensor functions: DPO, Bradley–Terry, GRPO/DAPO/Dr.GRPO/GSPO.

They work on per-token / per-sequence log-probs aligned with the shifted labels (vlpost.train.logprobs, which
also holds the SFT NLL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant_norm")
RATIO_LEVELS = ("token", "sequence")
# Default clip ranges per ratio level (token: PPO/GRPO; sequence: GSPO paper, Zheng et al. 2025, §5).
DEFAULT_EPS = {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4)}


# ---------------------------------------------------------------- DPO and reward models


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss from completion log-probs (B,) -> (losses, chosen_rewards, rejected_rewards), each (B,).

    sigmoid: -(1-e) logsig(b m) - e logsig(-b m) (e>0: conservative DPO, Mitchell 2023, as TRL);
    robust: ((1-e)(-logsig(b m)) + e logsig(-b m)) / (1-2e) (Chowdhury 2024); ipo: (m - 1/(2b))^2.
    m = (pi_c - ref_c) - (pi_r - ref_r). Pass summed log-probs for sigmoid/robust and length-AVERAGED
    log-probs (sums / counts from sequence_logprobs) for ipo, as TRL does. Rewards = b (policy - ref), detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type {loss_type!r} unknown; choose one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("dpo label_smoothing applies to sigmoid/robust, not ipo; set it to 0")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    margin = chosen_logratio - rejected_logratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * margin) + eps * F.logsigmoid(-beta * margin)) / (
            1 - 2 * eps
        )
    else:
        losses = (margin - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def dpo_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Batch means for logging, as detached 0-d tensors (the trainer reduces across ranks)."""
    with torch.no_grad():
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }


def dpo_with_sft(dpo_losses: torch.Tensor, chosen_nll: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean DPO loss plus alpha x the token-mean NLL of the chosen completions (sft_nll on them; RPO)."""
    return dpo_losses.mean() + alpha * chosen_nll.mean()


def bt_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Bradley–Terry reward-model loss per pair: -logsig(s_c - s_r [- margin]) -> (B,)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs scored strictly chosen > rejected (ties count as wrong), 0-d."""
    return (chosen_scores > rejected_scores).float().mean()


# ---------------------------------------------------------------- GRPO family: advantages and rewards


def _groups(rewards: torch.Tensor, group_size: int, min_size: int = 1) -> torch.Tensor:
    """Reshape contiguous groups: (B,) -> (B // G, G), with a clear error when B is not a multiple."""
    if rewards.dim() != 1 or group_size < min_size or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of {group_size} "
            f"(need 1-D, B a multiple of group_size, group_size >= {min_size})"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages (B,): (r - group mean) / (group std + eps); scale="none" skips the division (Dr.GRPO).

    The std is the unbiased (N-1) estimate, as torch.std and TRL use; a constant group gets 0.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"advantage scale {scale!r} unknown; choose 'std' or 'none'")
    grouped = _groups(rewards.float(), group_size, min_size=2 if scale == "std" else 1)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale == "std":
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (B,): r_i - mean of the other rewards in its group."""
    grouped = _groups(rewards.float(), group_size, min_size=2)
    others_mean = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (B,): 0 up to max-cache, linear to -1 at max, -1 beyond."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong cache_len must be in (0, max_len={max_len}], got {cache_len}")
    start = max_len - cache_len
    penalty = (start - lengths.float()) / cache_len
    return penalty.clamp(min=-1.0, max=0.0)


def dynamic_sampling_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n_groups,) bool: True where a group's rewards are not all equal (DAPO keeps only those)."""
    grouped = _groups(rewards, group_size)
    return grouped.amax(-1) != grouped.amin(-1)


# ---------------------------------------------------------------- GRPO family: the policy loss


def _importance_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, ratio_level: str) -> torch.Tensor:
    """Per-token ratio (B, T): exp(logp - old) per token, or GSPO-token's sg[s_i] * pi / sg[pi].

    s_i = exp(mean over completion tokens of (logp - old)); the stop-gradient form has value s_i on
    every token and, under sequence_mean, the GSPO paper's gradient s_i A_i mean_t grad logp.
    """
    if ratio_level == "token":
        return torch.exp(log_ratio)
    counts = mask.sum(-1, keepdim=True).clamp(min=1)
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / counts  # (B, 1); log_ratio is 0 off-mask
    return torch.exp(log_ratio - log_ratio.detach() + seq_log_ratio.detach())


def _aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    max_len: int | None,
    num_tokens: float | None,
) -> torch.Tensor:
    """Reduce (B, T) token losses (0 off-mask) to a scalar the way each GRPO variant does."""
    if aggregation == "sequence_mean":  # GRPO: mean over each sequence's tokens, then over sequences
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if aggregation == "token_mean":  # DAPO: every token of the batch weighs the same
        denom = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
        return per_token.sum() / denom
    if max_len is None:
        raise ValueError(
            "aggregation 'constant_norm' (Dr.GRPO) needs max_completion_length (the generation budget)"
        )
    return per_token.sum() / (per_token.shape[0] * max_len)  # Dr.GRPO: constant B * L_max


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    eps_low: float | None = None,
    eps_high: float | None = None,
    aggregation: str = "sequence_mean",
    max_completion_length: int | None = None,
    ratio_level: str = "token",
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) (+ beta k3 KL) -> (loss, metrics).

    logps/old_logps/ref_logps/completion_mask (B, T), advantages (B,). old_logps=None means on-policy
    (logps.detach()). GRPO: token ratio + sequence_mean; DAPO: token_mean, eps_high > eps_low;
    Dr.GRPO: constant_norm with max_completion_length; GSPO: ratio_level="sequence" (default eps
    3e-4 / 4e-4). num_tokens overrides token_mean's denominator (whole optimizer step's token count).
    Metrics (detached 0-d): clip fractions (token-weighted, only where clipping changes the loss), ratio, kl.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"policy loss aggregation {aggregation!r} unknown; choose one of {AGGREGATIONS}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"policy loss ratio_level {ratio_level!r} unknown; choose one of {RATIO_LEVELS}")
    if beta and ref_logps is None:
        raise ValueError(f"policy loss beta={beta} needs ref_logps (or set beta=0 to drop the KL term)")
    default_low, default_high = DEFAULT_EPS[ratio_level]
    eps_low = default_low if eps_low is None else eps_low
    eps_high = default_high if eps_high is None else eps_high
    mask = completion_mask.bool()
    old = logps.detach() if old_logps is None else old_logps.detach()
    log_ratio = torch.where(mask, logps - old, 0.0)  # off-mask values may be padding garbage
    ratio = _importance_ratio(log_ratio, mask, ratio_level)
    adv = advantages.detach().float().unsqueeze(-1)  # (B, 1)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logps is not None:
        ref_minus = torch.where(mask, ref_logps.detach() - logps, 0.0)
        kl = torch.exp(ref_minus) - ref_minus - 1  # k3 estimator, >= 0, 0 off-mask
        if beta:
            per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, 0.0)
    loss = _aggregate(per_token, mask, aggregation, max_completion_length, num_tokens)
    return loss, _policy_metrics(ratio, adv, mask, eps_low, eps_high, kl)


def _policy_metrics(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    kl: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Token-weighted masked means of the clipping events, ratio and KL."""
    with torch.no_grad():
        count = mask.sum().clamp(min=1)

        def masked_mean(values: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, values.float(), 0.0).sum() / count

        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        metrics = {
            "clip_fraction/low": masked_mean(low),
            "clip_fraction/high": masked_mean(high),
            "clip_fraction": masked_mean(low | high),
            "ratio/mean": masked_mean(ratio),
            "ratio/max": torch.where(mask, ratio, float("-inf")).max() if mask.any() else ratio.new_zeros(()),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl)
        return metrics
