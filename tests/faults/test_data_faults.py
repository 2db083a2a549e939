"""Bad shards never stop a run: through the stage data path every good sample arrives once, each bad one is counted.

One shard folder holds every data fault at once (bad JSON, missing members, a corrupt JPEG, a decompression
bomb, a `../` member name, a truncated tar, a 0-byte shard); it is read the way stages/*.py read it
(`vlpost.train.stage.sft_batches`: ShardStream → ExampleEncoder → BatchStream) and the batches' label tokens
are decoded back to the sample numbers they came from.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from vlpost.config import DataConfig
from vlpost.data.records import Record
from vlpost.data.shards import write_shards
from vlpost.train.stage import sft_batches

IGNORE = -100
PER_SHARD = 4
NUM = 20  # 5 shards of 4: samples 4s..4s+3 live in shard-00000s.tar
GOOD = [0, 4, 8, 9, 16, 17, 18, 19]
READER_SKIPS = {
    "bad json": 1,  # sample 1
    "missing image": 2,  # sample 2 (png dropped), sample 10 (tar cut inside its png)
    "missing json": 1,  # sample 3
    "corrupt image": 1,  # sample 5: truncated JPEG, header fine, full decode fails
    "image too large": 1,  # sample 6: 400M-pixel PNG of ~50 kB
    "unsafe member name": 1,  # sample 7: members renamed ../evil.json, ../evil.png
    "corrupt shard": 2,  # shard 2 (truncated) and shard 3 (0 bytes)
    "missing from shard": 5,  # sample 11 (after the cut) and samples 12..15 (0-byte shard)
}


def _sample(i: int) -> dict:
    return {"kind": "sft", "meta": {"source": "faults", "id": f"rec-{i}"},
            "messages": [{"role": "user", "content": f"<image>\nquestion {i}?"},
                         {"role": "assistant", "content": f"answer {i}"}]}  # fmt: skip


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _rewrite(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _bomb_png(side: int = 20000) -> bytes:
    """A 1-bit greyscale PNG of side² pixels (1.2 GB as RGB) that compresses to ~50 kB."""
    compressor = zlib.compressobj(9)
    rows = bytes(1 + side // 8) * 1000
    idat = b"".join(compressor.compress(rows) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    Image.open(io.BytesIO(data[: len(data) // 2]))  # the header still parses: only a full decode fails
    return data[: len(data) // 2]


def faulty_shards(root: Path) -> Path:
    """Write NUM good samples in shards of PER_SHARD, then inject one fault of each kind (see READER_SKIPS)."""
    records = [Record(f"k{i:05d}", _sample(i), Image.new("RGB", (8, 8), (i * 12, 40, 200 - i * 5)))
               for i in range(NUM)]  # fmt: skip
    out = root / "shards"
    write_shards(records, out, "sft", "faults", progress=False, max_samples=PER_SHARD)
    shard = [out / f"shard-{s:06d}.tar" for s in range(NUM // PER_SHARD)]
    edits = {"k00001.json": b'{"kind": "sft", "messages": [', "k00002.png": None, "k00003.json": None}
    _rewrite(shard[0], [(n, edits.get(n, d)) for n, d in _members(shard[0]) if edits.get(n, d) is not None])
    renamed = {"k00005.png": ("k00005.jpg", _truncated_jpeg()), "k00006.png": ("k00006.png", _bomb_png())}
    members = [renamed.get(n, (n, d)) for n, d in _members(shard[1])]
    _rewrite(shard[1], [(n.replace("k00007", "../evil"), d) for n, d in members])
    with tarfile.open(shard[2]) as tar:
        cut = tar.getmember("k00010.png")
    shard[2].write_bytes(shard[2].read_bytes()[: cut.offset_data + cut.size // 2])
    shard[3].write_bytes(b"")
    return out


def _listing(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _sample_numbers(batch: dict, tokenizer) -> list[int]:
    """Which samples a padded batch holds, read back from its supervised (label) tokens."""
    numbers = []
    for row in batch["labels"]:
        text = tokenizer.decode([t for t in row.tolist() if t != IGNORE], skip_special_tokens=True)
        found = re.fullmatch(r"\s*answer (\d+)\s*", text)
        assert found, f"unexpected supervised text {text!r}"
        numbers.append(int(found.group(1)))
    return numbers


def test_every_fault_is_skipped_and_counted_and_every_good_sample_arrives_once(make_model, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    data_dir = faulty_shards(tmp_path / "data")
    parent_before, data_before = _listing(tmp_path.parent), sorted(p.name for p in data_dir.iterdir())
    model = make_model()
    run = SimpleNamespace(accelerator=SimpleNamespace(process_index=0, num_processes=1),
                          cfg=SimpleNamespace(train=SimpleNamespace(seed=3)))  # fmt: skip
    batches = sft_batches(DataConfig(shards=str(data_dir), shuffle=True), model, "sft", run, batch_size=3)
    batches.source.loop = False  # one pass over the data instead of a training run's endless loop
    seen = [n for batch in batches for n in _sample_numbers(batch, model.tokenizer)]

    assert sorted(seen) == GOOD  # each good sample exactly once: none lost, none repeated
    assert batches.source.stats == {"yielded": len(GOOD), "skipped": READER_SKIPS}
    assert dict(batches.skipped) == {}  # every sample that survived the reader also encoded
    assert sum(READER_SKIPS.values()) - 2 + len(GOOD) == NUM  # every sample accounted for (2 = shard-level)
    assert list(work.iterdir()) == []  # nothing extracted into cwd
    assert _listing(tmp_path.parent) == parent_before
    assert sorted(p.name for p in data_dir.iterdir()) == data_before
    assert not [p for p in tmp_path.parent.rglob("*evil*")]


def test_a_second_pass_skips_the_same_faults_again(make_model, tmp_path):
    """Looping (a training run's mode) re-reads the set: the same good samples, the counts double."""
    data_dir = faulty_shards(tmp_path)
    model = make_model()
    run = SimpleNamespace(accelerator=SimpleNamespace(process_index=0, num_processes=1),
                          cfg=SimpleNamespace(train=SimpleNamespace(seed=0)))  # fmt: skip
    batches = sft_batches(DataConfig(shards=str(data_dir), shuffle=False), model, "sft", run, batch_size=4)
    stream = iter(batches)
    seen = [n for _ in range(4) for n in _sample_numbers(next(stream), model.tokenizer)]  # 2 epochs x 8 good
    assert seen == GOOD + GOOD  # unshuffled: source order, twice
    skipped = batches.source.stats["skipped"]
    # the second epoch's last good samples (shard 4) come after every fault, so all faults were passed twice
    assert skipped == {reason: 2 * count for reason, count in READER_SKIPS.items()}
