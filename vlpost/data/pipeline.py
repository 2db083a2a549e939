"""From samples (dict + image) to training batches: encode, skip-and-count bad samples, batch or pack."""

from __future__ import annotations

import json
import logging
import random
import zlib
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
    """Batches from a resumable sample source; samples that cannot be encoded are skipped and counted.

    Modes: plain (`batch_size` samples per batch, in source order), `group_by_length` (a buffer of samples is
    sorted by length and cut into batches whose order is shuffled) and `packing` (a buffer is first-fit packed
    into rows of `max_length` tokens, `batch_size` rows per batch). Buffered modes stay exactly resumable: the
    state is the source position at the start of the buffer plus the number of batches already emitted from it,
    and a buffer is planned deterministically, so a resumed stream re-plans it and skips what was emitted.
    """

    def __init__(self, source, encode: Callable[[dict, Image.Image | None], Example], *, batch_size: int,
                 pad_id: int, packing: bool = False, max_length: int = 2048, group_by_length: bool = False,
                 buffer_size: int = 1024, seed: int = 0):
        self.source, self.encode = source, encode
        self.batch_size, self.pad_id = batch_size, pad_id
        self.packing, self.max_length = packing, max_length
        self.group_by_length, self.seed = group_by_length, seed
        self.buffer_size = buffer_size if (packing or group_by_length) else batch_size
        self.skipped: Counter = Counter()
        self._state = {"source": source.state_dict(), "emitted": 0, "skipped": {}}

    def _take(self, examples: Iterator[Example]) -> list[Example]:
        buffer = []
        for example in examples:
            buffer.append(example)
            if len(buffer) == self.buffer_size:
                break
        return buffer

    def _examples(self) -> Iterator[Example]:
        for sample, image in self.source:
            try:
                yield self.encode(sample, image)
            except SampleError as err:
                self.skipped[err.reason] += 1
                log.warning("skipped %s", err)

    def _plan(self, buffer: list[Example], buffer_key: int) -> list[list]:
        """Deterministic batches for one buffer: lists of examples, or of packed rows."""
        if self.packing:
            rows = pack_rows(buffer, self.max_length)
            return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.group_by_length:
            ordered = sorted(buffer, key=len, reverse=True)
            batches = [ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
            random.Random(self.seed * 1000003 + buffer_key).shuffle(batches)
            return batches
        return [buffer[i:i + self.batch_size] for i in range(0, len(buffer), self.batch_size)]

    def __iter__(self) -> Iterator[dict]:
        skip = self._state["emitted"]
        examples = self._examples()
        while True:
            start = {"source": self.source.state_dict(), "skipped": dict(self.skipped)}
            buffer = self._take(examples)
            if not buffer:
                return
            buffer_key = zlib.crc32(json.dumps(start["source"], sort_keys=True, default=str).encode())
            for index, batch in enumerate(self._plan(buffer, buffer_key)):
                if index < skip:
                    continue
                self._state = {**start, "emitted": index + 1}
                yield self._collate(batch)
            skip = 0
            self._state = {"source": self.source.state_dict(), "skipped": dict(self.skipped), "emitted": 0}

    def _collate(self, batch: list) -> dict:
        if self.packing:
            return packed_batch(batch, self.pad_id)
        return pad_batch(batch, self.pad_id)

    def state_dict(self) -> dict:
        return {**self._state, "skipped_total": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.skipped = Counter(state.get("skipped", {}))
        self._state = {"source": state["source"], "skipped": state.get("skipped", {}),
                       "emitted": state.get("emitted", 0)}


def records_to_items(records: Iterable) -> list[tuple[dict, Image.Image | None]]:
    """Synthetic/converter Records → (sample, image) pairs for a ListSource."""
    return [(r.sample, r.image) for r in records]
