"""Which modules train in a stage: the tower is always frozen; the LM is frozen, full or LoRA (peft)."""

from __future__ import annotations

from torch import nn

from vlpost.config import FreezeConfig, TrainConfig


def apply_freeze(model, cfg: FreezeConfig) -> None:
    """Set requires_grad per module; wrap the LM with LoRA adapters when `cfg.lm == "lora"`.

    An LM loaded with adapters from an earlier LoRA run is merged first: each stage trains on that run's weights.
    """
    if is_peft(model.lm):
        model.lm = model.lm.merge_and_unload()
    model.vision.requires_grad_(False)
    model.projector.requires_grad_(cfg.projector == "train")
    if cfg.lm == "lora":
        model.lm = add_lora(model.lm, cfg)
    else:
        model.lm.requires_grad_(cfg.lm == "full")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: freeze.projector is 'frozen' and freeze.lm is 'frozen'")


def add_lora(lm: nn.Module, cfg: FreezeConfig) -> nn.Module:
    """peft LoRA on the LM's `cfg.lora_targets`; the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    unknown = [t for t in cfg.lora_targets if t not in names]
    if unknown:
        raise ValueError(f"freeze.lora_targets {unknown} are not module names in the LM (have e.g. {sorted(names)[:12]})")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(lm, lora)


def is_peft(lm: nn.Module) -> bool:
    """A peft-wrapped LM (LoRA adapters); checked without importing peft for plain LMs."""
    if not hasattr(lm, "peft_config"):
        return False
    from peft import PeftModel

    return isinstance(lm, PeftModel)


def enable_gradient_checkpointing(model) -> None:
    """Recompute the LM's activations in backward (non-reentrant); the frozen tower is never checkpointed.

    Non-reentrant checkpointing passes gradients to the projector even when the LM and its embeddings are
    frozen; `enable_input_require_grads` also covers code paths that fall back to reentrant checkpointing.
    """
    lm = model.lm
    if not getattr(lm, "supports_gradient_checkpointing", True):
        raise ValueError(f"train.gradient_checkpointing: {type(lm).__name__} does not support it; set it to false")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    if not lm.get_input_embeddings().weight.requires_grad:
        lm.enable_input_require_grads()


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """Projector and LM parameters as separate optimizer groups (the projector has its own LR)."""
    projector = [p for p in model.projector.parameters() if p.requires_grad]
    projector_ids = {id(p) for p in projector}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in projector_ids]
    groups = []
    if projector:
        groups.append({"name": "projector", "params": projector, "lr": cfg.projector_lr or cfg.lr})
    if rest:
        groups.append({"name": "lm", "params": rest, "lr": cfg.lr})
    for group in groups:
        group["weight_decay"] = cfg.weight_decay
    return groups


def count_parameters(model) -> dict:
    """Trainable / total parameter counts per top-level module, for the run log."""
    out = {}
    for name in ("vision", "projector", "lm"):
        module = getattr(model, name)
        out[name] = {
            "total": sum(p.numel() for p in module.parameters()),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        }
    return out
