"""One accelerate loop for every stage: exact accumulation, clipping, schedule, mixed precision, checkpoints,
resume, NaN guard, SIGTERM and logging. Under DeepSpeed the engine owns accumulation and clipping."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from vlpost.config import TrainConfig
from vlpost.train import checkpointing
from vlpost.train.freeze import enable_gradient_checkpointing, param_groups
from vlpost.train.metrics import MetricsLogger
from vlpost.train.zero import mark_frozen_tower_leaf

log = logging.getLogger(__name__)
TRACKERS = ("tensorboard", "wandb")


class Objective(Protocol):
    """A stage's loss: `count` gives the normaliser units of a micro-batch (tokens, pairs, ...)."""

    def count(self, batch: dict) -> float: ...

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]: ...


# ---------------------------------------------------------------------------- accelerator


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_trackers(report_to: str, out_dir: Path) -> list:
    """accelerate tracker objects for `train.report_to` ("tensorboard,wandb", "none")."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"train.report_to={report_to!r}: unknown tracker(s) {unknown}; "
                         f"use a comma-separated subset of {TRACKERS} or 'none'")
    trackers = []
    if "tensorboard" in names:
        trackers.append(TensorBoardTracker("tensorboard", logging_dir=str(out_dir)))
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ImportError("train.report_to includes 'wandb' but the wandb package is not installed "
                              "(pip install wandb, then `wandb login` or WANDB_MODE=offline)") from err
        project = os.environ.get("WANDB_PROJECT", "vlpost")
        trackers.append(WandBTracker(project, name=out_dir.name, dir=str(out_dir)))
    return trackers


def make_accelerator(cfg: TrainConfig, out_dir: Path | None = None):
    """An Accelerator for this machine: gloo on CPU (plain and DeepSpeed), bf16 on GPUs that have it."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    kwargs: dict = {}
    if not torch.cuda.is_available():
        # accelerate only picks gloo for CPU ranks when told: cpu=True (DDP) or an explicit DeepSpeed backend.
        if uses_deepspeed():
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    trackers = build_trackers(cfg.report_to, Path(out_dir)) if out_dir else []
    return Accelerator(mixed_precision=precision, log_with=trackers or None,
                       project_dir=str(out_dir) if out_dir else None, **kwargs)


def fill_deepspeed_config(accelerator, cfg: TrainConfig, model) -> None:
    """Replace the DeepSpeed JSON's "auto" entries from train.* (batch, accumulation, clipping, buckets)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = {"train_micro_batch_size_per_gpu": ("train.batch_size", cfg.batch_size),
            "gradient_accumulation_steps": ("train.grad_accum", cfg.grad_accum),
            "train_batch_size": ("batch_size × grad_accum × processes",
                                 cfg.batch_size * cfg.grad_accum * accelerator.num_processes),
            "gradient_clipping": ("train.max_grad_norm", float(cfg.max_grad_norm or 0.0))}
    for key, (source, value) in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ValueError(f"the DeepSpeed JSON sets {key}={ds[key]} but {source} gives {value}; "
                             f'set it to "auto" there (vlpost fills it from the train config)')
        ds[key] = value
    hidden = model.lm.get_input_embeddings().embedding_dim
    sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    zero = ds.setdefault("zero_optimization", {})
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value


class NonFiniteLossError(RuntimeError):
    pass


class TrainingStopped(SystemExit):
    """Raised after a requested stop (SIGTERM) once the checkpoint is on disk; the process exits with code 0."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(0)
        self.step, self.checkpoint = step, checkpoint


# ---------------------------------------------------------------------------- trainer


class Trainer:
    """Runs `cfg.steps` optimizer steps over `batches`; each step averages over all its units on all ranks.

    `callbacks`: objects with optional `on_step_start(trainer)` / `on_step_end(trainer)` (e.g. GRPO refreshes
    rollouts with the current policy). `batches` may offer `state_dict()` / `load_state_dict()` (exact resume).
    """

    def __init__(self, model, batches, objective: Objective, cfg: TrainConfig, out_dir: str | Path,
                 accelerator=None, stage: str = "train", max_bad_steps: int | None = None,
                 callbacks: Sequence[object] = (), resume_from: str | None = None):
        self.cfg, self.objective, self.batches = cfg, objective, batches
        self.out_dir = Path(out_dir)
        self.accelerator = accelerator or make_accelerator(cfg, self.out_dir)
        self.stage = stage
        self.max_bad_steps = max_bad_steps if max_bad_steps is not None else cfg.max_bad_steps
        self.callbacks = list(callbacks)
        self.resume_from = resume_from if resume_from is not None else cfg.resume_from
        self.model = model
        self.step = 0
        self.history: list[dict] = []
        self.bad_in_row = 0
        self.skipped_steps = 0
        self.stop_reason: str | None = None
        self.last_checkpoint: Path | None = None

    @property
    def deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if self.deepspeed:
            fill_deepspeed_config(acc, cfg, self.model)
            if checkpointing.zero3(acc):
                mark_frozen_tower_leaf(self.model)  # the tower may run outside the engine's forward (DPO)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        warmup = int(cfg.warmup_ratio * cfg.steps)
        name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
        # Not prepared: accelerate would step a prepared scheduler once per process; ours steps once per step.
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=cfg.steps)
        self.logger = MetricsLogger(self.out_dir, acc, self.stage)
        if acc.is_main_process and acc.log_with:
            hparams = {k: v for k, v in asdict(cfg).items() if isinstance(v, int | float | str | bool)}
            acc.init_trackers(self.stage, config=hparams)

    def _to_device(self, batch: dict) -> dict:
        device = self.accelerator.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def global_sums(self, *values: float) -> list[float]:
        """Sum scalars over all ranks in one collective (identity on one process)."""
        if self.accelerator.num_processes == 1:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        return [float(v) for v in self.accelerator.reduce(tensor, reduction="sum").tolist()]

    def request_stop(self, reason: str = "requested") -> None:
        """Finish the current step, write a checkpoint and exit 0 (what SIGTERM does)."""
        self.stop_reason = reason

    @contextmanager
    def _stop_on_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            log.warning("SIGTERM: finishing step %d, then checkpointing and exiting", self.step + 1)
            self.request_stop("SIGTERM")

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _callbacks(self, hook: str) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self)

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        with self._stop_on_sigterm():
            self._setup()
            path = checkpointing.resolve_resume(self.out_dir, self.resume_from)
            if path is not None:
                checkpointing.load_checkpoint(self, path)
            return self._loop()

    def _loop(self) -> dict:
        acc, cfg = self.accelerator, self.cfg
        iterator = iter(self.batches)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage, disable=not acc.is_main_process,
                   dynamic_ncols=True)
        started, units_seen = time.perf_counter(), 0
        while self.step < cfg.steps:
            self._callbacks("on_step_start")
            micro = self._next_micro_batches(iterator)
            total, empty = self.global_sums(sum(self.objective.count(b) for b in micro), 0 if micro else 1)
            if empty:
                log.warning("data ran out after %d steps (of %d)", self.step, cfg.steps)
                break
            loss_sum, metrics = self._accumulate(micro, max(total, 1.0))
            loss = self.global_sums(loss_sum)[0] / max(total, 1.0)
            applied, grad_norm = self._optimizer_step(loss)
            if applied:
                self.step += 1
                units_seen += int(total)
                rate = units_seen / max(time.perf_counter() - started, 1e-9)
                self._record({"loss": loss, "lr": self.scheduler.get_last_lr()[-1], "units": total, **metrics},
                             grad_norm, rate)
                bar.set_postfix(loss=f"{loss:.4f}", units_s=f"{rate:.0f}")
                bar.update(1)
                self._callbacks("on_step_end")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
            if self.global_sums(1 if self.stop_reason else 0)[0]:
                bar.close()
                self._stop()
        bar.close()
        acc.wait_for_everyone()
        self._finish_trackers()
        return {"steps": self.step, "final_loss": self.history[-1]["loss"] if self.history else None,
                "skipped_steps": self.skipped_steps, "seconds": time.perf_counter() - started}

    def _record(self, row: dict, grad_norm: float | None, rate: float) -> None:
        """History (every step) and metrics.jsonl / trackers (every `log_every` steps and the last)."""
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        self.history.append({"step": self.step, **row})
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
            self.logger.log(self.step, {**row, "units_per_s": rate})

    def _stop(self) -> None:
        """Checkpoint (every rank agreed to stop at this step) and leave with exit code 0."""
        reason = self.stop_reason or "another rank was asked to stop"
        checkpoint = self.save_checkpoint()
        if self.accelerator.is_main_process:
            log.warning("stopped at step %d (%s); checkpoint %s; continue with --resume", self.step, reason, checkpoint)
        self._finish_trackers()
        raise TrainingStopped(self.step, checkpoint)

    def _finish_trackers(self) -> None:
        """Close TensorBoard / W&B (not `end_training()`: it also destroys the process group finish_run needs)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []

    def _next_micro_batches(self, iterator) -> list[dict]:
        micro = []
        for _ in range(self.cfg.grad_accum):
            try:
                micro.append(self._to_device(next(iterator)))
            except StopIteration:
                break
        return micro

    def _accumulate(self, micro: list[dict], total: float) -> tuple[float, dict]:
        """Backward each micro-batch with loss_sum / global units × world size (DDP and ZeRO average over ranks)."""
        acc = self.accelerator
        self.model.train()
        loss_sum, metrics = 0.0, {}
        for index, batch in enumerate(micro):
            last = index == len(micro) - 1
            if self.deepspeed:
                self.model.set_gradient_accumulation_boundary(last)
                part, part_metrics = self.objective(self.model, batch)
                self.model.backward(part * acc.num_processes / total, scale_wrt_gas=False)
            else:
                with (nullcontext() if last else acc.no_sync(self.model)), acc.autocast():
                    part, part_metrics = self.objective(self.model, batch)
                    acc.backward(part * acc.num_processes / total)
            loss_sum += float(part.detach())
            for key, value in part_metrics.items():
                metrics[key] = metrics.get(key, 0) + value
        return loss_sum, metrics

    def _optimizer_step(self, loss: float) -> tuple[bool, float | None]:
        """Clip and step unless the loss or gradient norm is non-finite; returns (applied, grad_norm)."""
        if self.deepspeed:
            return self._deepspeed_step(loss)
        grad_norm = None
        if math.isfinite(loss):
            max_norm = self.cfg.max_grad_norm or float("inf")  # inf: measure the norm, clip nothing
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
            grad_norm = None if norm is None else float(norm)
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._bad_step(loss, grad_norm)
            return False, grad_norm
        self.optimizer.step()
        if not getattr(self.optimizer, "step_was_skipped", False):  # fp16 scaler overflow
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_in_row = 0
        return True, grad_norm

    def _deepspeed_step(self, loss: float) -> tuple[bool, float | None]:
        """The engine clips, steps and zeroes; it skips a step whose gradient norm is not finite."""
        engine = self.model
        engine.step()
        norm = engine.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
        if engine.was_step_applied() and not math.isfinite(loss):
            raise NonFiniteLossError(f"step {self.step + 1}: DeepSpeed applied an update with a non-finite loss; "
                                     "set bf16.check_grad_overflow: true in the DeepSpeed JSON")
        if not engine.was_step_applied() or not math.isfinite(loss):
            self._bad_step(loss, grad_norm)
            return False, grad_norm
        self.scheduler.step()
        self.bad_in_row = 0
        return True, grad_norm

    def _bad_step(self, loss: float, grad_norm: float | None) -> None:
        self.bad_in_row += 1
        self.skipped_steps += 1
        log.warning("step %d: non-finite loss %s / grad norm %s, update skipped (%d in a row)", self.step + 1, loss,
                    grad_norm, self.bad_in_row)
        if self.bad_in_row >= self.max_bad_steps:
            raise NonFiniteLossError(f"{self.bad_in_row} non-finite losses in a row at step {self.step + 1}; stopping "
                                     "(lower train.lr, check the data with `vlpost audit`)")

    # ------------------------------------------------------------------ checkpoints and models

    def save_checkpoint(self) -> Path | None:
        """Write `<out>/checkpoints/step-<N>` atomically on every rank's behalf (collective)."""
        self.last_checkpoint = checkpointing.save_checkpoint(self)
        return self.last_checkpoint

    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    def full_weights(self):
        """Context (enter on every rank): the unwrapped model with whole parameters, e.g. gathered under ZeRO-3."""
        model = self.unwrapped_model()
        return checkpointing.gathered(self, list(model.parameters()))
