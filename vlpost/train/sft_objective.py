"""The stage 1/2 loss: assistant-token NLL, averaged per token, per sample or in between (`train.loss_reduction`)."""

from __future__ import annotations

import torch

from vlpost.constants import LOSS_REDUCTIONS
from vlpost.train.logprobs import label_positions, loss_weights, selected_nll_sum

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_features", "position_ids")


class SFTObjective:
    """Summed (weighted) NLL over assistant tokens; the trainer divides by the step's global normaliser: tokens
    (`reduction="token"`), samples ("sample") or sum of sqrt(tokens) per sample ("square"); see `loss_weights`."""

    def __init__(self, reduction: str = "token"):
        if reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"train.loss_reduction = {reduction!r}; expected one of {LOSS_REDUCTIONS}")
        self.reduction = reduction

    def count(self, batch: dict) -> float:
        return loss_weights(batch["labels"], batch.get("position_ids"), self.reduction)[1]

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        # the LM head runs only where a label is trained (an SFT batch trains a fraction of its positions)
        mask, targets = label_positions(batch["labels"])
        out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, logits_mask=mask)
        weights, _ = loss_weights(batch["labels"], batch.get("position_ids"), self.reduction)
        return selected_nll_sum(out.logits, targets, weights=weights), {"tokens": int(targets.numel())}
