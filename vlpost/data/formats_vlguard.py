"""VLGuard (safety fine-tuning data) → sft conversations, preference pairs or refusal-scored prompts.

VLGuard gives one response per instruction: a helpful answer for a safe instruction, a refusal for an
unsafe one. Preference pairs need the other side, so:
- safe instruction: chosen = VLGuard's answer, rejected = a refusal from `REFUSALS` (picked per record);
- unsafe instruction: chosen = VLGuard's refusal, rejected = the answer for that record id in
  `--rejected-from FILE` (a JSON object `{vlguard_id: answer}`) when given, else `COMPLIANT_TEMPLATE`
  filled with the instruction. `meta.rejected_source` records which ("refusal-template", "file",
  "compliant-template").
Each (image, instruction) pair is its own sample; a safe image gives two (keys `-0`, `-1`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlpost.data.formats_common import (
    MALFORMED,
    Output,
    SkipRecord,
    base_meta,
    check_assistant_text,
    load_image_file,
    pick,
    place_placeholders,
    stream_records,
)
from vlpost.data.formats_io import read_json_rows
from vlpost.data.records import Record, Skip

REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I can't assist with that.",
    "Sorry, I'm not able to help with this.",
    "I'm not able to provide that.",
    "I'm unable to help with that request.",
    "Unfortunately, I can't comply with that request.",
)
COMPLIANT_TEMPLATE = 'Sure! Here is a detailed answer to "{instruction}", based on what the image shows.'
INSTRUCTION_KEYS = {"safe_instruction": True, "unsafe_instruction": False}


def _pairs(raw: dict) -> list[tuple[str, str, bool]]:
    """(instruction, response, instruction_is_safe) for each entry of `instr-resp`."""
    entries = raw.get("instr-resp")
    if not isinstance(entries, list) or not entries:
        raise SkipRecord(MALFORMED, "'instr-resp' must be a non-empty list")
    pairs = []
    for position, entry in enumerate(entries):
        key = next((k for k in (*INSTRUCTION_KEYS, "instruction") if isinstance(entry, dict) and k in entry), None)
        if key is None or not isinstance(entry[key], str) or not isinstance(entry.get("response"), str):
            raise SkipRecord(MALFORMED, f"instr-resp[{position}] needs a string instruction and 'response'")
        # A plain "instruction" belongs to an unsafe image and is itself unsafe.
        pairs.append((entry[key], entry["response"], INSTRUCTION_KEYS.get(key, bool(raw["safe"]))))
    return pairs


def _category(raw: dict) -> str | None:
    parts = [raw[k] for k in ("harmful_category", "harmful_subcategory") if isinstance(raw.get(k), str)]
    return "/".join(parts) or None


def _rejected(rid: str, sub: int, instruction: str, safe: bool, rejected_from: dict) -> tuple[str, str]:
    if safe:
        return pick(REFUSALS, f"{rid}/{sub}"), "refusal-template"
    if isinstance(rejected_from.get(rid), str) and rejected_from[rid].strip():
        return rejected_from[rid].strip(), "file"
    return COMPLIANT_TEMPLATE.format(instruction=instruction.strip()), "compliant-template"


def _sample(kind: str, rid: str, sub: int, pair: tuple[str, str, bool], meta: dict, rejected_from: dict) -> dict:
    instruction, response, safe = pair
    prompt = place_placeholders([{"role": "user", "content": instruction}], 1)
    answer = [{"role": "assistant", "content": response.strip()}]
    meta = {**meta, "safe_instruction": safe}
    if kind == "sft":
        return {"kind": "sft", "messages": prompt + answer, "meta": meta}
    if kind == "preference":
        text, source = _rejected(rid, sub, instruction, safe, rejected_from)
        rejected = [{"role": "assistant", "content": text}]
        return {"kind": "preference", "prompt": prompt, "chosen": answer, "rejected": rejected,
                "meta": {**meta, "rejected_source": source}}
    category = meta.get("category") or ("benign" if safe else "uncategorised")
    reward = {"type": "refusal", "sensitive": not safe, "category": category,
              "answers": [response.strip()] if safe else []}
    return {"kind": "prompt", "prompt": prompt, "reward": reward, "meta": meta}


def _vlguard_build(raw: dict, rid: str, images_dir: Path | None, kind: str, split: str,
                   rejected_from: dict) -> list[Output]:
    missing = [k for k in ("image", "safe", "instr-resp") if k not in raw]
    if missing:
        raise SkipRecord(MALFORMED, f"missing key(s) {missing}")
    if not isinstance(raw["safe"], bool):
        raise SkipRecord(MALFORMED, f"'safe' must be true/false, got {raw['safe']!r}")
    pairs = _pairs(raw)
    for _, response, _ in pairs:
        check_assistant_text([{"role": "assistant", "content": response}])
    meta = base_meta("vlguard", rid, split, category=_category(raw), safe_image=raw["safe"])
    samples = [_sample(kind, rid, sub, pair, meta, rejected_from) for sub, pair in enumerate(pairs)]
    image = load_image_file(images_dir, raw["image"])  # one decode, shared by the record's samples
    return [(sample, image) for sample in samples]


def _load_rejected(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    with Path(path).open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"--rejected-from {path}: expected a JSON object {{vlguard_id: answer}}")
    return data


def convert_vlguard(
    input_path: Path,
    images_dir: Path | None,
    *,
    kind: str = "sft",
    split: str | None = None,
    rejected_from: Path | None = None,
) -> Iterator[Record | Skip]:
    """VLGuard train.json / test.json → `kind` sft | preference | prompt (split defaults to eval for test*)."""
    if kind not in ("sft", "preference", "prompt"):
        raise ValueError(f"vlguard: --kind must be sft, preference or prompt, got {kind!r}")
    split = split or ("eval" if Path(input_path).stem.startswith("test") else "train")
    rejected = _load_rejected(rejected_from)
    return stream_records(
        "vlguard", read_json_rows(input_path),
        lambda raw, rid: _vlguard_build(raw, rid, images_dir, kind, split, rejected),
    )
