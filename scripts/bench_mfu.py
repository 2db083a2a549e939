"""GPU MFU benchmark: random-init real-size VLMs, stage-1 and stage-2 optimizer steps in bf16 through vlpost's Trainer.

Configs (tower frozen everywhere; mlp2x_gelu projector; 576 image tokens per image for ViT-L/14-336):

  vitl336+llama7bw-8L   ViT-L/14-336 + Llama of 7B width (hidden 4096, MLP 11008, 32 heads, vocab 32000), 8 layers
  vitl336+qwen2-0.5b    ViT-L/14-336 + Qwen2-0.5B-like (hidden 896, 24 layers, 14 / 2 KV heads, MLP 4864, vocab 151936)

  stage1  projector trains; the LM is frozen but backpropagates to its inputs (AlignConfig's freeze)
  stage2  projector + LM train in full (SFTConfig's freeze)

Every model is built by `VisionLanguageModel.build` (open_clip tower without pretrained weights, random-init LM from
`vlpost.model.lm`, a word-level tokenizer of the right vocabulary size made locally: nothing is downloaded), frozen by
`apply_freeze` and trained by `vlpost.train.trainer.Trainer` (SFTObjective, AdamW, clipping 1.0, accelerate's bf16
autocast on GPU, fp32 on CPU) on one synthetic batch per step: each row one image, then random text ids up to
--seq-len. Warm-up steps are not timed; each timed step ends with `torch.cuda.synchronize()`.

Reports per config × stage: tokens/s (all LM positions, image tokens included), step time, model TFLOP/s,
MFU = model FLOPs/s ÷ peak, and max GPU memory allocated. Model FLOPs are `step_flops` (matmuls only, no
recomputation: gradient checkpointing does not raise them). The peak defaults to the bf16 dense peak of the detected
GPU (H100 / H200 SXM: 989 TFLOP/s); override with --peak-tflops.

    python scripts/bench_mfu.py [--configs NAME,...] [--stages stage1,stage2] [--batch-size 8] [--seq-len 2048]
                                [--warmup 3] [--steps 10] [--gradient-checkpointing] [--json OUT]
    OMP_NUM_THREADS=1 python scripts/bench_mfu.py --tiny --steps 2    # CPU smoke run of the same code, seconds

Targets (issue 10): 7B-width stage 2 ≥ 40% MFU, stage 1 ≥ 35%.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

EOS_TOKEN = "<|endoftext|>"
STAGES = ("stage1", "stage2")
LM_LINEAR_FACTOR = {"stage1": 4, "stage2": 6}  # forward 2N + input grads 2N (+ weight grads 2N when it trains)
DEFAULT_PEAK_TFLOPS = 989.0
# bf16 dense tensor-core peaks (TFLOP/s) by device-name substring, first match wins (SXM parts; pass
# --peak-tflops for others, e.g. H100 PCIe 756).
PEAK_BF16_DENSE = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class BenchConfig:
    tower: str  # open_clip model name (vlpost's tiny configs are registered too)
    arch: str  # llama | qwen2 (vlpost.model.lm.RANDOM_INIT_ARCHS)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int


CONFIGS = {
    "vitl336+llama7bw-8L": BenchConfig("ViT-L-14-336", "llama", 4096, 8, 32, 32, 11008, 32000),
    "vitl336+qwen2-0.5b": BenchConfig("ViT-L-14-336", "qwen2", 896, 24, 14, 2, 4864, 151936),
}
TINY_CONFIGS = {
    "tiny+llama": BenchConfig("vlpost-tiny-vit", "llama", 32, 2, 4, 2, 64, 512),
    "tiny+qwen2": BenchConfig("vlpost-tiny-vit", "qwen2", 32, 2, 4, 2, 64, 512),
}
TARGETS = {("vitl336+llama7bw-8L", "stage2"): 0.40, ("vitl336+llama7bw-8L", "stage1"): 0.35}


# ---------------------------------------------------------------------------- FLOP count


@dataclass(frozen=True)
class FlopModel:
    """The sizes the FLOP count needs, read off a built VisionLanguageModel by `flop_model`."""

    vit_params: int  # matmul parameters of the tower part that runs: patch conv + blocks up to the feature layer
    vit_layers: int  # blocks that run (feature_layer -2 of 24: 23)
    vit_width: int
    vit_tokens: int  # tokens per image inside the tower: patches + class token (577 for ViT-L/14-336)
    projector_params: int  # Linear weights and biases (a per-slot position embedding is an add, not counted)
    image_tokens: int  # LM positions per image (tokens_per_image, 576)
    lm_params: int  # non-embedding LM parameters: all but the input embedding table (the LM head is counted)
    lm_layers: int
    lm_attention_width: int  # query heads × head dim (GQA shrinks K/V projections, not the score / value matmuls)


def step_flops(model: FlopModel, rows: int, seq_len: int, images: int, stage: str) -> dict[str, int]:
    """Model FLOPs of one optimizer step over `rows` sequences of `seq_len` LM tokens holding `images` images.

    Dense layers, N parameters each part, per token: frozen ViT forward 2N (on patch and class tokens); projector 6N
    (it trains; counts its first layer's input gradient, which is not computed: < 0.1% of a step); LM 6N in stage 2
    and 4N in stage 1 (frozen, but gradients flow to its inputs: forward 2N + input grads 2N, no weight grads). LM N
    excludes the input embedding table (a lookup) but includes the LM head (a matmul on every position).
    Attention score / value matmuls are counted explicitly, as PaLM (App. B) does, over the full T×T matrix although
    causal kernels skip about half: 4·L·d_attn·T per token forward, ×3 for forward + backward (12·L·d_attn·T; the
    LM's attention has no weights, so freezing it does not shrink its backward). The ViT's forward-only term is
    4·L·d·T. Norms, activations, softmax, the optimizer and recomputation are not counted.
    """
    if stage not in LM_LINEAR_FACTOR:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    vit_tokens = images * model.vit_tokens
    lm_tokens = rows * seq_len
    flops = {
        "vit": 2 * model.vit_params * vit_tokens,
        "vit_attention": 4 * model.vit_layers * model.vit_width * model.vit_tokens * vit_tokens,
        "projector": 6 * model.projector_params * images * model.image_tokens,
        "lm": LM_LINEAR_FACTOR[stage] * model.lm_params * lm_tokens,
        "lm_attention": 12 * model.lm_layers * model.lm_attention_width * seq_len * lm_tokens,
    }
    flops["total"] = sum(flops.values())
    return flops


def flop_model(model) -> FlopModel:
    """Parameter counts and shapes of a built VisionLanguageModel, as `step_flops` defines them."""
    visual = model.vision.visual
    blocks = visual.transformer.resblocks[: model.vision.layer_index + 1]
    vit_params = count(visual.conv1) + count(blocks)
    projector_params = sum(p.numel() for name, p in model.projector.named_parameters() if name != "position")
    lm = model.lm
    embedding = lm.get_input_embeddings().weight
    lm_params = count(lm) - embedding.numel()
    head = lm.get_output_embeddings()
    if head is not None and head.weight is embedding:  # tied: the head matmul still runs on every position
        lm_params += embedding.numel()
    config = lm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopModel(
        vit_params=vit_params, vit_layers=len(blocks), vit_width=visual.transformer.width,
        vit_tokens=int(visual.positional_embedding.shape[0]), projector_params=projector_params,
        image_tokens=model.tokens_per_image, lm_params=lm_params, lm_layers=config.num_hidden_layers,
        lm_attention_width=config.num_attention_heads * head_dim,
    )


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def peak_tflops(device_name: str) -> tuple[float, bool]:
    """(bf16 dense peak, known) for a device name; unknown devices get the H100 number."""
    for key, peak in PEAK_BF16_DENSE:
        if key in device_name:
            return peak, True
    return DEFAULT_PEAK_TFLOPS, False


# ---------------------------------------------------------------------------- models and data


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` ids (<pad>, eos, <image>, filler words): the batches are
    random ids, so only the vocabulary size matters (it sets the embedding and LM-head shapes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlpost.constants import IMAGE_TOKEN, PAD_TOKEN

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, IMAGE_TOKEN: 2} | {f"w{i}": i for i in range(3, vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                        additional_special_tokens=[IMAGE_TOKEN])
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"synthetic tokenizer has {len(tokenizer)} ids, wanted {vocab_size}")
    return tokenizer


def build_model(bench: BenchConfig, seq_len: int, work: Path, attn: str):
    """A random-init VLM through `VisionLanguageModel.build`, on CPU in fp32 (the Trainer moves it)."""
    from vlpost.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
    from vlpost.model.vlm import VisionLanguageModel

    tokenizer_dir = work / f"tokenizer-{bench.vocab_size}"
    if not tokenizer_dir.is_dir():
        synthetic_tokenizer(bench.vocab_size).save_pretrained(tokenizer_dir)
    cfg = ModelConfig(
        vision=VisionConfig(name=bench.tower, pretrained=None),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=LMConfig(tokenizer=str(tokenizer_dir), arch=bench.arch, hidden_size=bench.hidden_size,
                    num_layers=bench.num_layers, num_heads=bench.num_heads, num_kv_heads=bench.num_kv_heads,
                    intermediate_size=bench.intermediate_size, max_position_embeddings=seq_len,
                    attn_implementation=attn),
    )
    return VisionLanguageModel.build(cfg)


def make_batch(model, rows: int, seq_len: int, device, seed: int = 0) -> dict:
    """One image per row, its tokens first, then random text ids; the text is the target (image positions -100)."""
    from vlpost.constants import IGNORE_INDEX

    image_tokens = model.tokens_per_image
    if seq_len <= image_tokens + 1:
        raise SystemExit(f"--seq-len {seq_len} leaves no text after {image_tokens} image tokens; use a longer one")
    generator = torch.Generator().manual_seed(seed)
    vocab = model.lm.get_input_embeddings().num_embeddings
    text = torch.randint(3, vocab, (rows, seq_len - image_tokens), generator=generator)
    input_ids = torch.cat([torch.full((rows, image_tokens), model.image_token_id), text], dim=1)  # (B, T)
    labels = input_ids.masked_fill(input_ids == model.image_token_id, IGNORE_INDEX)
    size = model.vision.visual.image_size
    pixel_values = torch.randn(rows, 3, size[0], size[1], generator=generator)  # (B, 3, H, W)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "pixel_values": pixel_values}
    return {key: value.to(device) for key, value in batch.items()}


class StepClock:
    """Trainer callback: a timestamp after every applied optimizer step (after a CUDA sync on GPU)."""

    def __init__(self):
        self.marks: list[float] = []

    def on_step_end(self, trainer) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def seconds(self, warmup: int, steps: int) -> float:
        return self.marks[warmup + steps - 1] - self.marks[warmup - 1]


# ---------------------------------------------------------------------------- one measurement


def measure(template, name: str, stage: str, args, accelerator, work: Path) -> dict:
    """Train a copy of `template` for warmup + steps optimizer steps at `stage`; rates over the timed steps."""
    from vlpost.config import AlignConfig, SFTConfig, TrainConfig
    from vlpost.train.freeze import apply_freeze
    from vlpost.train.sft_objective import SFTObjective
    from vlpost.train.trainer import Trainer

    model = copy.deepcopy(template)
    apply_freeze(model, (AlignConfig() if stage == "stage1" else SFTConfig()).freeze)
    cfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.0,
                      schedule="constant", log_every=10**9, save_every=0, report_to="none",
                      gradient_checkpointing=args.gradient_checkpointing)
    batch = make_batch(model, args.batch_size, args.seq_len, accelerator.device, seed=args.seed)
    clock = StepClock()
    trainer = Trainer(model, itertools.repeat(batch), SFTObjective(), cfg, work / f"{name}-{stage}",
                      accelerator=accelerator, stage=f"{name} {stage}", callbacks=[clock])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    seconds = clock.seconds(args.warmup, args.steps)
    memory_gib = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    sizes = flop_model(model)
    flops = step_flops(sizes, args.batch_size, args.seq_len, images=args.batch_size, stage=stage)
    result = summarize(name, stage, args, sizes, flops, seconds, memory_gib)
    result.update(final_loss=trainer.history[-1]["loss"], skipped_steps=trainer.skipped_steps)
    del trainer, model, batch
    return result


def release(accelerator) -> None:
    """Free the last measurement's model, optimizer and cached GPU blocks before the next one."""
    accelerator.free_memory()  # drops accelerate's references to the prepared model and optimizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(name: str, stage: str, args, sizes: FlopModel, flops: dict, seconds: float, memory_gib: float) -> dict:
    step_s = seconds / args.steps
    peak = args.peak_tflops * 1e12
    no_attention = flops["total"] - flops["vit_attention"] - flops["lm_attention"]
    return {
        "config": name, "stage": stage, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len, "step_s": step_s,
        "tokens_per_s": args.batch_size * args.seq_len / step_s,
        "model_tflops_per_s": flops["total"] / step_s / 1e12, "mfu": flops["total"] / step_s / peak,
        "mfu_no_attention": no_attention / step_s / peak, "max_memory_gib": memory_gib,
        "memory_kind": "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "process peak RSS (CPU)",
        "target_mfu": TARGETS.get((name, stage)), "flops_per_step": flops, "sizes": asdict(sizes),
    }


# ---------------------------------------------------------------------------- report


def format_table(results: list[dict]) -> str:
    header = (f"{'config':<22} {'stage':<7} {'batch x seq':>11} {'tokens/s':>10} {'step s':>8} {'TFLOP/s':>8} "
              f"{'MFU':>6} {'6N-only':>7} {'target':>6} {'mem GiB':>8}")
    lines = [header]
    for row in results:
        if "error" in row:
            lines.append(f"{row['config']:<22} {row['stage']:<7} {row['batch_size']:>4} x {row['seq_len']:<4} "
                         f"{row['error']} (try a smaller --batch-size or --gradient-checkpointing)")
            continue
        target = f"{row['target_mfu']:.0%}" if row["target_mfu"] else "-"
        lines.append(
            f"{row['config']:<22} {row['stage']:<7} {row['batch_size']:>4} x {row['seq_len']:<4} "
            f"{row['tokens_per_s']:>10.0f} {row['step_s']:>8.3f} {row['model_tflops_per_s']:>8.1f} "
            f"{row['mfu']:>6.1%} {row['mfu_no_attention']:>7.1%} {target:>6} {row['max_memory_gib']:>8.2f}")
    return "\n".join(lines)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (smoke run; MFU is meaningless)")
    parser.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 8; --tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="LM tokens per row (default 2048; --tiny 64)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps (at least 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn", default="sdpa", help="LM attention implementation: sdpa | eager | flash_attention_2")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: detected bf16 dense peak; H100 / H200 989)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--work-dir", default=None, help="tokenizers and Trainer run dirs (default: a temp dir)")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    args.seq_len = args.seq_len or (64 if args.tiny else 2048)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (timing starts at the end of the last warm-up step)")
    table = TINY_CONFIGS if args.tiny else CONFIGS
    names = args.configs.split(",") if args.configs else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; {'--tiny ' if args.tiny else ''}configs are {list(table)}")
    stages = args.stages.split(",")
    if any(s not in STAGES for s in stages):
        parser.error(f"--stages {args.stages!r}: expected a comma-separated subset of {STAGES}")
    args.selected = {n: table[n] for n in names}
    args.stage_list = stages
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("bench_mfu: no CUDA GPU here. The real sizes (ViT-L/14-336 + a 7B-width LM) need one; "
                         "--tiny runs the same code with tiny models on CPU (its MFU means nothing).")
    name = device_name()
    if args.peak_tflops is None:
        args.peak_tflops, known = peak_tflops(name)
        if not known and torch.cuda.is_available():
            print(f"warning: no bf16 peak known for {name!r}; assuming {args.peak_tflops} TFLOP/s "
                  "(pass --peak-tflops)", file=sys.stderr)
    if not torch.cuda.is_available():
        print(f"note: CPU run against a {args.peak_tflops:g} TFLOP/s GPU peak: the MFU column means nothing here")
    if args.tiny:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from vlpost.config import TrainConfig
    from vlpost.train.trainer import make_accelerator

    accelerator = make_accelerator(TrainConfig(mixed_precision="auto", report_to="none"))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-mfu-") as tmp:
        work = Path(args.work_dir or tmp)
        for config_name, bench in args.selected.items():
            torch.manual_seed(args.seed)
            template = build_model(bench, args.seq_len, work, args.attn)
            for stage in args.stage_list:
                try:
                    row = measure(template, config_name, stage, args, accelerator, work)
                except torch.OutOfMemoryError:  # record it and go on: one GPU session should cover every row
                    row = {"config": config_name, "stage": stage, "batch_size": args.batch_size,
                           "seq_len": args.seq_len, "error": "out of memory"}
                release(accelerator)  # after an OOM only here, once the traceback holding the model is gone
                results.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
            del template
            gc.collect()
    print(f"\n{name}, peak {args.peak_tflops:g} TFLOP/s, precision {accelerator.mixed_precision}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.warmup} warm-up + {args.steps} timed steps\n{format_table(results)}")
    if args.json:
        report = {"date": datetime.date.today().isoformat(), "device": name, "peak_tflops": args.peak_tflops,
                  "precision": accelerator.mixed_precision, "software": software(),
                  "settings": {k: getattr(args, k) for k in ("tiny", "batch_size", "seq_len", "warmup", "steps", "lr",
                                                             "gradient_checkpointing", "attn", "seed")},
                  "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def software() -> dict:
    import open_clip
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "open_clip": open_clip.__version__, "cuda": torch.version.cuda}


if __name__ == "__main__":
    sys.exit(main())
