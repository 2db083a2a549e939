"""Training survives faults: kill -9 during a checkpoint save, a full disk, SIGTERM, non-finite losses."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlpost.config import FreezeConfig, LMConfig, ModelConfig, ProjectorConfig, TrainConfig, VisionConfig
from vlpost.data.chat import ChatEncoder
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train import checkpointing
from vlpost.train.freeze import apply_freeze
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.trainer import NonFiniteLossError, Trainer

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 300  # generous: CI machines are slow and shared


def items(n: int = 12) -> list:
    colours = [("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220))]
    out = []
    for i in range(n):
        name, rgb = colours[i % 3]
        sample = {"kind": "sft", "meta": {"id": f"f{i}"}, "messages": [
            {"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": name}]}
        out.append((sample, Image.new("RGB", (32, 32), rgb)))
    return out


def build(tokenizer_dir: str, lm: str = "full") -> tuple:
    torch.manual_seed(0)
    model = VisionLanguageModel.build(ModelConfig(
        vision=VisionConfig(name="vlpost-tiny-vit"), projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=LMConfig(tokenizer=tokenizer_dir, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64)))
    apply_freeze(model, FreezeConfig(lm=lm))
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    stream = BatchStream(ListSource(items(), seed=1, loop=True), ExampleEncoder(encoder, model.image_transform),
                         batch_size=2, pad_id=model.tokenizer.pad_token_id)
    return model, stream


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(steps=6, batch_size=2, lr=5e-3, warmup_ratio=0.0, log_every=1, save_every=2,
                                 keep_last=3, report_to="none"), **overrides})


def run_training(tokenizer_dir: str, out: str, steps: str, save_every: str, resume: str = "") -> Trainer:
    """Also the subprocess entry point (arguments arrive as strings)."""
    model, stream = build(tokenizer_dir)
    cfg = train_config(steps=int(steps), save_every=int(save_every), resume_from=resume or None)
    trainer = Trainer(model, stream, SFTObjective(), cfg, out)
    trainer.fit()
    return trainer


def spawn(args: list[str], env: dict | None = None) -> subprocess.Popen:
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_training_faults as t; " \
           "t.run_training(*sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_during_save_leaves_previous_checkpoint_loadable(tokenizer_dirs, tmp_path):
    out = tmp_path / "run"
    partial = out / "checkpoints" / ".tmp-step-4"
    proc = spawn([tokenizer_dirs["chatml"], str(out), "6", "2"], env={checkpointing.PAUSE_ENV: "4:600"})
    wait_for(lambda: (partial / checkpointing.WEIGHTS_FILE).is_file(), proc, "the step-4 save to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert partial.is_dir() and not (partial / checkpointing.STATE_FILE).exists()
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["step-2"]

    trainer = run_training(tokenizer_dirs["chatml"], str(out), "6", "2", "latest")
    assert trainer.step == 6 and [h["step"] for h in trainer.history] == [1, 2, 3, 4, 5, 6]
    assert not partial.exists()  # the next save cleaned the leftover
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["step-2", "step-4"]


def test_disk_full_during_save_is_a_clear_error(tokenizer_dirs, tmp_path, monkeypatch):
    calls = []
    real_save = checkpointing.save_file

    def save_file(state, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", save_file)
    with pytest.raises(checkpointing.CheckpointError) as failed:
        run_training(tokenizer_dirs["chatml"], str(tmp_path), "5", "2")
    message = str(failed.value)
    assert "No space left on device" in message and "step-4" in message
    assert "step-2 is intact" in message and "--resume" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]

    monkeypatch.setattr(checkpointing, "save_file", real_save)
    trainer = run_training(tokenizer_dirs["chatml"], str(tmp_path), "3", "0", "latest")
    assert [h["step"] for h in trainer.history] == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_0(tokenizer_dirs, tmp_path):
    out = tmp_path / "sft"
    stage_args = ["--config", "configs/sft/tiny.yaml", "--out", str(out), "--model.lm.tokenizer",
                  tokenizer_dirs["chatml"], "--model.lm.hidden_size", "32", "--model.lm.intermediate_size", "64",
                  "--data.synthetic_samples", "24", "--train.batch_size", "2", "--train.log_every", "1",
                  "--train.save_every", "0", "--train.report_to", "none"]
    proc = subprocess.Popen([sys.executable, "stages/sft.py", *stage_args, "--train.steps", "500"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc, "two logged steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT_S) == 0, proc.stdout.read()[-3000:]

    checkpoints = checkpointing.list_checkpoints(out)
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / checkpointing.STATE_FILE).read_text())
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert state["step"] == logged[-1] >= 2 and checkpoints[0].name == f"step-{state['step']}"
    assert not (out / "vlpost.json").exists()  # an interrupted run is not saved as finished

    from stages import sft

    summary = sft.main([*stage_args, "--train.steps", str(state["step"] + 2), "--resume"])
    assert summary["steps"] == state["step"] + 2 and (out / "vlpost.json").is_file()


class NaNAt:
    """SFT loss, but NaN on the given optimizer-step attempts; the callback tells it which attempt runs."""

    def __init__(self, attempts: set[int]):
        self.attempts, self.attempt, self.snapshots = attempts, 0, []
        self.sft = SFTObjective()

    def count(self, batch):
        return self.sft.count(batch)

    def __call__(self, model, batch):
        loss, metrics = self.sft(model, batch)
        return (loss * float("nan") if self.attempt in self.attempts else loss), metrics

    def on_step_start(self, trainer):
        self.attempt += 1
        state = {k: v.detach().clone() for k, v in trainer.unwrapped_model().named_parameters() if v.requires_grad}
        adam = [t.clone() for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        self.snapshots.append((state, adam, trainer.scheduler.get_last_lr()))


def assert_same(a, b):
    (params_a, adam_a, lr_a), (params_b, adam_b, lr_b) = a, b
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    assert len(adam_a) == len(adam_b) and all(torch.equal(x, y) for x, y in zip(adam_a, adam_b))
    assert lr_a == lr_b


def test_nan_step_is_skipped_without_touching_parameters(tokenizer_dirs, tmp_path):
    model, stream = build(tokenizer_dirs["chatml"])
    objective = NaNAt({2})
    trainer = Trainer(model, stream, objective, train_config(steps=3, save_every=0), tmp_path, callbacks=[objective])
    trainer.fit()
    assert trainer.step == 3 and trainer.skipped_steps == 1 and objective.attempt == 4
    assert_same(objective.snapshots[1], objective.snapshots[2])  # attempt 2 (NaN) changed nothing
    assert not all(torch.equal(objective.snapshots[0][0][k], v) for k, v in objective.snapshots[1][0].items())
    assert all(h["loss"] == h["loss"] for h in trainer.history)  # no NaN recorded as a step


def test_too_many_nan_steps_in_a_row_stop_training(tokenizer_dirs, tmp_path):
    model, stream = build(tokenizer_dirs["chatml"], lm="frozen")
    objective = NaNAt({2, 3, 4, 5})
    cfg = train_config(steps=6, save_every=0, max_bad_steps=3)
    trainer = Trainer(model, stream, objective, cfg, tmp_path, callbacks=[objective])
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row at step 2"):
        trainer.fit()
    assert trainer.step == 1 and objective.attempt == 4
    assert_same(objective.snapshots[1], objective.snapshots[3])
