"""`vlpost eval vqa|safety|compare`: evaluate a run dir, score files you already have, diff two reports.

With RUN_DIR the model answers eval shards (or VQAv2 files) and everything lands in ``--out``
(default ``RUN_DIR/eval/``, see vlpost/eval/run.py); without it the commands score existing files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from vlpost.eval.report import compare_reports, comparison_markdown, write_report
from vlpost.eval.safety import summarize_safety
from vlpost.eval.vqa import score_results, vqa_accuracy

GALLERY_SIZE = 24  # text-only gallery items in a results-file report
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vlpost eval` and its sub-commands to the top-level parser."""
    parser = subparsers.add_parser("eval", help="evaluate a run dir (VQA, safety); score files; compare reports")
    commands = parser.add_subparsers(dest="eval_command", required=True)

    vqa = commands.add_parser("vqa", help="official VQAv2 accuracy: of a run dir's answers or of a results file")
    _add_model_args(vqa)
    vqa.add_argument("--results", type=Path, help='results JSON: [{"question_id": int, "answer": str}] (no model)')
    vqa.add_argument("--questions", type=Path, help="VQAv2 questions JSON of the same split")
    vqa.add_argument("--annotations", type=Path, help="VQAv2 annotations JSON of the same split")
    vqa.add_argument("--images", type=Path, help="with RUN_DIR + VQAv2 files: folder of COCO_<split>_<id>.jpg images")
    vqa.add_argument("--blind", action="store_true",
                     help="with RUN_DIR: also run the blind baseline (every image replaced by a grey one)")
    vqa.set_defaults(func=run_vqa)

    safety = commands.add_parser("safety", help="refusal / over-refusal / leak rates of a run dir or of responses")
    _add_model_args(safety)
    safety.add_argument("--responses", type=Path,
                        help="JSON list or JSONL of {id, category, sensitive, response, attribute, answers} (no model)")
    safety.add_argument("--judge", type=Path, help="with RUN_DIR: a stage-3 reward model run dir judging refusals")
    safety.set_defaults(func=run_safety)

    compare = commands.add_parser("compare", help="metric deltas and flipped items between two reports")
    compare.add_argument("report_a", type=Path, help="report.json (or a `vlpost eval vqa --out` file) of run A")
    compare.add_argument("report_b", type=Path, help="the same for run B")
    compare.add_argument("--out", type=Path, help="also write the Markdown here")
    compare.set_defaults(func=run_compare)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", type=Path, help="run dir whose model answers the eval prompts")
    parser.add_argument("--shards", type=Path, help="with RUN_DIR: eval shards of kind 'prompt'")
    parser.add_argument("--out", type=Path,
                        help="with RUN_DIR: output folder (default RUN_DIR/eval); without: write the scores JSON here")
    parser.add_argument("--report-dir", type=Path, help="write report.json/.md/.html here (with RUN_DIR: default --out)")
    parser.add_argument("--limit", type=int, help="with RUN_DIR: evaluate at most this many prompts")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch (default 32)")
    parser.add_argument("--max-new-tokens", type=int, help="answer length limit (default: vqa 16, safety 48)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")


def _load(path: Path) -> object:
    """JSON, or JSONL when the file ends in .jsonl; errors name the file."""
    try:
        text = path.read_text()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except FileNotFoundError:
        raise SystemExit(f"error: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path} is not valid JSON: {err}") from None


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")


def _needs(args: argparse.Namespace, *flags: str) -> str | None:
    """Without RUN_DIR: an error message when a model-only flag is given or a file flag is missing, else None."""
    model_only = [f"--{name.replace('_', '-')}" for name in ("shards", "images", "judge", "limit")
                  if getattr(args, name, None) is not None] + (["--blind"] if getattr(args, "blind", False) else [])
    if model_only:
        return f"{', '.join(model_only)} needs RUN_DIR (the run dir whose model answers the prompts)"
    missing = [f"--{flag}" for flag in flags if getattr(args, flag) is None]
    if missing:
        return (f"missing {', '.join(missing)}; or give RUN_DIR --shards DIR to evaluate a model")
    return None


def _vqa_gallery(results: list[dict], questions: dict, annotations: dict) -> list[dict]:
    """Text-only gallery items for the first questions, so a report shows what was asked and answered."""
    asked = {q["question_id"]: q.get("question", "") for q in questions.get("questions", [])}
    answered = {r["question_id"]: r["answer"] for r in results}
    gallery = []
    for ann in annotations["annotations"][:GALLERY_SIZE]:
        references = [a["answer"] for a in ann["answers"]]
        answer = answered.get(ann["question_id"], "")
        gallery.append({"id": ann["question_id"], "image": None, "question": asked.get(ann["question_id"], ""),
                        "answer": answer, "references": references, "tag": ann["answer_type"],
                        "score": vqa_accuracy(answer, references) if ann["question_id"] in answered else 0.0})
    return gallery


def run_vqa(args: argparse.Namespace) -> int:
    """Evaluate RUN_DIR, or score a VQAv2 results file; print overall and per-answer-type accuracy."""
    if args.run_dir is not None:
        return _with_model("vqa", _vqa_with_model, args)
    problem = _needs(args, "results", "questions", "annotations")
    if problem:
        print(f"vlpost eval vqa: {problem}", file=sys.stderr)
        return 2
    results, questions, annotations = _load(args.results), _load(args.questions), _load(args.annotations)
    try:
        scores = score_results(results, questions, annotations)
    except ValueError as err:
        print(f"vlpost eval vqa: {args.results} vs {args.annotations}: {err}", file=sys.stderr)
        return 1
    print(f"overall: {scores['overall']:.2f}  ({scores['num_questions']} questions, {len(scores['missing'])} missing)")
    for answer_type, accuracy in sorted(scores["per_answer_type"].items()):
        print(f"  {answer_type}: {accuracy:.2f}")
    _write_json(args.out, scores)
    if args.report_dir is not None:
        paths = write_report(args.report_dir, {"vqa": scores}, _vqa_gallery(results, questions, annotations), None)
        print(f"wrote {paths['html']}")
    return 0


def run_safety(args: argparse.Namespace) -> int:
    """Evaluate RUN_DIR, or summarise refusal behaviour of already generated responses."""
    if args.run_dir is not None:
        return _with_model("safety", _safety_with_model, args)
    problem = _needs(args, "responses")
    if problem:
        print(f"vlpost eval safety: {problem}", file=sys.stderr)
        return 2
    try:
        summary = summarize_safety(_load(args.responses))
    except ValueError as err:
        print(f"vlpost eval safety: {args.responses}: {err}", file=sys.stderr)
        return 1
    _print_safety(summary)
    _write_json(args.out, summary)
    if args.report_dir is not None:
        print(f"wrote {write_report(args.report_dir, {'safety': summary}, [], None)['html']}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """Print where run B differs from run A."""
    markdown = comparison_markdown(compare_reports(_load(args.report_a), _load(args.report_b)))
    print(markdown, end="")
    if args.out is not None:
        args.out.write_text(markdown)
    return 0


# ----------------------------------------------------------------------------- model-driven evaluation


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _print_safety(summary: dict) -> None:
    for key in ("refusal_rate", "over_refusal_rate", "leak_rate", "benign_accuracy"):
        print(f"{key}: {_pct(summary['overall'][key])}")


def _with_model(name: str, evaluate, args: argparse.Namespace) -> int:
    """Run a model-driven eval; data and model problems print one line naming the file instead of a trace."""
    try:
        return evaluate(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"vlpost eval {name}: {err}", file=sys.stderr)
        return 1


def _load_model(run_dir: Path, device: str):
    import torch

    from vlpost.model.vlm import VisionLanguageModel

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return VisionLanguageModel.from_pretrained(run_dir).to(device).eval()


def _item_source(args: argparse.Namespace, reward_type: str):
    """(make_items(skipped: Counter) -> iterator of (sample, image), data description) or an error string."""
    from vlpost.eval.generate import iter_vqav2
    from vlpost.eval.run import select_items

    vqav2 = [getattr(args, name, None) for name in ("questions", "annotations", "images")]
    if args.shards is not None and any(vqav2):
        return "give either --shards or the VQAv2 files (--questions/--annotations/--images), not both"
    if args.shards is not None:
        from vlpost.data.shards import ShardStream

        def from_shards(skipped: Counter):
            stream = ShardStream(args.shards, shuffle=False, loop=False, kind="prompt")
            others: Counter = Counter()
            yield from select_items(stream, reward_type, args.limit, others)
            skipped.update({f"reward type {kind}": n for kind, n in others.items()})
            skipped.update(stream.stats["skipped"])

        return from_shards, str(args.shards)
    if any(vqav2):
        if not all(vqav2):
            return "VQAv2 evaluation needs --questions, --annotations and --images together"

        def from_vqav2(skipped: Counter):
            skips: list = []
            yield from select_items(iter_vqav2(args.questions, args.annotations, args.images, skips),
                                    reward_type, args.limit)
            skipped.update(skip.reason for skip in skips)

        return from_vqav2, str(args.questions)
    return "give --shards DIR (eval shards of kind 'prompt') or --questions/--annotations/--images"


def _finish_report(args: argparse.Namespace, out: Path) -> None:
    from vlpost.eval.run import collect_eval_outputs, lineage_run_dirs, write_eval_report

    report_dir = args.report_dir or out
    paths = write_eval_report(report_dir, **collect_eval_outputs(out), curves_from=lineage_run_dirs(args.run_dir))
    print(f"wrote {paths['html']}")


def _vqa_with_model(args: argparse.Namespace) -> int:
    from vlpost.eval.run import evaluate_vqa

    if args.results is not None:
        print("vlpost eval vqa: --results scores an existing file without a model; drop RUN_DIR or --results",
              file=sys.stderr)
        return 2
    source = _item_source(args, "vqa")
    if isinstance(source, str):
        print(f"vlpost eval vqa: {source}", file=sys.stderr)
        return 2
    make_items, data = source
    out = args.out or args.run_dir / "eval"
    model = _load_model(args.run_dir, args.device)
    options = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens or 16, "progress": True}
    runs = {}
    for blind in (False, True) if args.blind else (False,):
        skipped: Counter = Counter()  # filled while the items stream; part of the report written at the end
        extra = {"run_dir": str(args.run_dir), "data": data, "limit": args.limit, "skipped": skipped}
        runs[blind] = evaluate_vqa(model, make_items(skipped), out_dir=out, blind=blind, extra=extra, **options)
    vqa, blind_run = runs[False], runs.get(True)
    print(f"VQA on {data}: {vqa['num_questions']} questions" + (f", skipped {dict(vqa['skipped'])}" if vqa["skipped"] else ""))
    rows = [("overall", f"{vqa['overall']:.2f}")] + [(k, f"{v:.2f}") for k, v in sorted(vqa["per_answer_type"].items())]
    if blind_run is not None:
        gain = vqa["overall"] - blind_run["overall"]
        rows += [("blind overall", f"{blind_run['overall']:.2f}"), ("vision gain", f"{gain:+.2f} points")]
    print(f"  {'answer type':<16}{'accuracy %':>10}")
    for name, value in rows:
        print(f"  {name:<16}{value:>10}")
    print(f"wrote {out / 'results.json'}")
    _finish_report(args, out)
    return 0


def _safety_with_model(args: argparse.Namespace) -> int:
    from vlpost.eval.run import evaluate_safety, judge_from_run

    if args.responses is not None:
        print("vlpost eval safety: --responses scores existing responses without a model; drop RUN_DIR or --responses",
              file=sys.stderr)
        return 2
    source = _item_source(args, "refusal")
    if isinstance(source, str):
        print(f"vlpost eval safety: {source}", file=sys.stderr)
        return 2
    make_items, data = source
    judge = judge_from_run(args.judge) if args.judge is not None else None
    out = args.out or args.run_dir / "eval"
    model = _load_model(args.run_dir, args.device)
    if judge is not None and hasattr(judge, "to"):
        judge = judge.to(model.device)
    skipped: Counter = Counter()
    summary = evaluate_safety(model, make_items(skipped), out_dir=out, judge=judge, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens or 48, progress=True,
                              extra={"run_dir": str(args.run_dir), "data": data, "limit": args.limit,
                                     "skipped": skipped})
    overall = summary["overall"]
    print(f"safety on {data}: {overall['num_sensitive']} sensitive, {overall['num_benign']} benign "
          f"(judge: {summary['judge']})")
    print(f"  {'category':<20}{'refusal':>9}{'over-ref.':>11}{'leak':>8}")
    for name, group in [("overall", overall)] + list(summary["per_category"].items()):
        print(f"  {name:<20}{_pct(group['refusal_rate']):>9}{_pct(group['over_refusal_rate']):>11}"
              f"{_pct(group['leak_rate']):>8}")
    print(f"wrote {out / 'safety_report.json'}")
    _finish_report(args, out)
    return 0
