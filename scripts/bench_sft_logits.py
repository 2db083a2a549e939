"""SFT step with the LM head on every position vs only on the positions that predict a trained label.

An SFT batch trains a small share of its positions (the assistant tokens; ~8% on the demo's SFT set), so
`SFTObjective` asks the model for logits at those positions only (`forward(logits_mask=...)`). This times
forward + backward both ways on the same batches, side by side, and checks the two losses agree.
    python scripts/bench_sft_logits.py [--preset demo-size|tiny] [--batches 6] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from vlpost.config import FreezeConfig, LMConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlpost.constants import IGNORE_INDEX
from vlpost.data.chat import ChatEncoder
from vlpost.data.synthetic import SyntheticWorld
from vlpost.model.tokenizer import train_bpe_tokenizer
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.freeze import apply_freeze
from vlpost.train.logprobs import label_positions, selected_nll_sum, sft_nll_sum

PRESETS = {  # name -> (tower, LM sizes, image size, batch size)
    "demo-size": ("vlpost-demo-vit", dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                          intermediate_size=384), 64, 32),
    "tiny": ("vlpost-tiny-vit", dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                     intermediate_size=64), 32, 4),
}


def batches(model, world: SyntheticWorld, count: int, batch_size: int) -> list[tuple]:
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image, max_length=160)
    records = list(world.records("sft", count * batch_size))
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        enc = [encoder.encode(r.sample["messages"], sample_id=r.key, num_images=int(r.image is not None)) for r in chunk]
        width = max(len(e) for e in enc)
        ids = torch.tensor([e.input_ids + [0] * (width - len(e)) for e in enc])
        labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e)) for e in enc])
        attention = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
        images = [r.image for r in chunk if r.image is not None]
        out.append((ids, attention, labels, model.pixel_values(images) if images else None))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo-size")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    tower, lm_sizes, image_size, batch_size = PRESETS[args.preset]
    world = SyntheticWorld(seed=0, image_size=image_size)
    with tempfile.TemporaryDirectory() as tmp:
        train_bpe_tokenizer(world.text_corpus(2000), vocab_size=2048).save_pretrained(tmp)
        torch.manual_seed(0)
        model = VisionLanguageModel.build(ModelConfig(vision=VisionConfig(name=tower),
                                                      projector=ProjectorConfig(type="pixel_shuffle"),
                                                      lm=LMConfig(tokenizer=tmp, **lm_sizes)))
    apply_freeze(model, FreezeConfig(lm="full"))
    data = batches(model, world, args.batches, batch_size)

    def all_positions(ids, attention, labels, pixels):
        return sft_nll_sum(model(ids, attention, pixel_values=pixels).logits, labels)[0]

    def label_only(ids, attention, labels, pixels):
        mask, targets = label_positions(labels)
        return selected_nll_sum(model(ids, attention, pixel_values=pixels, logits_mask=mask).logits, targets)

    losses = [(all_positions(*b).item(), label_only(*b).item()) for b in data]
    agree = max(abs(a - b) / max(1.0, abs(a)) for a, b in losses)
    times = {"all_positions": [], "label_positions": []}
    model.train()
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits both sides
        for name, fn in (("all_positions", all_positions), ("label_positions", label_only)):
            start = time.perf_counter()
            for b in data:
                fn(*b).backward()
                model.zero_grad(set_to_none=True)
            times[name].append((time.perf_counter() - start) / len(data))
    best = {k: min(v) for k, v in times.items()}
    trained = sum(int((b[2][:, 1:] != IGNORE_INDEX).sum()) for b in data) / sum(b[0].numel() for b in data)
    result = {"preset": args.preset, "trained_share": round(trained, 4), "loss_rel_diff": agree,
              "ms_per_step": {k: round(v * 1000, 1) for k, v in best.items()},
              "speedup": round(best["all_positions"] / best["label_positions"], 3)}
    print(f"{args.preset}: trained positions {trained:.1%} of the batch; losses agree to {agree:.1e} (relative)")
    print(f"  all positions   {result['ms_per_step']['all_positions']:8.1f} ms/step")
    print(f"  label positions {result['ms_per_step']['label_positions']:8.1f} ms/step   speedup {result['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
