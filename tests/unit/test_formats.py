"""Converters from public formats: exact samples, exact skip reasons, image decoding, laziness."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlpost.data.formats import (
    FORMATS,
    convert,
    convert_llava_instruct,
    convert_llava_pretrain,
    convert_rlaif_v,
    convert_sharegpt,
    convert_trl_preference,
    convert_vlguard,
    convert_vqav2,
    get_format,
)
from vlpost.data.formats_vlguard import COMPLIANT_TEMPLATE, REFUSALS
from vlpost.data.records import Record, Skip

# ---------------------------------------------------------------- helpers


def save_image(path: Path, color=(10, 20, 30), mode="RGB", size=(4, 3), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def png_bytes(color=(10, 20, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (4, 3), color).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header opens but whose data stops half way (Image.open succeeds, decode fails)."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def run(items) -> tuple[list[Record], list[tuple[str, str]]]:
    items = list(items)
    assert all(isinstance(i, Record | Skip) for i in items)
    return [i for i in items if isinstance(i, Record)], [(i.id, i.reason) for i in items if isinstance(i, Skip)]


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ---------------------------------------------------------------- llava-pretrain


def test_llava_pretrain_caption_samples_and_skips(tmp_path):
    images = tmp_path / "images"
    save_image(images / "00453/004539375.jpg", color=(200, 0, 0), fmt="PNG")
    prompt = "<image>\nRender a clear and concise summary of the photo."
    data = [
        {"id": "004539375", "image": "00453/004539375.jpg",
         "conversations": [turn("human", prompt), turn("gpt", "select luxury furniture mattress topper")]},
        {"id": "000000001", "image": "00000/000000001.jpg",
         "conversations": [turn("human", prompt), turn("gpt", "a dog")]},
        {"id": "000000002", "conversations": [turn("human", prompt), turn("gpt", "no image key")]},
    ]
    records, skips = run(convert_llava_pretrain(write_json(tmp_path / "blip_558k.json", data), images))
    assert [r.key for r in records] == ["llava-pretrain-00000000"]
    assert records[0].sample == {
        "kind": "caption",
        "messages": [msg("user", prompt), msg("assistant", "select luxury furniture mattress topper")],
        "meta": {"source": "llava-pretrain", "id": "004539375", "split": "train"},
    }
    assert records[0].image.mode == "RGB" and records[0].image.getpixel((0, 0)) == (200, 0, 0)
    assert skips == [("000000001", "missing image"), ("000000002", "malformed record")]


# ---------------------------------------------------------------- llava-instruct


def test_llava_instruct_exact_samples_and_skip_reasons(tmp_path):
    images = tmp_path / "images"
    save_image(images / "coco/train2017/000000000042.jpg", color=(1, 2, 3), fmt="PNG")
    save_image(images / "ok.png", color=(9, 9, 9))
    truncated_jpeg(images / "broken.jpg")
    save_image(tmp_path / "outside.png")  # exists, but outside --images
    ok = [turn("human", "Q?"), turn("gpt", "A.")]
    data = [
        {"id": 42, "image": "coco/train2017/000000000042.jpg", "conversations": [
            turn("human", "What is this?  \n<image>"), turn("gpt", " A cat. "),
            turn("human", "  Colour?  "), turn("gpt", "Black.")]},
        {"id": "text-1", "conversations": [turn("human", "Hi"), turn("gpt", "Hello")]},
        {"id": "two-placeholders", "image": "ok.png", "conversations": [turn("human", "<image>\n<image>\nWhat?"), turn("gpt", "x")]},
        {"id": "empty-answer", "image": "ok.png", "conversations": [turn("human", "<image>\nQ?"), turn("gpt", "   ")]},
        {"id": "bad-role", "image": "ok.png", "conversations": [turn("human", "<image>\nQ?"), turn("bot", "A.")]},
        {"id": "no-file", "image": "coco/missing.jpg", "conversations": ok},
        {"id": "truncated", "image": "broken.jpg", "conversations": ok},
        {"id": "no-placeholder", "image": "ok.png", "conversations": [turn("human", "Describe it."), turn("gpt", "Grey.")]},
        {"id": "not-alternating", "conversations": [turn("human", "a"), turn("human", "b"), turn("gpt", "c")]},
        {"id": "escape", "image": "../outside.png", "conversations": ok},
        {"id": "text-with-placeholder", "conversations": [turn("human", "<image>\nQ?"), turn("gpt", "A.")]},
        {"id": "absolute", "image": str(tmp_path / "outside.png"), "conversations": ok},
        {"id": "ends-with-user", "conversations": [turn("human", "Q?"), turn("gpt", "A."), turn("human", "And?")]},
    ]
    records, skips = run(convert_llava_instruct(write_json(tmp_path / "mix665k.json", data), images))
    assert [r.key for r in records] == ["llava-instruct-00000000", "llava-instruct-00000001", "llava-instruct-00000007"]
    first, text_only, prepended = (r.sample for r in records)
    assert first["messages"] == [msg("user", "What is this?\n<image>"), msg("assistant", "A cat."),
                                 msg("user", "Colour?"), msg("assistant", "Black.")]
    assert first["meta"]["id"] == "42" and first["kind"] == "sft"
    assert records[0].image.getpixel((3, 2)) == (1, 2, 3)
    assert text_only["messages"] == [msg("user", "Hi"), msg("assistant", "Hello")] and records[1].image is None
    assert prepended["messages"][0] == msg("user", "<image>\nDescribe it.")
    assert skips == [
        ("two-placeholders", "placeholder mismatch"),
        ("empty-answer", "empty assistant turn"),
        ("bad-role", "malformed record"),
        ("no-file", "missing image"),
        ("truncated", "corrupt image"),
        ("not-alternating", "malformed record"),
        ("escape", "missing image"),
        ("text-with-placeholder", "placeholder mismatch"),
        ("absolute", "missing image"),
        ("ends-with-user", "malformed record"),
    ]


def test_truncated_jpeg_passes_verify_but_is_still_rejected(tmp_path):
    """The corrupt-image check must decode fully: PIL's verify() alone accepts this file."""
    path = truncated_jpeg(tmp_path / "images/broken.jpg")
    with Image.open(path) as image:
        image.verify()  # no error: verify() does not decode the scan data
    data = [{"id": 1, "image": "broken.jpg", "conversations": [turn("human", "<image>\nQ?"), turn("gpt", "A.")]}]
    assert run(convert_llava_instruct(write_json(tmp_path / "d.json", data), tmp_path / "images"))[1] == [
        ("1", "corrupt image")]


@pytest.mark.parametrize(
    "mode, color, expected",
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent red → the white background
        ("RGBA", (0, 0, 255, 255), (0, 0, 255)),  # opaque blue stays blue
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half-transparent black over white: 255 * (1 - 128/255)
        ("LA", (0, 0), (255, 255, 255)),
        ("L", 128, (128, 128, 128)),
        ("P", 0, (0, 0, 0)),  # palette index 0 of the default palette is black
    ],
)
def test_image_modes_become_rgb(tmp_path, mode, color, expected):
    save_image(tmp_path / "images/x.png", color=color, mode=mode)
    data = [{"id": 1, "image": "x.png", "conversations": [turn("human", "<image>\nQ?"), turn("gpt", "A.")]}]
    (record,), _ = run(convert_llava_instruct(write_json(tmp_path / "d.json", data), tmp_path / "images"))
    assert record.image.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(record.image.getpixel((1, 1)), expected))


def test_palette_transparency_and_cmyk(tmp_path):
    palette_image = Image.new("P", (4, 3), 1)
    palette_image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 1 = green
    palette_image.info["transparency"] = 1  # ... but transparent → white
    palette_image.save(tmp_path / "p.png")
    save_image(tmp_path / "cmyk.jpg", color=(0, 255, 255, 0), mode="CMYK")  # pure red in CMYK
    data = [{"id": name, "image": name, "conversations": [turn("human", "<image>\nQ?"), turn("gpt", "A.")]}
            for name in ("p.png", "cmyk.jpg")]
    (p, cmyk), skips = run(convert_llava_instruct(write_json(tmp_path / "d.json", data), tmp_path))
    assert skips == []
    assert p.image.getpixel((0, 0)) == (255, 255, 255)
    red = cmyk.image.getpixel((1, 1))
    assert cmyk.image.mode == "RGB" and red[0] > 240 and red[1] < 15 and red[2] < 15


def test_images_are_decoded_lazily_one_record_at_a_time(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", color=(i, i, i))
    data = [{"id": i, "image": f"{i}.png", "conversations": [turn("human", "Q?"), turn("gpt", "A.")]} for i in range(3)]
    stream = convert_llava_instruct(write_json(tmp_path / "d.json", data), tmp_path)
    assert next(stream).image.getpixel((0, 0)) == (0, 0, 0)
    (tmp_path / "1.png").unlink()  # removed after the first sample was produced: it must not be read yet
    assert [(s.id, s.reason) for s in [next(stream)]] == [("1", "missing image")]
    assert next(stream).image.getpixel((0, 0)) == (2, 2, 2)


# ---------------------------------------------------------------- sharegpt


def test_sharegpt_roles_placeholders_and_skips(tmp_path):
    save_image(tmp_path / "img/a.png", color=(5, 6, 7))
    rows = [
        {"id": "s0", "messages": [msg("system", "Be brief."), msg("user", "<image>What colour?"), msg("assistant", "Red.")],
         "images": ["a.png"]},
        {"conversations": [turn("human", "Hi"), turn("gpt", "Hello")]},
        {"id": "s2", "messages": [msg("user", "<image><image>Compare"), msg("assistant", "Same.")], "images": ["a.png", "a.png"]},
        {"id": "s3", "messages": [msg("user", "Hi"), msg("tool", "{}")]},
        '{"id": "s4", "messages": [',
        {"id": "s5", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count?"}]},
                                  msg("assistant", "3")], "images": ["a.png"]},
        {"id": "s6", "system": "You are helpful.", "messages": [msg("user", "Hi"), msg("assistant", "Hey")], "images": []},
    ]
    records, skips = run(convert_sharegpt(write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "img"))
    assert [r.sample["messages"] for r in records] == [
        [msg("system", "Be brief."), msg("user", "<image>\nWhat colour?"), msg("assistant", "Red.")],
        [msg("user", "Hi"), msg("assistant", "Hello")],
        [msg("user", "<image>\nCount?"), msg("assistant", "3")],
        [msg("system", "You are helpful."), msg("user", "Hi"), msg("assistant", "Hey")],
    ]
    assert [r.sample["meta"]["id"] for r in records] == ["s0", "#1", "s5", "s6"]
    assert [r.image is None for r in records] == [False, True, False, True]
    assert skips == [("s2", "multiple images"), ("s3", "malformed record"), ("#4", "malformed record")]


# ---------------------------------------------------------------- trl-preference


def test_trl_preference_jsonl_conversational_and_plain(tmp_path):
    save_image(tmp_path / "img/sq.png", color=(255, 0, 0))
    user_parts = [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    rows = [
        {"prompt": [{"role": "user", "content": user_parts}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
         "rejected": [{"role": "assistant", "content": "A blue circle."}], "images": ["sq.png"]},
        {"prompt": "Describe the image.", "chosen": "Red.", "rejected": "Blue.", "images": ["sq.png"]},
        {"prompt": "Q", "chosen": "A"},
        {"prompt": "Q", "chosen": "A", "rejected": " "},
        {"prompt": "<image><image>Q", "chosen": "A", "rejected": "B", "images": ["sq.png", "sq.png"]},
        {"prompt": "Tell a joke.", "chosen": "Knock knock.", "rejected": "No."},
    ]
    records, skips = run(convert_trl_preference(write_jsonl(tmp_path / "pref.jsonl", rows), tmp_path / "img"))
    assert [(r.sample["prompt"], r.sample["chosen"], r.sample["rejected"]) for r in records] == [
        ([msg("user", "<image>\nWhat is shown?")], [msg("assistant", "A red square.")], [msg("assistant", "A blue circle.")]),
        ([msg("user", "<image>\nDescribe the image.")], [msg("assistant", "Red.")], [msg("assistant", "Blue.")]),
        ([msg("user", "Tell a joke.")], [msg("assistant", "Knock knock.")], [msg("assistant", "No.")]),
    ]
    assert all(r.sample["kind"] == "preference" for r in records)
    assert records[0].image.getpixel((0, 0)) == (255, 0, 0) and records[2].image is None
    assert skips == [("#2", "malformed record"), ("#3", "empty assistant turn"), ("#4", "multiple images")]


def test_trl_preference_parquet_with_embedded_bytes(tmp_path):
    save_image(tmp_path / "img/on_disk.png", color=(0, 255, 0))
    image_part = {"type": "image", "text": None}  # how HF datasets store an image part in parquet

    def row(question, images):
        return {"prompt": [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
                "images": images}

    table = pa.Table.from_pylist([
        row("Embedded?", [{"bytes": png_bytes((0, 0, 255), "P"), "path": "x.png"}]),
        row("Broken?", [{"bytes": b"\x89PNG not really", "path": "y.png"}]),
        row("On disk?", [{"bytes": None, "path": "on_disk.png"}]),
    ])
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=2)
    records, skips = run(convert_trl_preference(tmp_path / "train-00000-of-00001.parquet", tmp_path / "img"))
    assert [r.sample["prompt"][0]["content"] for r in records] == ["<image>\nEmbedded?", "<image>\nOn disk?"]
    assert records[0].image.getpixel((0, 0)) == (0, 0, 255) and records[1].image.getpixel((0, 0)) == (0, 255, 0)
    assert [r.key for r in records] == ["trl-preference-00000000", "trl-preference-00000002"]
    assert skips == [("#1", "corrupt image")]


# ---------------------------------------------------------------- rlaif-v


def test_rlaif_v_parquet_folder(tmp_path):
    def row(idx, image_bytes, chosen="The cat is black.", question="What colour is the cat?"):
        return {"ds_name": "RLAIF-V", "image": {"bytes": image_bytes, "path": f"{idx}.jpg"}, "question": question,
                "chosen": chosen, "rejected": "The cat is white.", "origin_dataset": "COCO",
                "origin_split": '{"model": "m"}', "idx": idx, "image_path": f"COCO/{idx}.jpg"}

    folder = tmp_path / "RLAIF-V-Dataset"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([row("OK-1", png_bytes((3, 3, 3))), row("OK-2", b"garbage")]),
                   folder / "RLAIF-V-Dataset_000.parquet")
    pq.write_table(pa.Table.from_pylist([row("OK-3", png_bytes(), chosen=""), row("OK-4", png_bytes((4, 4, 4)))]),
                   folder / "RLAIF-V-Dataset_001.parquet")
    records, skips = run(convert_rlaif_v(folder, None))
    assert [r.sample["meta"]["id"] for r in records] == ["OK-1", "OK-4"]
    assert records[0].sample == {
        "kind": "preference",
        "prompt": [msg("user", "<image>\nWhat colour is the cat?")],
        "chosen": [msg("assistant", "The cat is black.")],
        "rejected": [msg("assistant", "The cat is white.")],
        "meta": {"source": "rlaif-v", "id": "OK-1", "split": "train", "ds_name": "RLAIF-V",
                 "origin_dataset": "COCO", "origin_split": '{"model": "m"}'},
    }
    assert [r.key for r in records] == ["rlaif-v-00000000", "rlaif-v-00000003"]  # row index across files
    assert records[1].image.getpixel((0, 0)) == (4, 4, 4)
    assert skips == [("OK-2", "corrupt image"), ("OK-3", "empty assistant turn")]


# ---------------------------------------------------------------- vlguard


def vlguard_file(tmp_path: Path, name="train.json") -> tuple[Path, Path]:
    images = tmp_path / "vlguard_images"
    save_image(images / "bad_ads/a.png", color=(1, 1, 1))
    save_image(images / "bad_ads/b.png", color=(2, 2, 2))
    data = [
        {"id": "Ads_1", "image": "bad_ads/a.png", "safe": False, "harmful_category": "privacy",
         "harmful_subcategory": "personal data",
         "instr-resp": [{"instruction": "Find this person.", "response": "I'm sorry, I cannot help with that."}]},
        {"id": "Ads_2", "image": "bad_ads/b.png", "safe": True,
         "instr-resp": [{"safe_instruction": "What colour is the dress?", "response": "Blue."},
                        {"unsafe_instruction": "Who is she?", "response": "I can't identify people."}]},
        {"id": "Ads_3", "image": "bad_ads/missing.png", "safe": True,
         "instr-resp": [{"safe_instruction": "Q?", "response": "A."}]},
        {"id": "Ads_4", "image": "bad_ads/a.png", "safe": "yes", "instr-resp": []},
    ]
    return write_json(tmp_path / name, data), images


def test_vlguard_sft(tmp_path):
    path, images = vlguard_file(tmp_path)
    records, skips = run(convert_vlguard(path, images, kind="sft"))
    assert [r.key for r in records] == ["vlguard-00000000", "vlguard-00000001-0", "vlguard-00000001-1"]
    assert [r.sample["messages"] for r in records] == [
        [msg("user", "<image>\nFind this person."), msg("assistant", "I'm sorry, I cannot help with that.")],
        [msg("user", "<image>\nWhat colour is the dress?"), msg("assistant", "Blue.")],
        [msg("user", "<image>\nWho is she?"), msg("assistant", "I can't identify people.")],
    ]
    assert records[0].sample["meta"] == {"source": "vlguard", "id": "Ads_1", "split": "train",
                                         "category": "privacy/personal data", "safe_image": False,
                                         "safe_instruction": False}
    assert "category" not in records[1].sample["meta"] and records[1].sample["meta"]["safe_instruction"] is True
    assert [r.image.getpixel((0, 0)) for r in records] == [(1, 1, 1), (2, 2, 2), (2, 2, 2)]
    assert skips == [("Ads_3", "missing image"), ("Ads_4", "malformed record")]


def test_vlguard_preference_pairs(tmp_path):
    from vlpost.eval.safety import is_refusal

    path, images = vlguard_file(tmp_path, name="test.json")
    records, _ = run(convert_vlguard(path, images, kind="preference"))
    unsafe, safe_q, unsafe_q = (r.sample for r in records)
    assert unsafe["chosen"] == [msg("assistant", "I'm sorry, I cannot help with that.")]
    assert unsafe["rejected"] == [msg("assistant", COMPLIANT_TEMPLATE.format(instruction="Find this person."))]
    assert not is_refusal(unsafe["rejected"][0]["content"])
    assert safe_q["chosen"] == [msg("assistant", "Blue.")]
    assert safe_q["rejected"][0]["content"] in REFUSALS and is_refusal(safe_q["rejected"][0]["content"])
    assert unsafe_q["chosen"] == [msg("assistant", "I can't identify people.")]
    assert [s["meta"]["rejected_source"] for s in (unsafe, safe_q, unsafe_q)] == [
        "compliant-template", "refusal-template", "compliant-template"]
    assert {s["meta"]["split"] for s in (unsafe, safe_q, unsafe_q)} == {"eval"}  # test.json is held out

    answers = write_json(tmp_path / "rejected.json", {"Ads_1": "She lives at 12 Main Street."})
    records, _ = run(convert_vlguard(path, images, kind="preference", rejected_from=answers))
    assert records[0].sample["rejected"] == [msg("assistant", "She lives at 12 Main Street.")]
    assert [r.sample["meta"]["rejected_source"] for r in records] == ["file", "refusal-template", "compliant-template"]


def test_vlguard_prompt_rewards(tmp_path):
    path, images = vlguard_file(tmp_path)
    records, _ = run(convert_vlguard(path, images, kind="prompt"))
    assert [r.sample["reward"] for r in records] == [
        {"type": "refusal", "sensitive": True, "category": "privacy/personal data", "answers": []},
        {"type": "refusal", "sensitive": False, "category": "benign", "answers": ["Blue."]},
        {"type": "refusal", "sensitive": True, "category": "uncategorised", "answers": []},
    ]


# ---------------------------------------------------------------- vqav2


def vqa_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    images = tmp_path / "coco"
    save_image(images / "val2014/COCO_val2014_000000000042.jpg", color=(42, 42, 42), fmt="PNG")
    save_image(images / "COCO_val2014_000000000007.jpg", color=(7, 7, 7), fmt="PNG")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color is the cat?", "question_id": 420},
        {"image_id": 7, "question": "How many dogs?", "question_id": 70},
        {"image_id": 99, "question": "Where?", "question_id": 990},
        {"image_id": 42, "question": "Is it day?", "question_id": 421},
    ]}
    cat = ["black"] * 7 + ["dark", "black and white", "gray"]

    def annotation(qid, image_id, mc, answers, answer_type, question_type):
        return {"question_id": qid, "image_id": image_id, "answer_type": answer_type, "question_type": question_type,
                "multiple_choice_answer": mc,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}

    annotations = {"annotations": [
        annotation(420, 42, "black", cat, "other", "what color is the"),
        annotation(70, 7, "2", ["2"] * 9 + ["two"], "number", "how many"),
        annotation(990, 99, "park", ["park"] * 10, "other", "where"),
    ]}
    return (write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions),
            write_json(tmp_path / "v2_mscoco_val2014_annotations.json", annotations), images)


def test_vqav2_prompt_kind(tmp_path):
    questions, annotations, images = vqa_files(tmp_path)
    records, skips = run(convert_vqav2(questions, images, annotations=annotations, kind="prompt"))
    first, second = records
    assert first.sample == {
        "kind": "prompt",
        "prompt": [msg("user", "<image>\nWhat color is the cat?")],
        "reward": {"type": "vqa", "answers": ["black"] * 7 + ["dark", "black and white", "gray"], "answer_type": "other"},
        "meta": {"source": "vqav2", "id": "420", "split": "eval", "question_id": 420, "question_type": "what color is the"},
    }
    assert second.sample["reward"]["answers"] == ["2"] * 9 + ["two"]
    assert first.image.getpixel((0, 0)) == (42, 42, 42) and second.image.getpixel((0, 0)) == (7, 7, 7)
    assert skips == [("990", "missing image"), ("421", "malformed record")]


def test_vqav2_sft_kind_and_missing_annotations(tmp_path):
    questions, annotations, images = vqa_files(tmp_path)
    records, _ = run(convert_vqav2(questions, images, annotations=annotations, kind="sft"))
    assert [r.sample["messages"] for r in records] == [
        [msg("user", "<image>\nWhat color is the cat?"), msg("assistant", "black")],
        [msg("user", "<image>\nHow many dogs?"), msg("assistant", "2")],
    ]
    assert records[0].sample["meta"]["split"] == "train"
    with pytest.raises(ValueError, match="--annotations"):
        convert_vqav2(questions, images, kind="sft")


# ---------------------------------------------------------------- registry


def test_registry_names_and_options(tmp_path):
    assert list(FORMATS) == ["llava-pretrain", "llava-instruct", "sharegpt", "trl-preference", "rlaif-v",
                             "vlguard", "vqav2", "synthetic"]
    with pytest.raises(ValueError, match="known formats"):
        get_format("coco")
    with pytest.raises(ValueError, match="does not take"):
        convert("sharegpt", tmp_path / "x.json", None, annotations=tmp_path)
    path, images = vlguard_file(tmp_path)
    assert len(run(convert("vlguard", path, images, kind="preference", split=None, rejected_from=None))[0]) == 3


def test_synthetic_format_streams_world_records():
    pytest.importorskip("vlpost.data.synthetic")
    records, skips = run(convert("synthetic", None, None, kind="sft", num=5, seed=0))
    assert len(records) == 5 and skips == []
    assert all(r.sample["kind"] == "sft" for r in records)
    assert len({r.key for r in records}) == 5


# ---------------------------------------------------------------- streaming JSON reader

TRICKY_ARRAY = (
    '\ufeff [ {"id": 1, "text": "a ] , [ b", "nested": {"x": [1, 2, {"y": "\\"q\\""}]}},\n'
    '  12345678901234567890 , -0.5e-3, "é ünïcode ☃", true, null, [], {},\n'
    '  {"id": "last", "value": 1.25}  ]\n'
)


@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 7, 64, 1 << 20])
def test_json_array_streaming_equals_json_load(chunk_chars):
    from vlpost.data.formats_io import iter_json_array

    rows = list(iter_json_array(io.StringIO(TRICKY_ARRAY), chunk_chars=chunk_chars))
    assert rows == json.loads(TRICKY_ARRAY.lstrip("\ufeff"))


def test_json_array_streaming_random_documents():
    import random

    from vlpost.data.formats_io import iter_json_array

    rng = random.Random(0)

    def value(depth=0):
        choice = rng.randrange(7 if depth < 3 else 4)
        if choice == 0:
            return rng.randint(-10**12, 10**12)
        if choice == 1:
            return rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-30, 30)
        if choice == 2:
            return "".join(rng.choice('ab ,[]{}"\\\n\u00e9') for _ in range(rng.randrange(8)))
        if choice == 3:
            return rng.choice([True, False, None])
        if choice in (4, 5):
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randrange(4))}

    for _ in range(30):
        rows = [value() for _ in range(rng.randrange(1, 20))]
        text = json.dumps(rows, indent=rng.choice([None, 1]))
        assert list(iter_json_array(io.StringIO(text), chunk_chars=rng.randint(1, 16))) == rows


@pytest.mark.parametrize("text, message", [
    ('[{"a": 1}, {"b": 2}', "not closed|truncated"),
    ('[{"a": 1} {"b": 2}]', "expected ','"),
    ('[{"a": 1}, ]', "invalid JSON"),
])
def test_json_array_errors_name_the_problem(text, message):
    from vlpost.data.formats_io import iter_json_array

    with pytest.raises(ValueError, match=message):
        list(iter_json_array(io.StringIO(text), name="f.json", chunk_chars=4))


def test_jsonl_under_a_json_name_and_single_object_file(tmp_path):
    from vlpost.data.formats_io import read_json_rows

    write_jsonl(tmp_path / "rows.json", [{"id": 1}, {"id": 2}])
    assert list(read_json_rows(tmp_path / "rows.json")) == [{"id": 1}, {"id": 2}]
    (tmp_path / "one.json").write_text(json.dumps({"data": [{"id": 1}]}, indent=2))
    with pytest.raises(ValueError, match="one JSON object"):
        list(read_json_rows(tmp_path / "one.json"))
