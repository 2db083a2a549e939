"""scripts/bench_sft_logits.py runs and its two sides compute the same loss (the timing itself is not tested)."""

import json


def test_bench_sft_logits_tiny(load_script, tmp_path):
    bench = load_script("bench_sft_logits")
    out = tmp_path / "bench.json"
    result = bench.main(["--preset", "tiny", "--batches", "2", "--rounds", "1", "--json", str(out)])
    assert result == json.loads(out.read_text())
    assert result["loss_rel_diff"] < 1e-5
    assert 0 < result["trained_share"] < 1
    assert set(result["ms_per_step"]) == {"all_positions", "label_positions"}
