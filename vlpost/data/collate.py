"""Batching: right padding for training, left padding for generation, length grouping, and exact packing."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from vlpost.constants import IGNORE_INDEX


@dataclass
class Example:
    """One encoded sample ready for batching; `pixel_values` (N_img, 3, H, W) or None."""

    id: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def _add_images(batch: dict, examples: Sequence[Example]) -> dict:
    """`pixel_values` (N_img, 3, H, W) in example order, and `image_ids` (one sample id per image row)."""
    with_images = [ex for ex in examples if ex.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([ex.pixel_values for ex in with_images])
        batch["image_ids"] = [ex.id for ex in with_images for _ in range(ex.pixel_values.shape[0])]
    return batch


def pad_batch(examples: Sequence[Example], pad_id: int, side: str = "right") -> dict:
    """(B, T) input_ids / attention_mask / labels padded to the longest row; images in row order."""
    width = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(ex.input_ids)
        labels[row, cols] = torch.tensor(ex.labels)
        mask[row, cols] = 1
    return _add_images({"input_ids": ids, "attention_mask": mask, "labels": labels}, examples)


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) prompt ids and attention mask for batched generation."""
    batch = pad_batch([Example("", p, [IGNORE_INDEX] * len(p)) for p in prompts], pad_id, side="left")
    return batch["input_ids"], batch["attention_mask"]


def padding_waste(batches: Sequence[dict]) -> float:
    """Share of positions in the batches that are padding (0..1)."""
    total = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["real_tokens"]) if "real_tokens" in b else int(b["attention_mask"].sum()) for b in batches)
    return 1.0 - real / max(total, 1)


# ----------------------------------------------------------------------------- packing


def pack_rows(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """First-fit-decreasing bin packing of examples into rows of at most `max_length` tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        if len(ex) > max_length:
            raise ValueError(f"sample {ex.id!r} has {len(ex)} tokens > packing length {max_length}")
        for i, free in enumerate(room):
            if len(ex) <= free:
                rows[i].append(ex)
                room[i] -= len(ex)
                break
        else:
            rows.append([ex])
            room.append(max_length - len(ex))
    return rows


def packed_batch(rows: Sequence[Sequence[Example]], pad_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """Rows of several samples each; position ids restart per sample and a 4D block-diagonal causal mask.

    Restarting position_ids alone does not isolate samples in HF attention; the (B, 1, T, T) additive float mask
    (0 = attend, dtype-min = blocked) does, for sdpa and eager attention.
    """
    width = max(sum(len(ex) for ex in row) for row in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # sample index within the row; -1 = padding
    ordered: list[Example] = []
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            end = start + len(ex)
            ids[r, start:end] = torch.tensor(ex.input_ids)
            labels[r, start:end] = torch.tensor(ex.labels)
            positions[r, start:end] = torch.arange(len(ex))
            segment[r, start:end] = s
            start = end
            ordered.append(ex)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed = same & causal  # (B, T, T)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no NaN rows)
    mask = torch.zeros((n, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions,
             "real_tokens": int((segment >= 0).sum())}
    return _add_images(batch, ordered)


def shared_prefix_mask(segment: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) segment ids → (B, 1, T, T) additive causal mask (0 = attend, dtype-min = blocked) for rows that hold
    one prompt and several answers to it: -1 marks the shared prefix (seen by every later token of its row), j >= 0
    answer j (sees the prefix and itself), -2 padding (sees only itself, so no row is all masked)."""
    width = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = ((key == -1) & (query >= -1)) | ((query == key) & (query >= 0))
    allowed &= torch.ones(width, width, dtype=torch.bool).tril()
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros((segment.shape[0], 1, width, width), dtype=dtype)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


# ----------------------------------------------------------------------------- length grouping


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0,
                           mega_batch_mult: int = 16) -> Iterator[list[int]]:
    """Indices in batches of similar length: shuffle, sort within mega-batches, shuffle the batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * mega_batch_mult
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    yield from batches
