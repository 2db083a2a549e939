"""`make demo`: every stage, chained through run dirs, on the synthetic world with tiny models.

Each step runs the real stage script with its real config (configs/<stage>/demo.yaml), as a user would.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(name: str, config: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "stages" / f"{name}.py"), "--config", str(ROOT / config), "--out", str(out), *extra]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--smoke", action="store_true", help="few steps: checks that every stage runs (CI)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        if not args.overwrite:
            print(f"{out} exists; pass --overwrite to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = ["--train.steps", "4"] if args.smoke else []
    started = time.perf_counter()
    report = {"align": run_stage("align", "configs/align/tiny.yaml", out / "align", steps)}
    report["sft"] = run_stage("sft", "configs/sft/tiny.yaml", out / "sft",
                              [*steps, "--model.init_from", str(out / "align")])
    report["demo"] = {"seconds": round(time.perf_counter() - started, 1), "smoke": args.smoke}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("\nstage     steps  final loss  seconds")
    for stage in ("align", "sft"):
        row = report[stage]
        print(f"{stage:<9} {row['steps']:>5}  {row['final_loss']:>10.4f}  {row['wall_seconds']:>7.1f}")
    print(f"\nreport: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
