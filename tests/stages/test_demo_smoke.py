"""`make demo-smoke`: every stage of the demo runs, chains through run dirs, and the report has every key."""

import json

import pytest

from vlpost.demo import TARGETS, demo_tokens_per_image, run_demo
from vlpost.model.vlm import VisionLanguageModel


@pytest.mark.slow
def test_demo_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, smoke=True)
    for stage in ("bootstrap", "align", "sft", "dpo", "grpo"):
        assert (out / stage / "summary.json").is_file(), stage
        assert report[stage]["steps"] > 0
    for stage in ("align", "sft", "dpo", "grpo"):
        assert (out / stage / "vlpost.json").is_file(), stage
    lineage = json.loads((out / "grpo" / "vlpost.json").read_text())["lineage"]
    assert [entry["stage"] for entry in lineage] == ["align", "sft", "dpo", "grpo"]
    written = json.loads((out / "report.json").read_text())
    for key in [*TARGETS, "final.vqa_accuracy", "demo.seconds", "align.caption_loss"]:
        section, name = key.split(".")
        assert name in written[section], key
    assert set(written["demo"]["targets"]) == {*TARGETS, "final.vqa_accuracy"}
    assert (out / "report.html").is_file()
    # the audit step's image-token count is the one the trained model really uses
    align = VisionLanguageModel.from_pretrained(out / "align")
    assert demo_tokens_per_image(out / "bootstrap" / "clip") == align.projector.tokens_per_image
    # GRPO's before/after prompts are the demo's held-out eval shards, not the prompts it trains on
    # ... answered greedily and sampled as in training (configs/grpo/demo.yaml: eval_samples 8); the gain is theirs
    before, after = written["grpo"]["eval_before"], written["grpo"]["eval_after"]
    assert before["sampled/k"] == 8.0
    assert written["grpo"]["sampled_reward_gain"] == after["sampled/reward/mean"] - before["sampled/reward/mean"]
    assert written["grpo"]["eval_source"] == f"held-out shards {out / 'data' / 'eval_vqa'}, {out / 'data' / 'eval_safety'}"
    # a finished run loads without the bootstrap tower folder it was built from (its open_clip config travels)
    (out / "bootstrap" / "clip").rename(out / "bootstrap" / "clip-moved")
    grpo = VisionLanguageModel.from_pretrained(out / "grpo")
    assert grpo.tokens_per_image == align.projector.tokens_per_image
