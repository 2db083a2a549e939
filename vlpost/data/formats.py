"""Registry of converters from public formats (and the synthetic world) into the shard sample schema.

Each converter is `convert_<name>(input_path, images_dir, **opts) -> Iterator[Record | Skip]`, streaming
one record at a time; `FORMATS[name]` says which sample kinds and options it takes. The format names
are a public interface (`vlpost prepare <format>`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vlpost.constants import SAMPLE_KINDS
from vlpost.data.formats_common import (
    CORRUPT_IMAGE,
    EMPTY_ASSISTANT,
    MALFORMED,
    MISSING_IMAGE,
    MULTIPLE_IMAGES,
    PLACEHOLDER_MISMATCH,
    to_rgb,
)
from vlpost.data.formats_llava import convert_llava_instruct, convert_llava_pretrain, convert_sharegpt
from vlpost.data.formats_preference import convert_rlaif_v, convert_trl_preference
from vlpost.data.formats_vlguard import convert_vlguard
from vlpost.data.formats_vqa import convert_vqav2
from vlpost.data.records import Record, Skip

__all__ = [
    "CORRUPT_IMAGE", "EMPTY_ASSISTANT", "FORMATS", "MALFORMED", "MISSING_IMAGE", "MULTIPLE_IMAGES",
    "PLACEHOLDER_MISMATCH", "FormatSpec", "convert", "convert_llava_instruct", "convert_llava_pretrain",
    "convert_rlaif_v", "convert_sharegpt", "convert_synthetic", "convert_trl_preference", "convert_vlguard",
    "convert_vqav2", "get_format", "sample_kind", "to_rgb",
]

EVAL_KINDS = ("vqa", "safety")  # synthetic held-out eval sets; both are written as "prompt" samples


def convert_synthetic(
    input_path: Path | None,
    images_dir: Path | None,
    *,
    kind: str = "sft",
    num: int = 1000,
    seed: int = 0,
    split: str = "train",
    image_size: int = 64,
) -> Iterator[Record | Skip]:
    """The embedded demo world: `kind` in SAMPLE_KINDS for training, or vqa | safety with split eval."""
    from vlpost.data.synthetic import SyntheticWorld  # deferred: only this format needs it

    if split == "eval" and kind not in EVAL_KINDS:
        raise ValueError(f"synthetic --split eval takes --kind vqa or safety, got {kind!r}")
    if split != "eval" and kind not in SAMPLE_KINDS:
        raise ValueError(f"synthetic --kind must be one of {SAMPLE_KINDS} (or vqa|safety with --split eval), got {kind!r}")
    world = SyntheticWorld(seed=seed, image_size=image_size)
    if split == "eval":
        return iter(world.eval_records(kind, num))
    return iter(world.records(kind, num, split=split))


@dataclass(frozen=True)
class FormatSpec:
    """What `vlpost prepare <name>` needs to know about a converter."""

    name: str
    convert: Callable[..., Iterator[Record | Skip]]
    kinds: tuple[str, ...]  # accepted --kind values; the first is the default
    options: tuple[str, ...]  # keyword options the converter takes (CLI dest names)
    help: str
    needs_input: bool = True


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("llava-pretrain", convert_llava_pretrain, ("caption",), ("split",),
                   "LLaVA-Pretrain 558k JSON → caption"),
        FormatSpec("llava-instruct", convert_llava_instruct, ("sft",), ("split",),
                   "LLaVA-Instruct / mix665k JSON → sft"),
        FormatSpec("sharegpt", convert_sharegpt, ("sft",), ("split",),
                   "ShareGPT-style JSON/JSONL (messages|conversations + images) → sft"),
        FormatSpec("trl-preference", convert_trl_preference, ("preference",), ("split",),
                   "TRL vision preference JSONL/parquet (prompt, chosen, rejected, images) → preference"),
        FormatSpec("rlaif-v", convert_rlaif_v, ("preference",), ("split",),
                   "RLAIF-V parquet file or folder → preference"),
        FormatSpec("vlguard", convert_vlguard, ("sft", "preference", "prompt"), ("kind", "split", "rejected_from"),
                   "VLGuard train.json/test.json → sft | preference | prompt (refusal reward)"),
        FormatSpec("vqav2", convert_vqav2, ("prompt", "sft"), ("kind", "split", "annotations"),
                   "VQAv2 questions JSON (+ --annotations) → prompt (VQA reward) | sft"),
        FormatSpec("synthetic", convert_synthetic, ("sft", "caption", "preference", "prompt", *EVAL_KINDS),
                   ("kind", "split", "num", "seed", "image_size"),
                   "the embedded synthetic world (INPUT ignored)", needs_input=False),
    )
}


def get_format(name: str) -> FormatSpec:
    """The spec for `name`, or a ValueError listing the known formats."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def sample_kind(kind: str) -> str:
    """The shard kind written for a --kind value (synthetic eval sets vqa/safety are prompt samples)."""
    return "prompt" if kind in EVAL_KINDS else kind


def convert(name: str, input_path: Path | None, images_dir: Path | None, **opts) -> Iterator[Record | Skip]:
    """Look up `name` and run its converter with the options it accepts (None values left out)."""
    spec = get_format(name)
    unknown = sorted(set(opts) - set(spec.options))
    if unknown:
        raise ValueError(f"format {name!r} does not take option(s) {unknown}; it takes {list(spec.options)}")
    return spec.convert(input_path, images_dir, **{k: v for k, v in opts.items() if v is not None})
