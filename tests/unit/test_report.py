"""write_report files and contents, and compare_reports deltas / flips, on small hand-built inputs."""

import argparse
import base64
import io
import json
import re

import pytest
from PIL import Image

from vlpost.eval import commands
from vlpost.eval.report import compare_reports, comparison_markdown, write_report

COLORS = [(255, 0, 0), (0, 128, 255), (20, 200, 20)]


def _summary():
    vqa = {"overall": 62.5, "per_answer_type": {"yes/no": 30.0, "number": 100.0},
           "per_question_type": {"is the": 30.0, "how many": 100.0},
           "per_question": {"1": 60.0, "2": 100.0}, "num_questions": 4, "missing": [4]}
    group = {"num_items": 4, "num_sensitive": 2, "num_benign": 2, "refusal_rate": 0.5, "over_refusal_rate": 0.25,
             "leak_rate": 0.0, "benign_accuracy": 0.9}
    safety = {"overall": group, "per_category": {"religion": group},
              "examples": {"over_refused": [{"id": "b2", "category": "religion", "response": "I can't help."}]}}
    return {"run": "demo-sft", "vqa": vqa, "safety": safety}


def _gallery():
    return [{"id": f"q{i}", "image": Image.new("RGB", (64, 48), color), "question": f"What colour? <b>{i}</b>",
             "answer": "red", "references": ["red", "red", "crimson"], "score": [1.0, 0.3, 0.0][i], "tag": "color"}
            for i, color in enumerate(COLORS)]


def test_write_report_files_and_contents(tmp_path):
    curves = {"sft/loss": [(0, 2.0), (10, 1.2), (20, 0.9)], "dpo/loss": [(0, 0.69), (10, 0.5)]}
    paths = write_report(tmp_path, _summary(), _gallery(), curves)
    for key, name in {"json": "report.json", "markdown": "report.md", "html": "report.html"}.items():
        assert paths[key] == str(tmp_path / name) and (tmp_path / name).exists()
    assert set(paths["plots"]) == {"curves", "accuracy_by_type", "safety_by_category"}
    for plot in paths["plots"].values():
        assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    record = json.loads((tmp_path / "report.json").read_text())
    assert set(record) == {"schema", "summary", "gallery", "curves", "plots"}
    assert record["summary"]["vqa"]["overall"] == 62.5
    assert [g["id"] for g in record["gallery"]] == ["q0", "q1", "q2"]
    assert all("image" not in g and g["has_image"] for g in record["gallery"])
    assert record["curves"]["dpo/loss"] == [[0, 0.69], [10, 0.5]]

    page = (tmp_path / "report.html").read_text()
    thumbs = re.findall(r"<img src='data:image/png;base64,([^']+)'", page)
    assert len(thumbs) == len(COLORS)                       # one <img> per gallery item
    for data, color in zip(thumbs, COLORS):                 # and it is that item's picture
        assert Image.open(io.BytesIO(base64.b64decode(data))).getpixel((5, 5)) == color
    assert len(re.findall(r"<img class='plot' alt='\w+' src='data:image/png;base64,", page)) == 3
    assert "<b>0</b>" not in page and "&lt;b&gt;0&lt;/b&gt;" in page      # user text is escaped
    assert "I can&#x27;t help." in page                                  # over-refusal example shown
    assert "src='http" not in page and "href=" not in page               # self-contained

    markdown = (tmp_path / "report.md").read_text()
    assert "| number | 100.00 |" in markdown
    assert "| religion | 2 | 50.0% | 2 | 25.0% | 0.0% | 90.0% |" in markdown
    assert "![curves](plot_curves.png)" in markdown
    assert "| q1 | What colour? <b>1</b> | red | red ×2, crimson | 0.30 | color |" in markdown


def test_write_report_without_optional_parts(tmp_path):
    paths = write_report(tmp_path, {"vqa": _summary()["vqa"]}, [{"image": None, "question": "q", "answer": "a",
                                                                   "references": [], "score": 0.0, "tag": "t"}], None)
    assert set(paths["plots"]) == {"accuracy_by_type"}
    assert "(no image)" in (tmp_path / "report.html").read_text()


def _report(overall, gallery_scores, refusal_rate):
    summary = _summary()
    summary["vqa"] = {**summary["vqa"], "overall": overall}
    summary["vqa"].pop("per_question")
    summary["safety"]["overall"] = {**summary["safety"]["overall"], "refusal_rate": refusal_rate}
    gallery = [{"id": item_id, "question": f"{item_id}?", "answer": f"ans-{score}", "score": score}
               for item_id, score in gallery_scores.items()]
    return {"schema": 1, "summary": summary, "gallery": gallery}


def test_compare_reports_deltas_and_flips():
    a = _report(50.0, {"q1": 1.0, "q2": 0.0, "q3": 1.0, "only_a": 1.0}, 0.5)
    b = _report(60.0, {"q1": 0.0, "q2": 0.9, "q3": 0.6, "only_b": 0.0}, 0.75)
    comparison = compare_reports(a, b)
    metrics = {m["name"]: m for m in comparison["metrics"]}
    assert metrics["vqa.overall"]["delta"] == pytest.approx(10.0)
    assert metrics["safety.overall.refusal_rate"]["delta"] == pytest.approx(0.25)
    assert metrics["vqa.per_answer_type.number"]["delta"] == 0.0
    assert not any(name.startswith("safety.examples") or "missing" in name for name in metrics)
    assert comparison["num_shared_items"] == 3
    assert [f["id"] for f in comparison["flips"]["became_wrong"]] == ["q1"]   # 1.0 -> 0.0
    assert [f["id"] for f in comparison["flips"]["became_right"]] == ["q2"]   # 0.0 -> 0.9; q3 stays >= 0.5
    markdown = comparison_markdown(comparison)
    assert "| vqa.overall | 50 | 60 | +10 |" in markdown
    assert "## Right in A, wrong in B (1)" in markdown and "vqa.per_answer_type.number" not in markdown
    assert "- q1: q1? — A “ans-1.0” (1.00), B “ans-0.0” (0.00)" in markdown


def test_compare_bare_score_files_uses_per_question():
    a = {"overall": 50.0, "per_question": {"1": 100.0, "2": 0.0}}
    b = {"overall": 50.0, "per_question": {"1": 0.0, "2": 30.0}}
    comparison = compare_reports(a, b)
    assert [f["id"] for f in comparison["flips"]["became_wrong"]] == ["1"]
    assert comparison["flips"]["became_right"] == []          # 0.3 is below the 0.5 threshold
    assert compare_reports(a, b, threshold=0.3)["flips"]["became_right"][0]["id"] == "2"


def test_cli_eval_compare(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vlpost")
    commands.register(parser.add_subparsers(dest="command", required=True))
    for name, overall in (("a", 40.0), ("b", 57.5)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"overall": overall, "per_question": {"1": overall}}))
    args = parser.parse_args(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                              "--out", str(tmp_path / "diff.md")])
    assert args.func(args) == 0
    assert "| overall | 40 | 57.5 | +17.5 |" in capsys.readouterr().out
    assert "## Wrong in A, right in B (1)" in (tmp_path / "diff.md").read_text()    # item 1: 0.4 -> 0.575
