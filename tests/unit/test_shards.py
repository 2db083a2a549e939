"""Shard writer/reader: roundtrip, index.json, validation, splitting, exact resume, and bad data."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import resource
import struct
import tarfile
import zlib
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlpost.constants import SCHEMA_VERSION
from vlpost.data.records import Record, Skip
from vlpost.data.shards import ShardStream, read_index, verify_shards, write_shards

# ---------------------------------------------------------------- helpers


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def _sample(i: int, image: bool = True, kind: str = "sft") -> dict:
    return {
        "kind": kind,
        "messages": [
            {"role": "user", "content": ("<image>\n" if image else "") + f"question {i}? é"},
            {"role": "assistant", "content": f"answer {i}"},
        ],
        "meta": {"source": "test", "id": f"rec-{i}", "category": "even" if i % 2 == 0 else "odd"},
    }


def _record(i: int, image: bool = True) -> Record:
    picture = Image.new("RGB", (6, 4), _colour(i)) if image else None
    return Record(f"k{i:05d}", _sample(i, image), picture)


def _write(tmp_path: Path, n: int, name: str = "shards", text_every: int = 0, **kwargs) -> Path:
    records = [_record(i, image=not (text_every and i % text_every == 0)) for i in range(n)]
    kwargs.setdefault("max_samples", 5)
    write_shards(records, tmp_path / name, "sft", "pytest", progress=False, **kwargs)
    return tmp_path / name


def _ids(items) -> list[str]:
    return [sample["meta"]["id"] for sample, _ in items]


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _replace(path: Path, name: str, data: bytes | None) -> None:
    """Rewrite one member of a tar (None drops it)."""
    members = [(n, data if n == name else d) for n, d in _members(path)]
    _write_members(path, [(n, d) for n, d in members if d is not None])


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


# ---------------------------------------------------------------- writer


def test_roundtrip_samples_and_pixels_identical(tmp_path):
    out = _write(tmp_path, 12, text_every=4)  # 3 text-only samples, 3 shards (5, 5, 2)
    items = list(ShardStream(out, shuffle=False))
    assert [sample for sample, _ in items] == [_sample(i, image=i % 4 != 0) for i in range(12)]
    for i, (_, image) in enumerate(items):
        if i % 4 == 0:
            assert image is None
        else:
            assert image.mode == "RGB" and image.size == (6, 4)
            assert (np.asarray(image) == np.array(_colour(i), dtype=np.uint8)).all()


def test_jpg_roundtrip_is_close(tmp_path):
    out = _write(tmp_path, 3, image_format="jpg")
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert sorted(tar.getnames())[:2] == ["k00000.jpg", "k00000.json"]
    for i, (_, image) in enumerate(ShardStream(out, shuffle=False)):
        diff = np.abs(np.asarray(image, dtype=int) - np.array(_colour(i)))
        assert diff.max() <= 3  # solid colour survives JPEG q95 within a few levels


def test_index_counts_and_sha256(tmp_path):
    out = _write(tmp_path, 12, text_every=4)
    index = json.loads((out / "index.json").read_text())
    assert index["schema_version"] == SCHEMA_VERSION and index["kind"] == "sft"
    assert index["command"] == "pytest" and index["num_samples"] == 12
    assert [s["name"] for s in index["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]
    assert [s["num_samples"] for s in index["shards"]] == [5, 5, 2]
    for entry in index["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
        with tarfile.open(out / entry["name"]) as tar:
            assert len({name.split(".")[0] for name in tar.getnames()}) == entry["num_samples"]
    assert index["stats"]["with_image"] == 9 and index["stats"]["text_only"] == 3
    assert index["stats"]["categories"] == {"even": 6, "odd": 6}
    assert index["skipped"] == [] and index["stats"]["skipped_by_reason"] == {}
    assert verify_shards(out) == []


def test_same_records_give_identical_bytes(tmp_path):
    first = read_index(_write(tmp_path, 7, name="a"))
    second = read_index(_write(tmp_path, 7, name="b"))
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]


def _bad(i: int, change) -> Record:
    record = _record(i)
    change(record)
    return record


def _set(record: Record, path: str, value) -> None:
    target = record.sample
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = value


INVALID = [
    (lambda r: _set(r, "kind", "caption"), "kind mismatch"),
    (lambda r: _set(r, "kind", "chat"), "unknown kind"),
    (lambda r: r.sample.pop("messages"), "missing field"),
    (lambda r: _set(r, "messages.0.role", "human"), "invalid role"),
    (lambda r: _set(r, "messages.1.content", "  "), "empty assistant turn"),
    (lambda r: r.sample["messages"].pop(), "no assistant turn"),
    (lambda r: _set(r, "messages.0.content", "<image><image> two"), "placeholder mismatch"),
    (lambda r: _set(r, "messages.0.content", "no placeholder"), "placeholder mismatch"),
    (lambda r: setattr(r, "image", None), "missing image"),
    (lambda r: r.sample["meta"].pop("id"), "missing field"),
    (lambda r: _set(r, "messages.1.content", {"text": "x"}), "malformed record"),
    (lambda r: _set(r, "meta.extra", {1, 2}), "not json-serializable"),
]


def test_invalid_records_become_skips(tmp_path):
    records = [_record(0)] + [_bad(i + 1, change) for i, (change, _) in enumerate(INVALID)]
    records.append(Skip("upstream-7", "corrupt image"))
    index = write_shards(records, tmp_path / "s", "sft", "pytest", progress=False)
    assert index["num_samples"] == 1
    expected = [(f"rec-{i + 1}", reason) for i, (_, reason) in enumerate(INVALID)]
    expected[9] = ("k00010", "missing field")  # no meta.id: the key identifies it
    expected.append(("upstream-7", "corrupt image"))
    assert [(s["id"], s["reason"]) for s in index["skipped"]] == expected
    assert index["stats"]["skipped_by_reason"]["missing field"] == 2
    assert "'messages'" in index["skipped"][2]["detail"]  # the detail names the field to fix


def test_prompt_kind_needs_a_known_reward(tmp_path):
    good = {"kind": "prompt", "prompt": [{"role": "user", "content": "2+2?"}],
            "reward": {"type": "math", "answer": "4"}, "meta": {"id": "p0"}}  # fmt: skip
    bad = json.loads(json.dumps(good)) | {"reward": {"type": "vibes"}, "meta": {"id": "p1"}}
    index = write_shards([Record("p0", good, None), Record("p1", bad, None)], tmp_path / "p", "prompt", "t",
                         progress=False)  # fmt: skip
    assert index["num_samples"] == 1 and index["skipped"][0]["reason"] == "invalid reward"


def test_duplicate_key_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="duplicate record key 'k00001'"):
        write_shards([_record(1), _record(2), _record(1)], tmp_path / "d", "sft", "t", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temp folder is left


def test_image_modes_become_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    transparent = palette.copy()
    transparent.info["transparency"] = 1
    images = {
        "grey": (Image.new("L", (4, 4), 100), (100, 100, 100)),
        "rgba": (Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (255, 127, 127)),  # 50% red over white
        "palette": (palette, (10, 200, 30)),
        "transparent": (transparent, (255, 255, 255)),
        "cmyk": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    }
    records = [Record(f"m{i}", _sample(i), image) for i, (image, _) in enumerate(images.values())]
    out = tmp_path / "modes"
    write_shards(records, out, "sft", "t", progress=False)
    for (_, image), (name, (_, rgb)) in zip(ShardStream(out, shuffle=False), images.items(), strict=True):
        assert image.mode == "RGB", name
        assert np.abs(np.asarray(image, dtype=int) - np.array(rgb)).max() <= 1, name


def test_refuses_to_overwrite_and_never_loses_data(tmp_path):
    out = _write(tmp_path, 6)
    before = (out / "index.json").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(tmp_path, 3)
    assert (out / "index.json").read_bytes() == before

    def failing():
        yield _record(0)
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        write_shards(failing(), out, "sft", "t", progress=False, overwrite=True)
    assert (out / "index.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temp folders left behind

    assert read_index(_write(tmp_path, 3, overwrite=True))["num_samples"] == 3
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a shard folder"):
        write_shards([_record(0)], other, "sft", "t", progress=False, overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"


def test_read_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vlpost prepare"):
        read_index(tmp_path)
    out = _write(tmp_path, 2)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps(index | {"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ValueError, match="upgrade vlpost"):
        ShardStream(out)


def test_kind_must_match(tmp_path):
    with pytest.raises(ValueError, match="holds 'sft' samples but 'preference'"):
        ShardStream(_write(tmp_path, 2), kind="preference")


# ---------------------------------------------------------------- order, splitting, resume


def test_shuffle_is_deterministic(tmp_path):
    out = _write(tmp_path, 40)
    order = _ids(ShardStream(out, seed=3, shuffle_window=4))
    assert order == _ids(ShardStream(out, seed=3, shuffle_window=4))
    assert order != _ids(ShardStream(out, seed=4, shuffle_window=4))
    assert order != _ids(ShardStream(out, seed=3, epoch=1, shuffle_window=4))
    assert order != _ids(ShardStream(out, shuffle=False))
    assert sorted(order) == sorted(f"rec-{i}" for i in range(40))
    # window 1 leaves samples in shard order, so only the seeded shard permutation shows
    blocks = [_ids(ShardStream(out, seed=3, epoch=epoch, shuffle_window=1)) for epoch in (0, 1)]
    assert blocks[0] != blocks[1] and blocks[0] != _ids(ShardStream(out, shuffle=False))
    assert all(ids[i * 5 : i * 5 + 5] == sorted(ids[i * 5 : i * 5 + 5], key=lambda x: int(x[4:]))
               for ids in blocks for i in range(8))  # whole shards stay together, in order  # fmt: skip


@pytest.mark.parametrize("split", ["range", "shards", "samples"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_complete(tmp_path, split, world_size):
    out = _write(tmp_path, 23)  # 5 shards: 5, 5, 5, 5, 3
    per_rank = [_ids(ShardStream(out, rank=r, world_size=world_size, split=split, epoch=2))
                for r in range(world_size)]  # fmt: skip
    union = [i for ids in per_rank for i in ids]
    assert sorted(union) == sorted(f"rec-{i}" for i in range(23))  # complete and (same length) disjoint
    if split != "shards":  # balanced: ranks stay in step
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_ranks_split_samples_when_shards_are_few(tmp_path):
    out = _write(tmp_path, 7, max_samples=100)  # one shard, two ranks
    ids = [_ids(ShardStream(out, rank=r, world_size=2, split="shards")) for r in range(2)]
    assert sorted(ids[0] + ids[1]) == sorted(f"rec-{i}" for i in range(7)) and len(ids[0]) == 3


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_exact_across_epochs(tmp_path, world_size):
    out = _write(tmp_path, 17)
    options = dict(world_size=world_size, seed=5, loop=True, shuffle_window=3)
    for rank in range(world_size):
        full = _ids(islice(ShardStream(out, rank=rank, **options), 40))
        epoch_length = ShardStream(out, rank=rank, **options).epoch_length()
        for taken in (0, 4, epoch_length - 1, epoch_length, epoch_length + 2, 2 * epoch_length + 1):
            first = ShardStream(out, rank=rank, **options)
            iterator = iter(first)
            head = _ids(islice(iterator, taken))
            state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint file
            epoch, position = divmod(taken, epoch_length)
            if taken and position == 0:  # paused right after an epoch's last sample
                epoch, position = epoch - 1, epoch_length
            assert (state["epoch"], state["position"]) == (epoch, position)
            resumed = ShardStream(out, rank=rank, **(options | {"seed": 0}))  # seed comes from the state
            resumed.load_state_dict(state)
            assert head + _ids(islice(resumed, 40 - taken)) == full, (rank, taken)


def test_resume_refuses_other_layout(tmp_path):
    out = _write(tmp_path, 6)
    state = ShardStream(out).state_dict()
    with pytest.raises(ValueError, match="world_size=1"):
        ShardStream(out, world_size=2).load_state_dict(state)


def test_set_epoch_keeps_a_resumed_position(tmp_path):
    out = _write(tmp_path, 10)
    stream = ShardStream(out)
    head = _ids(islice(iter(stream), 4))
    state = stream.state_dict()
    resumed = ShardStream(out)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the usual call at the top of an epoch loop must not rewind
    assert head + _ids(resumed) == _ids(ShardStream(out))
    resumed.set_epoch(3)
    assert _ids(resumed) == _ids(ShardStream(out, epoch=3))


def test_loader_resume_is_exact_with_workers(tmp_path):
    out = _write(tmp_path, 20)
    options = dict(seed=1, loop=True, shuffle_window=4)

    def batches(stream, count, state=None):
        loader = stream.loader(batch_size=3, num_workers=2)
        if state is not None:
            loader.load_state_dict(state)
        return [_ids(batch) for batch in islice(loader, count)], loader.state_dict()

    full, _ = batches(ShardStream(out, **options), 11)  # 33 samples: crosses the epoch boundary
    head, state = batches(ShardStream(out, **options), 5)  # odd: worker 1's batch is due next
    assert state["num_workers"] == 2 and state["position"] == 15 and state["next_worker"] == 1
    tail, _ = batches(ShardStream(out, **options), 6, json.loads(json.dumps(state)))
    assert head + tail == full
    flat = [i for batch in full[:6] for i in batch]  # 3 batches from each worker: all in epoch 0
    assert len(set(flat)) == 18


def test_loader_resume_within_an_epoch_with_uneven_workers(tmp_path):
    out = _write(tmp_path, 11)  # workers read 5 and 6 samples: batches of 3, 2 and 3, 3

    def one_pass(stream, state=None, stop=None):
        loader = stream.loader(batch_size=3, num_workers=2)
        if state is not None:
            loader.load_state_dict(state)
        return [_ids(batch) for batch in islice(loader, stop)], loader

    full, _ = one_pass(ShardStream(out, seed=2))
    assert sorted(i for batch in full for i in batch) == sorted(f"rec-{i}" for i in range(11))
    head, loader = one_pass(ShardStream(out, seed=2), stop=3)  # worker 0 has just finished its part
    assert loader.state_dict()["position"] == 8
    tail, loader = one_pass(ShardStream(out, seed=2), loader.state_dict())
    assert head + tail == full
    next_epoch, _ = one_pass(loader.stream)  # the resumed stream goes on to epoch 1
    assert next_epoch == one_pass(ShardStream(out, seed=2, epoch=1))[0]


# ---------------------------------------------------------------- bad data is skipped, counted, logged


def _first_shard(tmp_path: Path, n: int = 5) -> Path:
    return _write(tmp_path, n, max_samples=100)


def test_truncated_png_is_skipped_even_if_verify_passes(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = tmp_path / "noise"
    write_shards([_record(0), Record("k00001", _sample(1), noise), _record(2)], out, "sft", "t", progress=False)
    png = dict(_members(out / "shard-000000.tar"))["k00001.png"]
    chunks, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        tag, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        chunks.append(_png_chunk(tag, data[: len(data) // 2] if tag == b"IDAT" else data))
        pos += 12 + length
    broken = png[:8] + b"".join(chunks)  # half the pixel data, every CRC still valid
    Image.open(io.BytesIO(broken)).verify()  # the cheap check is fooled
    _replace(out / "shard-000000.tar", "k00001.png", broken)
    stream = ShardStream(out, shuffle=False)
    assert _ids(stream) == ["rec-0", "rec-2"]
    assert stream.stats == {"yielded": 2, "skipped": {"corrupt image": 1}}


def test_bad_json_and_missing_members_are_skipped(tmp_path):
    out = _first_shard(tmp_path)
    shard = out / "shard-000000.tar"
    _replace(shard, "k00001.json", b'{"kind": "sft", "messages": [')
    _replace(shard, "k00002.png", None)  # json has <image> but there is no image
    _replace(shard, "k00003.json", None)  # image without json
    bogus = json.dumps(_sample(4) | {"kind": "bogus"}).encode()
    _replace(shard, "k00004.json", bogus)
    stream = ShardStream(out, shuffle=False)
    assert _ids(stream) == ["rec-0"]
    assert stream.stats["skipped"] == {"bad json": 1, "missing image": 1, "missing json": 1, "unknown kind": 1}


def test_skip_is_counted_every_epoch_but_logged_once(tmp_path, caplog):
    out = _first_shard(tmp_path, 3)
    _replace(out / "shard-000000.tar", "k00001.json", b"not json")
    stream = ShardStream(out, loop=True, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="vlpost.data.shards"):
        assert len(list(islice(stream, 6))) == 6  # three epochs of the two good samples
    assert stream.stats["skipped"] == {"bad json": 3}  # passed in epochs 0, 1 and 2 (before the 6th yield)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "k00001" in messages[0] and "shard-000000.tar" in messages[0]


def test_truncated_tar_keeps_samples_before_the_cut(tmp_path):
    out = _first_shard(tmp_path, 5)
    shard = out / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        cut_member = tar.getmember("k00003.png")
    data = shard.read_bytes()
    shard.write_bytes(data[: cut_member.offset_data + cut_member.size // 2])  # cut inside sample 3's image
    stream = ShardStream(out, shuffle=False)
    assert _ids(stream) == ["rec-0", "rec-1", "rec-2"]
    skipped = stream.stats["skipped"]
    assert skipped == {"corrupt shard": 1, "missing image": 1, "missing from shard": 1}


def test_empty_and_missing_shard_files(tmp_path):
    out = _write(tmp_path, 15)  # shards of 5
    (out / "shard-000001.tar").write_bytes(b"")
    (out / "shard-000002.tar").unlink()
    stream = ShardStream(out, shuffle=False)
    assert _ids(stream) == [f"rec-{i}" for i in range(5)]
    assert stream.stats["skipped"] == {"corrupt shard": 2, "missing from shard": 10}
    assert sorted(verify_shards(out)) == ["shard-000001.tar: sha256 differs from index.json (corrupt or replaced)",
                                          "shard-000002.tar: missing"]  # fmt: skip


def test_decompression_bomb_is_skipped_without_decoding(tmp_path):
    side = 20000  # 400M pixels: 1.2 GB as RGB, ~50 kB as a 1-bit PNG
    compressor = zlib.compressobj(9)
    rows = bytes(1 + side // 8) * 1000  # filter byte + packed bits, 1000 rows at a time
    idat = b"".join(compressor.compress(rows) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    assert len(bomb) < 200_000
    out = _first_shard(tmp_path, 2)
    _replace(out / "shard-000000.tar", "k00000.png", bomb)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    stream = ShardStream(out, shuffle=False)
    assert _ids(stream) == ["rec-1"]
    assert stream.stats["skipped"] == {"image too large": 1}
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100_000  # < 100 MB more


def test_max_image_pixels_applies_to_every_image(tmp_path):
    stream = ShardStream(_first_shard(tmp_path, 3), max_image_pixels=23)  # images are 6x4 = 24 px
    assert list(stream) == [] and stream.stats["skipped"] == {"image too large": 3}


def test_member_names_with_dotdot_are_never_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _first_shard(tmp_path, 3)
    shard = out / "shard-000000.tar"
    evil = json.dumps(_sample(9, image=False)).encode()
    _write_members(shard, [("../evil.json", evil), ("../../evil2.json", evil)] + _members(shard))
    stream = ShardStream(out, shuffle=False)
    ids = _ids(stream)
    assert stream.stats["skipped"]["unsafe member name"] == 2
    assert ids == ["rec-0"]  # the two fake groups took ordinals 0 and 1 of the 3 listed
    assert not list(tmp_path.rglob("evil*")) and not (tmp_path.parent / "evil.json").exists()
