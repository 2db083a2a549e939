"""The frozen-tower feature cache (stages 1 and 2): same training with or without it, later runs skip the ViT, no
stale or broken reads."""

from pathlib import Path

import pytest
import torch

from vlpost.config import AlignConfig, FreezeConfig, SFTConfig, TrainConfig, load_config
from vlpost.constants import IMAGE_TOKEN
from vlpost.data.chat import ChatEncoder
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource, records_to_items
from vlpost.data.synthetic import SyntheticWorld
from vlpost.train.dpo_config import DPOConfig
from vlpost.train.feature_cache import CachedFeatureBatches, cache_tower_features
from vlpost.train.freeze import apply_freeze
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.trainer import Trainer

TOL = 1e-6


def items(n: int = 12, text_only_every: int = 3):
    """Caption samples; the first four and every `text_only_every`-th are text-only (no image, no placeholder)."""
    out = []
    for index, (sample, image) in enumerate(records_to_items(SyntheticWorld(seed=0, image_size=32).records(
            "caption", n))):
        if index < 4 or index % text_only_every == 0:
            messages = [{**m, "content": m["content"].replace(IMAGE_TOKEN, "").strip()} for m in sample["messages"]]
            sample, image = {**sample, "messages": messages}, None
        out.append((sample, image))
    return out


def stream(model, packing: bool = False) -> BatchStream:
    source = ListSource(items(), seed=0, shuffle=False, loop=True)  # batch 1 is text-only
    encoder = ExampleEncoder(ChatEncoder(model.tokenizer, model.tokens_per_image, max_length=256),
                             model.image_transform)
    return BatchStream(source, encoder, batch_size=4, pad_id=model.tokenizer.pad_token_id, packing=packing,
                       max_length=256, buffer_size=8)


def aligned(make_model, out: Path, cache: Path | None, packing: bool = False, steps: int = 6, tweak=None,
            lm: str = "frozen"):
    """Train the projector (and the LM with `lm="full"`, as SFT does) `steps` steps (two epochs of 3 batches)
    → (losses, trained weights, batches, model)."""
    model = make_model(seed=0)
    if tweak:
        tweak(model)
    apply_freeze(model, FreezeConfig(lm=lm, projector="train"))
    batches = cache_tower_features(stream(model, packing), model, cache)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_ratio=0.0, log_every=1, save_every=0,
                      report_to="none", mixed_precision="no")
    trainer = Trainer(model, batches, SFTObjective(), cfg, out)
    trainer.fit()
    losses = [row["loss"] for row in trainer.history]
    trained = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return losses, trained, batches, model


def same(a, b) -> bool:
    losses_a, weights_a = a[:2]
    losses_b, weights_b = b[:2]
    return (max(abs(x - y) for x, y in zip(losses_a, losses_b, strict=True)) <= TOL
            and all(torch.allclose(weights_a[k], weights_b[k], atol=TOL, rtol=0) for k in weights_a))


@pytest.mark.parametrize("packing", [False, True])
def test_cached_training_equals_uncached(make_model, tmp_path, packing):
    plain = aligned(make_model, tmp_path / "plain", None, packing)
    cached = aligned(make_model, tmp_path / "cached", tmp_path / "cache", packing)
    assert len(plain[0]) == 6 and same(plain, cached)
    stats = cached[2].summary()
    assert stats["misses"] == 6 and stats["hits"] >= 6  # 6 images: computed in epoch 1, read from then on


def test_sft_with_the_cache_equals_sft_without(make_model, tmp_path):
    plain = aligned(make_model, tmp_path / "plain", None, lm="full")
    cached = aligned(make_model, tmp_path / "cached", tmp_path / "cache", lm="full")
    assert any(name.startswith("lm.") for name in plain[1]) and same(plain, cached)
    assert cached[2].summary()["misses"] == 6


def test_a_second_run_reads_only_hits_and_never_runs_the_tower(make_model, tmp_path, monkeypatch):
    calls: list = []
    original = Trainer._setup

    def setup_and_count(trainer):  # count every tower forward (cache misses and the model's own) while training
        original(trainer)
        trainer.unwrapped_model().vision.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))

    monkeypatch.setattr(Trainer, "_setup", setup_and_count)
    first = aligned(make_model, tmp_path / "one", tmp_path / "cache")
    assert sum(calls) == 6  # the counter works: run 1 encodes each of the 6 images once, in epoch 1
    calls.clear()
    second = aligned(make_model, tmp_path / "two", tmp_path / "cache")
    assert same(first, second)
    assert second[2].summary()["misses"] == 0 and second[2].summary()["hits"] == 12
    assert calls == []  # neither the cache nor the model's forward ran the ViT


def test_another_tower_does_not_reuse_entries(make_model, tmp_path):
    aligned(make_model, tmp_path / "one", tmp_path / "cache", steps=3)

    def other_weights(model):
        with torch.no_grad():
            next(model.vision.parameters()).add_(0.01)

    losses, weights, batches, _ = aligned(make_model, tmp_path / "two", tmp_path / "cache", steps=3,
                                          tweak=other_weights)
    plain = aligned(make_model, tmp_path / "three", None, steps=3, tweak=other_weights)
    assert batches.summary()["hits"] == 0 and batches.summary()["misses"] == 6
    assert same((losses, weights), plain)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one folder per tower fingerprint


def test_a_truncated_entry_is_recomputed(make_model, tmp_path):
    first = aligned(make_model, tmp_path / "one", tmp_path / "cache", steps=3)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 6
    files[0].write_bytes(files[0].read_bytes()[:40])  # a kill mid-write on a filesystem without atomic rename
    files[1].write_bytes(b"")
    second = aligned(make_model, tmp_path / "two", tmp_path / "cache", steps=3)
    stats = second[2].summary()
    assert (stats["hits"], stats["misses"], stats["corrupt"]) == (4, 2, 2)
    assert same(first, second)
    third = aligned(make_model, tmp_path / "three", tmp_path / "cache", steps=3)  # rewritten: all hits again
    assert third[2].summary()["hits"] == 6 and third[2].summary()["corrupt"] == 0
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_the_stream_position_is_the_wrapped_one(make_model, tmp_path):
    model = make_model(seed=0)
    batches = cache_tower_features(stream(model), model, tmp_path / "cache")
    iterator = iter(batches)
    first = next(iterator)
    assert first["image_features"].shape[0] == 0 and "pixel_values" not in first  # text-only batch: no tower
    next(iterator)
    state = batches.state_dict()
    assert state == batches.batches.state_dict()
    expected = next(iterator)
    resumed = cache_tower_features(stream(model), model, tmp_path / "cache")
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert torch.equal(again["input_ids"], expected["input_ids"])
    assert torch.equal(again["image_features"], expected["image_features"])


def test_a_trainable_tower_is_refused(make_model, tmp_path):
    model = make_model()
    model.vision.requires_grad_(True)
    with pytest.raises(ValueError, match="data.feature_cache=.* needs a frozen vision tower"):
        cache_tower_features(stream(model), model, tmp_path / "cache")
    assert not isinstance(cache_tower_features(stream(model), model, None), CachedFeatureBatches)


def test_only_the_align_and_sft_configs_have_the_key():
    for config in (AlignConfig, SFTConfig):  # the stages whose tower is frozen and that read images per sample
        assert load_config(config, overrides=["--data.feature_cache", "/tmp/x"]).data.feature_cache == "/tmp/x"
        assert load_config(config).data.feature_cache is None
    with pytest.raises(BaseException):  # noqa: B017 (draccus exits with a usage error naming the key)
        load_config(DPOConfig, overrides=["--data.feature_cache", "/tmp/x"])


def test_resumed_with_the_cache_equals_uninterrupted(make_model, tmp_path):
    straight = aligned(make_model, tmp_path / "straight", tmp_path / "cache", packing=True)
    model = make_model(seed=0)
    apply_freeze(model, FreezeConfig(lm="frozen", projector="train"))
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_ratio=0.0, log_every=1, save_every=3,
                      report_to="none", mixed_precision="no")
    Trainer(model, cache_tower_features(stream(model, True), model, tmp_path / "cache"), SFTObjective(), cfg,
            tmp_path / "cut").fit()
    model = make_model(seed=0)
    apply_freeze(model, FreezeConfig(lm="frozen", projector="train"))
    resumed = Trainer(model, cache_tower_features(stream(model, True), model, tmp_path / "cache"), SFTObjective(),
                      cfg, tmp_path / "cut", resume_from=str(tmp_path / "cut" / "checkpoints" / "step-3"))
    resumed.fit()
    losses = [row["loss"] for row in resumed.history]
    trained = {k: v for k, v in model.named_parameters() if v.requires_grad}
    assert same((losses[-3:], trained), (straight[0][-3:], straight[1]))
