"""scripts/bench_vs_trl.py: its chat template renders TRL's structured content exactly like vlpost's strings, and
(when TRL is installed: the `bench` extra, not in CI) a 2-step sft run agrees with TRL on the step-0 loss."""

import json

import pytest

from vlpost.data.chat import ChatEncoder


def test_bench_template_renders_structured_content_like_strings(make_model, load_script):
    bench = load_script("bench_vs_trl")
    tokenizer = make_model().tokenizer
    tokenizer.chat_template = bench.BENCH_TEMPLATE
    messages = [{"role": "user", "content": "How many shapes?\n<image>"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "<image>\nAnd now?"}, {"role": "assistant", "content": "three"}]
    as_strings = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.apply_chat_template(bench.structured(messages), tokenize=False) == as_strings
    assert not as_strings.endswith("\n")  # a completion ends at <|im_end|> on both sides (TRL's DPO split)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert as_strings.startswith(prompt)
    encoded = ChatEncoder(tokenizer, tokens_per_image=4).encode(messages[:2], sample_id="x", num_images=1)
    trained = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != -100])
    assert trained == "two<|im_end|>"


def test_sft_step0_losses_agree_with_trl(tmp_path, load_script):
    pytest.importorskip("trl")
    bench = load_script("bench_vs_trl")
    out = tmp_path / "bench.json"
    code = bench.main(["--size", "tiny", "--stages", "sft", "--steps", "1", "--warmup", "1", "--repeats", "1",
                       "--batch-size", "4", "--json", str(out), "--work-dir", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    check = report["loss_check"]["sft"]
    assert code == 0 and check["agree"], check
    assert check["abs_diff"] < 1e-4 and check["packed_abs_diff"] < 1e-4
    assert set(report["sft"]) >= {"vlpost", "trl", "ratio", "unit", "valid"} and report["sft"]["trl"] > 0
