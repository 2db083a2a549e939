"""Trackers: TensorBoard by default, W&B when `train.report_to` names it (a stand-in wandb module records the
calls: no network, no account), and clear errors for an unknown tracker or a missing wandb package."""

import sys
import types

import pytest
from PIL import Image

from vlpost.config import FreezeConfig, TrainConfig
from vlpost.data.chat import ChatEncoder
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource
from vlpost.train.freeze import apply_freeze
from vlpost.train.metrics import read_metrics
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.trainer import Trainer, build_trackers


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, values, step=None, **kwargs):
        self.calls.append(("log", step, values))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun(calls)
    module.config = types.SimpleNamespace(update=lambda values, **kw: calls.append(("config", values)))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def stream(model):
    sample = {"kind": "caption", "meta": {"id": "x"}, "messages": [
        {"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "a red square"}]}
    encoder = ExampleEncoder(ChatEncoder(model.tokenizer, model.tokens_per_image), model.image_transform)
    return BatchStream(ListSource([(sample, Image.new("RGB", (32, 32), "red"))] * 4, loop=True), encoder,
                       batch_size=2, pad_id=model.tokenizer.pad_token_id)


def test_wandb_and_tensorboard_receive_the_logged_rows(make_model, tmp_path, fake_wandb):
    model = make_model()
    apply_freeze(model, FreezeConfig(lm="frozen"))
    cfg = TrainConfig(steps=3, batch_size=2, log_every=2, save_every=0, report_to="tensorboard,wandb")
    Trainer(model, stream(model), SFTObjective(), cfg, tmp_path / "run", stage="align").fit()

    init = [c for c in fake_wandb if c[0] == "init"]
    assert init == [("init", {"project": "vlpost", "name": "run", "dir": str(tmp_path / "run")})]
    logged = [(step, values) for kind, *rest in fake_wandb if kind == "log" for step, values in [rest]]
    rows = read_metrics(tmp_path / "run")
    assert [step for step, _ in logged] == [r["step"] for r in rows] == [2, 3]  # log_every 2 + the last step
    assert all(values["loss"] == row["loss"] for (_, values), row in zip(logged, rows))
    configs = [c[1] for c in fake_wandb if c[0] == "config"]
    assert len(configs) == 1 and configs[0]["lr"] == cfg.lr and configs[0]["steps"] == 3
    assert fake_wandb[-1] == ("finish",)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_tracker_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker"):
        build_trackers("tensorboard,mlflow", tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        build_trackers("wandb", tmp_path)
    assert build_trackers("none", tmp_path) == []
