"""`ShardStream`: a deterministic, resumable, fault-tolerant stream of (sample, image) from a shard set.

Order and splitting are described in shard_plan.py: a pure function of index.json counts, seed, epoch,
rank/world_size and the worker count, so `position` (slots of this consumer's epoch already consumed,
counting samples skipped as bad) is all a resume needs. Tars are read sequentially with webdataset's
`tar_file_iterator` + `group_by_keys`; a resume jumps straight to its shard and re-reads one window.

Resume and workers:
- Iterated directly (or by a DataLoader with num_workers=0) the stream's own `state_dict()` is exact.
- With worker processes, iterate through `stream.loader(batch_size, collate_fn, num_workers=N)`: every
  batch carries its worker's position back, so `state_dict()` holds one position per worker and the next
  worker in DataLoader round-robin order; a restored loader with the same N continues exactly.
  A plain DataLoader with workers works for reading but its main-process state does not move.
A bad sample (bad JSON, undecodable or oversized image, missing member, truncated or unreadable tar,
unknown kind) is skipped, counted in `stats` by reason and logged once with shard + key; never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from vlpost.data.shard_decode import DEFAULT_MAX_IMAGE_PIXELS, decode_group, read_index
from vlpost.data.shard_plan import Part, WindowTask, epoch_part, window_tasks
from vlpost.data.shard_schema import SampleError

logger = logging.getLogger("vlpost.data.shards")

MISSING_SAMPLE = "missing from shard"
CORRUPT_SHARD = "corrupt shard"
DUPLICATE_MEMBER = "duplicate member"
DROPPED = "dropped by transform"
STATE_VERSION = 1

# transform(sample, image) -> anything to yield instead, or None to drop the sample (counted).
Transform = Callable[[dict, Any], Any]


class _OrdinalTracker:
    """Numbers the sample groups of a tar as they stream by and selects only the wanted ones."""

    def __init__(self, wanted: set[int]) -> None:
        self.wanted = wanted
        self.prefix: str | None = None
        self.current = -1
        self.selected: deque[tuple[str, int]] = deque()  # (key, ordinal) of wanted groups, in tar order

    def rename(self, fname: str) -> str:
        prefix, _ = base_plus_ext(fname)
        if prefix is not None and prefix != self.prefix:
            self.prefix, self.current = prefix, self.current + 1
        return fname

    def select(self, fname: str) -> bool:
        if base_plus_ext(fname)[0] is None or self.current not in self.wanted:
            return False
        if not self.selected or self.selected[-1][1] != self.current:
            self.selected.append((self.prefix, self.current))
        return True

    def ordinal(self, key: str) -> int:
        while self.selected:
            selected_key, ordinal = self.selected.popleft()
            if selected_key == key:
                return ordinal
        return -1


class ShardStream(IterableDataset):
    """Iterable of (sample dict, PIL RGB image | None) over a shard folder; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        epoch: int = 0,
        loop: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        kind: str | None = None,
        shuffle_window: int = 1000,
        split: str = "range",
        transform: Transform | None = None,
    ) -> None:
        self.root = Path(path)
        self.index = {k: v for k, v in read_index(self.root).items() if k != "skipped"}  # skipped can be long
        if kind is not None and self.index.get("kind") != kind:
            raise ValueError(f"{self.root} holds {self.index.get('kind')!r} samples but {kind!r} were asked for")
        self.kind = self.index.get("kind")
        self.counts = [entry["num_samples"] for entry in self.index["shards"]]
        self.names = [entry["name"] for entry in self.index["shards"]]
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.loop, self.max_image_pixels, self.transform = loop, max_image_pixels, transform
        self.shuffle_window, self.split = shuffle_window, split
        self._part(epoch, 0, 1)  # validates rank/world_size/split now rather than at the first sample
        self._epoch, self._position = epoch, 0
        self._workers: list[tuple[int, int]] | None = None  # (epoch, position) per logical worker
        self._next_worker = 0  # logical worker whose batch the DataLoader delivers next
        self._logical_worker = 0
        self._stats: Counter[str] = Counter()
        self._yielded = 0
        self._base_stats: Counter[str] = Counter()  # folded in from finished worker processes
        self._worker_stats: dict[int, dict] = {}
        self._logged: set[tuple[str, str, str]] = set()

    # ------------------------------------------------------------------ public API

    @property
    def num_samples(self) -> int:
        """Samples in the whole shard set (all ranks), from index.json."""
        return sum(self.counts)

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from (the earliest one among workers)."""
        return self._epoch if self._workers is None else min(e for e, _ in self._workers)

    def epoch_length(self, epoch: int | None = None) -> int:
        """Slots this rank reads in `epoch` (ranks differ by at most 1 unless split="shards")."""
        return self._part(self.epoch if epoch is None else epoch, 0, 1).length

    @property
    def stats(self) -> dict[str, Any]:
        """{"yielded": samples yielded, "skipped": {reason: count}} including worker processes."""
        skipped = self._stats + self._base_stats
        yielded = self._yielded + self._base_stats["__yielded__"]
        for snapshot in self._worker_stats.values():
            skipped.update(snapshot["skipped"])
            yielded += snapshot["yielded"]
        skipped.pop("__yielded__", None)
        return {"yielded": yielded, "skipped": dict(sorted(skipped.items()))}

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first sample, unless already in it (so a resumed position survives)."""
        if epoch != self.epoch:
            self._epoch, self._position, self._workers, self._next_worker = epoch, 0, None, 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the consumer of this stream stopped."""
        if self._workers is None:
            epoch, position, workers = self._epoch, self._position, None
        else:
            epoch = self.epoch
            workers = [list(state) for state in self._workers]
            position = sum(p if e == epoch else self._part(epoch, w, len(workers)).length
                           for w, (e, p) in enumerate(self._workers))  # fmt: skip
        return {
            "version": STATE_VERSION, "epoch": epoch, "position": position, "seed": self.seed,
            "shuffle": self.shuffle, "shuffle_window": self.shuffle_window, "split": self.split,
            "rank": self.rank, "world_size": self.world_size, "data": self.fingerprint(),
            "num_workers": 0 if workers is None else len(workers), "workers": workers,
            "next_worker": self._next_worker,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the data, rank layout and shuffle settings must match (else ValueError)."""
        mine = {"version": STATE_VERSION, "data": self.fingerprint(), "rank": self.rank,
                "world_size": self.world_size, "shuffle": self.shuffle, "shuffle_window": self.shuffle_window,
                "split": self.split}  # fmt: skip
        for field, value in mine.items():
            if state.get(field) != value:
                raise ValueError(
                    f"cannot resume {self.root}: state has {field}={state.get(field)!r} but this stream has "
                    f"{value!r}; an exact resume needs the same shards, ranks and shuffle settings"
                )
        self.seed, self._epoch, self._position = state["seed"], state["epoch"], state["position"]
        self._workers = None if state["workers"] is None else [tuple(w) for w in state["workers"]]
        self._next_worker = state["next_worker"]

    def fingerprint(self) -> str:
        """Short hash of shard names and counts: a resume state only fits the data it was taken on."""
        listing = json.dumps([self.names, self.counts]).encode()
        return hashlib.sha256(listing).hexdigest()[:16]

    def loader(self, batch_size: int, collate_fn: Callable | None = None, num_workers: int = 0, **kwargs: Any):
        """A DataLoader over this stream whose batches keep `state_dict()` exact (see shard_loader.py)."""
        from vlpost.data.shard_loader import StatefulLoader

        return StatefulLoader(self, batch_size, collate_fn=collate_fn, num_workers=num_workers, **kwargs)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is None:
            if self._workers is not None:
                self._single_from_workers()
            return self._consume(0, 1, self._epoch, self._position)
        logical = (info.id + self._next_worker) % info.num_workers
        if self._workers is not None and len(self._workers) == info.num_workers:
            epoch, position = self._workers[logical]
        elif self._workers is None and self._position == 0:
            epoch, position = self._epoch, 0
        else:
            raise RuntimeError(
                f"stream state was saved with {self._describe_workers()} but is read by "
                f"{info.num_workers} workers; use stream.loader(num_workers=...) with the saved count"
            )
        # this object is the worker's own copy: its counters start at zero and travel back via the loader
        self._logical_worker, self._stats, self._yielded = logical, Counter(), 0
        self._base_stats, self._worker_stats = Counter(), {}
        if not self.loop and epoch > self.epoch:  # finished its part of this pass before the save
            return iter(())
        return self._consume(logical, info.num_workers, epoch, position)

    def _consume(self, worker: int, num_workers: int, epoch: int, position: int) -> Iterator[Any]:
        while True:
            part = self._part(epoch, worker, num_workers)
            if self.loop and part.length == 0:
                raise ValueError(
                    f"rank {self.rank} worker {worker} gets no samples: {self.num_samples} samples for "
                    f"{self.world_size * num_workers} readers; use fewer ranks/workers or more data"
                )
            yielded = 0
            for item, position_after in self._read_part(part, epoch, position):
                self._epoch, self._position = epoch, position_after
                self._yielded += 1
                yielded += 1
                yield item
            started_at_zero, epoch, position = position == 0, epoch + 1, 0
            self._epoch, self._position = epoch, position
            if not self.loop:
                return
            if yielded == 0 and started_at_zero:
                raise RuntimeError(f"a whole epoch of {self.root} gave no valid sample; stats: {self.stats}")

    def _part(self, epoch: int, worker: int, num_workers: int) -> Part:
        return epoch_part(
            self.counts, seed=self.seed, epoch=epoch, shuffle=self.shuffle, rank=self.rank,
            world_size=self.world_size, worker=worker, num_workers=num_workers, split=self.split,
        )  # fmt: skip

    def _read_part(self, part: Part, epoch: int, position: int) -> Iterator[tuple[Any, int]]:
        """(item, position after it) for each good sample of the part from `position` on."""
        tasks = window_tasks(part, self.counts, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                             window=self.shuffle_window, position=position)  # fmt: skip
        for shard, shard_tasks in groupby(tasks, key=lambda task: task.shard):
            name = self.names[shard]
            for ordinal, slot, group in self._read_shard(shard, list(shard_tasks)):
                if group is None:
                    self._skip(name, f"#{ordinal}", MISSING_SAMPLE, f"sample {ordinal} is listed in index.json")
                    continue
                try:
                    sample, image = decode_group(group, self.kind, self.max_image_pixels)
                except SampleError as err:
                    self._skip(name, group["__key__"], err.reason, err.detail)
                    continue
                item = (sample, image) if self.transform is None else self.transform(sample, image)
                if item is None:
                    self._skip(name, group["__key__"], DROPPED, "transform returned None")
                    continue
                yield item, slot + 1

    def _read_shard(self, shard: int, tasks: list[WindowTask]) -> Iterator[tuple[int, int, dict | None]]:
        """(ordinal, slot, group or None if absent) in emission order; holds one window of bytes."""
        groups = self._groups(shard, {ordinal for task in tasks for ordinal in task.ordinals})
        pending: dict[int, dict] = {}
        last_read, exhausted = -1, False
        for task in tasks:
            needed = max(task.ordinals)
            while not exhausted and last_read < needed:
                found = next(groups, None)
                if found is None:
                    exhausted = True
                else:
                    last_read, group = found
                    pending[last_read] = group
            for offset, ordinal in enumerate(task.ordinals):
                yield ordinal, task.first_position + offset, pending.pop(ordinal, None)

    def _groups(self, shard: int, wanted: set[int]) -> Iterator[tuple[int, dict]]:
        """(ordinal, group) for the wanted sample groups of one tar, in tar order; tar errors end it."""
        name = self.names[shard]
        tracker, errors = _OrdinalTracker(wanted), []

        def stop(exn: Exception) -> bool:
            errors.append(f"{type(exn).__name__}: {exn}")
            return False

        def skip_duplicate(exn: Exception) -> bool:
            self._skip(name, "?", DUPLICATE_MEMBER, str(exn))
            return True

        try:
            with open(self.root / name, "rb") as handle:
                files = tar_file_iterator(handle, handler=stop, select_files=tracker.select,
                                          rename_files=tracker.rename)  # fmt: skip
                for group in group_by_keys(_guarded(files, name, errors), handler=skip_duplicate):
                    ordinal = tracker.ordinal(group["__key__"])
                    if ordinal >= 0:
                        yield ordinal, group
        except OSError as err:
            errors.append(f"{type(err).__name__}: {err}")
        if errors:
            self._skip(name, "-", CORRUPT_SHARD, errors[0])

    def _skip(self, shard: str, key: str, reason: str, detail: str) -> None:
        self._stats[reason] += 1
        if (shard, key, reason) not in self._logged:
            self._logged.add((shard, key, reason))
            logger.warning("skipped sample %s in %s/%s: %s (%s)", key, self.root, shard, reason, detail)

    # ------------------------------------------------------------------ worker bookkeeping (shard_loader)

    def _describe_workers(self) -> str:
        if self._workers is None:
            return f"no workers at epoch {self._epoch} position {self._position}"
        return f"{len(self._workers)} workers"

    def _single_from_workers(self) -> None:
        epochs = {e for e, _ in self._workers}
        if len(epochs) != 1 or any(p for _, p in self._workers):
            raise RuntimeError(
                f"stream state holds {len(self._workers)} worker positions; resume through "
                f"stream.loader(num_workers={len(self._workers)}) to continue exactly"
            )
        self._epoch, self._position, self._workers, self._next_worker = epochs.pop(), 0, None, 0

    def _begin_workers(self, num_workers: int) -> None:
        """Called by the loader before its DataLoader copies this object into worker processes."""
        if num_workers == 0:
            if self._workers is not None:
                self._single_from_workers()
            return
        if self._workers is None:
            if self._position != 0:
                raise RuntimeError(
                    f"stream is at epoch {self._epoch} position {self._position} of a single reader; "
                    "resume with num_workers=0 to continue exactly"
                )
            self._workers, self._next_worker = [(self._epoch, 0)] * num_workers, 0
        elif len(self._workers) != num_workers:
            self._single_from_workers()  # only possible at an epoch start: re-split for the new count
            self._workers, self._next_worker = [(self._epoch, 0)] * num_workers, 0
        for snapshot in self._worker_stats.values():  # worker processes restart their counters
            self._base_stats.update(snapshot["skipped"])
            self._base_stats["__yielded__"] += snapshot["yielded"]
        self._worker_stats = {}

    def _worker_state(self) -> dict[str, Any]:
        """Sent with each batch from a worker process (runs inside the worker)."""
        return {"worker": self._logical_worker, "epoch": self._epoch, "position": self._position,
                "stats": {"yielded": self._yielded, "skipped": dict(self._stats)}}  # fmt: skip

    def _record_worker(self, state: dict[str, Any]) -> None:
        worker = state["worker"]
        self._workers[worker] = (state["epoch"], state["position"])
        self._next_worker = (worker + 1) % len(self._workers)
        self._worker_stats[worker] = state["stats"]

    def _end_workers_epoch(self, epoch: int) -> None:
        """A loop=False loader ran to its end: every worker finished `epoch`."""
        if self._workers is not None:
            self._workers, self._next_worker = [(epoch + 1, 0)] * len(self._workers), 0


def _guarded(files: Iterator[dict], shard: str, errors: list[str]) -> Iterator[dict]:
    """Tag members with their shard and turn a tar error into a clean end, so the last group still comes."""
    try:
        for member in files:
            member["__url__"] = shard
            yield member
    except Exception as err:  # noqa: BLE001 - tarfile raises ReadError, EOFError, OSError, zlib.error ...
        errors.append(f"{type(err).__name__}: {err}")
