"""Preference formats: TRL vision preference datasets (JSONL or parquet) and RLAIF-V parquet shards.

Parquet is read in small row batches so a multi-GB file of embedded images never sits in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlpost.constants import IMAGE_TOKEN
from vlpost.data.formats_common import (
    MALFORMED,
    MULTIPLE_IMAGES,
    PLACEHOLDER_MISMATCH,
    Output,
    SkipRecord,
    base_meta,
    check_alternation,
    check_assistant_text,
    convert_turns,
    load_image_value,
    normalise_placeholder,
    place_placeholders,
    record_id,
    stream_records,
)
from vlpost.data.formats_io import read_parquet_rows, read_rows
from vlpost.data.records import Record, Skip


def _as_messages(value: Any, role: str, where: str) -> list[dict]:
    """A plain string becomes one `role` turn; a conversational list is converted turn by turn."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    try:
        return convert_turns(value, role_keys=("role",), content_keys=("content",))
    except SkipRecord as err:
        raise SkipRecord(err.reason, f"{where}: {err.detail}") from err


def _completion(value: Any, where: str) -> list[dict]:
    """The chosen / rejected continuation: assistant turns only, no image placeholder, not empty."""
    messages = _as_messages(value, "assistant", where)
    if any(m["role"] != "assistant" for m in messages):
        raise SkipRecord(MALFORMED, f"{where} must hold assistant turns only, got {[m['role'] for m in messages]}")
    messages = [{**m, "content": normalise_placeholder(m["content"])} for m in messages]
    if any(IMAGE_TOKEN in m["content"] for m in messages):
        raise SkipRecord(PLACEHOLDER_MISMATCH, f"{IMAGE_TOKEN} in the {where} answer")
    try:
        check_assistant_text(messages)
    except SkipRecord as err:
        raise SkipRecord(err.reason, f"{where} {err.detail}") from err
    return messages


def _image_values(raw: dict) -> list[Any]:
    """TRL keeps a list under `images`; some exports use a single `image` column."""
    value = raw["images"] if raw.get("images") is not None else raw.get("image")
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _trl_build(raw: dict, rid: str, images_dir: Path | None, split: str) -> list[Output]:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in raw]
    if missing:
        raise SkipRecord(MALFORMED, f"missing key(s) {missing} (explicit-prompt preference format needed)")
    prompt = _as_messages(raw["prompt"], "user", "prompt")
    check_alternation(prompt, last="user", where="prompt")
    chosen = _completion(raw["chosen"], "chosen")
    rejected = _completion(raw["rejected"], "rejected")
    images = _image_values(raw)
    if len(images) > 1:
        raise SkipRecord(MULTIPLE_IMAGES, f"{len(images)} images; one image per sample is supported")
    prompt = place_placeholders(prompt, len(images))
    image = load_image_value(images[0], images_dir) if images else None
    sample = {"kind": "preference", "prompt": prompt, "chosen": chosen, "rejected": rejected,
              "meta": base_meta("trl-preference", rid, split)}
    return [(sample, image)]


def convert_trl_preference(
    input_path: Path, images_dir: Path | None, *, split: str = "train"
) -> Iterator[Record | Skip]:
    """TRL vision preference data (prompt/chosen/rejected/images; plain or conversational) → preference."""
    return stream_records(
        "trl-preference", read_rows(input_path), lambda raw, rid: _trl_build(raw, rid, images_dir, split)
    )


def _text_field(raw: dict, key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise SkipRecord(MALFORMED, f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _rlaif_build(raw: dict, rid: str, images_dir: Path | None, split: str) -> list[Output]:
    missing = [k for k in ("image", "question", "chosen", "rejected") if k not in raw]
    if missing:
        raise SkipRecord(MALFORMED, f"missing key(s) {missing}")
    prompt = place_placeholders([{"role": "user", "content": _text_field(raw, "question")}], 1)
    chosen = _completion(_text_field(raw, "chosen"), "chosen")
    rejected = _completion(_text_field(raw, "rejected"), "rejected")
    image_value = raw["image"] if raw["image"] is not None else raw.get("image_path")
    image = load_image_value(image_value, images_dir)
    meta = base_meta(
        "rlaif-v", rid, split,
        ds_name=raw.get("ds_name"), origin_dataset=raw.get("origin_dataset"), origin_split=raw.get("origin_split"),
    )
    return [({"kind": "preference", "prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}, image)]


def convert_rlaif_v(input_path: Path, images_dir: Path | None, *, split: str = "train") -> Iterator[Record | Skip]:
    """RLAIF-V parquet (a file or the folder of shards): question + chosen/rejected with embedded image."""
    return stream_records(
        "rlaif-v",
        read_parquet_rows(input_path),
        lambda raw, rid: _rlaif_build(raw, rid, images_dir, split),
        id_of=lambda raw, index: record_id(raw, index, key="idx"),
    )
