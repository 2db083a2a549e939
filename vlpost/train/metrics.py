"""Step metrics: metrics.jsonl (the source of truth), accelerate trackers (TensorBoard / W&B), PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from vlpost.constants import METRICS_FILE


class MetricsLogger:
    """Appends one JSON row per logged step on the main process and forwards it to accelerate trackers."""

    def __init__(self, out_dir: Path, accelerator=None, stage: str = ""):
        self.path = Path(out_dir) / METRICS_FILE
        self.accelerator, self.stage = accelerator, stage
        self.is_main = accelerator is None or accelerator.is_main_process

    def log(self, step: int, values: dict) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        if self.is_main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(run_dir: str | Path, keys: tuple[str, ...] = ("loss", "lr"), out_name: str = "curves.png") -> Path | None:
    """One PNG with a panel per metric key found in metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.5)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / out_name
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
