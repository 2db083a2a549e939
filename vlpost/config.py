"""Nested dataclass configs: YAML file + dotted CLI overrides (draccus), validated, dumped to the run dir."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import draccus

from vlpost.constants import LOSS_REDUCTIONS

# ----------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
    name: str = "vlpost-tiny-vit"  # open_clip model name, or "local-dir:/path" / "hf-hub:org/repo"
    pretrained: str | None = None  # open_clip tag ("openai") or a local checkpoint file; None = random init
    feature_layer: int = -2  # transformer block whose output feeds the projector (LLaVA: penultimate)


@dataclass
class ProjectorConfig:
    type: str = "mlp2x_gelu"  # linear | mlp2x_gelu | pixel_shuffle
    hidden_size: int | None = None  # width of the MLP's hidden layer; None = the LM's hidden size (LLaVA)
    merge: int = 2  # pixel_shuffle only: merge×merge neighbouring patches become one token (tokens = patches / merge²)


@dataclass
class LMConfig:
    path: str | None = None  # local HF dir (save_pretrained); None = random init from the fields below
    tokenizer: str | None = None  # tokenizer dir; defaults to `path`
    arch: str = "llama"  # llama | qwen2 (random init only)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    trust_remote_code: bool = False  # off unless you trust the model dir's code


@dataclass
class ModelConfig:
    init_from: str | None = None  # run dir of an earlier stage; when set, vision/projector/lm come from it
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)


# ----------------------------------------------------------------------------- data / training


@dataclass
class DataConfig:
    shards: str | None = None  # shard folder (vlpost prepare ...); None = in-memory synthetic world
    synthetic_samples: int = 256  # size of the in-memory synthetic set when `shards` is None
    synthetic_seed: int = 0
    image_size: int = 64  # synthetic world image size (the tower's transform resizes)
    max_length: int = 512  # tokens incl. image tokens; longer samples are truncated on text or dropped
    packing: bool = False  # pack samples into rows of max_length (exact: restarting positions + block mask)
    group_by_length: bool = False  # batches of similar length from a shuffled buffer (less padding)
    buffer_size: int = 1024  # samples planned at once for packing / length grouping
    shuffle: bool = True


@dataclass
class TowerCacheDataConfig(DataConfig):
    # Stages 1 and 2 (the tower is frozen there): a folder where the tower's features (what the projector reads)
    # are stored per image, keyed by sample id + image digest + tower fingerprint; later epochs and runs skip the
    # ViT. None = off.
    feature_cache: str | None = None


@dataclass
class FreezeConfig:
    lm: str = "frozen"  # frozen | full | lora
    projector: str = "train"  # train | frozen
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    steps: int = 50  # optimizer steps
    batch_size: int = 8  # per device, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    projector_lr: float | None = None  # defaults to lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row (each one is skipped)
    save_every: int = 500  # checkpoint every N optimizer steps into <out>/checkpoints/step-N; 0 = only on SIGTERM
    keep_last: int = 2  # checkpoints kept on disk; older ones are deleted after each save
    resume_from: str | None = None  # "latest" or a checkpoint dir; the stage flag --resume sets "latest"
    gradient_checkpointing: bool = False  # recompute the LM's activations in backward (non-reentrant)
    report_to: str = "tensorboard"  # comma-separated trackers: tensorboard, wandb; "none" = metrics.jsonl only


@dataclass
class SFTTrainConfig(TrainConfig):
    # how assistant-token NLL is averaged over the optimizer step: token (every token weighs the same; long answers
    # dominate) | sample (every sample weighs the same) | square (1/sqrt(tokens) per token, InternVL 2.5)
    loss_reduction: str = "token"


@dataclass
class StageConfig:
    out: str = "runs/stage"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _align_freeze() -> FreezeConfig:
    return FreezeConfig(lm="frozen", projector="train")


def _sft_freeze() -> FreezeConfig:
    return FreezeConfig(lm="full", projector="train")


@dataclass
class AlignConfig(StageConfig):
    """Stage 1: projector learns on image-caption pairs; tower and LM frozen."""

    out: str = "runs/align"
    data: TowerCacheDataConfig = field(default_factory=TowerCacheDataConfig)
    freeze: FreezeConfig = field(default_factory=_align_freeze)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)


@dataclass
class SFTConfig(StageConfig):
    """Stage 2: projector + LM (full or LoRA) on conversations, assistant-only loss."""

    out: str = "runs/sft"
    data: TowerCacheDataConfig = field(default_factory=TowerCacheDataConfig)
    freeze: FreezeConfig = field(default_factory=_sft_freeze)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)


CHOICES = {
    "projector.type": ("linear", "mlp2x_gelu", "pixel_shuffle"),
    "lm.arch": ("llama", "qwen2"),
    "lm.dtype": ("float32", "bfloat16", "float16"),
    "freeze.lm": ("frozen", "full", "lora"),
    "freeze.projector": ("train", "frozen"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.loss_reduction": LOSS_REDUCTIONS,
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
}

# ----------------------------------------------------------------------------- loading

C = TypeVar("C")


def validate(cfg: object, prefix: str = "") -> None:
    """Check enumerated string fields everywhere in a nested config; raise naming the key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
            continue
        short = ".".join(key.split(".")[-2:])
        if short in CHOICES and value not in CHOICES[short]:
            raise ValueError(f"config key '{key}' = {value!r}; expected one of {CHOICES[short]}")


@dataclass
class StageArgs:
    """What a stage script gets: the resolved config plus the run-dir flags."""

    cfg: object
    config_path: str | None
    resume: bool
    overwrite: bool


def parse_stage_args(config_class: type[C], argv: list[str] | None = None, description: str = "") -> StageArgs:
    """`stage.py --config FILE [--out DIR] [--resume] [--overwrite] [--a.b value ...]`; --help lists every key."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--overwrite", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.config and not Path(known.config).is_file():
        raise SystemExit(f"config file not found: {known.config}")
    if "-h" in rest or "--help" in rest:
        print(f"{description}\n\nflags: --config FILE --resume --overwrite; every config key below is an override:\n")
    cfg = draccus.parse(config_class, config_path=known.config, args=rest)
    validate(cfg)
    return StageArgs(cfg=cfg, config_path=known.config, resume=known.resume, overwrite=known.overwrite)


def load_config(config_class: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load a config from YAML plus `--a.b value` overrides (for tests and library use)."""
    cfg = draccus.parse(config_class, config_path=str(path) if path else None, args=overrides or [])
    validate(cfg)
    return cfg


def dump_config(cfg: object, path: str | Path) -> None:
    """Write the resolved config as YAML (re-loadable with --config)."""
    with open(path, "w") as handle:
        draccus.dump(cfg, handle)
