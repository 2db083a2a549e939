"""Stage 3 with rank 1's data text-only (`accelerate launch ... stage3_driver.py OUT INIT_RUN_DIR KIND`).

KIND: `dpo-cache` (full LM, disk-cached reference), `dpo-adapter` (LoRA, the adapter-disabled policy with the
policy's frozen projector as reference) or `grpo` (full LM, projector trains, copy reference). Odd items lose
their image, and with 2 processes and no shuffle they are exactly rank 1's share: under ZeRO-3 every rank must
still run the tower / projector in the same order (they gather shards in collectives), or training hangs.
`run(..., world_size=1)` is the same global batch in one process. The main process writes `history.json`.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed

from vlpost.config import FreezeConfig, TrainConfig
from vlpost.constants import IMAGE_TOKEN
from vlpost.data.pipeline import ListSource, records_to_items
from vlpost.data.synthetic import SyntheticWorld
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.dpo_config import DPOLossConfig
from vlpost.train.freeze import apply_freeze
from vlpost.train.trainer import Trainer, make_accelerator

PAIRS_PER_STEP, STEPS = 4, 2


def text_only_odd(items: list) -> list:
    """Items with every odd one's image removed (and its <image> placeholder)."""
    out = []
    for i, (sample, image) in enumerate(items):
        if i % 2:
            sample = copy.deepcopy(sample)
            for message in sample["prompt"]:
                message["content"] = message["content"].replace(IMAGE_TOKEN, "").strip()
            image = None
        out.append((sample, image))
    return out


def run(out: Path, init_dir: str | Path, kind: str, world_size: int) -> list[dict]:
    out = Path(out)
    set_seed(0)
    grpo = kind == "grpo"
    cfg = TrainConfig(steps=STEPS, batch_size=PAIRS_PER_STEP * (2 if grpo else 1) // world_size, lr=1e-3,
                      log_every=1, report_to="none", grad_accum=2 if grpo else 1)
    accelerator = make_accelerator(cfg, out)
    if accelerator.num_processes != world_size:
        raise SystemExit(f"expected {world_size} processes, got {accelerator.num_processes}")
    rank = accelerator.process_index
    freeze = FreezeConfig(lm="lora" if kind == "dpo-adapter" else "full", lora_r=4,
                          projector="train" if grpo else "frozen")
    model = VisionLanguageModel.from_pretrained(init_dir)
    apply_freeze(model, freeze)
    world = SyntheticWorld(seed=0, image_size=32)
    if grpo:
        trainer = _grpo_trainer(model, world, cfg, out, accelerator, rank, world_size)
    else:
        trainer = _dpo_trainer(model, world, cfg, out, accelerator, rank, world_size, kind, freeze)
    trainer.fit()
    if accelerator.is_main_process:
        (out / "history.json").write_text(json.dumps(trainer.history, default=float))
    accelerator.wait_for_everyone()
    return trainer.history


def _dpo_trainer(model, world, cfg, out, accelerator, rank, world_size, kind, freeze):
    from vlpost.train.preference import DPOObjective, pair_stream
    from vlpost.train.reference import build_reference

    items = text_only_odd(records_to_items(world.records("preference", 16)))

    def pairs(loop: bool):
        source = ListSource(items, shuffle=False, loop=loop, rank=rank, world_size=world_size)
        return pair_stream(source, model, batch_size=cfg.batch_size, max_length=256)

    dpo = DPOLossConfig(reference="cache" if kind == "dpo-cache" else "adapter", cache_dir=str(out / "cache"))
    reference, _ = build_reference(dpo, freeze, model, accelerator=accelerator, data_name="text-only-odd",
                                   precompute_batches=lambda: pairs(False))
    return Trainer(model, pairs(True), DPOObjective(dpo, reference), cfg, out, accelerator, stage="dpo")


def _grpo_trainer(model, world, cfg, out, accelerator, rank, world_size):
    from vlpost.train.grpo import GRPOObjective, build_reference, loss_settings
    from vlpost.train.grpo_batches import GRPOBatches
    from vlpost.train.grpo_config import GRPOLossConfig, RolloutConfig
    from vlpost.train.rollout import build_engine
    from vlpost.train.zero import whole_model

    items = text_only_odd(records_to_items(world.records("prompt", 16)))
    source = ListSource(items, shuffle=False, loop=True, rank=rank, world_size=world_size)
    loss = GRPOLossConfig(loss="dapo", overlong_cache=12, num_iterations=2, beta=0.04)
    rollout = RolloutConfig(group_size=4, max_new_tokens=16, temperature=1.0, stop=["e"])
    settings = loss_settings(loss, rollout)
    with whole_model(model, accelerator):
        reference = build_reference(model, loss)
    batches = GRPOBatches(model, source, build_engine("hf", model), settings, rollout, batch_size=cfg.batch_size,
                          grad_accum=cfg.grad_accum, num_iterations=loss.num_iterations, reference=reference,
                          gather=lambda: whole_model(model, accelerator))
    return Trainer(model, batches, GRPOObjective(settings), cfg, out, accelerator, stage="grpo")


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2], sys.argv[3], world_size=2)
    torch.distributed.destroy_process_group()
    # Skip interpreter finalization: in about 1 launch in 10 a gloo worker thread frees a finished all-gather
    # there, cannot take the GIL and aborts the process (README, "Known on CPU") after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
