"""Training losses as pure tensor functions: SFT NLL, DPO, Bradley–Terry, GRPO/DAPO/Dr.GRPO/GSPO.

The one place logits and labels are shifted is `token_logprobs` (logits[:, t] predicts labels[:, t + 1]).
Everything downstream works on per-token log-probs aligned with the shifted labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from vlpost.constants import IGNORE_INDEX

# Float32 elements per temporary (V-wide) chunk: 2**24 = 64 MiB, e.g. 110 rows of a 151k vocabulary.
CHUNK_ELEMENTS = 2**24

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant_norm")
RATIO_LEVELS = ("token", "sequence")
# Default clip ranges per ratio level (token: PPO/GRPO; sequence: GSPO paper, Zheng et al. 2025, §5).
DEFAULT_EPS = {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4)}


# ---------------------------------------------------------------- token log-probs


def _row_chunks(num_rows: int, rows_per_chunk: int):
    """Yield (start, stop) spans covering range(num_rows)."""
    for start in range(0, num_rows, rows_per_chunk):
        yield start, min(start + rows_per_chunk, num_rows)


class _ShiftedTokenLogprob(torch.autograd.Function):
    """log softmax(logits[:, t])[targets[:, t]] chunk by chunk; backward recomputes softmax per chunk.

    Saves only the input logits (already alive), targets and one logsumexp per token, so neither pass
    keeps a (B, T, V) float32 copy; temporaries are bounded by `rows` x V.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        # logits (B, T, V); targets (B, T-1) valid ids; returns (B, T-1) in >= float32
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        batch, steps = targets.shape
        lse = torch.empty(batch, steps, dtype=compute_dtype, device=logits.device)
        picked = torch.empty_like(lse)
        for b in range(batch):
            for start, stop in _row_chunks(steps, rows):
                chunk = logits[b, start:stop]  # (n, V) view, no copy
                lse[b, start:stop] = torch.logsumexp(chunk.to(compute_dtype), dim=-1)
                picked[b, start:stop] = chunk.gather(-1, targets[b, start:stop, None]).squeeze(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return picked - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # d logp(y) / d logits = onehot(y) - softmax(logits), scaled by grad_out per token
        logits, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # the last position predicts nothing and keeps zero gradient
        for b in range(targets.shape[0]):
            for start, stop in _row_chunks(targets.shape[1], ctx.rows):
                g_tok = grad_out[b, start:stop, None].to(lse.dtype)  # (n, 1)
                chunk = logits[b, start:stop].to(lse.dtype) - lse[b, start:stop, None]  # log-softmax (n, V)
                chunk.exp_().mul_(-g_tok)  # in place: one (n, V) temporary per chunk
                chunk.scatter_add_(-1, targets[b, start:stop, None], g_tok)
                grad[b, start:stop] = chunk.to(grad.dtype)
        return grad, None, None


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label under the shifted logits -> (logps (B, T-1) float32, mask (B, T-1) bool).

    logits (B, T, V), labels (B, T). logps are 0 where mask is False (labels == IGNORE_INDEX). Computed
    as gathered logit minus a per-row logsumexp in chunks of `chunk_elements` (no full log_softmax).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in (B, T)")
    vocab = logits.shape[-1]
    targets = labels[:, 1:]  # the shift: logits[:, t] predicts labels[:, t + 1]
    mask = targets != IGNORE_INDEX
    if bool(((targets >= vocab) | ((targets < 0) & mask)).any()):
        raise ValueError(
            f"labels hold token ids outside [0, {vocab}) other than IGNORE_INDEX={IGNORE_INDEX}: the "
            "tokenizer and the model's vocabulary disagree (resize embeddings after adding tokens)"
        )
    safe_targets = targets.masked_fill(~mask, 0)  # gather index for ignored labels, zeroed below
    rows = max(1, chunk_elements // vocab)
    logps = _ShiftedTokenLogprob.apply(logits, safe_targets, rows)
    return torch.where(mask, logps, 0.0), mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob per sequence -> (sums (B,), token counts (B,)); sums/counts = average."""
    logps, mask = token_logprobs(logits, labels)
    return logps.sum(-1), mask.sum(-1)


# ---------------------------------------------------------------- SFT


def sft_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL over non-ignored tokens and their count -> (sum, count), both 0-d.

    Averaging per-micro-batch means over accumulation steps or ranks over-weights tokens of short
    micro-batches; summing these and dividing once by the total count gives the true token mean.
    """
    logps, mask = token_logprobs(logits, labels)
    return -logps.sum(), mask.sum()


def selected_nll_sum(logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Summed NLL of `targets` (N,) under already-shifted, already-selected logits (N, V) -> 0-d; same chunked
    log-softmax as token_logprobs (no (N, V) float32 copy). Pairs with forward(logits_mask=label_positions(labels))."""
    vocab = logits.shape[-1]
    if bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"labels hold token ids outside [0, {vocab}): the tokenizer and the model's vocabulary "
                         "disagree (resize embeddings after adding tokens)")
    rows = max(1, chunk_elements // vocab)
    return -_ShiftedTokenLogprob.apply(logits[None], targets[None], rows).sum()


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) labels -> (mask (B, T) of positions whose next label is trained, their targets (N,)); the last
    position never predicts. forward(logits_mask=mask).logits[i] predicts targets[i]."""
    nxt = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = nxt != IGNORE_INDEX
    return mask, nxt[nxt != IGNORE_INDEX]


def sft_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL over the batch (== F.cross_entropy on shifted tensors); 0 when no token counts."""
    total, count = sft_nll_sum(logits, labels)
    return total / count.clamp(min=1)


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


def entropy_from_logits(
    logits: torch.Tensor, mask: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """Masked mean entropy of the predictive distributions, chunked; logits (B, T, V), mask (B, T).

    For completion tokens pass logits[:, :-1] with the mask from token_logprobs. Meant for logging
    (call under no_grad): with grad enabled each chunk's float32 softmax is kept for backward.
    """
    if logits.shape[:2] != mask.shape:
        raise ValueError(
            f"entropy: logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in (B, T)"
        )
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = max(1, chunk_elements // logits.shape[-1])
    mask = mask.bool()
    total = logits.new_zeros((), dtype=compute_dtype)
    for b in range(logits.shape[0]):
        for start, stop in _row_chunks(logits.shape[1], rows):
            chunk = logits[b, start:stop].to(compute_dtype)  # (n, V)
            log_p = chunk - torch.logsumexp(chunk, dim=-1, keepdim=True)
            entropy = -(log_p.exp() * log_p).sum(-1)  # (n,)
            total = total + torch.where(mask[b, start:stop], entropy, 0.0).sum()
    return total / mask.sum().clamp(min=1)
