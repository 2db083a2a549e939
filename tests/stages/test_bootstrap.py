"""Stage 0 is reproducible: the same config gives the same tokenizer, CLIP and LM bit for bit; another seed does not."""

import json

import torch
from safetensors.torch import load_file

from stages.bootstrap import main as bootstrap
from vlpost.demo import SMOKE_STEPS

SMALL = [*SMOKE_STEPS["bootstrap"], "--clip.batch_size", "16", "--lm.batch_size", "4", "--lm.seq_len", "32"]


def weights(run, *names):
    return {name: load_file(str(run / name)) for name in names}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        runs[name] = tmp_path / name
        bootstrap(["--config", "configs/bootstrap/demo.yaml", "--out", str(runs[name]), "--seed", str(seed), *SMALL])
    files = ("clip/open_clip_model.safetensors", "lm/model.safetensors")
    a, b, c = (weights(runs[n], *files) for n in "abc")
    for f in files:
        assert same(a[f], b[f]), f"{f} differs between two runs with the same seed"
        assert not same(a[f], c[f]), f"{f} did not change with the seed"
    assert (runs["a"] / "tokenizer/tokenizer.json").read_text() == (runs["b"] / "tokenizer/tokenizer.json").read_text()
    summary = [json.loads((runs[n] / "summary.json").read_text()) for n in "ab"]
    assert summary[0]["clip_loss"] == summary[1]["clip_loss"] and summary[0]["lm_loss"] == summary[1]["lm_loss"]
