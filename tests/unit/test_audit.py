"""`vlpost audit`: exact counts on hand-made shard sets, the --strict exit code, and a clean set passing it."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from vlpost.cli import main
from vlpost.data.audit import AuditOptions, audit_shards, length_histogram, reward_problem
from vlpost.data.records import Record, Skip
from vlpost.data.shards import write_shards

TPI = 8  # tokens per image
MAX = 96  # max_length
REFUSAL = "I can't determine someone's religion from an image."
LONG = "word " * 80  # far more than MAX tokens whatever the tokenizer (every word is >= 1 token)


def _image(shade: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (shade, 255 - shade, 7))


def _sft(i: int, user: str, answer: str, image: Image.Image | None, category: str = "color") -> Record:
    sample = {"kind": "sft", "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
              "meta": {"source": "test", "id": f"s{i}", "category": category, "split": "train"}}
    return Record(f"k{i}", sample, image)


def _messy_records() -> list:
    return [
        _sft(0, "<image>\nWhat colour is the circle?", "red", _image(10)),
        _sft(1, "<image>\nHow many shapes are there?", "three", _image(10), "count"),  # duplicate image of s0
        _sft(2, "<image>\nWhat colour is the circle?", "red", _image(20)),  # duplicate text of s0
        _sft(3, "<image>\nWhat is this person's religion?", REFUSAL, _image(30), "religion"),  # a refusal
        _sft(4, "<image>\nDescribe it.", "red " * 100, _image(40)),  # image early, answer cut: truncated
        _sft(5, LONG + "<image>", "yes", _image(50)),  # image span ends past MAX: dropped
        _sft(6, LONG, "yes", None, "text"),  # no assistant token left within MAX: dropped
        _sft(7, "What is a square?", "a shape with four equal sides", None, "text"),
        Skip("bad-1", "missing image"),
    ]


def _clean_records() -> list:
    return [_sft(0, "<image>\nWhat colour is the circle?", "red", _image(10)),
            _sft(1, "<image>\nHow many shapes are there?", "three", _image(20), "count"),
            _sft(2, "What is a square?", "a shape with four equal sides", None, "text")]


def _write(tmp_path: Path, records: list, name: str, kind: str = "sft") -> Path:
    write_shards(records, tmp_path / name, kind, "pytest", progress=False)
    return tmp_path / name


@pytest.fixture
def tokenizer(tokenizer_dirs):
    return AutoTokenizer.from_pretrained(tokenizer_dirs["chatml"])


def _audit(path: Path, tokenizer=None, **options) -> dict:
    return audit_shards(path, tokenizer, TPI if tokenizer is not None else None,
                        AuditOptions(max_length=MAX, **options))


def _count(report: dict, name: str) -> int:
    return report["problems"][name]["count"]


# ---------------------------------------------------------------- library


def test_messy_sft_counts(tmp_path, tokenizer):
    report = _audit(_write(tmp_path, _messy_records(), "messy"), tokenizer)
    assert report["mode"] == "tokens" and report["samples"]["read"] == 8
    assert _count(report, "truncated") == 1 and report["problems"]["truncated"]["examples"] == ["s4"]
    dropped = report["problems"]["dropped"]
    assert dropped["count"] == 2 and sorted(dropped["examples"]) == ["s5", "s6"]
    assert dropped["by_reason"] == {"image span beyond max_length": 1, "no labels left": 1}
    assert report["problems"]["duplicate_images"]["examples"] == ["s1 = s0"]
    assert report["problems"]["duplicate_texts"]["examples"] == ["s2 = s0"]
    assert _count(report, "duplicate_samples") == 0
    assert _count(report, "skipped_at_prepare") == 1
    for name in ("decode_failures", "placeholder_mismatches", "empty_label_masks", "encode_errors"):
        assert _count(report, name) == 0, name
    assert report["blocking"] == ["dropped"] and report["ok"] is False
    refusals = report["refusals"]["sft"]
    assert (refusals["assistant_turns"], refusals["refusal_turns"], refusals["samples_with_refusal"]) == (8, 1, 1)
    assert refusals["by_category"]["religion"] == {"turns": 1, "refusals": 1}
    assert report["balance"]["category"] == {"color": 4, "text": 2, "count": 1, "religion": 1}
    assert report["balance"]["image"] == {"with image": 6, "text-only": 2}


def test_lengths_match_the_chat_template(tmp_path, tokenizer):
    """Histogram and mean agree with lengths taken straight from the template: text tokens + (TPI - 1) per image."""
    records = [r for r in _messy_records() if isinstance(r, Record)]
    expected = []
    for record in records:
        ids = tokenizer.apply_chat_template(record.sample["messages"], tokenize=True, return_dict=True)["input_ids"]
        expected.append(len(ids) + (TPI - 1) * (record.image is not None))
    lengths = _audit(_write(tmp_path, records, "lengths"), tokenizer)["token_lengths"]
    assert lengths["sequences"] == 8 and lengths["over_max_length"] == 3
    assert lengths["max"] == max(expected) and lengths["mean"] == pytest.approx(sum(expected) / 8, abs=0.01)
    assert lengths["image_tokens_mean"] == TPI * 6 / 8
    for bucket in lengths["buckets"]:
        hi = bucket["max"] if bucket["max"] is not None else 10**9
        assert bucket["count"] == sum(bucket["min"] <= n <= hi for n in expected), bucket


def test_length_histogram_edges():
    buckets = length_histogram([1, 8, 9, 64, 65, 500], max_length=64, buckets=8)
    assert [(b["min"], b["max"]) for b in buckets[:2]] == [(1, 8), (9, 16)]
    assert [b["count"] for b in buckets] == [2, 1, 0, 0, 0, 0, 0, 1, 2]


def test_structural_mode_without_tokenizer(tmp_path):
    report = _audit(_write(tmp_path, _messy_records(), "messy"))
    assert report["mode"] == "structural" and report["token_lengths"] is None
    assert _count(report, "dropped") == 0 and _count(report, "truncated") == 0  # not measurable without tokens
    assert _count(report, "duplicate_images") == 1 and _count(report, "duplicate_texts") == 1
    assert report["ok"] is True


def _rewrite_member(shard: Path, suffix: str, key: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, old in members:
            new = data if member.name == f"{key}.{suffix}" else old
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))


def test_reader_failures_and_placeholder_mismatch(tmp_path, tokenizer):
    path = _write(tmp_path, _clean_records() + [_sft(3, "<image>\nWhat is it?", "a cup", _image(90))], "broken")
    shard = path / "shard-000000.tar"
    _rewrite_member(shard, "png", "k1", b"\x89PNG\r\n\x1a\n not an image")
    bad = {"kind": "sft", "meta": {"id": "s3"}, "messages": [
        {"role": "user", "content": "<image>\n<image>\nWhat is it?"}, {"role": "assistant", "content": "a cup"}]}
    _rewrite_member(shard, "json", "k3", json.dumps(bad).encode())
    report = _audit(path, tokenizer)
    decode = report["problems"]["decode_failures"]
    assert (decode["count"], decode["by_reason"]) == (1, {"corrupt image": 1})
    assert decode["examples"] == ["shard-000000.tar/k1"]
    assert _count(report, "placeholder_mismatches") == 1
    assert report["samples"]["read"] == 2 and report["samples"]["attempted"] == 4
    assert set(report["blocking"]) == {"decode_failures", "placeholder_mismatches"}
    tolerant = _audit(path, tokenizer, max_decode_failure_share=0.5)  # 1 of 4 is under the threshold
    assert tolerant["blocking"] == ["placeholder_mismatches"]


def test_empty_label_masks_from_a_template_that_trains_nothing(tmp_path, tokenizer):
    """The LLaVA tokenization-mismatch trap: a template whose generation span is empty gives all-ignored labels."""
    tokenizer.chat_template = (
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>\n' }}{%- if message['role'] == 'assistant' %}{% generation %}{% endgeneration %}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    )
    report = _audit(_write(tmp_path, _clean_records(), "clean"), tokenizer)
    masks = report["problems"]["empty_label_masks"]
    assert masks["count"] == 3 and masks["blocking"] and report["blocking"] == ["empty_label_masks"]


def _pair(i: int, chosen: str, rejected: str) -> Record:
    sample = {"kind": "preference", "prompt": [{"role": "user", "content": "<image>\nWhat is their religion?"}],
              "chosen": [{"role": "assistant", "content": chosen}],
              "rejected": [{"role": "assistant", "content": rejected}], "meta": {"id": f"p{i}"}}
    return Record(f"p{i}", sample, _image(i))


def test_preference_checks(tmp_path, tokenizer):
    records = [_pair(0, REFUSAL, "They are Christian."), _pair(1, "red", "red"), _pair(2, "a cup", REFUSAL)]
    report = _audit(_write(tmp_path, records, "pref", "preference"), tokenizer)
    assert report["problems"]["identical_pairs"]["examples"] == ["p1"]
    assert report["refusals"]["preference"] == {"pairs": 3, "chosen_refusals": 1, "rejected_refusals": 1}
    assert report["token_lengths"]["sequences"] == 6  # chosen and rejected each
    assert report["ok"] is True


def _prompt(i: int, reward: dict) -> Record:
    sample = {"kind": "prompt", "prompt": [{"role": "user", "content": f"question {i}?"}], "reward": reward,
              "meta": {"id": f"q{i}"}}
    return Record(f"q{i}", sample, None)


def test_prompt_reward_fields(tmp_path, tokenizer):
    rewards = [
        {"type": "vqa", "answers": ["2"] * 10}, {"type": "vqa"},
        {"type": "math"}, {"type": "code", "tests": "def test_a():\n    assert f() == 1\n", "entry_point": "f"},
        {"type": "refusal", "sensitive": True, "category": "religion"},
        {"type": "refusal", "sensitive": False, "category": "religion"},  # benign look-alike needs answers
    ]
    report = _audit(_write(tmp_path, [_prompt(i, r) for i, r in enumerate(rewards)], "prompts", "prompt"), tokenizer)
    invalid = report["problems"]["invalid_rewards"]
    assert invalid["examples"] == ["q1", "q2", "q5"] and invalid["blocking"]
    assert invalid["by_reason"] == {"vqa reward without answers": 1, "math reward without answer": 1,
                                    "refusal reward without answers": 1}
    assert report["balance"]["reward_type"] == {"vqa": 2, "refusal": 2, "math": 1, "code": 1}


def test_reward_problem_types():
    assert reward_problem({"type": "vqa", "answers": ["two", ""]}) == "vqa reward with a non-text answers entry"
    assert reward_problem({"type": "refusal", "sensitive": "yes", "category": "x"}) == "refusal reward without sensitive"
    assert reward_problem({"type": "refusal", "sensitive": False, "category": "x", "answers": ["a hat"]}) is None


def test_limit_reads_only_that_many(tmp_path):
    report = _audit(_write(tmp_path, _messy_records(), "messy"), limit=3)
    assert report["samples"]["read"] == 3 and report["settings"]["limit"] == 3


# ---------------------------------------------------------------- command line


def test_cli_strict_exit_codes_and_files(tmp_path, tokenizer_dirs, capsys):
    messy, clean = _write(tmp_path, _messy_records(), "messy"), _write(tmp_path, _clean_records(), "clean")
    common = ["--tokenizer", tokenizer_dirs["chatml"], "--tokens-per-image", str(TPI), "--max-length", str(MAX)]
    assert main(["audit", str(messy), *common]) == 0  # problems, but not --strict
    assert main(["audit", str(messy), *common, "--strict"]) == 1
    assert "BLOCKED: dropped" in capsys.readouterr().out
    written = json.loads((messy / "audit" / "audit.json").read_text())
    assert written["problems"]["dropped"]["count"] == 2
    assert "# Audit of" in (messy / "audit" / "audit.md").read_text()
    out = tmp_path / "reports"
    assert main(["audit", str(clean), *common, "--strict", "--out", str(out)]) == 0
    assert json.loads((out / "audit.json").read_text())["ok"] is True


def test_cli_model_run_dir_and_structural(tmp_path, tokenizer_dirs, capsys):
    messy = _write(tmp_path, _messy_records(), "messy")
    run_dir = tmp_path / "run"
    shutil.copytree(tokenizer_dirs["chatml"], run_dir / "lm")
    (run_dir / "vlpost.json").write_text(json.dumps({"tokens_per_image": TPI, "lm_dir": "lm"}))
    out = tmp_path / "from_model"
    assert main(["audit", str(messy), "--model", str(run_dir), "--max-length", str(MAX), "--out", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["settings"]["tokens_per_image"] == TPI and report["problems"]["truncated"]["count"] == 1
    assert main(["audit", str(messy), "--strict", "--out", str(tmp_path / "structural")]) == 0
    assert "structural checks only" in capsys.readouterr().out
    assert main(["audit", str(messy), "--tokenizer", tokenizer_dirs["chatml"]]) == 2  # no --tokens-per-image
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
