"""Padding waste (% of batch positions that are padding) for random, length-grouped and packed batching.

Two length sets:
  (a) synthetic SFT: `SyntheticWorld(seed).records("sft", n)` encoded exactly as stage 2 encodes it
      (ChatEncoder, a BPE tokenizer trained on `world.text_corpus`, 64 tokens per image, demo max_length 160);
  (b) LLaVA-665k-like: lengths drawn from the modelled mixture in LLAVA_665K_MIX (documented below; assumed,
      not measured on the real file, which cannot be downloaded here).
Strategies (the batch is padded to its longest row, as pad_batch / packed_batch do):
  random          shuffled samples, B per batch
  length-grouped  vlpost.data.collate.length_grouped_batches (sort within mega-batches of 16·B)
  packed/batch    what BatchStream(packing=True) does today: each random batch of B is packed into rows of
                  max_length by pack_rows (first-fit decreasing)
  packed/buffer   pack_rows over a buffer of K samples into rows of `pack_length`, then batches holding the same
                  token budget (B · max_length) as a padded batch
Run:  .venv/bin/python scripts/bench_padding.py [--quick] [--json padding.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence

import numpy as np

from vlpost.constants import IGNORE_INDEX
from vlpost.data.collate import (
    Example,
    length_grouped_batches,
    pack_rows,
    packed_batch,
    pad_batch,
    padding_waste,
)

# LLaVA-1.5 mix665k by source (counts from the LLaVA-1.5 paper's data table), with the text-token length of
# one sample modelled as a lognormal: (samples, median text tokens, sigma, has a 576-token image).
# ASSUMED, not fitted: medians are chosen so that the whole mix has a mean of ~700 tokens including the image
# (public descriptions: "mean ~600-700 tokens incl. 576 image tokens, long tail to 2048"). Short-answer VQA
# sets are multi-turn (several QA pairs of one image merged into one conversation); ShareGPT is text-only
# and long. Every sample is truncated to 2048 tokens as LLaVA's model_max_length does.
LLAVA_IMAGE_TOKENS = 576
LLAVA_MAX_LENGTH = 2048
LLAVA_665K_MIX = {
    "llava_instruct (158k)": (158_000, 200, 0.6, True),
    "sharegpt text-only (40k)": (40_000, 600, 0.8, False),
    "short-answer VQA (332k: VQAv2, GQA, OKVQA, OCR-VQA, A-OKVQA, TextCaps)": (332_000, 80, 0.7, True),
    "region grounding (134k: RefCOCO, VG)": (134_000, 120, 0.6, True),
}
SYNTHETIC_TOKENS_PER_IMAGE = 64
SYNTHETIC_MAX_LENGTH = 160  # configs/sft/demo.yaml


# ---------------------------------------------------------------------- length sets


def synthetic_examples(n: int, seed: int, max_length: int) -> tuple[list[Example], int]:
    """Synthetic SFT samples encoded as stage 2 does; (examples, samples the encoder dropped)."""
    from vlpost.data.chat import ChatEncoder, SampleError
    from vlpost.data.synthetic import SyntheticWorld
    from vlpost.model.tokenizer import train_bpe_tokenizer

    world = SyntheticWorld(seed=seed)
    tokenizer = train_bpe_tokenizer(world.text_corpus(4000), vocab_size=1024)
    encoder = ChatEncoder(tokenizer, SYNTHETIC_TOKENS_PER_IMAGE, max_length=max_length)
    examples, dropped = [], 0
    for record in world.records("sft", n):
        sample_id = record.sample["meta"]["id"]
        try:
            encoded = encoder.encode(record.sample["messages"], sample_id=sample_id,
                                     num_images=int(record.image is not None))  # fmt: skip
        except SampleError:
            dropped += 1
            continue
        examples.append(Example(sample_id, encoded.input_ids, encoded.labels))
    return examples, dropped


def llava_like_lengths(n: int, seed: int) -> np.ndarray:
    """n lengths (image tokens included) drawn from LLAVA_665K_MIX, truncated at 2048."""
    rng = np.random.default_rng(seed)
    counts = np.array([spec[0] for spec in LLAVA_665K_MIX.values()], dtype=float)
    sources = rng.choice(len(counts), size=n, p=counts / counts.sum())
    lengths = np.empty(n, dtype=np.int64)
    for index, (_, median, sigma, has_image) in enumerate(LLAVA_665K_MIX.values()):
        chosen = sources == index
        text = np.maximum(1, np.round(rng.lognormal(np.log(median), sigma, chosen.sum())))
        lengths[chosen] = text + (LLAVA_IMAGE_TOKENS if has_image else 0)
    return np.minimum(lengths, LLAVA_MAX_LENGTH)


def length_stats(lengths: Sequence[int], max_length: int) -> dict:
    values = np.asarray(lengths)
    return {"samples": int(values.size), "mean": round(float(values.mean()), 1), "p50": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "max": int(values.max()),
            "at_max_length": round(float((values >= max_length).mean()), 4)}  # fmt: skip


# ---------------------------------------------------------------------- strategies (index batches)


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    return list(length_grouped_batches(lengths, batch_size, seed=seed))


def _as_examples(indices: Sequence[int], lengths: Sequence[int]) -> list[Example]:
    # pack_rows only needs len(); a range stands in for the ids without allocating them
    return [Example(str(i), range(lengths[i]), range(lengths[i])) for i in indices]  # type: ignore[arg-type]


def packed_per_batch(lengths: Sequence[int], batch_size: int, pack_length: int, seed: int) -> list[list[list[int]]]:
    """Each random batch of B samples packed into rows of pack_length: [batch][row][sample index]."""
    return [[[int(ex.id) for ex in row] for row in pack_rows(_as_examples(batch, lengths), pack_length)]
            for batch in random_batches(len(lengths), batch_size, seed)]  # fmt: skip


def packed_buffered(lengths: Sequence[int], buffer: int, pack_length: int, token_budget: int,
                    seed: int) -> list[list[list[int]]]:
    """pack_rows over shuffled buffers of `buffer` samples; batches of token_budget // pack_length rows."""
    rows_per_batch = max(1, token_budget // pack_length)
    order = random_batches(len(lengths), buffer, seed)
    batches = []
    for chunk in order:
        rows = [[int(ex.id) for ex in row] for row in pack_rows(_as_examples(chunk, lengths), pack_length)]
        batches += [rows[i : i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]
    return batches


# ---------------------------------------------------------------------- waste


def padded_waste(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> dict:
    """Each batch padded to its longest sample."""
    real = sum(lengths[i] for batch in batches for i in batch)
    total = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return {"waste": 1 - real / total, "batches": len(batches), "rows": sum(map(len, batches)), "real_tokens": real}


def packed_waste(batches: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int]) -> dict:
    """Each batch of packed rows padded to its longest row (as packed_batch does)."""
    real = total = rows = 0
    for batch in batches:
        fills = [sum(lengths[i] for i in row) for row in batch]
        real, total, rows = real + sum(fills), total + len(fills) * max(fills), rows + len(fills)
    return {"waste": 1 - real / total, "batches": len(batches), "rows": rows, "real_tokens": real}


def check_against_library(examples: list[Example], padded: list[list[int]], packed: list[list[list[int]]]) -> None:
    """The arithmetic above equals collate.padding_waste on real pad_batch / packed_batch tensors."""
    lengths = [len(ex) for ex in examples]
    padded, packed = padded[:20], packed[:5]
    real = padding_waste([pad_batch([examples[i] for i in batch], pad_id=0) for batch in padded])
    assert abs(real - padded_waste(padded, lengths)["waste"]) < 1e-9, "padded waste differs from the library"
    tensors = [packed_batch([[examples[i] for i in row] for row in batch], pad_id=0) for batch in packed]
    assert abs(padding_waste(tensors) - packed_waste(packed, lengths)["waste"]) < 1e-9, "packed waste differs"
    for batch in tensors:  # every real position carries a token whose label is either trained or IGNORE_INDEX
        assert int((batch["labels"] != IGNORE_INDEX).sum()) <= batch["real_tokens"]


def run_set(name: str, lengths: Sequence[int], batch_size: int, max_length: int, pack_lengths: Sequence[int],
            buffer: int, seed: int) -> dict:
    """Waste of every strategy on one length set."""
    results = {
        f"random (B={batch_size})": padded_waste(random_batches(len(lengths), batch_size, seed), lengths),
        f"length-grouped (B={batch_size}, mega 16B)": padded_waste(grouped_batches(lengths, batch_size, seed), lengths),
        f"packed/batch (B={batch_size} into rows of {max_length})":
            packed_waste(packed_per_batch(lengths, batch_size, max_length, seed), lengths),
    }  # fmt: skip
    for pack_length in pack_lengths:
        batches = packed_buffered(lengths, buffer, pack_length, batch_size * max_length, seed)
        results[f"packed/buffer ({buffer} samples into rows of {pack_length})"] = packed_waste(batches, lengths)
    return {"name": name, "batch_size": batch_size, "max_length": max_length,
            "lengths": length_stats(lengths, max_length), "strategies": results}  # fmt: skip


def print_table(sets: list[dict]) -> None:
    print(f"{'length set':37s} {'strategy':52s} {'waste %':>8s} {'batches':>8s} {'rows':>7s}")
    for result in sets:
        stats = result["lengths"]
        label = f"{result['name']} (n={stats['samples']}, mean {stats['mean']:.0f})"
        for strategy, numbers in result["strategies"].items():
            print(f"{label:37s} {strategy:52s} {100 * numbers['waste']:8.2f} {numbers['batches']:8d} {numbers['rows']:7d}")
            label = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-samples", type=int, default=4000)
    parser.add_argument("--llava-samples", type=int, default=20000)
    parser.add_argument("--synthetic-batch-size", type=int, default=32, help="configs/sft/demo.yaml")
    parser.add_argument("--llava-batch-size", type=int, default=16, help="LLaVA-1.5 per-device SFT batch")
    parser.add_argument("--buffer", type=int, default=1024, help="samples per packing buffer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1000 synthetic and 5000 LLaVA-like samples")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args()
    if args.quick:
        args.synthetic_samples, args.llava_samples = 1000, 5000
    started = time.perf_counter()
    examples, dropped = synthetic_examples(args.synthetic_samples, args.seed, SYNTHETIC_MAX_LENGTH)
    synthetic_lengths = [len(ex) for ex in examples]
    check_against_library(examples, random_batches(len(examples), args.synthetic_batch_size, args.seed),
                          packed_per_batch(synthetic_lengths, args.synthetic_batch_size, SYNTHETIC_MAX_LENGTH, args.seed))
    synthetic = run_set("synthetic sft", synthetic_lengths, args.synthetic_batch_size, SYNTHETIC_MAX_LENGTH,
                        (SYNTHETIC_MAX_LENGTH, 1024), args.buffer, args.seed)  # fmt: skip
    synthetic["dropped_by_encoder"] = dropped
    llava = run_set("llava-665k-like", llava_like_lengths(args.llava_samples, args.seed).tolist(), args.llava_batch_size,
                    LLAVA_MAX_LENGTH, (LLAVA_MAX_LENGTH, 4096), args.buffer, args.seed)  # fmt: skip
    llava["model"] = {name: dict(zip(("samples", "median_text_tokens", "sigma", "image"), spec))
                      for name, spec in LLAVA_665K_MIX.items()}  # fmt: skip
    print_table([synthetic, llava])
    print(f"synthetic: {dropped} samples dropped by the encoder; lengths {synthetic['lengths']}")
    print(f"llava-665k-like lengths {llava['lengths']} (modelled; see LLAVA_665K_MIX)")
    print(f"({time.perf_counter() - started:.1f} s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"synthetic_sft": synthetic, "llava665k_like": llava}, handle, indent=1)


if __name__ == "__main__":
    main()
