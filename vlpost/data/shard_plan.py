"""Which samples a reader gets, in which order: a pure function of index counts, seed, epoch and split.

The epoch order (DESIGN §4) is built from metadata alone, so any position can be jumped to without
reading earlier data:
  1. shard order: a permutation of the index's shards seeded by (seed, epoch);
  2. inside each shard, samples are read in windows of `window` consecutive samples and each window is
     permuted, seeded by (seed, epoch, shard, window) — memory is one window, and a resume only
     re-reads the window it stopped in;
  3. the concatenated sequence is split among ranks, then among DataLoader workers. Default
     `split="range"`: each consumer gets one contiguous range (sizes differ by at most 1, so ranks
     stay in step, and each reads only its own share of the bytes). `split="shards"`: whole shards,
     round-robin over the shuffled order (falls back to ranges when there are fewer shards than
     consumers). `split="samples"`: every `world_size`-th sample (each rank reads every byte).
     Either way each sample goes to exactly one consumer per epoch.
A consumer's slots are numbered 0, 1, 2, ... in that order; a resume position is such a number.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

SPLITS = ("range", "shards", "samples")


@dataclass(frozen=True)
class Part:
    """One consumer's share of an epoch: slot k is global index begin + k * step of these shards, concatenated."""

    shards: tuple[int, ...]  # shard ids (positions in index.json) in read order
    begin: int
    length: int
    step: int = 1


@dataclass(frozen=True)
class WindowTask:
    """Samples to emit from one window of one shard: `ordinals` in emission order (within [lo, hi))."""

    shard: int
    lo: int
    hi: int
    ordinals: tuple[int, ...]
    first_position: int  # the consumer slot number of ordinals[0]


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard ids in this epoch's read order."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def _narrow(part: Part, counts: Sequence[int], index: int, parts: int, split: str) -> Part:
    """Consumer `index` of `parts` within `part`."""
    whole = part.begin == 0 and part.step == 1 and part.length == sum(counts[s] for s in part.shards)
    if split == "shards" and whole and len(part.shards) >= parts:
        shards = part.shards[index::parts]
        return Part(shards, 0, sum(counts[s] for s in shards), 1)
    if split == "samples":
        length = len(range(index, part.length, parts))
        return Part(part.shards, part.begin + index * part.step, length, part.step * parts)
    lo, hi = index * part.length // parts, (index + 1) * part.length // parts
    return Part(part.shards, part.begin + lo * part.step, hi - lo, part.step)


def epoch_part(
    counts: Sequence[int],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    worker: int = 0,
    num_workers: int = 1,
    split: str = "range",
) -> Part:
    """The part of `epoch` read by (rank, worker); `counts` are samples per shard from index.json."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
    order = tuple(shard_order(len(counts), seed, epoch, shuffle))
    everything = Part(order, 0, sum(counts), 1)
    rank_part = _narrow(everything, counts, rank, world_size, split)
    return _narrow(rank_part, counts, worker, num_workers, split)


def window_tasks(
    part: Part, counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool, window: int, position: int = 0
) -> Iterator[WindowTask]:
    """The part's slots from `position` on, one window at a time; windows outside are not computed."""
    if window < 1:
        raise ValueError(f"shuffle window must be >= 1, got {window}")
    if position >= part.length:
        return
    first_global = part.begin + position * part.step  # index in the concatenated sequence
    last_global = part.begin + (part.length - 1) * part.step
    offset = 0  # global index of the current shard's ordinal 0
    slot = position
    for shard in part.shards:
        for lo in range(0, counts[shard], window):
            hi = min(lo + window, counts[shard])
            if offset + hi <= first_global:
                continue
            if offset + lo > last_global:
                return
            order = np.arange(lo, hi)
            if shuffle:
                order = lo + np.random.default_rng([seed, epoch, shard + 1, lo // window]).permutation(hi - lo)
            globals_ = offset + np.arange(lo, hi)  # global index of each emission slot of the window
            keep = (globals_ >= first_global) & (globals_ <= last_global)
            keep &= (globals_ - part.begin) % part.step == 0
            ordinals = tuple(order[keep].tolist())
            if ordinals:
                yield WindowTask(shard, lo, hi, ordinals, slot)
                slot += len(ordinals)
        offset += counts[shard]
