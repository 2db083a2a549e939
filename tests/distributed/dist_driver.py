"""Multi-process training driver for tests/distributed (`accelerate launch ... dist_driver.py OUT INIT_RUN_DIR`).

Starts from a saved run dir (under ZeRO-3 transformers builds the LM partitioned, so a random init would
differ from the one-process reference; loading weights does not). Trains a tiny stage-2 model (full LM + projector) on a fixed, unshuffled set where rank 1's first batch is
text-only, checkpoints, saves the run dir with `finish_run` (gathering ZeRO-3 partitions) and writes the
logits of a probe batch computed by the trained, still-wrapped model. `train_reference` is the same run in
one process with the same global batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from vlpost.config import (
    FreezeConfig,
    LMConfig,
    ModelConfig,
    ProjectorConfig,
    StageConfig,
    TrainConfig,
    VisionConfig,
)
from vlpost.data.chat import ChatEncoder
from vlpost.data.collate import pad_batch
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.freeze import apply_freeze
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.stage import Run, finish_run
from vlpost.train.trainer import Trainer, make_accelerator

TEXT_ONLY = {1, 3}  # with 2 ranks and no shuffle, rank 1's first micro-batch is items 1 and 3
ANSWERS = ["red", "a blue square", "two", "the left person holds a cup", "no", "green"]
MICRO_BATCH, GRAD_ACCUM, STEPS = 2, 2, 3


def items(n: int = 24) -> list:
    out = []
    for i in range(n):
        image = None if i in TEXT_ONLY else Image.new("RGB", (32, 32), (10 * i, 200 - 7 * i, 90))
        sample = {"kind": "sft", "meta": {"id": f"d{i}"}, "messages": [
            {"role": "user", "content": ("" if image is None else "<image>\n") + f"Question {i}?"},
            {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]}
        out.append((sample, image))
    return out


def make_init(init_dir: Path, tokenizer_dir: str) -> Path:
    """A tiny random model saved as the run dir every process starts from."""
    torch.manual_seed(0)
    model = VisionLanguageModel.build(ModelConfig(
        vision=VisionConfig(name="vlpost-tiny-vit"), projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=LMConfig(tokenizer=tokenizer_dir, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64)))
    model.save_pretrained(init_dir)
    return init_dir


def build_model(init_dir: str | Path) -> VisionLanguageModel:
    model = VisionLanguageModel.from_pretrained(init_dir)
    apply_freeze(model, FreezeConfig(lm="full"))
    return model


def train_config(world_size: int) -> TrainConfig:
    """The same global batch (micro × accumulation × ranks = 8) whatever the number of processes."""
    return TrainConfig(steps=STEPS, batch_size=MICRO_BATCH * 2 // world_size, grad_accum=GRAD_ACCUM, lr=1e-2,
                       warmup_ratio=0.34, max_grad_norm=1.0, log_every=1, save_every=2, report_to="none")


def stream(model, rank: int, world_size: int, batch_size: int) -> BatchStream:
    encoder = ExampleEncoder(ChatEncoder(model.tokenizer, model.tokens_per_image), model.image_transform)
    source = ListSource(items(), shuffle=False, loop=True, rank=rank, world_size=world_size)
    return BatchStream(source, encoder, batch_size=batch_size, pad_id=model.tokenizer.pad_token_id)


def probe_batch(model) -> dict:
    encoder = ExampleEncoder(ChatEncoder(model.tokenizer, model.tokens_per_image), model.image_transform)
    return pad_batch([encoder(s, im) for s, im in items(6)], model.tokenizer.pad_token_id)


def train_reference(out: Path, init_dir: str | Path) -> Trainer:
    """One process, same global batch: what the multi-process run must reproduce."""
    model = build_model(init_dir)
    cfg = train_config(world_size=1)
    trainer = Trainer(model, stream(model, 0, 1, cfg.batch_size), SFTObjective(), cfg, out, stage="sft")
    trainer.fit()
    return trainer


def main(out: str, init_dir: str, resume_from: str = "") -> None:
    out_dir = Path(out)
    probe_cfg = train_config(world_size=2)
    probe_cfg.resume_from = resume_from or None
    probe_cfg.report_to = "tensorboard"  # trackers must close without tearing down the process group
    accelerator = make_accelerator(probe_cfg, out_dir)
    if accelerator.num_processes != 2:
        raise SystemExit(f"expected 2 processes, got {accelerator.num_processes} ({accelerator.distributed_type})")
    model = build_model(init_dir)
    batches = stream(model, accelerator.process_index, 2, probe_cfg.batch_size)
    trainer = Trainer(model, batches, SFTObjective(), probe_cfg, out_dir, accelerator, stage="sft")
    trainer.fit()
    run = Run(out=out_dir, accelerator=accelerator, cfg=StageConfig(out=out, train=probe_cfg), stage="sft")
    finish_run(run, trainer)
    trainer.model.eval()
    batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in probe_batch(model).items()}
    with torch.no_grad():  # every rank runs the wrapped model (ZeRO-3 gathers parameters layer by layer)
        logits = trainer.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    if accelerator.is_main_process:
        save_file({"logits": logits.float().cpu().contiguous()}, str(out_dir / "probe_logits.safetensors"))
        (out_dir / "distributed_type.txt").write_text(str(accelerator.distributed_type))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
