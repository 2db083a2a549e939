"""Stage scripts compose: align → sft chains through run dirs; the CLI contract refuses to clobber runs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from stages import align, sft
from vlpost.config import ModelConfig
from vlpost.model.vlm import VisionLanguageModel

SMALL = ["--train.steps", "2", "--data.synthetic_samples", "32", "--train.batch_size", "4"]


@pytest.fixture(scope="module")
def align_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "align"
    align.main(["--config", "configs/align/tiny.yaml", "--out", str(out), *SMALL])
    return out


def test_sft_starts_from_the_align_projector(align_run, tmp_path):
    saved = load_file(str(align_run / "projector.safetensors"))
    model = VisionLanguageModel.build(ModelConfig(init_from=str(align_run)))
    for name, tensor in model.projector.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    summary = sft.main(["--config", "configs/sft/tiny.yaml", "--out", str(tmp_path / "sft"),
                        "--model.init_from", str(align_run), *SMALL])
    assert summary["steps"] == 2
    lineage = json.loads((tmp_path / "sft" / "vlpost.json").read_text())["lineage"]
    assert [entry["stage"] for entry in lineage] == ["align", "sft"]
    assert (tmp_path / "sft" / "config.yaml").is_file() and (tmp_path / "sft" / "metrics.jsonl").is_file()


def test_an_existing_run_is_not_overwritten_without_a_flag(align_run):
    before = (align_run / "projector.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        align.main(["--config", "configs/align/tiny.yaml", "--out", str(align_run), *SMALL])
    assert (align_run / "projector.safetensors").read_bytes() == before


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(SystemExit):
        align.main(["--config", "configs/align/tiny.yaml", "--out", str(tmp_path / "x"), "--train.lx", "1"])
    with pytest.raises(ValueError, match="freeze.lm"):
        align.main(["--config", "configs/align/tiny.yaml", "--out", str(tmp_path / "y"), "--freeze.lm", "half"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(Exception, match="stepz"):
        align.main(["--config", str(bad), "--out", str(tmp_path / "z")])
