"""The two things a data source yields: a sample ready for a shard, or a reason it was skipped.

Converters (formats.py), the synthetic world and the shard writer share these, so they live apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class Record:
    """One sample in the shard schema (docs/INTERFACES.md) plus its image, if any."""

    key: str  # unique, webdataset-safe: [A-Za-z0-9_-] only, no dots
    sample: dict  # the JSON part of the sample
    image: Image.Image | None  # already RGB

    def __post_init__(self) -> None:
        if not _KEY_PATTERN.match(self.key):
            raise ValueError(
                f"record key {self.key!r} is not webdataset-safe: use only letters, digits, '_' and '-'"
            )


@dataclass
class Skip:
    """A record left out, with a short stable reason ("missing image", "placeholder mismatch", ...)."""

    id: str
    reason: str
    detail: str = ""  # what exactly is wrong, stored in index.json next to the reason
