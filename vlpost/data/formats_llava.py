"""Conversation formats: LLaVA-Pretrain (558k captions), LLaVA-Instruct (mix665k) and ShareGPT-style chats.

Checks run cheapest first, so a record failing several gets the first reason: malformed record →
multiple images → placeholder mismatch → empty assistant turn → missing / corrupt image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlpost.data.formats_common import (
    MALFORMED,
    MULTIPLE_IMAGES,
    Output,
    SkipRecord,
    base_meta,
    check_alternation,
    check_assistant_text,
    convert_turns,
    load_image_file,
    place_placeholders,
    stream_records,
)
from vlpost.data.formats_io import read_json_rows
from vlpost.data.records import Record, Skip


def _single_image(value: Any) -> str | None:
    """The one image path of a record (`"a.jpg"`, `["a.jpg"]`), None when text-only."""
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, list):
        if len(value) > 1:
            raise SkipRecord(MULTIPLE_IMAGES, f"{len(value)} images; one image per sample is supported")
        value = value[0]
    if not isinstance(value, str):
        raise SkipRecord(MALFORMED, f"image must be a path string, got {type(value).__name__}")
    return value


def _conversation_sample(
    messages: list[dict], image_rel: str | None, images_dir: Path | None, kind: str, meta: dict
) -> Output:
    """Shared tail: alternation, placeholders, assistant text, then (last, as it is the slow part) the image."""
    check_alternation(messages, last="assistant")
    messages = place_placeholders(messages, 0 if image_rel is None else 1)
    check_assistant_text(messages)
    image = None if image_rel is None else load_image_file(images_dir, image_rel)
    return {"kind": kind, "messages": messages, "meta": meta}, image


def _llava_build(raw: dict, rid: str, images_dir: Path | None, kind: str, source: str, split: str) -> list[Output]:
    if "conversations" not in raw:
        raise SkipRecord(MALFORMED, "missing key 'conversations'")
    if kind == "caption" and raw.get("image") is None:
        raise SkipRecord(MALFORMED, "missing key 'image' (a caption sample needs an image)")
    messages = convert_turns(raw["conversations"], role_keys=("from",), content_keys=("value",))
    image_rel = _single_image(raw.get("image"))
    return [_conversation_sample(messages, image_rel, images_dir, kind, base_meta(source, rid, split))]


def convert_llava_pretrain(input_path: Path, images_dir: Path | None, *, split: str = "train") -> Iterator[Record | Skip]:
    """LLaVA-Pretrain (blip_laion_cc_sbu_558k.json): `{id, image, conversations}` → caption samples."""
    return stream_records(
        "llava-pretrain",
        read_json_rows(input_path),
        lambda raw, rid: _llava_build(raw, rid, images_dir, "caption", "llava-pretrain", split),
    )


def convert_llava_instruct(input_path: Path, images_dir: Path | None, *, split: str = "train") -> Iterator[Record | Skip]:
    """LLaVA-Instruct (llava_v1_5_mix665k.json): multi-turn human/gpt chats, image optional → sft samples."""
    return stream_records(
        "llava-instruct",
        read_json_rows(input_path),
        lambda raw, rid: _llava_build(raw, rid, images_dir, "sft", "llava-instruct", split),
    )


def _sharegpt_build(raw: dict, rid: str, images_dir: Path | None, split: str) -> list[Output]:
    turns_key = next((k for k in ("messages", "conversations") if k in raw), None)
    if turns_key is None:
        raise SkipRecord(MALFORMED, "missing key 'messages' (or 'conversations')")
    messages = convert_turns(raw[turns_key], role_keys=("role", "from"), content_keys=("content", "value"))
    image_rel = _single_image(raw.get("images", raw.get("image")))
    system = raw.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return [_conversation_sample(messages, image_rel, images_dir, "sft", base_meta("sharegpt", rid, split))]


def convert_sharegpt(input_path: Path, images_dir: Path | None, *, split: str = "train") -> Iterator[Record | Skip]:
    """ShareGPT / LLaMA-Factory style: `{messages|conversations: [{role|from, content|value}], images: [...]}` → sft."""
    return stream_records(
        "sharegpt", read_json_rows(input_path), lambda raw, rid: _sharegpt_build(raw, rid, images_dir, split)
    )
