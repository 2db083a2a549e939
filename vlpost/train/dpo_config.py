"""Configs of the preference stages: DPO (stage 3a) and the optional Bradley–Terry reward model.

Both subclass `vlpost.config.StageConfig` and load with `parse_stage_args` / `load_config` like every stage;
their own enumerated keys are checked here (in `__post_init__`) with errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlpost.config import FreezeConfig, StageConfig, TrainConfig

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")
REFERENCE_MODES = ("auto", "adapter", "cache", "copy")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"config key '{key}' = {value!r}; expected one of {choices}")


@dataclass
class DPOLossConfig:
    """The DPO objective and where its reference log-probs come from."""

    beta: float = 0.1  # strength of the implicit KL to the reference
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo (length-averaged log-probs) | robust
    label_smoothing: float = 0.0  # > 0: conservative DPO (sigmoid) / robust DPO noise rate
    sft_weight: float = 0.0  # alpha: + alpha x token-mean NLL of the chosen answer (RPO)
    # auto: adapter when freeze.lm == lora, else cache. adapter: the policy with LoRA disabled (no second model);
    # cache: reference log-probs computed once before training and kept on disk; copy: a frozen deep copy in memory.
    reference: str = "auto"
    cache_dir: str = "runs/ref_cache"  # <cache_dir>/<reference hash>/<data id>-r<rank>.jsonl, shared across runs
    reference_batch_size: int = 16  # pairs per forward pass when precomputing the cache
    # one packed row per pair, [shared prompt | chosen rest | rejected rest] with a 4D block mask: the prompt and its
    # image tokens go through the LM once instead of twice; same log-probs. Off by default: the dense mask has no
    # flash-attention kernel (on GPUs with long answers the padded [chosen; rejected] rows may be faster)
    shared_prompt: bool = False

    def __post_init__(self) -> None:
        _check_choice("dpo.loss_type", self.loss_type, DPO_LOSS_TYPES)
        _check_choice("dpo.reference", self.reference, REFERENCE_MODES)
        if self.beta <= 0:
            raise ValueError(f"config key 'dpo.beta' = {self.beta}; must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"config key 'dpo.label_smoothing' = {self.label_smoothing}; must be in [0, 0.5)")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("config key 'dpo.label_smoothing' must be 0 with dpo.loss_type=ipo")
        if self.sft_weight < 0:
            raise ValueError(f"config key 'dpo.sft_weight' = {self.sft_weight}; must be >= 0")


def _dpo_freeze() -> FreezeConfig:
    # The projector is frozen in DPO by default: preference pairs teach the answer, not the image features, and a
    # frozen projector lets the adapter reference reuse the live one. With projector=train the adapter reference
    # keeps a frozen copy of the initial projector (small), so the reference is still the initial model.
    return FreezeConfig(lm="lora", projector="frozen")


def _dpo_train() -> TrainConfig:
    return TrainConfig(steps=100, batch_size=8, lr=5e-6, warmup_ratio=0.1, schedule="cosine")


@dataclass
class DPOConfig(StageConfig):
    """Stage 3a: the policy (LoRA or full) learns from chosen / rejected pairs against a fixed reference."""

    out: str = "runs/dpo"
    freeze: FreezeConfig = field(default_factory=_dpo_freeze)
    train: TrainConfig = field(default_factory=_dpo_train)
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)


@dataclass
class RewardHeadConfig:
    """Bradley–Terry training of a scalar head and its held-out check."""

    margin: float = 0.0  # BT margin: -logsig(s_c - s_r - margin)
    eval_fraction: float = 0.1  # share of pairs held out (by a seeded hash of the sample id)
    eval_seed: int = 0
    eval_batch_size: int = 16
    eval_max_pairs: int = 2000  # cap on the held-out pairs scored at the end

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"config key 'reward.eval_fraction' = {self.eval_fraction}; must be in [0, 1)")


def _reward_freeze() -> FreezeConfig:
    return FreezeConfig(lm="full", projector="frozen")


@dataclass
class RewardConfig(StageConfig):
    """Optional stage: a scalar head on the VLM scores (prompt, image, completion) for GRPO rewards and eval."""

    out: str = "runs/reward"
    freeze: FreezeConfig = field(default_factory=_reward_freeze)
    reward: RewardHeadConfig = field(default_factory=RewardHeadConfig)
