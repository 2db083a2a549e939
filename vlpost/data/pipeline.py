"""From samples (dict + image) to training batches: encode, skip-and-count bad samples, batch or pack."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from PIL import Image

from vlpost.data.chat import ChatEncoder, SampleError
from vlpost.data.collate import Example, pack_rows, packed_batch, pad_batch

log = logging.getLogger(__name__)


class ListSource:
    """In-memory samples with the same resumable interface as ShardStream (seeded shuffle per epoch)."""

    def __init__(self, items: list[tuple[dict, Image.Image | None]], *, seed: int = 0, shuffle: bool = True,
                 loop: bool = False, rank: int = 0, world_size: int = 1):
        self.items, self.seed, self.shuffle, self.loop = items, seed, shuffle, loop
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[dict, Image.Image | None]]:
        while True:
            order = self._order(self.epoch)
            while self.position < len(order):
                item = self.items[order[self.position]]
                self.position += 1
                yield item
            if not self.loop:
                return
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def conversation_of(sample: dict) -> list[dict]:
    """The messages a caption / sft sample trains on."""
    if sample.get("kind") not in ("caption", "sft"):
        raise SampleError(sample.get("meta", {}).get("id", "?"), "wrong kind",
                          f"kind {sample.get('kind')!r} where caption/sft samples are expected")
    return sample["messages"]


class ExampleEncoder:
    """(sample, image) → Example with pixel values; the tower's transform runs here (in the loader)."""

    def __init__(self, encoder: ChatEncoder, image_transform: Callable):
        self.encoder, self.image_transform = encoder, image_transform

    def __call__(self, sample: dict, image: Image.Image | None) -> Example:
        sample_id = str(sample.get("meta", {}).get("id", "?"))
        num_images = 0 if image is None else 1
        encoded = self.encoder.encode(conversation_of(sample), sample_id=sample_id, num_images=num_images)
        pixels = None if image is None else self.image_transform(image.convert("RGB")).unsqueeze(0)
        return Example(sample_id, encoded.input_ids, encoded.labels, pixels)


class BatchStream:
    """Batches from a resumable sample source; samples that cannot be encoded are skipped and counted."""

    def __init__(self, source, encode: Callable[[dict, Image.Image | None], Example], *, batch_size: int,
                 pad_id: int, packing: bool = False, max_length: int = 2048):
        self.source, self.encode = source, encode
        self.batch_size, self.pad_id = batch_size, pad_id
        self.packing, self.max_length = packing, max_length
        self.skipped: Counter = Counter()

    def _examples(self) -> Iterator[Example]:
        for sample, image in self.source:
            try:
                yield self.encode(sample, image)
            except SampleError as err:
                self.skipped[err.reason] += 1
                log.warning("skipped %s", err)

    def __iter__(self) -> Iterator[dict]:
        group: list[Example] = []
        for example in self._examples():
            group.append(example)
            if len(group) == self.batch_size:
                yield self._collate(group)
                group = []
        if group:
            yield self._collate(group)

    def _collate(self, examples: list[Example]) -> dict:
        if self.packing:
            return packed_batch(pack_rows(examples, self.max_length), self.pad_id)
        return pad_batch(examples, self.pad_id)

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.skipped = Counter(state.get("skipped", {}))


def records_to_items(records: Iterable) -> list[tuple[dict, Image.Image | None]]:
    """Synthetic/converter Records → (sample, image) pairs for a ListSource."""
    return [(r.sample, r.image) for r in records]
