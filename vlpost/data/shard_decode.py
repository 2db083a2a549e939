"""Reading side of one shard set: `read_index`, and turning one tar sample group into (sample, image).

Everything here treats shard bytes as untrusted: a bad sample raises `SampleError` with a stable reason,
images are size-checked from their header before any pixel is decoded, and member names are only
ever used as dictionary keys (nothing is extracted to disk, so a `../` name cannot escape anywhere).
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

from PIL import Image

from vlpost.constants import SCHEMA_VERSION
from vlpost.data.shard_schema import SampleError, check_sample
from vlpost.data.shard_writer import INDEX_FILE, file_sha256, to_rgb

DEFAULT_MAX_IMAGE_PIXELS = 1 << 26  # 67M pixels (~8192²): far above any VLM input, far below a bomb
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

UNSAFE_NAME = "unsafe member name"
MISSING_JSON = "missing json"
MULTIPLE_IMAGES = "multiple images"
BAD_JSON = "bad json"
IMAGE_TOO_LARGE = "image too large"
CORRUPT_IMAGE = "corrupt image"


def read_index(path: str | Path) -> dict:
    """Load `<path>/index.json` (or the file itself), refusing missing files and newer schema versions."""
    path = Path(path)
    index_path = path if path.name == INDEX_FILE else path / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(
            f"no {INDEX_FILE} in {index_path.parent}: not a shard folder; write one with "
            f"`vlpost prepare <format> <input> --out {index_path.parent}` (vlpost.data.shards.write_shards)"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{index_path} is not valid JSON ({err}); re-run `vlpost prepare`") from err
    version = index.get("schema_version") if isinstance(index, dict) else None
    if not isinstance(version, int):
        raise ValueError(f"{index_path} has no integer schema_version; it was not written by vlpost")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{index_path} has schema_version {version} but this vlpost reads up to {SCHEMA_VERSION}; "
            "upgrade vlpost or re-write the shards with this version"
        )
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(_valid_entry(entry) for entry in shards):
        raise ValueError(f"{index_path}: 'shards' must be a list of {{'name', 'num_samples', ...}} entries")
    return index


def _valid_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and Path(entry["name"]).name == entry["name"]  # a bare file name inside the folder, no ../
        and isinstance(entry.get("num_samples"), int)
        and entry["num_samples"] >= 0
    )


def verify_shards(path: str | Path) -> list[str]:
    """Problems found by re-hashing every shard against index.json (empty list: all intact)."""
    path = Path(path)
    index = read_index(path)
    problems = []
    for entry in index["shards"]:
        shard = path / entry["name"]
        if not shard.is_file():
            problems.append(f"{entry['name']}: missing")
        elif "sha256" in entry and file_sha256(shard) != entry["sha256"]:
            problems.append(f"{entry['name']}: sha256 differs from {INDEX_FILE} (corrupt or replaced)")
    return problems


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decoded RGB image; the header size is checked first so a bomb is never allocated."""
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own guard must not reject what we allow
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise SampleError(IMAGE_TOO_LARGE, f"{width}x{height} pixels > max_image_pixels={max_pixels}")
        image.load()  # full decode: verify() alone misses truncated pixel data
        return to_rgb(image)
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SampleError(IMAGE_TOO_LARGE, str(err)) from err
    except Exception as err:  # noqa: BLE001 - PIL decoders raise many types; all mean "cannot decode"
        raise SampleError(CORRUPT_IMAGE, f"{type(err).__name__}: {err}") from err


def decode_group(group: dict, kind: str | None, max_pixels: int) -> tuple[dict, Image.Image | None]:
    """(sample, RGB image or None) from a webdataset group {"__key__", "json", "png"|"jpg"...}."""
    key = group["__key__"]
    if not _SAFE_KEY.match(key):
        raise SampleError(UNSAFE_NAME, f"member name {key!r} is not [A-Za-z0-9_-]; ignored, never extracted")
    if "json" not in group:
        raise SampleError(MISSING_JSON, f"members {sorted(k for k in group if not k.startswith('__'))} "
                                        "but no .json")  # fmt: skip
    images = [ext for ext in IMAGE_EXTENSIONS if ext in group]
    if len(images) > 1:
        raise SampleError(MULTIPLE_IMAGES, f"image members {images}; a sample holds at most one")
    try:
        sample = json.loads(group["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise SampleError(BAD_JSON, str(err)) from err
    check_sample(sample, kind, has_image=bool(images))
    image = decode_image(group[images[0]], max_pixels) if images else None
    return sample, image
