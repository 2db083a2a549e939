"""Run dirs: refuse to clobber another run, record config, git commit and environment versions."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from vlpost.config import dump_config
from vlpost.constants import CONFIG_FILE, METRICS_FILE, RUN_META_FILE

RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, RUN_META_FILE, "checkpoints")
PACKAGES = ("torch", "transformers", "open_clip_torch", "accelerate", "peft", "deepspeed", "webdataset", "vlpost")


def prepare_run_dir(out: str | Path, *, resume: bool = False, overwrite: bool = False, is_main: bool = True) -> Path:
    """Create `out`; an existing run there is an error unless --resume (continue it) or --overwrite (replace it)."""
    out = Path(out)
    holds_run = out.is_dir() and any((out / marker).exists() for marker in RUN_MARKERS)
    if holds_run and not (resume or overwrite):
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it "
            "(or choose another --out)"
        )
    if resume and not holds_run:
        raise FileNotFoundError(f"--resume given but {out} holds no run to resume")
    if is_main:
        if overwrite and holds_run and not resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions, commit, command line and the CPU thread count: on CPU, runs of one config are bit-identical only
    at the same `torch_threads` (another count changes the order of float sums)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "git_commit": git_commit(), "argv": sys.argv, "torch_threads": torch.get_num_threads()}


def record_run(out: Path, cfg: object) -> None:
    """Write the resolved config and the environment next to the run's outputs."""
    dump_config(cfg, out / CONFIG_FILE)
    (out / "environment.json").write_text(json.dumps(environment(), indent=2))
