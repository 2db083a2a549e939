"""scripts/bench_mfu.py: the FLOP count against hand-worked numbers, the parameter counts it reads off a built
model, and a --tiny CPU run end to end (the GPU numbers themselves need a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_mfu.py"


def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_step_flops_match_hand_count(load_script):
    bench = load_script("bench_mfu")
    sizes = bench.FlopModel(vit_params=100, vit_layers=2, vit_width=8, vit_tokens=5, projector_params=10,
                            image_tokens=4, lm_params=1000, lm_layers=3, lm_attention_width=16)
    # 2 rows of 12 LM tokens (24 tokens), one image each (10 tower tokens, 8 image tokens in the LM)
    expected = {
        "vit": 2 * 100 * 10,  # frozen forward, 2N per tower token
        "vit_attention": 4 * 2 * 8 * 5 * 10,  # 4 L d T per tower token, T = 5
        "projector": 6 * 10 * 8,  # trains: 6N per image token
        "lm_attention": 12 * 3 * 16 * 12 * 24,  # 12 L d_attn T per LM token, T = 12
    }
    stage1 = bench.step_flops(sizes, rows=2, seq_len=12, images=2, stage="stage1")
    stage2 = bench.step_flops(sizes, rows=2, seq_len=12, images=2, stage="stage2")
    assert stage1 == {**expected, "lm": 4 * 1000 * 24, "total": 2000 + 3200 + 480 + 165888 + 96000}
    assert stage2 == {**expected, "lm": 6 * 1000 * 24, "total": 2000 + 3200 + 480 + 165888 + 144000}
    with pytest.raises(ValueError, match="stage"):
        bench.step_flops(sizes, rows=2, seq_len=12, images=2, stage="stage3")


@pytest.mark.parametrize("name, qkv_bias", [("tiny+llama", 0), ("tiny+qwen2", 32 + 16 + 16)])
def test_flop_model_counts_non_embedding_parameters(tmp_path, name, qkv_bias, load_script):
    bench = load_script("bench_mfu")
    torch.manual_seed(0)
    model = bench.build_model(bench.TINY_CONFIGS[name], seq_len=64, work=tmp_path, attn="sdpa")
    sizes = bench.flop_model(model)
    # tower (vlpost-tiny-vit: width 32, patch 8, 32 px, MLP 128): feature layer -2 of 2 → only block 0 runs
    conv = 3 * 8 * 8 * 32
    block = 2 * 32 + (3 * 32 * 32 + 3 * 32) + (32 * 32 + 32) + 2 * 32 + (32 * 128 + 128) + (128 * 32 + 32)
    # LM (width 32, 4 heads of 8, 2 KV heads, MLP 64, vocab 512): the 512 × 32 input table is not counted
    layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + qkv_bias + 3 * 32 * 64 + 2 * 32
    lm = 2 * layer + 32 + 512 * 32  # + final norm + LM head
    assert sizes == bench.FlopModel(vit_params=conv + block, vit_layers=1, vit_width=32, vit_tokens=16 + 1,
                                    projector_params=(32 * 32 + 32) * 2, image_tokens=16, lm_params=lm,
                                    lm_layers=2, lm_attention_width=32)
    assert sum(p.numel() for p in model.lm.parameters()) == lm + 512 * 32


def test_tiny_run_writes_json(tmp_path):
    out = tmp_path / "mfu.json"
    proc = run_script("--tiny", "--steps", "2", "--warmup", "1", "--json", str(out), "--work-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "means nothing" in proc.stdout
    report = json.loads(out.read_text())
    assert {"date", "device", "peak_tflops", "settings", "software", "results"} <= set(report)
    rows = report["results"]
    assert [(r["config"], r["stage"]) for r in rows] == [(c, s) for c in ("tiny+llama", "tiny+qwen2")
                                                         for s in ("stage1", "stage2")]
    for row in rows:
        for key in ("tokens_per_s", "step_s", "model_tflops_per_s", "mfu", "mfu_no_attention", "max_memory_gib"):
            assert row[key] > 0, (key, row)
        assert row["tokens_per_step"] == 2 * 64 and row["skipped_steps"] == 0
        assert row["model_tflops_per_s"] * 1e12 * row["step_s"] == pytest.approx(row["flops_per_step"]["total"])
        assert row["mfu"] == pytest.approx(row["model_tflops_per_s"] / report["peak_tflops"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_real_sizes_without_gpu_exit_with_message():
    proc = run_script("--steps", "1", timeout=60)
    assert proc.returncode != 0 and "no CUDA GPU" in proc.stderr and "--tiny" in proc.stderr
