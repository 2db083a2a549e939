"""`vlpost prepare`: stream a converter (vlpost.data.formats) into WebDataset shards and print a summary."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlpost.data.formats import FORMATS, convert, get_format, sample_kind
from vlpost.data.records import Record, Skip

# Options recorded in index.json's `command` (flag = --dest-with-dashes).
OPTION_DESTS = ("images", "out", "kind", "annotations", "rejected_from", "split", "num", "seed", "image_size",
                "max_samples_per_shard", "max_shard_bytes", "image_format", "limit", "overwrite")
SHOW_SKIPPED = 5  # skipped ids listed in the summary


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vlpost prepare` (the lead adds `vlpost audit` beside it)."""
    formats = "\n".join(f"  {name:15s} {spec.help}" for name, spec in FORMATS.items())
    parser = subparsers.add_parser(
        "prepare", help="convert a public dataset or the synthetic world into shards",
        description=f"Convert records into WebDataset shards + index.json.\n\nformats:\n{formats}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", choices=list(FORMATS), metavar="FORMAT", help="one of: " + ", ".join(FORMATS))
    parser.add_argument("input", nargs="?", default="-", metavar="INPUT",
                        help="the dataset file (or parquet folder); '-' or nothing for synthetic")
    parser.add_argument("--images", type=Path, help="folder the records' image paths are relative to")
    parser.add_argument("--out", type=Path, required=True, help="shard folder to write")
    parser.add_argument("--kind", help="sample kind to write, for formats offering several (default: the first)")
    parser.add_argument("--annotations", type=Path, help="vqav2: the annotations JSON (answers)")
    parser.add_argument("--rejected-from", type=Path,
                        help="vlguard --kind preference: JSON {id: compliant answer} used as rejected for unsafe instructions")
    parser.add_argument("--split", choices=("train", "eval"), help="meta.split (synthetic: eval = held-out sets)")
    parser.add_argument("--num", type=int, help="synthetic: number of samples (default 1000)")
    parser.add_argument("--seed", type=int, help="synthetic: world seed (default 0)")
    parser.add_argument("--image-size", type=int, help="synthetic: image side in pixels (default 64)")
    parser.add_argument("--max-samples-per-shard", type=int, help="samples per tar (default 10000)")
    parser.add_argument("--max-shard-bytes", type=float, help="bytes per tar (default 3e9)")
    parser.add_argument("--image-format", choices=("png", "jpg"), help="image encoding in the tars (default png)")
    parser.add_argument("--limit", type=int, help="stop after writing this many samples")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="log why each record was skipped")
    parser.set_defaults(func=run_prepare)


def command_line(args: argparse.Namespace) -> str:
    """The command as a user would retype it, recorded in index.json."""
    parts = ["vlpost", "prepare", args.format]
    if args.input not in (None, "-"):
        parts.append(str(args.input))
    for dest in OPTION_DESTS:
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def limit_records(records: Iterable[Record | Skip], limit: int | None) -> Iterator[Record | Skip]:
    """Pass records through until `limit` samples (not skips) have gone by."""
    written = 0
    for item in records:
        if limit is not None and written >= limit:
            return
        written += isinstance(item, Record)
        yield item


def _check_paths(args: argparse.Namespace, needs_input: bool) -> str | None:
    """A message naming the first missing input, or None."""
    if needs_input and args.input in (None, "-"):
        return f"format {args.format!r} needs an INPUT file"
    if needs_input and not Path(args.input).exists():
        return f"INPUT {args.input} does not exist"
    for flag, path in (("--images", args.images), ("--annotations", args.annotations),
                       ("--rejected-from", args.rejected_from)):
        if path is not None and not path.exists():
            return f"{flag} {path} does not exist"
    return None


def _converter_options(args: argparse.Namespace, options: tuple[str, ...], kind: str) -> dict:
    opts = {name: getattr(args, name, None) for name in options}
    if "kind" in options:
        opts["kind"] = kind
    return opts


def _writer_options(args: argparse.Namespace) -> dict:
    names = {"max_samples_per_shard": "max_samples", "max_shard_bytes": "max_bytes", "image_format": "image_format"}
    opts = {target: getattr(args, dest) for dest, target in names.items() if getattr(args, dest) is not None}
    return {**opts, "overwrite": args.overwrite, "progress": _progress()}


def _progress() -> bool:
    """Progress bars only on a terminal: logs and tests stay clean."""
    return sys.stderr.isatty()


def _print_summary(result: dict, kind: str, out: Path, writer_reported: bool) -> None:
    skipped = result.get("skipped", [])
    if not writer_reported:  # with progress on, write_shards prints its own "wrote ..." line
        shards = result.get("shards")
        in_shards = f" in {len(shards)} shard(s)" if isinstance(shards, list) else ""
        print(f"wrote {result.get('num_samples', 0)} {kind} samples{in_shards} to {out}")
    if skipped:
        by_reason = Counter(item["reason"] for item in skipped)
        print(f"skipped {len(skipped)}: " + ", ".join(f"{reason} {n}" for reason, n in by_reason.most_common()))
        shown = ", ".join(f"{item['id']} ({item['reason']})" for item in skipped[:SHOW_SKIPPED])
        print(f"first skipped: {shown}" + (" ..." if len(skipped) > SHOW_SKIPPED else ""))


def run_prepare(args: argparse.Namespace) -> int:
    """Convert, write, summarise; exit 1 when the input is missing or every record was skipped."""
    spec = get_format(args.format)
    kind = args.kind or spec.kinds[0]
    if kind not in spec.kinds:
        return _fail(f"format {args.format!r} writes --kind {' | '.join(spec.kinds)}, not {kind!r}")
    problem = _check_paths(args, spec.needs_input)
    if problem:
        return _fail(problem)
    if args.verbose:
        _log_skip_details()
    from vlpost.data.shards import write_shards  # deferred: keeps `vlpost --help` light

    input_path = None if args.input in (None, "-") else Path(args.input)
    try:
        records = convert(args.format, input_path, args.images, **_converter_options(args, spec.options, kind))
        result = write_shards(limit_records(records, args.limit), args.out, sample_kind(kind), command_line(args),
                              **_writer_options(args))
    except (OSError, ValueError) as err:
        return _fail(str(err))
    _print_summary(result, sample_kind(kind), args.out, writer_reported=_progress())
    if not result.get("num_samples"):
        return _fail(f"no samples written: every record was skipped (see {args.out / 'index.json'})")
    return 0


def _log_skip_details() -> None:
    logger = logging.getLogger("vlpost.data.formats")
    logger.setLevel(logging.DEBUG)
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))


def _fail(message: str) -> int:
    print(f"vlpost prepare: error: {message}", file=sys.stderr)
    return 1
