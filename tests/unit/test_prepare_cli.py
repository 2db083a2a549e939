"""`vlpost prepare` end to end: converter → write_shards → index.json, summary and exit codes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from vlpost.cli import main

pytest.importorskip("vlpost.data.shards")


def save_image(path: Path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), color).save(path)


def chat(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def llava_fixture(tmp_path: Path, all_bad: bool = False) -> tuple[Path, Path]:
    images = tmp_path / "images"
    for i in range(3):
        save_image(images / f"coco/{i}.png", (i * 10, 0, 0))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    good = [
        {"id": 0, "image": "coco/0.png", "conversations": chat("<image>\nWhat is it?", "Red-ish.")},
        {"id": 1, "image": "coco/1.png", "conversations": chat("Describe.", "Dark red.")},
        {"id": "text", "conversations": chat("Hello?", "Hi.")},
        {"id": 3, "image": "coco/2.png", "conversations": chat("What colour?\n<image>", "Red.")},
    ]
    bad = [
        {"id": "gone", "image": "coco/gone.png", "conversations": chat("<image>\nQ?", "A.")},
        {"id": "broken", "image": "broken.jpg", "conversations": chat("<image>\nQ?", "A.")},
        {"id": "double", "image": "coco/0.png", "conversations": chat("<image>\n<image>\nQ?", "A.")},
    ]
    data = bad if all_bad else [good[0], bad[0], good[1], good[2], bad[1], good[3], bad[2]]
    path = tmp_path / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(data))
    return path, images


def read_index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def read_tars(out: Path) -> dict[str, bytes]:
    members = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                members[member.name] = tar.extractfile(member).read()
    return members


def test_prepare_llava_instruct_writes_shards_and_index(tmp_path, capsys):
    path, images = llava_fixture(tmp_path)
    out = tmp_path / "shards"
    code = main(["prepare", "llava-instruct", str(path), "--images", str(images), "--out", str(out),
                 "--max-samples-per-shard", "2", "--image-format", "png"])
    assert code == 0
    index = read_index(out)
    assert index["num_samples"] == 4 and index["kind"] == "sft"
    assert [s["num_samples"] for s in index["shards"]] == [2, 2]
    assert [(s["id"], s["reason"]) for s in index["skipped"]] == [
        ("gone", "missing image"), ("broken", "corrupt image"), ("double", "placeholder mismatch")]
    assert index["command"].startswith("vlpost prepare llava-instruct ")

    members = read_tars(out)
    keys = ["llava-instruct-00000000", "llava-instruct-00000002", "llava-instruct-00000003", "llava-instruct-00000005"]
    assert sorted(members) == sorted([f"{k}.json" for k in keys] + [f"{k}.png" for k in keys if k != keys[2]])
    second = json.loads(members[f"{keys[1]}.json"])
    assert second["messages"] == [{"role": "user", "content": "<image>\nDescribe."},
                                  {"role": "assistant", "content": "Dark red."}]
    assert second["meta"]["id"] == "1"
    assert Image.open(io.BytesIO(members[f"{keys[1]}.png"])).getpixel((0, 0)) == (10, 0, 0)

    printed = capsys.readouterr().out
    assert "skipped 3: " in printed and "gone (missing image)" in printed


def test_limit_stops_after_n_samples(tmp_path):
    path, images = llava_fixture(tmp_path)
    out = tmp_path / "shards"
    assert main(["prepare", "llava-instruct", str(path), "--images", str(images), "--out", str(out), "--limit", "2"]) == 0
    index = read_index(out)
    assert index["num_samples"] == 2
    assert [s["id"] for s in index["skipped"]] == ["gone"]  # seen before the 2nd sample; later records unread


def test_everything_skipped_exits_1(tmp_path, capsys):
    path, images = llava_fixture(tmp_path, all_bad=True)
    code = main(["prepare", "llava-instruct", str(path), "--images", str(images), "--out", str(tmp_path / "o")])
    assert code == 1
    assert "every record was skipped" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["llava-instruct", "nope.json"], "does not exist"),
        (["llava-instruct", "{json}", "--kind", "preference"], "writes --kind sft"),
        (["vqav2", "{json}"], "--annotations"),
        (["llava-instruct", "{json}", "--images", "no_such_dir"], "--images no_such_dir does not exist"),
    ],
)
def test_bad_invocations_exit_1_with_a_message(tmp_path, capsys, argv_tail, message):
    path, _ = llava_fixture(tmp_path)
    argv = ["prepare", *[a.replace("{json}", str(path)) for a in argv_tail], "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "index.json").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    path, images = llava_fixture(tmp_path)
    argv = ["prepare", "llava-instruct", str(path), "--images", str(images), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert main(argv) == 1 and "overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_vlguard_preference_through_cli(tmp_path):
    save_image(tmp_path / "img/a.png", (1, 2, 3))
    data = [{"id": "Ads_1", "image": "a.png", "safe": False, "harmful_category": "privacy",
             "instr-resp": [{"instruction": "Who is this?", "response": "I can't identify people."}]},
            {"id": "Ads_2", "image": "a.png", "safe": True,
             "instr-resp": [{"safe_instruction": "Colour?", "response": "Blue."},
                            {"unsafe_instruction": "Where does she live?", "response": "I can't share that."}]}]
    (tmp_path / "train.json").write_text(json.dumps(data))
    (tmp_path / "rejected.json").write_text(json.dumps({"Ads_1": "This is Jane Doe."}))
    out = tmp_path / "o"
    assert main(["prepare", "vlguard", str(tmp_path / "train.json"), "--images", str(tmp_path / "img"), "--out", str(out),
                 "--kind", "preference", "--rejected-from", str(tmp_path / "rejected.json")]) == 0
    index = read_index(out)
    assert index["num_samples"] == 3 and index["kind"] == "preference" and index["skipped"] == []
    first = json.loads(read_tars(out)["vlguard-00000000.json"])
    assert first["rejected"] == [{"role": "assistant", "content": "This is Jane Doe."}]


def test_synthetic_through_cli(tmp_path):
    pytest.importorskip("vlpost.data.synthetic")
    out = tmp_path / "syn"
    assert main(["prepare", "synthetic", "--kind", "sft", "--num", "12", "--seed", "0", "--out", str(out)]) == 0
    assert read_index(out)["num_samples"] == 12
    out_eval = tmp_path / "syn_eval"
    assert main(["prepare", "synthetic", "-", "--split", "eval", "--kind", "vqa", "--num", "6", "--out", str(out_eval)]) == 0
    index = read_index(out_eval)
    assert index["kind"] == "prompt" and index["num_samples"] == 6


def test_shards_read_back_equal_the_converted_samples(tmp_path):
    """Converter → write_shards → ShardStream gives back exactly the converter's samples and pixels."""
    from vlpost.data.formats import convert_llava_instruct
    from vlpost.data.records import Record
    from vlpost.data.shards import ShardStream

    path, images = llava_fixture(tmp_path)
    out = tmp_path / "o"
    assert main(["prepare", "llava-instruct", str(path), "--images", str(images), "--out", str(out),
                 "--max-samples-per-shard", "3"]) == 0
    expected = [r for r in convert_llava_instruct(path, images) if isinstance(r, Record)]
    read_back = list(ShardStream(out, shuffle=False))
    assert [sample for sample, _ in read_back] == [r.sample for r in expected]
    for (_, image), record in zip(read_back, expected):
        assert (image is None) == (record.image is None)
        if image is not None:
            assert list(image.getdata()) == list(record.image.getdata())  # png: lossless
