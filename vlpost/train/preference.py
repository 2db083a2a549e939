"""Preference pairs for DPO and reward models: encoding, [chosen; rejected] batches, one vision pass per pair.

A batch holds B pairs as 2B right-padded rows (chosen rows first, then rejected rows, same pair order) and
the B pairs' images once. The tower runs once per image; its features feed the policy projector and the
reference (the tower is frozen in every stage, so the features are the same for both).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from vlpost.data.chat import ChatEncoder, Encoded, SampleError
from vlpost.data.collate import Example, pad_batch, shared_prefix_mask
from vlpost.data.pipeline import BatchStream
from vlpost.model.vlm import splice
from vlpost.train.logprobs import sequence_logprobs
from vlpost.train.losses import dpo_loss, dpo_metrics, dpo_with_sft

# ----------------------------------------------------------------------------- encoding and batches


@dataclass
class PairExample:
    """One encoded preference sample; `pixel_values` (1, 3, H, W) or None for a text-only pair."""

    id: str
    chosen: Encoded
    rejected: Encoded
    pixel_values: torch.Tensor | None = None

    @property
    def fingerprint(self) -> str:
        """Hash of the exact token ids and labels: a cached reference value is valid only for these."""
        payload = json.dumps([self.chosen.input_ids, self.chosen.labels, self.rejected.input_ids,
                              self.rejected.labels], separators=(",", ":"))
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


def sample_id_of(sample: dict) -> str:
    return str(sample.get("meta", {}).get("id", "?"))


class PairEncoder:
    """(preference sample, image) → PairExample; labels cover the completion only (chat.encode_pair)."""

    def __init__(self, encoder: ChatEncoder, image_transform):
        self.encoder, self.image_transform = encoder, image_transform

    def __call__(self, sample: dict, image: Image.Image | None) -> PairExample:
        sample_id = sample_id_of(sample)
        if sample.get("kind") != "preference":
            raise SampleError(sample_id, "wrong kind", f"kind {sample.get('kind')!r} where preference samples are expected")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(sample.get(key), list) or not sample[key]:
                raise SampleError(sample_id, "malformed record", f"preference sample needs a non-empty '{key}' message list")
        num_images = 0 if image is None else 1
        chosen = self.encoder.encode_pair(sample["prompt"], sample["chosen"], sample_id=sample_id, num_images=num_images)
        rejected = self.encoder.encode_pair(sample["prompt"], sample["rejected"], sample_id=sample_id,
                                            num_images=num_images)
        pixels = None if image is None else self.image_transform(image.convert("RGB")).unsqueeze(0)
        return PairExample(sample_id, chosen, rejected, pixels)


def collate_pairs(pairs: list[PairExample], pad_id: int, shared_prompt: bool = False) -> dict:
    """B pairs → input_ids / attention_mask / labels (2B, T) as [chosen; rejected], pixel_values (N_img, 3, H, W).

    `shared_prompt`: input_ids (B, W) instead, one row per pair [common prefix | chosen rest | rejected rest] with a
    4D block mask (each rest sees the prefix and itself; positions continue from the prefix), so the prompt and its
    image go through the LM once per pair; `labels` stay (2B, T) and `select_rows` / `select_positions` (2B, T) map
    each original position to its packed one (`pair_logits`), which gives the same log-probs.
    """
    rows = [Example(p.id, p.chosen.input_ids, p.chosen.labels) for p in pairs]
    rows += [Example(p.id, p.rejected.input_ids, p.rejected.labels) for p in pairs]
    batch = pad_batch(rows, pad_id)
    if shared_prompt:
        batch |= _packed_pairs(pairs, pad_id, batch["labels"].shape[1])
    images = [p.pixel_values for p in pairs if p.pixel_values is not None]
    if images:
        batch["pixel_values"] = torch.cat(images)  # one per image pair, in pair order
    batch["ids"] = [p.id for p in pairs]
    batch["fingerprints"] = [p.fingerprint for p in pairs]
    batch["pairs"] = len(pairs)
    return batch


def _packed_pairs(pairs: list[PairExample], pad_id: int, width: int) -> dict:
    """input_ids / attention_mask (4D) / position_ids of the packed rows and the (2B, width) position map."""
    prefixes, seq_len = [], 1
    for p in pairs:
        a, b = p.chosen.input_ids, p.rejected.input_ids
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        common = min(common, len(a) - 1, len(b) - 1)  # each side keeps at least its last token
        prefixes.append(common)
        seq_len = max(seq_len, len(a) + len(b) - common)
    n = len(pairs)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    position_ids = torch.zeros_like(input_ids)
    segment = torch.full_like(input_ids, -2)  # -1 shared prefix, 0 chosen rest, 1 rejected rest, -2 padding
    select_rows = torch.arange(n).repeat(2)[:, None].expand(2 * n, width).clone()
    select_positions = torch.zeros((2 * n, width), dtype=torch.long)
    for i, (p, common) in enumerate(zip(pairs, prefixes)):
        input_ids[i, :common] = torch.tensor(p.chosen.input_ids[:common])
        position_ids[i, :common] = torch.arange(common)
        segment[i, :common] = -1
        start = common
        for side, ids in enumerate((p.chosen.input_ids, p.rejected.input_ids)):
            rest = len(ids) - common
            input_ids[i, start:start + rest] = torch.tensor(ids[common:])
            position_ids[i, start:start + rest] = torch.arange(common, len(ids))
            segment[i, start:start + rest] = side
            row = side * n + i
            select_positions[row, :common] = torch.arange(common)
            select_positions[row, common:len(ids)] = torch.arange(start, start + rest)
            start += rest
    attention_mask = shared_prefix_mask(segment)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "select_rows": select_rows, "select_positions": select_positions}


def pair_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Logits in the [chosen; rejected] (2B, T, V) layout, gathered from packed rows when the prompt is shared."""
    if "select_rows" in batch:
        return logits[batch["select_rows"], batch["select_positions"]]
    return logits


class PairStream(BatchStream):
    """Batches of pairs from a resumable sample source; bad samples are skipped and counted (state_dict too)."""

    def __init__(self, source, encode: PairEncoder, *, batch_size: int, pad_id: int, shared_prompt: bool = False):
        super().__init__(source, encode, batch_size=batch_size, pad_id=pad_id)
        self.shared_prompt = shared_prompt

    def _collate(self, examples: list[PairExample]) -> dict:
        return collate_pairs(examples, self.pad_id, self.shared_prompt)


def pair_stream(source, model, *, batch_size: int, max_length: int, shared_prompt: bool = False) -> PairStream:
    """The usual PairStream for `model`'s tokenizer, image tokens and image transform."""
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image, max_length=max_length)
    return PairStream(source, PairEncoder(encoder, model.image_transform), batch_size=batch_size,
                      pad_id=model.tokenizer.pad_token_id, shared_prompt=shared_prompt)


# ----------------------------------------------------------------------------- held-out split


def in_held_out(sample_id: str, fraction: float, seed: int = 0) -> bool:
    """A stable, order-free split: hash(seed, id) mapped to [0, 1) is below `fraction`."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class HeldOutSplit:
    """Wraps a sample source and keeps only its train (or held-out) part; state_dict is the source's."""

    def __init__(self, source, fraction: float, seed: int = 0, held_out: bool = False):
        self.source, self.fraction, self.seed, self.held_out = source, fraction, seed, held_out

    def __iter__(self) -> Iterator:
        for sample, image in self.source:
            if in_held_out(sample_id_of(sample), self.fraction, self.seed) == self.held_out:
                yield sample, image

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def subsample(items: list, n: int, seed: int = 0) -> list:
    """At most `n` items, a seeded random subset in the original order (for capped evaluations)."""
    if len(items) <= n:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


# ----------------------------------------------------------------------------- forward pieces


def unwrap(model):
    """The VisionLanguageModel under a DDP / accelerate wrapper (for encode / project calls)."""
    return getattr(model, "module", model)


def has_images(batch: dict) -> bool:
    pixel_values = batch.get("pixel_values")
    return pixel_values is not None and pixel_values.shape[0] > 0


def vision_features(core, batch: dict, placeholder: bool = False) -> torch.Tensor | None:
    """One tower pass over the batch's B pair images → (N_img, P, Dv), or None for a text-only batch.

    `placeholder` (training): a text-only batch gets the features of one blank image instead, which
    `pair_image_embeds` projects and then cuts to zero rows. Every rank thus runs the tower and the projector in
    the same order whatever its pairs hold (ZeRO-3 gathers their shards in collectives), and the projector stays
    in the graph with a zero gradient (DDP) — the zero-weighted pass `VisionLanguageModel.embed` does for SFT.
    """
    pixel_values = batch.get("pixel_values")
    if not has_images(batch):
        if not placeholder:
            return None
        size = core.vision.visual.image_size
        pixel_values = torch.zeros(1, 3, size[0], size[1], device=batch["input_ids"].device)
    if any(p.requires_grad for p in core.vision.parameters()):
        raise ValueError("the vision tower must be frozen in preference stages (its features are shared by the "
                         "policy and the reference); use vlpost.train.freeze.apply_freeze")
    with torch.no_grad():
        return core.vision(pixel_values.to(core.vision.dtype))


def pair_image_embeds(projector, features: torch.Tensor | None, batch: dict | None = None) -> torch.Tensor | None:
    """Project the pair images once and repeat them for the [chosen; rejected] rows → (2 N_img, tpi, D).

    Placeholder features of a text-only `batch` (vision_features(placeholder=True)) → zero rows, still in the graph.
    """
    if features is None:
        return None
    dtype = next(projector.parameters()).dtype
    embeds = projector(features.to(dtype))  # (N_img, tpi, D)
    if batch is not None and not has_images(batch):
        return embeds[:0]  # spliced nowhere; the engine's forward then runs no vision pass of its own
    if batch is not None and "select_rows" in batch:
        return embeds  # shared prompt: one packed row, one image per pair
    return torch.cat([embeds, embeds])  # image rows of the chosen half, then of the rejected half


def lm_logits(core, lm, projector, batch: dict, features: torch.Tensor | None) -> torch.Tensor:
    """Logits (2B, T, V) of `lm` with `projector` over the batch: lets a reference swap either module."""
    input_ids = batch["input_ids"]
    text = lm.get_input_embeddings()(input_ids)  # (2B, T, D)
    image_embeds = pair_image_embeds(projector, features, batch)
    if image_embeds is not None:
        text = splice(text, image_embeds.reshape(-1, text.shape[-1]), input_ids == core.image_token_id)
    out = lm(inputs_embeds=text, attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"),
             use_cache=False)
    return pair_logits(out.logits, batch)


def policy_logps(model, batch: dict, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and token counts (2B,) through the (possibly wrapped) training model."""
    core = unwrap(model)
    image_embeds = pair_image_embeds(core.projector, features, batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch.get("position_ids"), image_embeds=image_embeds)
    return sequence_logprobs(pair_logits(out.logits, batch), batch["labels"])


# ----------------------------------------------------------------------------- the DPO objective


class DPOObjective:
    """DPO / IPO / robust (+ SFT on chosen) summed over pairs; the trainer divides by the step's pair count.

    `reference.logps(model, batch, features) -> (2B,)` gives the reference's summed completion log-probs
    (vlpost.train.reference). Metrics are batch means weighted by pairs / `pairs_per_step` (this rank's
    batch_size x grad_accum), so the trainer's sum over a step's micro-batches is the step mean.
    """

    def __init__(self, cfg, reference, pairs_per_step: int | None = None):
        self.cfg, self.reference, self.pairs_per_step = cfg, reference, pairs_per_step

    def count(self, batch: dict) -> int:
        return int(batch["pairs"])

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        training = model.training and torch.is_grad_enabled()
        features = vision_features(unwrap(model), batch, placeholder=training)
        sums, counts = policy_logps(model, batch, features)
        ref_sums = self.reference.logps(model, batch, features).to(sums.dtype)
        return self.loss(sums, counts, ref_sums)

    def loss(self, sums: torch.Tensor, counts: torch.Tensor, ref_sums: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(2B,) policy sums, token counts and reference sums → (summed loss over pairs, metrics)."""
        cfg, pairs = self.cfg, sums.shape[0] // 2
        policy, ref = sums, ref_sums.detach()
        if cfg.loss_type == "ipo":  # IPO works on length-averaged log-probs
            policy, ref = sums / counts.clamp(min=1), ref_sums / counts.clamp(min=1)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], cfg.beta, cfg.loss_type, cfg.label_smoothing)
        chosen_nll = -sums[:pairs] / counts[:pairs].clamp(min=1)  # per-pair token-mean NLL of the chosen answer
        loss_sum = dpo_with_sft(losses, chosen_nll, cfg.sft_weight) * pairs
        metrics = dpo_metrics(sums[:pairs], sums[pairs:], chosen_rewards, rejected_rewards)
        # KL estimate: mean over pairs of log pi(chosen) - log ref(chosen) (sequence level, off-policy samples).
        metrics["kl"] = (sums[:pairs] - ref_sums[:pairs]).detach().mean()
        if cfg.sft_weight:
            metrics["sft_nll"] = chosen_nll.detach().mean()
        share = pairs / self.pairs_per_step if self.pairs_per_step else 1.0
        return loss_sum, {k: float(v) * share for k, v in metrics.items()}


@torch.no_grad()
def preference_eval(model, reference, batches, tolerance: float = 1e-3) -> dict:
    """How often the policy and the reference prefer the chosen answer (log-prob margin > 0), over `batches`.

    reward_accuracy: share of pairs whose margin beats the reference's by more than `tolerance` nats (a cached
    reference was computed in other batches, so an untrained policy differs from it by float noise).
    """
    core = unwrap(model)
    was_training = core.training
    core.eval()
    policy_wins = ref_wins = gains = total = 0.0
    device = next(core.lm.parameters()).device
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        features = vision_features(core, batch)
        sums, _ = policy_logps(core, batch, features)
        ref = reference.logps(core, batch, features).to(sums.dtype)
        pairs = batch["pairs"]
        policy_margin, ref_margin = sums[:pairs] - sums[pairs:], ref[:pairs] - ref[pairs:]
        policy_wins += float((policy_margin > 0).sum())
        ref_wins += float((ref_margin > 0).sum())
        gains += float((policy_margin > ref_margin + tolerance).sum())
        total += pairs
    core.train(was_training)
    total = max(total, 1)
    return {"pairs": int(total), "policy_prefers_chosen": policy_wins / total,
            "reference_prefers_chosen": ref_wins / total, "reward_accuracy": gains / total}
