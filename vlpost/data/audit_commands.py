"""`vlpost audit SHARDS`: the pre-flight report (audit.json + audit.md) and a summary table on the console.

Exit code: 0, or 1 with --strict when a check blocks training; 2 when the audit itself cannot run
(no shard folder, no tokenizer, a bad run dir).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlpost.constants import IMAGE_TOKEN

BAR_WIDTH = 40
STRUCTURAL_NOTE = "structural checks only: no --model or --tokenizer, so no token lengths, truncation or label masks"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vlpost audit`."""
    parser = subparsers.add_parser(
        "audit", help="pre-flight report on a shard folder (no training, no model weights)",
        description="Read every sample once and report what would break or skew training.",
    )
    parser.add_argument("shards", type=Path, metavar="SHARDS", help="shard folder (with index.json)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, metavar="RUN_DIR",
                        help="run dir: its tokenizer and tokens_per_image (no weights are loaded)")
    source.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer dir (needs --tokens-per-image)")
    parser.add_argument("--tokens-per-image", type=int, metavar="N", help="image tokens per <image> (with --tokenizer)")
    parser.add_argument("--max-length", type=int, default=2048, metavar="N", help="training max_length (default 2048)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="report folder (default SHARDS/audit)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when anything blocks training")
    parser.add_argument("--limit", type=int, metavar="N", help="read at most N samples")
    parser.add_argument("--examples", type=int, default=5, metavar="N", help="example ids per problem (default 5)")
    parser.add_argument("--max-decode-failure-share", type=float, default=0.01, metavar="X",
                        help="decode failures above this share of samples block training (default 0.01)")
    parser.set_defaults(func=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    """Audit, write the reports, print the summary; see the module docstring for the exit code."""
    from vlpost.data.audit import AuditOptions, audit_shards  # deferred: keeps `vlpost --help` light

    try:
        tokenizer, tokens_per_image, source = load_token_source(args)
        options = AuditOptions(max_length=args.max_length, limit=args.limit, examples=args.examples,
                               max_decode_failure_share=args.max_decode_failure_share)  # fmt: skip
        report = audit_shards(args.shards, tokenizer, tokens_per_image, options)
    except (OSError, ValueError) as err:
        print(f"vlpost audit: error: {err}", file=sys.stderr)
        return 2
    report["settings"]["tokenizer"] = source
    out = args.out or args.shards / "audit"
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "audit.md").write_text(render_markdown(report), encoding="utf-8")
    print(render_summary(report))
    print(f"report: {out / 'audit.json'}, {out / 'audit.md'}")
    return 1 if args.strict and report["blocking"] else 0


def load_token_source(args: argparse.Namespace):
    """(tokenizer or None, tokens_per_image or None, where they came from) without loading any weights."""
    if args.model is not None:
        if args.tokens_per_image is not None:
            raise ValueError("--tokens-per-image comes from the run dir with --model; drop one of them")
        path, tokens_per_image = run_dir_tokenizer(args.model)
    elif args.tokenizer is not None:
        if args.tokens_per_image is None:
            raise ValueError("--tokenizer needs --tokens-per-image N (the projector's image tokens per image)")
        path, tokens_per_image = args.tokenizer, args.tokens_per_image
    else:
        if args.tokens_per_image is not None:
            raise ValueError("--tokens-per-image needs --tokenizer DIR")
        return None, None, None
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
    return with_image_token(_load_tokenizer(path)), tokens_per_image, str(path)


def run_dir_tokenizer(run_dir: Path) -> tuple[Path, int]:
    """The tokenizer dir and tokens_per_image a run dir's vlpost.json records."""
    from vlpost.model.checkpoint import read_spec

    spec = read_spec(run_dir)
    tokens_per_image = spec.get("tokens_per_image")
    if not isinstance(tokens_per_image, int):
        raise ValueError(f"{run_dir}/vlpost.json has no integer tokens_per_image; pass --tokenizer and --tokens-per-image")
    if spec.get("lm_dir"):
        return run_dir / spec["lm_dir"], tokens_per_image
    lm = spec.get("lm") or {}
    base = lm.get("tokenizer") or lm.get("path")  # projector-only run: the base LM's tokenizer
    if not base:
        raise ValueError(f"{run_dir}/vlpost.json names no lm_dir, lm.tokenizer or lm.path; pass --tokenizer")
    return Path(base), tokens_per_image


def _load_tokenizer(path: Path):
    from vlpost.model.lm import load_tokenizer  # deferred: transformers is slow to import

    return load_tokenizer(path)


def with_image_token(tokenizer):
    """Add `<image>` as load_lm would, so a base LM's tokenizer measures the lengths training will see."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return tokenizer


# ---------------------------------------------------------------------- rendering


def _status(entry: dict) -> str:
    if entry["blocking"]:
        return "BLOCKS"
    return "warn" if entry["count"] else "ok"


def render_summary(report: dict) -> str:
    """The short console table: one row per check, blocking ones first."""
    samples = report["samples"]
    head = f"audit of {report['shards']} ({report['kind']}): {samples['read']} samples read of {samples['listed']} listed"
    if report["mode"] == "structural":
        head += f"\n  {STRUCTURAL_NOTE}"
    else:
        settings = report["settings"]
        head += f"; max_length {settings['max_length']}, {settings['tokens_per_image']} tokens per image"
    rows = sorted(report["problems"].items(), key=lambda item: (not item[1]["blocking"], not item[1]["count"]))
    lines = [head, f"  {'check':24s} {'count':>7s}  status  examples"]
    for name, entry in rows:
        examples = ", ".join(entry["examples"][:3])
        lines.append(f"  {name:24s} {entry['count']:>7d}  {_status(entry):6s}  {examples}")
    verdict = "BLOCKED: " + ", ".join(report["blocking"]) if report["blocking"] else "ok: nothing blocks training"
    lines.append(f"  {verdict}")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """audit.md: the checks table, the token-length histogram, balance and refusal tables."""
    samples, settings = report["samples"], report["settings"]
    lines = [f"# Audit of `{report['shards']}`", "",
             f"Kind **{report['kind']}**; {samples['read']} samples read of {samples['listed']} listed "
             f"(limit {settings['limit']}).", "",
             "**Verdict: " + ("blocked by " + ", ".join(report["blocking"]) if report["blocking"] else "ok") + "**", ""]
    if report["mode"] == "structural":
        lines += [f"> {STRUCTURAL_NOTE}.", ""]
    else:
        lines += [f"Tokenizer `{settings.get('tokenizer')}`, {settings['tokens_per_image']} tokens per image, "
                  f"max_length {settings['max_length']}.", ""]
    lines += ["## Checks", "", "| check | count | status | what | examples |", "|---|---:|---|---|---|"]
    for name, entry in report["problems"].items():
        reasons = "; ".join(f"{r}: {n}" for r, n in entry.get("by_reason", {}).items())
        what = entry["what"] + (f" ({reasons})" if reasons else "")
        examples = ", ".join(f"`{e}`" for e in entry["examples"])
        lines.append(f"| {name} | {entry['count']} | {_status(entry)} | {what} | {examples} |")
    lines += _histogram_lines(report.get("token_lengths"))
    lines += _balance_lines(report["balance"])
    lines += _refusal_lines(report["refusals"])
    return "\n".join(lines) + "\n"


def _histogram_lines(lengths: dict | None) -> list[str]:
    if not lengths or not lengths["sequences"]:
        return []
    lines = ["", "## Token lengths (image tokens included)", "",
             f"{lengths['sequences']} sequences; mean {lengths['mean']} (image {lengths['image_tokens_mean']}, "
             f"text {lengths['text_tokens_mean']}), p50 {lengths['p50']:.0f}, p95 {lengths['p95']:.0f}, "
             f"max {lengths['max']}; {lengths['over_max_length']} over max_length {lengths['max_length']}.",
             "", "```"]
    top = max(bucket["count"] for bucket in lengths["buckets"]) or 1
    for bucket in lengths["buckets"]:
        label = f"{bucket['min']}-{bucket['max']}" if bucket["max"] is not None else f"> {bucket['min'] - 1}"
        bar = "#" * round(BAR_WIDTH * bucket["count"] / top)
        lines.append(f"{label:>13s} | {bar:<{BAR_WIDTH}s} {bucket['count']}")
    return lines + ["```"]


def _balance_lines(balance: dict) -> list[str]:
    lines = ["", "## Balance"]
    for name, counts in balance.items():
        total = sum(counts.values()) or 1
        lines += ["", f"| {name} | samples | share |", "|---|---:|---:|"]
        lines += [f"| {value} | {n} | {100 * n / total:.1f}% |" for value, n in counts.items()]
    return lines


def _refusal_lines(refusals: dict) -> list[str]:
    lines = []
    sft = refusals.get("sft")
    if sft:
        lines += ["", "## Refusals in assistant turns", "",
                  f"{sft['refusal_turns']} of {sft['assistant_turns']} assistant turns are refusals "
                  f"({100 * sft['share']:.1f}%), in {sft['samples_with_refusal']} samples.", "",
                  "| category | turns | refusals |", "|---|---:|---:|"]
        lines += [f"| {c} | {v['turns']} | {v['refusals']} |" for c, v in sft["by_category"].items()]
    pref = refusals.get("preference")
    if pref:
        lines += ["", "## Refusals in preference pairs", "",
                  f"{pref['pairs']} pairs: chosen is a refusal in {pref['chosen_refusals']}, "
                  f"rejected in {pref['rejected_refusals']}."]
    return lines
