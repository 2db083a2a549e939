"""`vlpost export RUN_DIR --to merged|llava-hf --out DIR`: hand a trained run to other tools.

merged:   LoRA adapters folded into the LM; a plain, self-contained vlpost run dir (no base-model reference).
llava-hf: a transformers LlavaForConditionalGeneration dir (CLIPVisionModel tower), when the tower converts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TARGETS = ("merged", "llava-hf")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a run dir: merged LoRA run dir or LLaVA-HF dir")
    parser.add_argument("run_dir", type=Path, help="a vlpost run dir (holds vlpost.json)")
    parser.add_argument("--to", choices=TARGETS, required=True, help="merged | llava-hf")
    parser.add_argument("--out", type=Path, required=True, help="output dir (must not hold files yet)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from vlpost.model.export import NotConvertible, export_llava_hf, export_merged

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} is not empty; choose a new dir", file=sys.stderr)
        return 2
    try:
        written = export_merged(args.run_dir, out) if args.to == "merged" else export_llava_hf(args.run_dir, out)
    except (NotConvertible, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} → {written} ({args.to})")
    return 0
