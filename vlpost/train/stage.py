"""Building blocks every stage script composes: run setup, data streams, tokenizer bootstrap, finishing."""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from vlpost.config import DataConfig, StageConfig
from vlpost.data.chat import ChatEncoder
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource, records_to_items
from vlpost.train.metrics import plot_metrics
from vlpost.train.rundir import prepare_run_dir, record_run
from vlpost.train.trainer import make_accelerator

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


@dataclass
class Run:
    """A stage's run dir, accelerator and clock."""

    out: Path
    accelerator: object
    cfg: StageConfig
    stage: str
    started: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def start_run(args, stage: str) -> Run:
    """Prepare the run dir (refusing to clobber another run), seed everything, record config + environment."""
    from accelerate.utils import set_seed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = args.cfg
    accelerator = make_accelerator(cfg.train, Path(cfg.out))
    out = prepare_run_dir(cfg.out, resume=args.resume, overwrite=args.overwrite,
                          is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)
    run = Run(out=out, accelerator=accelerator, cfg=cfg, stage=stage)
    ensure_tokenizer(run)
    if run.is_main:
        record_run(out, cfg)
    if args.resume and not cfg.train.resume_from:
        cfg.train.resume_from = "latest"  # the Trainer loads <out>/checkpoints/step-<latest> in fit()
    return run


def ensure_tokenizer(run: Run) -> None:
    """A random-init LM without a tokenizer dir gets one trained on the synthetic world's text (tiny configs)."""
    lm = run.cfg.model.lm
    if run.cfg.model.init_from or lm.path or lm.tokenizer:
        return
    target = run.out / "tokenizer"
    if run.is_main and not (target / "tokenizer.json").is_file():
        from vlpost.data.synthetic import SyntheticWorld
        from vlpost.model.tokenizer import train_bpe_tokenizer

        world = SyntheticWorld(seed=run.cfg.data.synthetic_seed)
        train_bpe_tokenizer(world.text_corpus(4000), vocab_size=1024).save_pretrained(target)
        log.info("trained a byte-level BPE tokenizer on synthetic text → %s", target)
    run.accelerator.wait_for_everyone()
    lm.tokenizer = str(target)


def sample_source(data: DataConfig, kind: str, *, rank: int, world_size: int, seed: int, loop: bool = True):
    """Shards when `data.shards` is set, else an in-memory synthetic set of `data.synthetic_samples`."""
    if data.shards:
        from vlpost.data.shards import ShardStream

        return ShardStream(data.shards, rank=rank, world_size=world_size, seed=seed, shuffle=data.shuffle, loop=loop)
    from vlpost.data.synthetic import SyntheticWorld

    world = SyntheticWorld(seed=data.synthetic_seed, image_size=data.image_size)
    items = records_to_items(world.records(kind, data.synthetic_samples))
    return ListSource(items, seed=seed, shuffle=data.shuffle, loop=loop, rank=rank, world_size=world_size)


def sft_batches(data: DataConfig, model, kind: str, run: Run, batch_size: int) -> BatchStream:
    """Encoded, batched (or packed) caption / sft samples for this rank."""
    acc = run.accelerator
    source = sample_source(data, kind, rank=acc.process_index, world_size=acc.num_processes,
                           seed=run.cfg.train.seed)
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image, max_length=data.max_length)
    return BatchStream(source, ExampleEncoder(encoder, model.image_transform), batch_size=batch_size,
                       pad_id=model.tokenizer.pad_token_id, packing=data.packing, max_length=data.max_length,
                       group_by_length=data.group_by_length, buffer_size=data.buffer_size, seed=run.cfg.train.seed)


def _reader_skips(batches) -> dict:
    stats = getattr(getattr(batches, "source", None), "stats", None) or {}
    return dict(stats.get("skipped", {})) if isinstance(stats, dict) else {}


def finish_run(run: Run, trainer, *, projector_only: bool = False, extra: dict | None = None) -> dict:
    """Save the model (projector-only when the LM did not train), plot curves, write summary.json.

    Collective: call it on every rank (the save gathers ZeRO-3 partitions).
    """
    acc = run.accelerator
    model = trainer.unwrapped_model()
    lineage = {"stage": run.stage, "run_dir": str(run.out.resolve()), "init_from": run.cfg.model.init_from,
               "steps": trainer.step}
    summary = {"stage": run.stage, "steps": trainer.step,
               "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
               "seconds": round(time.perf_counter() - run.started, 2),
               "skipped": dict(getattr(trainer.batches, "skipped", {})),  # encode-level (too long, empty mask...)
               "skipped_reading": _reader_skips(trainer.batches), **(extra or {})}  # shard-level (corrupt...)
    gather = getattr(trainer, "full_weights", nullcontext)
    with gather():  # every rank: under ZeRO-3 the parameters are gathered for the save
        if run.is_main:
            model.save_pretrained(run.out, lineage=lineage,
                                  projector_only=projector_only and bool(model.spec["lm"].get("path")))
    if run.is_main:
        plot_metrics(run.out)
        (run.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        log.info("%s done: %s → %s", run.stage, {k: summary[k] for k in ("steps", "final_loss", "seconds")}, run.out)
    acc.wait_for_everyone()
    return summary
