"""Evaluation reports: report.json for machines, report.md for reviews, one self-contained report.html for people.

``summary`` keys understood: "vqa" (``vqa.score_results`` output) and "safety"
(``safety.summarize_safety`` output); other keys with scalar values go in a "Run" table. A gallery item
is {"image": PIL.Image | None, "question", "answer", "references", "score" (0..1), "tag", optional "id"}.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from html import escape
from pathlib import Path

from matplotlib.figure import Figure  # Figure.savefig renders with Agg; no pyplot global state
from PIL import Image

REPORT_SCHEMA = 1
THUMB_SIDE = 256  # gallery images are shrunk to at most this many pixels per side
RIGHT_THRESHOLD = 0.5  # an item counts as "right" in compare_reports when its score reaches this
SAFETY_COLUMNS = (("num_sensitive", "sensitive", "n"), ("refusal_rate", "refusal", "%"),
                  ("num_benign", "benign", "n"), ("over_refusal_rate", "over-refusal", "%"),
                  ("leak_rate", "leak", "%"), ("benign_accuracy", "benign acc.", "%"))
EXAMPLE_TITLES = {"refused": "Sensitive, refused", "complied": "Sensitive, answered",
                  "refused_leaked": "Refused but named the attribute", "answered_leaked": "Answered with the attribute",
                  "over_refused": "Benign, refused (over-refusal)", "benign_wrong": "Benign, answered wrongly"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 16px}h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.metric{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 16px;min-width:140px}
.metric b{display:block;font-size:24px}.metric span{color:#5b6473;font-size:13px}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;font-size:14px}
th,td{border:1px solid #dde1e7;padding:4px 10px;text-align:left}th{background:#eef1f5}td.num{text-align:right}
img.plot{max-width:100%;background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:6px 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde1e7;border-left:5px solid #c62828;border-radius:8px;padding:10px;margin:0}
.card.good{border-left-color:#2e7d32}.card.part{border-left-color:#f9a825}
.card img{width:100%;image-rendering:pixelated;border-radius:4px;background:#eee}
.card p{margin:4px 0;font-size:14px}.muted{color:#5b6473;font-size:13px}.tag{background:#eef1f5;border-radius:4px;padding:0 6px}
h3{font-size:15px;margin:14px 0 4px}ul.examples{margin:0}ul.examples li{margin:3px 0;font-size:14px}
"""


def _fmt(value, unit: str = "%") -> str:
    """Fractions print as percent, VQA percentages as they are, counts as ints, missing as a dash."""
    if value is None:
        return "–"
    if unit == "n":
        return str(int(value))
    return f"{100 * value:.1f}%" if unit == "%" else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]], html: bool) -> str:
    if html:
        head = "".join(f"<th>{escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows])


def _headline(summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs shown first: VQA overall and the safety rates."""
    cards = []
    if "vqa" in summary:
        cards.append(("VQA accuracy", f"{summary['vqa']['overall']:.2f}%"))
    overall = summary.get("safety", {}).get("overall", {})
    for key, label in (("refusal_rate", "refusal"), ("over_refusal_rate", "over-refusal"),
                       ("leak_rate", "leak"), ("benign_accuracy", "benign accuracy")):
        if key in overall:
            cards.append((label, _fmt(overall[key])))
    return cards


def _sections(summary: dict, html: bool) -> list[tuple[str, str]]:
    """(title, table) pairs for every table the summary supports."""
    sections = []
    run = [[str(k), str(v)] for k, v in summary.items() if k not in ("vqa", "safety") and not isinstance(v, dict | list)]
    if run:
        sections.append(("Run", _table(["key", "value"], run, html)))
    if "vqa" in summary:
        vqa = summary["vqa"]
        for key, title in (("per_answer_type", "VQA accuracy per answer type"),
                           ("per_question_type", "VQA accuracy per question type")):
            rows = [[name, f"{value:.2f}"] for name, value in sorted(vqa.get(key, {}).items(), key=lambda kv: kv[1])]
            sections.append((title, _table(["type", "accuracy %"], rows, html)))
        note = f"{vqa.get('num_questions', 0)} questions, {len(vqa.get('missing', []))} without a prediction (scored 0)"
        sections.append(("VQA coverage", f"<p class='muted'>{escape(note)}</p>" if html else note))
    if "safety" in summary:
        safety = summary["safety"]
        groups = [("overall", safety["overall"])] + list(safety.get("per_category", {}).items())
        rows = [[name] + [_fmt(group.get(key), unit) for key, _, unit in SAFETY_COLUMNS] for name, group in groups]
        sections.append(("Safety per category", _table(["category"] + [label for _, label, _ in SAFETY_COLUMNS],
                                                        rows, html)))
    return sections


def _examples(summary: dict, html: bool) -> str:
    """Refusal / over-refusal / leak examples collected by summarize_safety."""
    parts = []
    for bucket, examples in summary.get("safety", {}).get("examples", {}).items():
        title = EXAMPLE_TITLES.get(bucket, bucket)
        items = [f"[{e.get('category')}] {e.get('id')}: “{e.get('response')}”" for e in examples]
        if html:
            lis = "".join(f"<li>{escape(item)}</li>" for item in items)
            parts.append(f"<h3>{escape(title)}</h3><ul class='examples'>{lis}</ul>")
        else:
            parts.append(f"### {title}\n\n" + "\n".join(f"- {item}" for item in items))
    return "\n".join(parts)


def _png_data_uri(image: Image.Image) -> str:
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _reference_counts(references: list[str]) -> str:
    """"red ×7, dark red ×3": the distinct references with how many annotators gave each."""
    counts = Counter(references)
    return ", ".join(ref if n == 1 else f"{ref} ×{n}" for ref, n in counts.most_common())


def _gallery_html(gallery: list[dict]) -> str:
    cards = []
    for item in gallery:
        score = float(item.get("score", 0.0))
        grade = "good" if score >= 0.999 else "part" if score > 0 else "bad"
        image = item.get("image")
        picture = (f"<img src='{_png_data_uri(image)}' alt='{escape(str(item.get('question', '')))}'>"
                   if image is not None else "<p class='muted'>(no image)</p>")
        refs = _reference_counts(item.get("references", []))
        cards.append(
            f"<figure class='card {grade}'>{picture}<p><b>Q:</b> {escape(str(item.get('question', '')))}</p>"
            f"<p><b>Model:</b> {escape(str(item.get('answer', '')))}</p><p class='muted'>refs: {escape(refs)}</p>"
            f"<p class='muted'>score {score:.2f} <span class='tag'>{escape(str(item.get('tag', '')))}</span></p></figure>")
    return "<div class='gallery'>" + "".join(cards) + "</div>"


def _plot_curves(curves: dict, path: Path) -> None:
    fig = Figure(figsize=(8, 3.6), dpi=100)
    ax = fig.add_subplot()
    for name, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, linewidth=1.6)
    ax.set(xlabel="step", title="Training curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _plot_bars(groups: dict[str, dict[str, float]], path: Path, title: str, xlabel: str) -> None:
    """One horizontal bar panel per group (e.g. per answer type, per question type)."""
    tallest = max(len(values) for values in groups.values())
    fig = Figure(figsize=(5 * len(groups), max(2.5, 0.28 * tallest + 1.2)), dpi=100)
    for index, (name, values) in enumerate(groups.items(), start=1):
        ax = fig.add_subplot(1, len(groups), index)
        ordered = sorted(values.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in ordered], [v for _, v in ordered], color="#4a78c2")
        ax.set(title=name, xlabel=xlabel)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def _write_plots(out: Path, summary: dict, curves: dict) -> dict[str, Path]:
    plots = {}
    if any(curves.values()):
        plots["curves"] = out / "plot_curves.png"
        _plot_curves(curves, plots["curves"])
    vqa = summary.get("vqa", {})
    groups = {k.replace("per_", "per "): vqa[k] for k in ("per_answer_type", "per_question_type") if vqa.get(k)}
    if groups:
        plots["accuracy_by_type"] = out / "plot_accuracy_by_type.png"
        _plot_bars(groups, plots["accuracy_by_type"], "VQA accuracy by type", "accuracy %")
    per_category = summary.get("safety", {}).get("per_category", {})
    rates = {label: {cat: 100 * g[key] for cat, g in per_category.items() if g.get(key) is not None}
             for key, label in (("refusal_rate", "refusal"), ("over_refusal_rate", "over-refusal"))}
    rates = {label: values for label, values in rates.items() if values}
    if rates:
        plots["safety_by_category"] = out / "plot_safety_by_category.png"
        _plot_bars(rates, plots["safety_by_category"], "Safety by category", "% of items")
    return plots


def _render_markdown(summary: dict, gallery: list[dict], plots: dict[str, Path]) -> str:
    lines = ["# Evaluation report", ""] + [f"- **{label}**: {value}" for label, value in _headline(summary)]
    for title, body in _sections(summary, html=False):
        lines += ["", f"## {title}", "", body]
    examples = _examples(summary, html=False)
    if examples:
        lines += ["", "## Safety examples", "", examples]
    lines += ["", "## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots.items()]
    rows = [[str(g.get("id", i)), str(g.get("question", "")), str(g.get("answer", "")),
             _reference_counts(g.get("references", [])), f"{float(g.get('score', 0)):.2f}", str(g.get("tag", ""))]
            for i, g in enumerate(gallery)]
    lines += ["", "## Gallery", "", _table(["id", "question", "answer", "references", "score", "tag"], rows, False)]
    return "\n".join(lines) + "\n"


def _render_html(summary: dict, gallery: list[dict], plots: dict[str, Path]) -> str:
    cards = "".join(f"<div class='metric'><b>{escape(v)}</b><span>{escape(k)}</span></div>" for k, v in _headline(summary))
    body = [f"<h1>Evaluation report</h1><div class='cards'>{cards}</div>"]
    body += [f"<h2>{escape(title)}</h2>{table}" for title, table in _sections(summary, html=True)]
    examples = _examples(summary, html=True)
    if examples:
        body.append(f"<h2>Safety examples</h2>{examples}")
    if plots:
        body.append("<h2>Plots</h2>")
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f"<img class='plot' alt='{escape(name)}' src='data:image/png;base64,{data}'>")
    if gallery:
        body.append(f"<h2>Gallery</h2>{_gallery_html(gallery)}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vlpost evaluation report</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n")


def write_report(out_dir: str | Path, summary: dict, gallery: list[dict],
                 curves: dict[str, list[tuple[int, float]]] | None = None) -> dict:
    """Write report.json, report.md, report.html and PNG plots into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = curves or {}
    plots = _write_plots(out, summary, curves)
    record = {"schema": REPORT_SCHEMA, "summary": summary,
              "gallery": [{**{k: v for k, v in item.items() if k != "image"}, "has_image": item.get("image") is not None}
                          for item in gallery],
              "curves": {name: [list(point) for point in points] for name, points in curves.items()},
              "plots": {name: path.name for name, path in plots.items()}}
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(record, indent=2, default=str) + "\n")
    paths["markdown"].write_text(_render_markdown(summary, gallery, plots))
    paths["html"].write_text(_render_html(summary, gallery, plots))
    return {**{k: str(v) for k, v in paths.items()}, "plots": {k: str(v) for k, v in plots.items()}}


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """Dotted name -> number for every numeric leaf, skipping per-item lists and examples."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key in ("examples", "per_question", "missing"):
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _item_scores(report: dict) -> dict[str, dict]:
    """id -> {score (0..1), question, answer}: from vqa.per_question, then gallery items with an id."""
    summary = report.get("summary", report)
    per_question = summary.get("vqa", summary).get("per_question", {})  # report.json or a bare score file
    items = {str(qid): {"score": pct / 100} for qid, pct in per_question.items()}
    for item in report.get("gallery", []):
        if "id" in item:
            items[str(item["id"])] = {"score": float(item.get("score", 0.0)), "question": item.get("question"),
                                      "answer": item.get("answer")}
    return items


def compare_reports(report_a: dict, report_b: dict, threshold: float = RIGHT_THRESHOLD) -> dict:
    """Per-metric deltas (b - a) and the items that flip right/wrong between two report.json dicts."""
    flat_a, flat_b = _flatten(report_a.get("summary", report_a)), _flatten(report_b.get("summary", report_b))
    metrics = []
    for name in sorted(set(flat_a) | set(flat_b)):
        a, b = flat_a.get(name), flat_b.get(name)
        metrics.append({"name": name, "a": a, "b": b, "delta": None if a is None or b is None else b - a})
    items_a, items_b = _item_scores(report_a), _item_scores(report_b)
    shared = sorted(set(items_a) & set(items_b))
    flips: dict[str, list[dict]] = {"became_right": [], "became_wrong": []}
    for item_id in shared:
        right_a, right_b = items_a[item_id]["score"] >= threshold, items_b[item_id]["score"] >= threshold
        if right_a != right_b:
            flips["became_right" if right_b else "became_wrong"].append(
                {"id": item_id, "question": items_b[item_id].get("question") or items_a[item_id].get("question"),
                 "answer_a": items_a[item_id].get("answer"), "answer_b": items_b[item_id].get("answer"),
                 "score_a": items_a[item_id]["score"], "score_b": items_b[item_id]["score"]})
    return {"metrics": metrics, "flips": flips, "num_shared_items": len(shared), "threshold": threshold}


def _scored(answer: str | None, score: float) -> str:
    return f"{score:.2f}" if answer is None else f"“{answer}” ({score:.2f})"


def comparison_markdown(comparison: dict, only_changed: bool = True) -> str:
    """Markdown view of compare_reports: changed metrics first by size, then flipped items."""
    def number(value):
        return "–" if value is None else f"{value:.4g}"

    metrics = [m for m in comparison["metrics"] if not only_changed or m["delta"] != 0]
    metrics.sort(key=lambda m: -abs(m["delta"]) if m["delta"] is not None else 0)
    rows = [[m["name"], number(m["a"]), number(m["b"]),
             "–" if m["delta"] is None else f"{m['delta']:+.4g}"] for m in metrics]
    lines = ["# Run comparison (B − A)", "", _table(["metric", "A", "B", "delta"], rows, html=False), "",
             f"{comparison['num_shared_items']} items in both runs (right = score ≥ {comparison['threshold']})."]
    for bucket, title in (("became_right", "Wrong in A, right in B"), ("became_wrong", "Right in A, wrong in B")):
        flipped = comparison["flips"][bucket]
        lines += ["", f"## {title} ({len(flipped)})", ""]
        lines += [f"- {f['id']}{': ' + f['question'] if f['question'] else ''} — "
                  f"A {_scored(f['answer_a'], f['score_a'])}, B {_scored(f['answer_b'], f['score_b'])}" for f in flipped]
    return "\n".join(lines) + "\n"
