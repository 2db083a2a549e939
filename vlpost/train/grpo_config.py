"""Config of the GRPO stage: StageConfig plus `grpo` (objective) and `rollout` (generation) sections.

One optimizer step consumes `train.batch_size * train.grad_accum` completions per rank, i.e.
`/ rollout.group_size` prompts; a rollout batch is reused for `grpo.num_iterations` optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlpost.config import FreezeConfig, StageConfig

LOSSES = ("grpo", "dr_grpo", "dapo", "gspo", "rloo")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant_norm")
REFERENCES = ("auto", "adapter", "copy", "none")
BACKENDS = ("hf",)


@dataclass
class RolloutConfig:
    group_size: int = 4  # completions per prompt (G)
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)  # completions end after the first stop string
    generation_batch_size: int = 0  # completions per generate() call; 0 = the whole rollout at once
    # (with shared_prefill a call holds whole groups: generation_batch_size // group_size prompts, at least one)
    shared_prefill: bool = True  # prefill each prompt once and decode its G samples from one KV cache (hf backend)
    backend: str = "hf"  # hf (transformers generate, KV cache); see vlpost/train/rollout.py for vLLM


@dataclass
class GRPOLossConfig:
    loss: str = "grpo"  # grpo | dr_grpo | dapo | gspo | rloo
    num_iterations: int = 1  # μ: optimizer steps per rollout batch (old log-probs stored when > 1)
    beta: float = 0.0  # k3 KL weight to the reference; 0 = no reference pass at all
    reference: str = "auto"  # auto (adapter if LoRA else copy; none when beta = 0) | adapter | copy | none
    eps_low: float | None = None  # None = the loss's default (token 0.2; gspo 3e-4)
    eps_high: float | None = None  # None = the loss's default (token 0.2, dapo 0.28; gspo 4e-4)
    aggregation: str | None = None  # None = the loss's own: sequence_mean | token_mean | constant_norm
    dynamic_sampling: bool | None = None  # drop groups whose rewards are all equal, refill; None = on for dapo
    max_refill: int = 3  # extra generation rounds per rollout batch to replace dropped groups
    # loss pass: one packed row per group — the prompt (image tokens included) once, each completion behind a block
    # mask — instead of G prompt copies; same log-probs. Needs train.batch_size % rollout.group_size == 0. Off by
    # default: the dense (rows, L, L) mask has no flash-attention kernel, which matters for long rows on GPUs.
    shared_prompt: bool = False
    overlong_cache: int | None = None  # DAPO soft overlong window in tokens; None = dapo: max_new_tokens // 4
    eval_prompts: int = 32  # held-out prompts answered greedily before and after training (main process); 0 = off
    # also draw this many completions per eval prompt as in training (rollout's temperature / top_p): "sampled/*"
    # keys in eval_before / eval_after — the expected reward GRPO optimises, and best-of-k VQA accuracy; 0 = off
    eval_samples: int = 0
    # prompt shard folders those prompts come from (split evenly, first ones of each). Empty with data.shards: the
    # first eval_prompts training prompts, which training also draws (summary eval_source says "training shards")
    eval_shards: list[str] = field(default_factory=list)


def _grpo_freeze() -> FreezeConfig:
    return FreezeConfig(lm="full", projector="frozen")


@dataclass
class GRPOConfig(StageConfig):
    """Stage 3b: policy (full or LoRA) on prompt samples with verifiable / refusal rewards."""

    out: str = "runs/grpo"
    freeze: FreezeConfig = field(default_factory=_grpo_freeze)
    grpo: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


def check_grpo_config(cfg: GRPOConfig) -> None:
    """Cross-field checks the generic validator cannot do; errors name the key and the fix."""
    g, r, t = cfg.grpo, cfg.rollout, cfg.train
    for key, value, choices in (("grpo.loss", g.loss, LOSSES), ("grpo.reference", g.reference, REFERENCES),
                                ("rollout.backend", r.backend, BACKENDS)):
        if value not in choices:
            raise ValueError(f"config key '{key}' = {value!r}; expected one of {choices}")
    if g.aggregation is not None and g.aggregation not in AGGREGATIONS:
        raise ValueError(f"config key 'grpo.aggregation' = {g.aggregation!r}; expected one of {AGGREGATIONS} or null")
    if r.group_size < 2:
        raise ValueError(f"rollout.group_size = {r.group_size}: group advantages need at least 2 completions")
    rows = t.batch_size * t.grad_accum
    if rows % r.group_size:
        raise ValueError(f"train.batch_size * train.grad_accum = {rows} completions per step is not a multiple of "
                         f"rollout.group_size = {r.group_size}; change one of them")
    if g.num_iterations < 1 or g.max_refill < 0 or g.beta < 0 or r.max_new_tokens < 1:
        raise ValueError("grpo.num_iterations >= 1, grpo.max_refill >= 0, grpo.beta >= 0 and "
                         "rollout.max_new_tokens >= 1 are required")
    if g.shared_prompt and t.batch_size % r.group_size:
        raise ValueError(f"grpo.shared_prompt packs whole groups into micro-batches: train.batch_size = {t.batch_size} "
                         f"must be a multiple of rollout.group_size = {r.group_size}")
    if g.eval_samples < 0 or (g.eval_samples and g.eval_prompts <= 0):
        raise ValueError(f"grpo.eval_samples = {g.eval_samples}: expected 0 (off) or a count of completions per eval "
                         f"prompt, with grpo.eval_prompts > 0 (it is {g.eval_prompts})")
    if g.beta > 0 and g.reference == "none":
        raise ValueError(f"grpo.beta = {g.beta} needs a reference: set grpo.reference to auto|adapter|copy or beta 0")
    if g.reference == "adapter" and cfg.freeze.lm != "lora":
        raise ValueError("grpo.reference = 'adapter' needs freeze.lm = 'lora' (else use 'copy')")
    if not (0 < r.top_p <= 1) or r.temperature < 0:
        raise ValueError(f"rollout.top_p must be in (0, 1] and rollout.temperature >= 0 (got {r.top_p}, {r.temperature})")
