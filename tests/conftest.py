"""Shared fixtures: a locally trained tokenizer and tiny random VLMs (no downloads, CPU only)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger().setLevel(logging.ERROR)
torch.set_num_threads(1)  # tiny models: one thread is fastest and does not oversubscribe

CORPUS = [
    "a red circle and a blue square on a white background",
    "What colour is the circle? The circle is red.",
    "two people are standing; one holds a cup and one holds a ball",
    "How many shapes are there? three",
    "The person on the left wears a green shirt and a hat.",
    "You are a helpful assistant that describes images.",
    "yes no left right top bottom small large one two three four",
] * 40


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    """Two template styles: chatml (with {% generation %}) and llama3 (prefix-derived masks)."""
    from vlpost.model.tokenizer import train_bpe_tokenizer

    dirs = {}
    for template in ("chatml", "llama3"):
        path = tmp_path_factory.mktemp(f"tok_{template}")
        train_bpe_tokenizer(CORPUS, vocab_size=400, template=template).save_pretrained(path)
        dirs[template] = str(path)
    return dirs


@pytest.fixture
def make_model(tokenizer_dirs):
    """Build a tiny random VLM: make_model(arch="llama", projector="mlp2x_gelu", template="chatml", seed=0, merge=2)."""
    from vlpost.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
    from vlpost.model.vlm import VisionLanguageModel

    def build(arch: str = "llama", projector: str = "mlp2x_gelu", template: str = "chatml", seed: int = 0,
              attn: str = "sdpa", merge: int = 2):
        torch.manual_seed(seed)
        cfg = ModelConfig(
            vision=VisionConfig(name="vlpost-tiny-vit"),
            projector=ProjectorConfig(type=projector, merge=merge),
            lm=LMConfig(arch=arch, tokenizer=tokenizer_dirs[template], hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, intermediate_size=64, attn_implementation=attn),
        )
        return VisionLanguageModel.build(cfg)

    return build


@pytest.fixture(scope="session")
def load_script():
    """load_script("bench_mfu") -> scripts/bench_mfu.py imported as a module (scripts/ is not a package)."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
        spec.loader.exec_module(module)
        return module

    return load
