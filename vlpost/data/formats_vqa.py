"""VQAv2 (official questions + annotations JSON) → sft samples or prompt samples scored by VQA accuracy.

Images are COCO files `COCO_<subtype>_<image_id:012d>.jpg` (subtype e.g. `val2014`, read from the
questions file's `data_subtype`), found in `--images` or in `--images/<subtype>/`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlpost.data.formats_common import (
    EMPTY_ASSISTANT,
    MALFORMED,
    Output,
    SkipRecord,
    base_meta,
    load_image_file,
    place_placeholders,
    record_id,
    stream_records,
)
from vlpost.data.records import Record, Skip


def _load_json(path: Path, key: str) -> tuple[dict, list]:
    with Path(path).open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected the official VQAv2 schema with a top-level '{key}' list")
    return data, data[key]


def _subtype(data: dict, path: Path) -> str:
    """`val2014` etc. from `data_subtype`, else from a file name like v2_OpenEnded_mscoco_val2014_questions.json."""
    if isinstance(data.get("data_subtype"), str):
        return data["data_subtype"]
    found = re.search(r"(train|val|test-dev|test)(20\d\d)", Path(path).name)
    if not found:
        raise ValueError(f"{path}: no 'data_subtype' and none in the file name; cannot name the COCO images")
    return "test2015" if found.group(1) == "test-dev" else found.group(0)


def _image_relative(images_dir: Path | None, subtype: str, image_id: Any) -> str:
    if isinstance(image_id, bool) or not isinstance(image_id, int | str) or not str(image_id).isdigit():
        raise SkipRecord(MALFORMED, f"image_id must be an integer, got {image_id!r}")
    name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
    if images_dir is not None and not (Path(images_dir) / name).is_file() and (Path(images_dir) / subtype / name).is_file():
        return f"{subtype}/{name}"
    return name


def _answers(annotation: dict) -> list[str]:
    answers = annotation.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise SkipRecord(MALFORMED, "annotation 'answers' must be a list of {answer: str, ...}")
    return [a["answer"] for a in answers]


def _vqa_build(raw: dict, rid: str, images_dir: Path | None, kind: str, split: str, subtype: str,
               annotations: dict[Any, dict]) -> list[Output]:
    missing = [k for k in ("question_id", "image_id", "question") if k not in raw]
    if missing:
        raise SkipRecord(MALFORMED, f"missing key(s) {missing}")
    if not isinstance(raw["question"], str):
        raise SkipRecord(MALFORMED, "'question' must be a string")
    annotation = annotations.get(raw["question_id"])
    if annotation is None:
        raise SkipRecord(MALFORMED, f"no annotation for question_id {raw['question_id']} in --annotations")
    prompt = place_placeholders([{"role": "user", "content": raw["question"]}], 1)
    meta = base_meta("vqav2", rid, split, question_id=raw["question_id"], question_type=annotation.get("question_type"))
    if kind == "sft":
        target = annotation.get("multiple_choice_answer")
        if not isinstance(target, str) or not target.strip():
            raise SkipRecord(EMPTY_ASSISTANT, "empty multiple_choice_answer")
        sample = {"kind": "sft", "messages": prompt + [{"role": "assistant", "content": target.strip()}], "meta": meta}
    else:
        reward = {"type": "vqa", "answers": _answers(annotation), "answer_type": annotation.get("answer_type")}
        sample = {"kind": "prompt", "prompt": prompt, "reward": reward, "meta": meta}
    image = load_image_file(images_dir, _image_relative(images_dir, subtype, raw["image_id"]))
    return [(sample, image)]


def convert_vqav2(
    input_path: Path,
    images_dir: Path | None,
    *,
    annotations: Path | None = None,
    kind: str = "prompt",
    split: str | None = None,
) -> Iterator[Record | Skip]:
    """INPUT is the questions file, `annotations` the answers; kind prompt (eval, VQA reward) or sft."""
    if kind not in ("prompt", "sft"):
        raise ValueError(f"vqav2: --kind must be prompt or sft, got {kind!r}")
    if annotations is None:
        raise ValueError("vqav2 needs --annotations (e.g. v2_mscoco_val2014_annotations.json) for the answers")
    data, questions = _load_json(input_path, "questions")
    _, annotation_list = _load_json(annotations, "annotations")
    by_question = {a["question_id"]: a for a in annotation_list if isinstance(a, dict) and "question_id" in a}
    subtype = _subtype(data, input_path)
    split = split or ("eval" if kind == "prompt" else "train")
    return stream_records(
        "vqav2", questions,
        lambda raw, rid: _vqa_build(raw, rid, images_dir, kind, split, subtype, by_question),
        id_of=lambda raw, index: record_id(raw, index, key="question_id"),
    )
