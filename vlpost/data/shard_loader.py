"""A DataLoader wrapper that keeps a `ShardStream`'s resume state exact when worker processes read it.

Why: with num_workers > 0 each worker reads its own copy of the stream, so the main process never sees
positions move. Here each batch is collated in its worker together with that worker's position and
skip counters, the main process records them as the batch arrives, and a restored loader rotates the
worker ids so the DataLoader's round-robin continues with the worker whose batch was due next.
Resume needs the same `num_workers` (and batch size, which decides the round-robin interleave).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, get_worker_info

if TYPE_CHECKING:
    from vlpost.data.shard_reader import ShardStream


class _CollateWithState:
    """Runs inside each worker: collate the batch and attach the worker's position after it."""

    def __init__(self, collate_fn: Callable[[list], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list) -> tuple[Any, dict | None]:
        info = get_worker_info()
        state = None if info is None else info.dataset._worker_state()
        return self.collate_fn(items), state


class StatefulLoader:
    """Iterable of collated batches from `stream`; `state_dict()` is exact for any `num_workers`."""

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        *,
        collate_fn: Callable[[list], Any] | None = None,
        num_workers: int = 0,
        **loader_kwargs: Any,
    ) -> None:
        if loader_kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers=True would keep stale stream copies across epochs; leave it off")
        self.stream, self.batch_size, self.num_workers = stream, batch_size, num_workers
        self.collate_fn = collate_fn or list  # default: a list of (sample, image) pairs
        self.loader_kwargs = loader_kwargs

    def __iter__(self) -> Iterator[Any]:
        stream = self.stream
        stream._begin_workers(self.num_workers)
        start_epoch = stream.epoch
        loader = DataLoader(
            stream, batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=_CollateWithState(self.collate_fn), **self.loader_kwargs,
        )  # fmt: skip
        for batch, state in loader:
            if state is not None:
                stream._record_worker(state)
            yield batch
        stream._end_workers_epoch(start_epoch)

    def state_dict(self) -> dict[str, Any]:
        """The stream's resume state (see ShardStream.state_dict)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stream; iterate with the same num_workers and batch_size as when it was saved."""
        self.stream.load_state_dict(state)
