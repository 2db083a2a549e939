"""One accelerate loop for every stage: exact accumulation, clipping, schedule, mixed precision, logging."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from vlpost.config import TrainConfig
from vlpost.constants import IGNORE_INDEX
from vlpost.train.freeze import param_groups
from vlpost.train.metrics import MetricsLogger

log = logging.getLogger(__name__)
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels", "position_ids")


class Objective(Protocol):
    """A stage's loss: `count` gives the normaliser units of a micro-batch (tokens, pairs, ...)."""

    def count(self, batch: dict) -> int: ...

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]: ...


class SFTObjective:
    """Summed NLL over assistant tokens; the trainer divides by the step's global token count."""

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        from vlpost.train.losses import sft_nll_sum

        out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch and k != "labels"})
        loss_sum, count = sft_nll_sum(out.logits, batch["labels"])
        return loss_sum, {"tokens": int(count)}


def make_accelerator(cfg: TrainConfig, out_dir: Path | None = None):
    from accelerate import Accelerator

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=precision, log_with=["tensorboard"] if out_dir else None,
                       project_dir=str(out_dir) if out_dir else None)


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """Runs `cfg.steps` optimizer steps over `batches`; each step averages over all its tokens on all ranks."""

    def __init__(self, model, batches, objective: Objective, cfg: TrainConfig, out_dir: str | Path,
                 accelerator=None, stage: str = "train", max_bad_steps: int = 5):
        self.cfg, self.objective, self.batches = cfg, objective, batches
        self.out_dir = Path(out_dir)
        self.accelerator = accelerator or make_accelerator(cfg, self.out_dir)
        self.stage, self.max_bad_steps = stage, max_bad_steps
        self.model = model
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        acc = self.accelerator
        groups = param_groups(self.model, self.cfg)
        self.optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warmup = int(self.cfg.warmup_ratio * self.cfg.steps)
        name = "constant_with_warmup" if self.cfg.schedule == "constant" else self.cfg.schedule
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.cfg.steps)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.logger = MetricsLogger(self.out_dir, acc, self.stage)
        if acc.is_main_process and acc.log_with:
            acc.init_trackers(self.stage)

    def _to_device(self, batch: dict) -> dict:
        device = self.accelerator.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _global_sum(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return float(value)
        tensor = torch.tensor([float(value)], device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        self._setup()
        acc, cfg = self.accelerator, self.cfg
        iterator = iter(self.batches)
        bad_in_row = 0
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage, disable=not acc.is_local_main_process,
                   dynamic_ncols=True)
        started, tokens_seen = time.perf_counter(), 0
        while self.step < cfg.steps:
            micro = self._next_micro_batches(iterator)
            if not micro:
                log.warning("data ran out after %d steps (of %d)", self.step, cfg.steps)
                break
            total = self._global_sum(sum(self.objective.count(b) for b in micro))
            loss_sum, metrics = self._accumulate(micro, max(total, 1.0))
            loss = self._global_sum(loss_sum) / max(total, 1.0)
            if not math.isfinite(loss):
                bad_in_row += 1
                self.optimizer.zero_grad(set_to_none=True)
                log.warning("step %d: non-finite loss %s, step skipped (%d in a row)", self.step, loss, bad_in_row)
                if bad_in_row >= self.max_bad_steps:
                    raise NonFiniteLossError(f"{bad_in_row} non-finite losses in a row at step {self.step}; stopping "
                                             "(lower train.lr, check the data with `vlpost audit`)")
                continue
            bad_in_row = 0
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens_seen += int(total)
            row = {"loss": loss, "lr": self.scheduler.get_last_lr()[-1], "units": total, **metrics}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            self.history.append({"step": self.step, **row})
            elapsed = time.perf_counter() - started
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.logger.log(self.step, {**row, "units_per_s": tokens_seen / max(elapsed, 1e-9)})
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
            bar.update(1)
        bar.close()
        acc.wait_for_everyone()
        if acc.log_with:
            acc.end_training()
        return {"steps": self.step, "final_loss": self.history[-1]["loss"] if self.history else None,
                "seconds": time.perf_counter() - started}

    def _next_micro_batches(self, iterator) -> list[dict]:
        micro = []
        for _ in range(self.cfg.grad_accum):
            try:
                micro.append(self._to_device(next(iterator)))
            except StopIteration:
                break
        return micro

    def _accumulate(self, micro: list[dict], total: float) -> tuple[float, dict]:
        """Backward each micro-batch with loss_sum / global units × world size (DDP averages over ranks)."""
        acc = self.accelerator
        self.model.train()
        loss_sum, metrics = 0.0, {}
        for index, batch in enumerate(micro):
            sync = index == len(micro) - 1
            with (nullcontext() if sync else acc.no_sync(self.model)), acc.autocast():
                part, part_metrics = self.objective(self.model, batch)
                acc.backward(part * acc.num_processes / total)
            loss_sum += float(part.detach())
            for key, value in part_metrics.items():
                metrics[key] = metrics.get(key, 0) + value
        return loss_sum, metrics

    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)
