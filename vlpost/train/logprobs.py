"""Token log-probs and SFT NLL from logits, chunked over the vocabulary (no (B, T, V) float32 copy).

The one place logits and labels are shifted is `token_logprobs` (logits[:, t] predicts labels[:, t + 1]);
`label_positions` + `selected_nll_sum` do the same shift for logits computed at trained positions only.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from vlpost.constants import IGNORE_INDEX, LOSS_REDUCTIONS

# Float32 elements per temporary (V-wide) chunk: 2**24 = 64 MiB, e.g. 110 rows of a 151k vocabulary.
CHUNK_ELEMENTS = 2**24

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


def _check_ids(targets: torch.Tensor, trained: torch.Tensor, vocab: int) -> None:
    if bool(((targets >= vocab) | ((targets < 0) & trained)).any()):
        raise ValueError(
            f"labels hold token ids outside [0, {vocab}) other than IGNORE_INDEX={IGNORE_INDEX}: the "
            "tokenizer and the model's vocabulary disagree (resize embeddings after adding tokens)"
        )


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
    _check_ids(targets, mask, vocab)
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


def selected_nll_sum(logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed NLL of `targets` (N,) under already-shifted, already-selected logits (N, V) -> 0-d; same chunked
    log-softmax as token_logprobs (no (N, V) float32 copy). Pairs with forward(logits_mask=label_positions(labels)).
    `weights` (N,) scales each token's NLL (see `loss_weights`)."""
    vocab = logits.shape[-1]
    _check_ids(targets, torch.ones_like(targets, dtype=torch.bool), vocab)
    rows = max(1, chunk_elements // vocab)
    logps = _ShiftedTokenLogprob.apply(logits[None], targets[None], rows)[0]
    return -(logps if weights is None else logps * weights.to(logps.dtype)).sum()


def loss_weights(labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                 reduction: str = "token") -> tuple[torch.Tensor | None, float]:
    """Per trained target (in `label_positions` order) its loss weight, and the micro-batch's normaliser.

    With n_i the trained tokens of sample i (a row, or a segment of a packed row: position_ids restart at 0):
    - token:  weight 1, normaliser sum n_i. Every token weighs the same, so long answers dominate the gradient.
    - sample: weight 1 / n_i, normaliser the number of samples: the mean over samples of each one's token mean,
      so a one-word VQA answer weighs as much as a paragraph.
    - square: weight 1 / sqrt(n_i), normaliser sum sqrt(n_i) (InternVL 2.5's "square averaging", in between).
    The trainer sums losses and normalisers over micro-batches and ranks before dividing, so the result is the
    reduction over the whole optimizer step, whatever the accumulation and world size. Weights are None for token.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction {reduction!r}; expected one of {LOSS_REDUCTIONS}")
    trained = labels[:, 1:] != IGNORE_INDEX  # targets, as label_positions orders them (row-major)
    if reduction == "token":
        return None, float(trained.sum())
    segment = torch.zeros_like(labels) if position_ids is None else (position_ids == 0).long().cumsum(1)
    sample = torch.arange(len(labels), device=labels.device)[:, None] * (labels.shape[1] + 1) + segment
    _, which, n = torch.unique(sample[:, 1:][trained], return_inverse=True, return_counts=True)
    n = n.to(torch.float64)
    if reduction == "sample":
        return (1.0 / n)[which].float(), float(len(n))
    return (1.0 / n.sqrt())[which].float(), float(n.sqrt().sum())


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


# ---------------------------------------------------------------- logging


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
