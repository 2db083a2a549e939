"""Checks one sample dict against the shard schema (docs/INTERFACES.md), for writer and reader alike.

A bad sample raises `SampleError(reason, detail)`: `reason` is short and stable (index.json and
`ShardStream.stats` count by it), `detail` names the field so the record can be fixed.
"""

from __future__ import annotations

from typing import Any

from vlpost.constants import IMAGE_TOKEN, REWARD_TYPES, ROLES, SAMPLE_KINDS

# Stable reasons shared with the converters (formats_common.py) where they overlap.
UNKNOWN_KIND = "unknown kind"
KIND_MISMATCH = "kind mismatch"
MISSING_FIELD = "missing field"
MALFORMED = "malformed record"
INVALID_ROLE = "invalid role"
PLACEHOLDER_MISMATCH = "placeholder mismatch"
MISSING_IMAGE = "missing image"
EMPTY_ASSISTANT = "empty assistant turn"
NO_ASSISTANT = "no assistant turn"
INVALID_REWARD = "invalid reward"

# Message lists each kind must carry, and whether each must hold an assistant turn.
REQUIRED_MESSAGES: dict[str, dict[str, bool]] = {
    "caption": {"messages": True},
    "sft": {"messages": True},
    "preference": {"prompt": False, "chosen": True, "rejected": True},
    "prompt": {"prompt": False},
}
MESSAGE_FIELDS = ("messages", "prompt", "chosen", "rejected")


class SampleError(ValueError):
    """One sample breaks the schema; `reason` is the counted category, `detail` says where."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def check_sample(sample: Any, kind: str | None, has_image: bool) -> None:
    """Raise `SampleError` unless `sample` is a valid `kind` sample with exactly one `<image>` iff an image."""
    if not isinstance(sample, dict):
        raise SampleError(MALFORMED, f"sample is a {type(sample).__name__}, expected a dict")
    sample_kind = sample.get("kind")
    if sample_kind not in SAMPLE_KINDS:
        raise SampleError(UNKNOWN_KIND, f"kind {sample_kind!r} is not one of {SAMPLE_KINDS}")
    if kind is not None and sample_kind != kind:
        raise SampleError(KIND_MISMATCH, f"sample kind {sample_kind!r} in a {kind!r} shard set")
    _check_meta(sample)
    for field, needs_assistant in REQUIRED_MESSAGES[sample_kind].items():
        if field not in sample:
            raise SampleError(MISSING_FIELD, f"kind {sample_kind!r} needs {field!r}")
        _check_messages(sample[field], field, needs_assistant)
    if sample_kind == "prompt":
        _check_reward(sample.get("reward"))
    _check_placeholders(sample, has_image)


def count_placeholders(sample: dict) -> int:
    """Number of `<image>` placeholders over every message list of the sample."""
    total = 0
    for field in MESSAGE_FIELDS:
        for message in sample.get(field) or []:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                total += message["content"].count(IMAGE_TOKEN)
    return total


def _check_meta(sample: dict) -> None:
    meta = sample.get("meta")
    if not isinstance(meta, dict):
        raise SampleError(MISSING_FIELD, "'meta' must be a dict holding at least 'id'")
    if not isinstance(meta.get("id"), str) or not meta["id"]:
        raise SampleError(MISSING_FIELD, "'meta.id' must be the original record id (a non-empty str)")


def _check_messages(messages: Any, field: str, needs_assistant: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise SampleError(MALFORMED, f"{field!r} must be a non-empty list of messages")
    has_assistant = False
    for turn, message in enumerate(messages):
        where = f"{field}[{turn}]"
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise SampleError(MALFORMED, f"{where} must be a dict with a str 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise SampleError(INVALID_ROLE, f"{where} has role {role!r}; roles are {ROLES}")
        if role == "assistant":
            has_assistant = True
            if not message["content"].strip():
                raise SampleError(EMPTY_ASSISTANT, f"{where} is an empty assistant turn")
    if needs_assistant and not has_assistant:
        raise SampleError(NO_ASSISTANT, f"{field!r} has no assistant turn, so nothing would be trained")


def _check_reward(reward: Any) -> None:
    if not isinstance(reward, dict):
        raise SampleError(MISSING_FIELD, "kind 'prompt' needs a 'reward' dict")
    if reward.get("type") not in REWARD_TYPES:
        raise SampleError(INVALID_REWARD, f"reward type {reward.get('type')!r} is not one of {REWARD_TYPES}")


def _check_placeholders(sample: dict, has_image: bool) -> None:
    placeholders = count_placeholders(sample)
    if has_image and placeholders != 1:
        raise SampleError(PLACEHOLDER_MISMATCH, f"{placeholders} {IMAGE_TOKEN} placeholders but 1 image")
    if not has_image and placeholders == 1:
        raise SampleError(MISSING_IMAGE, f"text has an {IMAGE_TOKEN} placeholder but the sample has no image")
    if not has_image and placeholders > 1:
        raise SampleError(PLACEHOLDER_MISMATCH, f"{placeholders} {IMAGE_TOKEN} placeholders but no image")
