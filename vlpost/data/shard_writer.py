"""Write `Record`s into WebDataset tar shards plus an `index.json` that readers trust for counts.

Everything is written into a temporary folder beside `out_dir` and renamed into place at the end,
so a crash never leaves half a shard set, and an existing shard set is replaced only on request.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from vlpost.constants import SAMPLE_KINDS, SCHEMA_VERSION
from vlpost.data.records import Record, Skip
from vlpost.data.shard_schema import SampleError, check_sample

logger = logging.getLogger("vlpost.data.shards")

INDEX_FILE = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}
JPEG_QUALITY = 95
NOT_SERIALIZABLE = "not json-serializable"
CORRUPT_IMAGE = "corrupt image"


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode; transparency is composited on white (black would invent dark pixels)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """PNG (lossless) or JPEG (quality 95) bytes of the RGB image."""
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if image_format == "jpg" else {}
    to_rgb(image).save(buffer, format=IMAGE_FORMATS[image_format], **options)
    return buffer.getvalue()


def write_shards(
    records: Iterable[Record | Skip],
    out_dir: str | Path,
    kind: str,
    command: str,
    *,
    max_samples: int = 10000,
    max_bytes: float = 3e9,
    image_format: str = "png",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Validate and write `records` as `shard-%06d.tar` files + `index.json`; return the index."""
    out_dir = Path(out_dir)
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {SAMPLE_KINDS}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r} is not one of {sorted(IMAGE_FORMATS)}")
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        index = _write_into(tmp_dir, records, kind, command, max_samples, max_bytes, image_format, progress)
        _publish(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _report(index, out_dir, progress)
    return index


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; pick another --out")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
    if not (out_dir / INDEX_FILE).exists():
        raise FileExistsError(
            f"refusing to overwrite {out_dir}: it is not a shard folder (no {INDEX_FILE}); pick another --out"
        )


def _publish(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temp folder into place; an old shard set is removed only after that worked."""
    if out_dir.exists() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.rename(tmp_dir, out_dir)
        return
    _check_target(out_dir, overwrite)  # re-check: the folder may have changed while we wrote
    backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, backup / out_dir.name)
    try:
        os.rename(tmp_dir, out_dir)
    except BaseException:
        os.rename(backup / out_dir.name, out_dir)
        raise
    shutil.rmtree(backup)


class _Tally:
    """Counts for index.json while records stream by."""

    def __init__(self) -> None:
        self.with_image = 0
        self.text_only = 0
        self.categories: Counter[str] = Counter()
        self.skip_reasons: Counter[str] = Counter()
        self.skipped: list[dict[str, str]] = []
        self.per_shard: Counter[str] = Counter()

    def skip(self, record_id: str, reason: str, detail: str = "") -> None:
        self.skip_reasons[reason] += 1
        entry = {"id": record_id, "reason": reason}
        if detail:
            entry["detail"] = detail
        self.skipped.append(entry)

    def stats(self) -> dict[str, Any]:
        return {
            "with_image": self.with_image,
            "text_only": self.text_only,
            "skipped_by_reason": dict(sorted(self.skip_reasons.items())),
            "categories": dict(sorted(self.categories.items())),
        }


def _write_into(
    tmp_dir: Path,
    records: Iterable[Record | Skip],
    kind: str,
    command: str,
    max_samples: int,
    max_bytes: float,
    image_format: str,
    progress: bool,
) -> dict:
    tally = _Tally()
    seen_keys: set[str] = set()
    pattern = str(tmp_dir / SHARD_PATTERN)
    # mtime=0 and fixed owner: the same records always give byte-identical tars (same sha256).
    writer = wds.ShardWriter(
        pattern, maxcount=max_samples, maxsize=max_bytes, verbose=0, encoder=False, mtime=0,
        user="vlpost", group="vlpost",
    )  # fmt: skip
    with writer:
        for item in tqdm(records, desc=f"writing {tmp_dir.name}", unit="rec", disable=not progress):
            entry = _encode(item, kind, image_format, seen_keys, tally)
            if entry is not None:
                writer.write(entry)
                tally.per_shard[Path(writer.fname).name] += 1
    return _index(tmp_dir, kind, command, tally)


def _encode(item: Record | Skip, kind: str, image_format: str, seen_keys: set[str], tally: _Tally) -> dict | None:
    """The tar entry for one record, or None after recording why it was skipped."""
    if isinstance(item, Skip):
        tally.skip(item.id, item.reason, getattr(item, "detail", "") or "")
        return None
    if not isinstance(item, Record):
        raise TypeError(f"write_shards got a {type(item).__name__}; converters must yield Record or Skip")
    if item.key in seen_keys:
        raise ValueError(f"duplicate record key {item.key!r}: keys must be unique within a shard set")
    seen_keys.add(item.key)
    record_id = _record_id(item)
    try:
        check_sample(item.sample, kind, item.image is not None)
        payload = json.dumps(item.sample, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except SampleError as err:
        tally.skip(record_id, err.reason, err.detail)
        return None
    except (TypeError, ValueError) as err:
        tally.skip(record_id, NOT_SERIALIZABLE, str(err))
        return None
    entry = {"__key__": item.key, "json": payload}
    if item.image is not None:
        try:
            entry[image_format] = encode_image(item.image, image_format)
        except Exception as err:  # noqa: BLE001 - PIL raises many types; all mean "cannot encode"
            tally.skip(record_id, CORRUPT_IMAGE, f"{type(err).__name__}: {err}")
            return None
    tally.with_image += item.image is not None
    tally.text_only += item.image is None
    category = (item.sample.get("meta") or {}).get("category")
    if isinstance(category, str):
        tally.categories[category] += 1
    return entry


def _record_id(record: Record) -> str:
    meta = record.sample.get("meta") if isinstance(record.sample, dict) else None
    meta_id = meta.get("id") if isinstance(meta, dict) else None
    return meta_id if isinstance(meta_id, str) and meta_id else record.key


def _index(tmp_dir: Path, kind: str, command: str, tally: _Tally) -> dict:
    shards = []
    for path in sorted(tmp_dir.glob("shard-*.tar")):
        count = tally.per_shard.get(path.name, 0)
        if count == 0:  # ShardWriter opens its first tar eagerly; an empty input leaves it empty
            path.unlink()
            continue
        shards.append({"name": path.name, "num_samples": count, "sha256": file_sha256(path),
                       "bytes": path.stat().st_size})  # fmt: skip
    index = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "command": command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "num_samples": sum(shard["num_samples"] for shard in shards),
        "shards": shards,
        "stats": tally.stats(),
        "skipped": tally.skipped,
    }
    (tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return index


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _report(index: dict, out_dir: Path, progress: bool) -> None:
    stats = index["stats"]
    skipped = ", ".join(f"{reason}: {n}" for reason, n in stats["skipped_by_reason"].items()) or "none"
    line = (
        f"wrote {index['num_samples']} {index['kind']} samples ({stats['with_image']} with image, "
        f"{stats['text_only']} text-only) in {len(index['shards'])} shards to {out_dir}; skipped {skipped}"
    )
    if progress:
        print(line)
    logger.info(line)
    if index["num_samples"] == 0 and index["skipped"]:
        logger.warning("every record was skipped; see %s 'skipped' for the reasons", out_dir / INDEX_FILE)
