"""Training checkpoints: `<run>/checkpoints/step-<N>/`, written atomically, the last K kept, exact resume.

A checkpoint holds the trainable weights (safetensors; for LoRA the adapters + projector), optimizer and
scheduler state, every rank's RNG states and data position, and the trainer's step and history. It is built
in `.tmp-step-<N>/`, fsynced and renamed: a step dir either is complete or does not exist, so a kill -9
during a save leaves the previous checkpoint loadable. Under DeepSpeed the engine writes the (partitioned)
optimizer state into `deepspeed/` (its own torch.save format) and restores weights + optimizer from it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlpost.constants import METRICS_FILE

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
RANK_FILE = "rank-{rank}.json"  # RNG states + data position of one rank
PAUSE_ENV = "VLPOST_TEST_CHECKPOINT_PAUSE"  # tests: sleep mid-save, after the weights are written
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- finding checkpoints


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (a step dir with its state file), oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(out_dir: str | Path, resume_from: str | None) -> Path | None:
    """`None` → no resume; "latest" → newest complete checkpoint (None when there is none); else that dir."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            log.warning("resume requested but %s holds no complete checkpoint; starting at step 0",
                        checkpoint_root(out_dir))
            return None
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume_from={resume_from}: not a complete checkpoint (no {STATE_FILE}); "
                                f"complete ones: {[str(p) for p in list_checkpoints(out_dir)]}")
    return path


# ---------------------------------------------------------------------------- RNG and small files


def rng_state() -> dict:
    """Python, numpy and torch (CPU + CUDA) generator states as JSON-able lists (no pickle)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _write_json(path: Path, value) -> None:
    try:
        text = json.dumps(value)
    except TypeError as err:
        raise TypeError(f"checkpoint file {path.name}: value is not JSON-serialisable ({err}); a batches "
                        "object's state_dict() must hold only str/int/float/bool/list/dict") from err
    path.write_text(text)


def _fsync_tree(root: Path) -> None:
    """Flush every file and dir under `root` to disk before the rename publishes it."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- weights


def zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def gathered(trainer, params: list):
    """Context entered on every rank: under ZeRO-3 (or FSDP v1) the sharded `params` are whole inside it."""
    if fsdp(trainer.accelerator):  # GPU only; not tested here (accelerate's FSDP plugin needs a GPU)
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(trainer.model, FullyShardedDataParallel):
            raise NotImplementedError("saving under FSDP2 is not implemented; use fsdp_version: 1 or DeepSpeed")
        return FullyShardedDataParallel.summon_full_params(trainer.model, writeback=False)
    if not zero3(trainer.accelerator):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """name → CPU tensor for every parameter that trains (projector, LM or its LoRA adapters)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, path: Path) -> None:
    """Copy saved trainable parameters into `model`; the set of names must match exactly."""
    state = load_file(str(path))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the trainable parameters (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); was freeze.* changed since it was written?")
    wrong = [f"{name} {tuple(state[name].shape)} != {tuple(getattr(p, 'ds_shape', p.shape))}"
             for name, p in params.items() if tuple(state[name].shape) != tuple(getattr(p, "ds_shape", p.shape))]
    if wrong:
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape: {wrong[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))


# ---------------------------------------------------------------------------- save


def save_checkpoint(trainer) -> Path | None:
    """Collective: every rank writes its part into a temp dir; the main rank publishes it with a rename."""
    acc = trainer.accelerator
    if fsdp(acc):
        log.warning("no checkpoint at step %d: resumable checkpoints under FSDP (sharded optimizer state) are not "
                    "implemented; use DeepSpeed ZeRO-2/3 or DDP for resumable runs", trainer.step)
        return None
    root = checkpoint_root(trainer.out_dir)
    final, tmp = root / f"step-{trainer.step}", root / f".tmp-step-{trainer.step}"
    if (final / STATE_FILE).is_file():
        return final
    if acc.is_main_process:
        _clean_stale(root)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    error = None
    try:
        _write_parts(trainer, tmp)
    except OSError as err:
        error = err
    if trainer.global_sums(1 if error else 0)[0]:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(trainer, final, error) from error
    acc.wait_for_everyone()
    if acc.is_main_process:
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, trainer.cfg.keep_last)
        log.info("checkpoint step %d → %s", trainer.step, final)
    acc.wait_for_everyone()
    return final


def _save_error(trainer, final: Path, error: OSError | None) -> CheckpointError:
    previous = list_checkpoints(trainer.out_dir)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    detail = f"{error.strerror or error} (errno {error.errno})" if error else "failed on another rank"
    hint = "free disk space or lower train.keep_last" if error and error.errno == errno.ENOSPC else "check the disk"
    return CheckpointError(f"could not write checkpoint step {trainer.step} to {final}: {detail}; {kept}. "
                           f"Fix it ({hint}) and continue with --resume")


def _write_parts(trainer, tmp: Path) -> None:
    acc, model = trainer.accelerator, trainer.unwrapped_model()
    rank_state = {"rng": rng_state(), "data": None}
    if hasattr(trainer.batches, "state_dict"):
        rank_state["data"] = trainer.batches.state_dict()
    _write_json(tmp / RANK_FILE.format(rank=acc.process_index), rank_state)
    if trainer.deepspeed:  # collective; each rank writes its optimizer partition
        trainer.model.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with gathered(trainer, trainable):
        if acc.is_main_process:
            save_file(trainable_state(model), str(tmp / WEIGHTS_FILE))
    if not acc.is_main_process:
        return
    _test_pause(trainer.step)
    if not trainer.deepspeed:
        torch.save(trainer.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    torch.save(trainer.scheduler.state_dict(), tmp / SCHEDULER_FILE)
    state = {"step": trainer.step, "history": trainer.history, "bad_in_row": trainer.bad_in_row,
             "skipped_steps": trainer.skipped_steps, "world_size": acc.num_processes, "stage": trainer.stage,
             "deepspeed": trainer.deepspeed, "batch_size": trainer.cfg.batch_size,
             "grad_accum": trainer.cfg.grad_accum}
    _write_json(tmp / STATE_FILE, state)


def _test_pause(step: int) -> None:
    """Tests kill a process mid-save: VLPOST_TEST_CHECKPOINT_PAUSE="SECONDS" or "STEP:SECONDS"."""
    value = os.environ.get(PAUSE_ENV, "")
    if not value:
        return
    at, _, seconds = value.rpartition(":")
    if not at or int(at) == step:
        log.warning("%s=%s: pausing mid-save at step %d", PAUSE_ENV, value, step)
        time.sleep(float(seconds))


def _clean_stale(root: Path) -> None:
    """Remove temp / half-deleted dirs left by a process killed during a save or a prune."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-step-", ".deleting-step-")):
                shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (renamed away first, so none is ever half there)."""
    found = list_checkpoints(root.parent)
    for path in found[: max(0, len(found) - max(keep_last, 1))]:
        doomed = root / f".deleting-{path.name}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------- load


def load_checkpoint(trainer, path: Path) -> None:
    """Restore weights, optimizer, scheduler, step/history, this rank's RNG and data position."""
    acc = trainer.accelerator
    state = json.loads((path / STATE_FILE).read_text())
    if state["deepspeed"] != trainer.deepspeed:
        raise CheckpointError(f"{path} was written {'with' if state['deepspeed'] else 'without'} DeepSpeed; "
                              "resume it under the same kind of launch (or start a new run from its weights)")
    if trainer.deepspeed:
        trainer.model.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False,
                                      load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        load_trainable(trainer.unwrapped_model(), path / WEIGHTS_FILE)
        trainer.optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    trainer.scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    trainer.step, trainer.history = state["step"], state["history"]
    trainer.bad_in_row, trainer.skipped_steps = state["bad_in_row"], state["skipped_steps"]
    _load_rank_state(trainer, path, state)
    if acc.is_main_process:
        truncate_metrics(trainer.out_dir, trainer.step)
        log.info("resumed from %s at step %d", path, trainer.step)
    acc.wait_for_everyone()


def _load_rank_state(trainer, path: Path, state: dict) -> None:
    acc = trainer.accelerator
    rank_file = path / RANK_FILE.format(rank=acc.process_index)
    same_layout = state["world_size"] == acc.num_processes and state["batch_size"] == trainer.cfg.batch_size
    if not same_layout or not rank_file.is_file():
        log.warning("%s was written by %d ranks with batch_size %d; now %d ranks with batch_size %d: the data "
                    "stream and RNG restart from the seed (weights, optimizer and step are restored)", path,
                    state["world_size"], state["batch_size"], acc.num_processes, trainer.cfg.batch_size)
        return
    rank_state = json.loads(rank_file.read_text())
    set_rng_state(rank_state["rng"])
    if rank_state["data"] is not None and hasattr(trainer.batches, "load_state_dict"):
        trainer.batches.load_state_dict(rank_state["data"])
    elif rank_state["data"] is None:
        log.warning("%s holds no data position (the batches object has no state_dict); data restarts", path)


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows logged after the checkpoint, so a resumed run does not log a step twice."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
