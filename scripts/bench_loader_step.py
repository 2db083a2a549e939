"""Loader vs model step, side by side: is the data path ever the bottleneck of a training step?

For the tiny config and a demo-sized model (random init at the demo's sizes), it writes synthetic SFT shards,
then times (a) the real training data path — ShardStream → ChatEncoder → the tower's transform → collate — and
(b) model steps (forward + backward + AdamW) on those same batches, and prints samples/s for both and the
loader's share of a step (loader time / (loader + step) when they run one after the other, num_workers=0).
    python scripts/bench_loader_step.py [--batches 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vlpost.config import LMConfig, ModelConfig, ProjectorConfig, SFTConfig, VisionConfig, load_config
from vlpost.data.chat import ChatEncoder
from vlpost.data.pipeline import BatchStream, ExampleEncoder
from vlpost.data.shards import ShardStream, write_shards
from vlpost.data.synthetic import SyntheticWorld
from vlpost.model.tokenizer import train_bpe_tokenizer
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.freeze import apply_freeze
from vlpost.train.sft_objective import SFTObjective

ROOT = Path(__file__).resolve().parents[1]


def presets(tokenizer_dir: str) -> dict[str, tuple[ModelConfig, int, int]]:
    """name → (model config, image size, batch size)."""
    tiny = load_config(SFTConfig, ROOT / "configs/sft/tiny.yaml")
    tiny.model.lm.tokenizer = tokenizer_dir
    demo = ModelConfig(vision=VisionConfig(name="vlpost-demo-vit"), projector=ProjectorConfig(type="pixel_shuffle"),
                       lm=LMConfig(tokenizer=tokenizer_dir, hidden_size=128, num_layers=4, num_heads=4,
                                   num_kv_heads=2, intermediate_size=384))
    return {"tiny": (tiny.model, tiny.data.image_size, tiny.train.batch_size), "demo-size": (demo, 64, 32)}


def measure(model_cfg: ModelConfig, shards: Path, batch_size: int, batches: int) -> dict:
    model = VisionLanguageModel.build(model_cfg)
    apply_freeze(model, SFTConfig().freeze)
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image, max_length=512)
    stream = BatchStream(ShardStream(shards, loop=True), ExampleEncoder(encoder, model.image_transform),
                         batch_size=batch_size, pad_id=model.tokenizer.pad_token_id)
    iterator = iter(stream)
    next(iterator)  # warm-up: shard open, first decode
    start = time.perf_counter()
    loaded = [next(iterator) for _ in range(batches)]
    loader_s = time.perf_counter() - start
    objective, optimizer = SFTObjective(), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.train()
    for batch in loaded[:2]:  # warm-up steps
        objective(model, batch)[0].backward()
    start = time.perf_counter()
    for batch in loaded:
        loss, _ = objective(model, batch)
        (loss / max(objective.count(batch), 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    samples = batches * batch_size
    return {"loader_samples_per_s": samples / loader_s, "step_samples_per_s": samples / step_s,
            "loader_share": loader_s / (loader_s + step_s), "tokens_per_image": model.tokens_per_image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        world = SyntheticWorld(seed=0, image_size=64)
        train_bpe_tokenizer(world.text_corpus(3000), vocab_size=1024).save_pretrained(Path(tmp) / "tok")
        for name, (model_cfg, image_size, batch_size) in presets(str(Path(tmp) / "tok")).items():
            shards = Path(tmp) / f"shards-{image_size}"
            if not shards.exists():
                records = SyntheticWorld(seed=0, image_size=image_size).records("sft", batch_size * (args.batches + 1))
                write_shards(records, shards, "sft", "bench_loader_step", progress=False)
            results[name] = measure(model_cfg, shards, batch_size, args.batches)
    print(f"\n{'config':<10} {'tok/img':>7} {'loader samples/s':>17} {'step samples/s':>15} {'loader share':>13}")
    for name, row in results.items():
        print(f"{name:<10} {row['tokens_per_image']:>7} {row['loader_samples_per_s']:>17.0f} "
              f"{row['step_samples_per_s']:>15.0f} {row['loader_share']:>12.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
