"""Loader throughput: ShardStream decode + torchvision to-tensor, in samples/s, for several worker counts.

Writes synthetic-looking samples (smooth random images + text) to a temporary shard folder per image
size and format, then times one full pass through `stream.loader(...)`. Run:
    python scripts/bench_loader.py --num-samples 1000 --workers 0 2
"decode" = tar read + JSON + schema check + full image decode; "uint8" adds a uint8 (3, H, W) tensor
per sample (normalise per batch later); "to-tensor" adds torchvision v2 ToImage/ToDtype/Normalize
per sample. Both stack a (B, 3, H, W) batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from vlpost.data.records import Record
from vlpost.data.shards import ShardStream, write_shards

CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


def synthetic_records(count: int, size: int, seed: int = 0):
    """Photo-like images: a small random grid upsampled (smooth, so PNG/JPEG compress realistically)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        question = f"<image>\nWhat is in region {i % 17}? Describe the colours and shapes you can see."
        sample = {"kind": "sft", "meta": {"id": f"bench-{i}", "source": "bench"},
                  "messages": [{"role": "user", "content": question},
                               {"role": "assistant", "content": "A smooth blend of colours. " * 4}]}  # fmt: skip
        yield Record(f"bench-{i:07d}", sample, image)


class ToTensor:
    """(sample, PIL image) -> (sample, normalised float tensor (3, H, W)); runs inside loader workers."""

    def __init__(self) -> None:
        self.transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(CLIP_MEAN, CLIP_STD)])  # fmt: skip

    def __call__(self, sample: dict, image: Image.Image) -> tuple[dict, torch.Tensor]:
        return sample, self.transform(image)


class ToUint8:
    """(sample, PIL image) -> (sample, uint8 tensor (3, H, W)); normalise later, per batch (e.g. on GPU)."""

    def __call__(self, sample: dict, image: Image.Image) -> tuple[dict, torch.Tensor]:
        return sample, torch.from_numpy(np.array(image)).permute(2, 0, 1)


def collate(items: list) -> tuple[list[dict], torch.Tensor]:
    samples, images = zip(*items, strict=True)
    return list(samples), torch.stack(images)  # (B, 3, H, W)


def decoded(items: list) -> tuple[list[dict], torch.Tensor]:
    """Decode-only baseline: PIL images stay PIL; a dummy tensor keeps the batch shape bookkeeping."""
    return [sample for sample, _ in items], torch.empty(len(items), 3)


PIPELINES = {"decode": (None, decoded), "uint8": (ToUint8, collate), "to-tensor": (ToTensor, collate)}


def time_pass(path: Path, num_workers: int, batch_size: int, pipeline: str) -> tuple[float, float, int]:
    """(samples/s after the first batch, seconds to the first batch, samples) over one epoch."""
    transform, collate_fn = PIPELINES[pipeline]
    stream = ShardStream(path, seed=0, transform=transform() if transform else None)
    loader = stream.loader(batch_size, collate_fn=collate_fn, num_workers=num_workers)
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_batch_s = time.perf_counter() - start
    steady_start, seen = time.perf_counter(), 0
    for _, images in iterator:
        seen += images.shape[0]
    elapsed = time.perf_counter() - steady_start
    assert first[1].shape[1] == 3 and stream.stats["skipped"] == {}, stream.stats
    return seen / max(elapsed, 1e-9), first_batch_s, seen + first[1].shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--formats", nargs="+", default=["png", "jpg"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loader, not intra-op threads, is what we measure
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for size in args.sizes:
            for image_format in args.formats:
                path = Path(tmp) / f"{size}-{image_format}"
                start = time.perf_counter()
                index = write_shards(synthetic_records(args.num_samples, size), path, "sft", "bench_loader",
                                     max_samples=1000, image_format=image_format, progress=False)  # fmt: skip
                write_rate = args.num_samples / (time.perf_counter() - start)
                kib = sum(s["bytes"] for s in index["shards"]) / args.num_samples / 1024
                for workers in args.workers:
                    for step in args.pipelines:
                        rate, first_s, seen = time_pass(path, workers, args.batch_size, step)
                        rows.append((size, image_format, kib, write_rate, workers, step, rate, first_s, seen))
    print(f"\n{'size':>5} {'fmt':>4} {'KiB/sample':>10} {'write/s':>8} {'workers':>7} {'pipeline':>9} "
          f"{'samples/s':>9} {'first batch s':>13} {'samples':>7}")  # fmt: skip
    for size, fmt, kib, write_rate, workers, step, rate, first_s, seen in rows:
        print(f"{size:>5} {fmt:>4} {kib:>10.1f} {write_rate:>8.0f} {workers:>7} {step:>9} {rate:>9.0f} "
              f"{first_s:>13.3f} {seen:>7}")  # fmt: skip


if __name__ == "__main__":
    main()
