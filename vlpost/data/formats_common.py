"""Shared pieces of the public-format converters: reading rows, images, roles and `<image>` placeholders.

Per-record problems raise `SkipRecord`; `stream_records` turns them into `Skip(id, reason)` so one bad
record never stops a conversion. File-level problems (input missing, not JSON) raise ordinary errors.
"""

from __future__ import annotations

import io
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from PIL import Image

from vlpost.constants import IMAGE_TOKEN
from vlpost.data.formats_io import BadLine
from vlpost.data.records import Record, Skip

logger = logging.getLogger("vlpost.data.formats")

# Stable skip reasons (index.json counts by these strings).
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
PLACEHOLDER_MISMATCH = "placeholder mismatch"
EMPTY_ASSISTANT = "empty assistant turn"
MALFORMED = "malformed record"
MULTIPLE_IMAGES = "multiple images"

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# One converted sample and its image (None for text-only samples).
Output = tuple[dict, Image.Image | None]


class SkipRecord(Exception):
    """Raised while converting one record; becomes `Skip(record_id, reason)` with `detail` logged."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def make_skip(record_id: str, err: SkipRecord) -> Skip:
    """Build the Skip; pass `detail` along when the Skip dataclass has such a field."""
    logger.debug("skip %s: %s", record_id, err)
    if err.detail and "detail" in {f.name for f in fields(Skip)}:
        return Skip(id=record_id, reason=err.reason, detail=err.detail)  # type: ignore[call-arg]
    return Skip(id=record_id, reason=err.reason)


def make_key(source: str, index: int, sub: int | None = None) -> str:
    """Webdataset-safe unique key: `<source>-<index:08d>[-<sub>]` (no dots, only [A-Za-z0-9_-])."""
    key = f"{source}-{index:08d}" if sub is None else f"{source}-{index:08d}-{sub}"
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "_-" else "_" for ch in key)


def record_id(raw: Any, index: int, key: str = "id") -> str:
    """The record's own id as a string, or `#<row>` when it has none."""
    if isinstance(raw, dict) and raw.get(key) is not None:
        return str(raw[key])
    return f"#{index}"


def stream_records(
    source: str,
    rows: Iterable[Any],
    build: Callable[[Any, str], Sequence[Output]],
    id_of: Callable[[Any, int], str] = record_id,
) -> Iterator[Record | Skip]:
    """Run `build(raw, record_id)` on each row; one input row may give several samples (keys `-<sub>`)."""
    for index, raw in enumerate(rows):
        rid = id_of(raw, index)
        try:
            if isinstance(raw, BadLine):
                raise SkipRecord(MALFORMED, str(raw))
            if not isinstance(raw, dict):
                raise SkipRecord(MALFORMED, f"expected a JSON object, got {type(raw).__name__}")
            outputs = build(raw, rid)
        except SkipRecord as err:
            yield make_skip(rid, err)
            continue
        for sub, (sample, image) in enumerate(outputs):
            yield Record(key=make_key(source, index, sub if len(outputs) > 1 else None), sample=sample, image=image)


# ---------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Fully decode and convert to RGB; transparent modes are composited on white (not on black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(opener: Callable[[], Image.Image], where: str) -> Image.Image:
    try:
        with opener() as image:
            return to_rgb(image)  # convert() forces the full decode; verify() alone misses truncation
    except Exception as err:  # noqa: BLE001 - PIL decoders raise many types; all mean "cannot decode"
        raise SkipRecord(CORRUPT_IMAGE, f"{where}: {type(err).__name__}: {err}") from err


def image_path(images_dir: Path | None, relative: Any) -> Path:
    """`images_dir / relative`, refusing absolute paths and `..` escapes (checked lexically so symlinks work)."""
    if not isinstance(relative, str) or not relative.strip():
        raise SkipRecord(MALFORMED, f"image path must be a non-empty string, got {relative!r}")
    if images_dir is None:
        raise SkipRecord(MISSING_IMAGE, f"'{relative}' needs --images DIR")
    normal = os.path.normpath(relative)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
        raise SkipRecord(MISSING_IMAGE, f"'{relative}' points outside --images {images_dir}")
    path = Path(images_dir) / normal
    if not path.is_file():
        raise SkipRecord(MISSING_IMAGE, f"{path} does not exist")
    return path


def load_image_file(images_dir: Path | None, relative: Any) -> Image.Image:
    """Open `images_dir/relative` as RGB or raise SkipRecord (missing / corrupt)."""
    path = image_path(images_dir, relative)
    return _decode(lambda: Image.open(path), str(path))


def load_image_value(value: Any, images_dir: Path | None) -> Image.Image:
    """An image given as raw bytes, a `{"bytes", "path"}` struct (HF datasets) or a relative path."""
    if isinstance(value, bytes | bytearray):
        return _decode(lambda: Image.open(io.BytesIO(value)), "embedded bytes")
    if isinstance(value, dict):
        if value.get("bytes"):
            return _decode(lambda: Image.open(io.BytesIO(value["bytes"])), f"embedded bytes ({value.get('path')})")
        if value.get("path"):
            return load_image_file(images_dir, value["path"])
        raise SkipRecord(MISSING_IMAGE, "image struct has neither bytes nor path")
    if isinstance(value, str):
        return load_image_file(images_dir, value)
    raise SkipRecord(MALFORMED, f"unsupported image value of type {type(value).__name__}")


# ---------------------------------------------------------------- messages


def normalise_placeholder(text: str) -> str:
    """Strip stray whitespace; a leading/trailing `<image>` is separated from the text by exactly one newline."""
    text = text.strip()
    if text.count(IMAGE_TOKEN) != 1:
        return text
    before, after = (part.strip() for part in text.split(IMAGE_TOKEN))
    if not before:
        return f"{IMAGE_TOKEN}\n{after}" if after else IMAGE_TOKEN
    if not after:
        return f"{before}\n{IMAGE_TOKEN}"
    return text  # placeholder in the middle of the text: keep it where the author put it


def content_text(content: Any, where: str) -> str:
    """A message content as text: a string, or a list of parts (`{"type": "image"}` → `<image>`, text parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SkipRecord(MALFORMED, f"{where} content must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image", "image_url"):
            texts.append(IMAGE_TOKEN)
        elif kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise SkipRecord(MALFORMED, f"{where} has an unsupported content part {part!r:.80}")
    return "\n".join(texts)


def convert_turns(turns: Any, role_keys: Sequence[str], content_keys: Sequence[str]) -> list[dict]:
    """`[{from|role, value|content}]` → `[{role, content}]` with human→user, gpt→assistant."""
    if not isinstance(turns, list) or not turns:
        raise SkipRecord(MALFORMED, f"conversation must be a non-empty list, got {type(turns).__name__}")
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SkipRecord(MALFORMED, f"turn {position} is {type(turn).__name__}, not an object")
        role = next((turn[k] for k in role_keys if k in turn), None)
        content = next((turn[k] for k in content_keys if k in turn), None)
        if role not in ROLE_MAP:
            raise SkipRecord(MALFORMED, f"turn {position} has unknown role {role!r} (expected one of {sorted(ROLE_MAP)})")
        messages.append({"role": ROLE_MAP[role], "content": content_text(content, f"turn {position}")})
    return messages


def check_alternation(messages: list[dict], last: str, where: str = "conversation") -> None:
    """Optional leading system turn, then user/assistant alternating from user, ending with `last`."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise SkipRecord(MALFORMED, f"{where} has no user/assistant turns")
    for position, message in enumerate(body):
        expected = "user" if position % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise SkipRecord(
                MALFORMED, f"{where} turn {position} is '{message['role']}' but roles must alternate user/assistant"
            )
    if body[-1]["role"] != last:
        raise SkipRecord(MALFORMED, f"{where} ends with a '{body[-1]['role']}' turn, expected '{last}'")


def check_assistant_text(messages: list[dict]) -> None:
    """Every assistant turn must say something: an empty target trains nothing and hides data bugs."""
    for position, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise SkipRecord(EMPTY_ASSISTANT, f"turn {position} is empty")


def place_placeholders(messages: list[dict], num_images: int) -> list[dict]:
    """Normalise texts and check `<image>` count == images (0 or 1), all in user turns.

    A record with an image but no placeholder gets `<image>\\n` prepended to its first user turn, as
    LLaVA's preprocessing does.
    """
    messages = [{**m, "content": normalise_placeholder(m["content"])} for m in messages]
    counts = [m["content"].count(IMAGE_TOKEN) for m in messages]
    if num_images == 1 and sum(counts) == 0:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        text = messages[first_user]["content"]
        messages[first_user] = {"role": "user", "content": f"{IMAGE_TOKEN}\n{text}" if text else IMAGE_TOKEN}
        return messages
    if sum(counts) != num_images:
        raise SkipRecord(PLACEHOLDER_MISMATCH, f"{sum(counts)} {IMAGE_TOKEN} placeholders but {num_images} image(s)")
    misplaced = [i for i, (m, c) in enumerate(zip(messages, counts)) if c and m["role"] != "user"]
    if misplaced:
        raise SkipRecord(PLACEHOLDER_MISMATCH, f"{IMAGE_TOKEN} in non-user turn {misplaced[0]}")
    return messages


def pick(options: Sequence[str], record: str) -> str:
    """A deterministic choice per record id (crc32, not the salted built-in hash)."""
    return options[zlib.crc32(record.encode("utf-8")) % len(options)]


def base_meta(source: str, rid: str, split: str, **extra: Any) -> dict:
    """The `meta` block every converted sample carries."""
    return {"source": source, "id": rid, "split": split, **{k: v for k, v in extra.items() if v is not None}}
