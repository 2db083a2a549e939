"""A reward model: the VLM's last hidden state at the last real token → a scalar, trained Bradley–Terry style.

Saved as a normal run dir (the VLM) plus `reward_head.safetensors`; `load_reward_model(run_dir).score(...)`
gives GRPO a learned reward and eval a judge.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from vlpost.constants import IMAGE_TOKEN, RUN_META_FILE
from vlpost.data.chat import ChatEncoder
from vlpost.data.collate import Example, pad_batch
from vlpost.model.checkpoint import load_strict
from vlpost.train.losses import bt_loss, pairwise_accuracy
from vlpost.train.preference import pair_image_embeds, unwrap, vision_features

HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """VisionLanguageModel + Linear(D, 1) on the hidden state of each row's last non-pad token."""

    def __init__(self, vlm, head: nn.Linear | None = None):
        super().__init__()
        self.vlm = vlm
        hidden = vlm.lm.get_input_embeddings().embedding_dim
        self.head = head if head is not None else nn.Linear(hidden, 1)
        if head is None:
            nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.head.bias)

    # The trainer and run-dir helpers look for these on the model they train and save.
    @property
    def vision(self):
        return self.vlm.vision

    @property
    def projector(self):
        return self.vlm.projector

    @property
    def lm(self):
        return self.vlm.lm

    @property
    def spec(self) -> dict:
        return self.vlm.spec

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Right-padded rows (R, T) → scores (R,)."""
        embeds = self.vlm.embed(input_ids, image_embeds=image_embeds)  # (R, T, D)
        decoder = self.vlm.lm.get_decoder()  # the base transformer: hidden states without the (R, T, V) logits
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.long().sum(-1).clamp(min=1) - 1  # (R,) index of the last real token
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (R, D)
        return self.head(final.to(self.head.weight.dtype)).squeeze(-1)

    def save_pretrained(self, out_dir: str | Path, lineage: dict | None = None, projector_only: bool = False) -> None:
        """The VLM's run dir plus the head weights; vlpost.json records the head."""
        self.vlm.spec["reward_head"] = {"file": HEAD_FILE, "hidden_size": self.head.in_features}
        self.vlm.save_pretrained(out_dir, lineage=lineage, projector_only=projector_only)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(Path(out_dir) / HEAD_FILE))

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, prompts: list, completions: list, images: list[Image.Image | None] | None = None,
              batch_size: int = 16, max_length: int = 2048) -> list[float]:
        """Scalar rewards for (prompt, completion, image) triples; prompts are message lists or user strings."""
        images = images if images is not None else [None] * len(prompts)
        if not len(prompts) == len(completions) == len(images):
            raise ValueError(f"score: {len(prompts)} prompts, {len(completions)} completions, {len(images)} images")
        encoder = ChatEncoder(self.vlm.tokenizer, self.vlm.tokens_per_image, max_length=max_length)
        was_training = self.training
        self.eval()
        scores: list[float] = []
        for start in range(0, len(prompts), batch_size):
            rows = [_encode(encoder, self.vlm, p, c, img, start + i) for i, (p, c, img) in
                    enumerate(zip(prompts[start:start + batch_size], completions[start:start + batch_size],
                                  images[start:start + batch_size]))]
            batch = pad_batch(rows, self.vlm.tokenizer.pad_token_id)
            device = self.head.weight.device
            image_embeds = None
            if "pixel_values" in batch:
                image_embeds = self.vlm.encode_images(batch["pixel_values"].to(device))
            scores += self(batch["input_ids"].to(device), batch["attention_mask"].to(device), image_embeds).tolist()
        self.train(was_training)
        return scores


def _messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _encode(encoder: ChatEncoder, vlm, prompt, completion, image, index: int) -> Example:
    if isinstance(prompt, str) and image is not None and IMAGE_TOKEN not in prompt:
        prompt = f"{IMAGE_TOKEN}\n{prompt}"
    encoded = encoder.encode_pair(_messages(prompt, "user"), _messages(completion, "assistant"),
                                  sample_id=f"score-{index}", num_images=0 if image is None else 1)
    pixels = None if image is None else vlm.pixel_values([image])
    return Example(f"score-{index}", encoded.input_ids, encoded.labels, pixels)


def load_reward_model(run_dir: str | Path) -> RewardModel:
    """A reward model run dir (stages/reward.py) → RewardModel in eval mode."""
    from vlpost.model.vlm import VisionLanguageModel

    run_dir = Path(run_dir)
    spec = json.loads((run_dir / RUN_META_FILE).read_text()) if (run_dir / RUN_META_FILE).is_file() else {}
    if "reward_head" not in spec or not (run_dir / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a reward model run dir (no {HEAD_FILE}); train one with stages/reward.py")
    vlm = VisionLanguageModel.from_pretrained(run_dir)
    head = nn.Linear(spec["reward_head"]["hidden_size"], 1)
    load_strict(head, run_dir / HEAD_FILE)
    return RewardModel(vlm, head).eval()


def prepare_reward_model(vlm, freeze) -> RewardModel:
    """Freeze per `freeze` (head-only training allowed: lm and projector both frozen) and add the head."""
    from vlpost.train.freeze import apply_freeze

    if freeze.lm == "frozen" and freeze.projector == "frozen":
        vlm.requires_grad_(False)
    else:
        apply_freeze(vlm, freeze)
    return RewardModel(vlm)


# ----------------------------------------------------------------------------- objective and evaluation


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) scores of a [chosen; rejected] batch; one tower pass per pair image."""
    core = unwrap(model)
    image_embeds = pair_image_embeds(core.projector, vision_features(core.vlm, batch))
    scores = model(batch["input_ids"], batch["attention_mask"], image_embeds)
    pairs = batch["pairs"]
    return scores[:pairs], scores[pairs:]


class BTObjective:
    """Bradley–Terry loss summed over pairs; the trainer divides by the step's pair count."""

    def __init__(self, margin: float = 0.0, pairs_per_step: int | None = None):
        self.margin, self.pairs_per_step = margin, pairs_per_step  # metrics weighted as in DPOObjective

    def count(self, batch: dict) -> int:
        return int(batch["pairs"])

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = pair_scores(model, batch)
        losses = bt_loss(chosen, rejected, self.margin or None)
        share = batch["pairs"] / self.pairs_per_step if self.pairs_per_step else 1.0
        metrics = {"accuracy": float(pairwise_accuracy(chosen, rejected)) * share,
                   "margin": float((chosen - rejected).detach().mean()) * share}
        return losses.sum(), metrics


@torch.no_grad()
def evaluate_pairs(model, batches) -> dict:
    """Pairwise accuracy, mean margin and BT loss over held-out batches."""
    model.eval()
    correct, total, margin, loss = 0.0, 0, 0.0, 0.0
    for batch in batches:
        device = model.head.weight.device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        chosen, rejected = pair_scores(model, batch)
        correct += float((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        loss += float(bt_loss(chosen, rejected).sum())
        total += batch["pairs"]
    model.train()
    if not total:
        return {"pairs": 0, "accuracy": None, "margin": None, "loss": None}
    return {"pairs": total, "accuracy": correct / total, "margin": margin / total, "loss": loss / total}
