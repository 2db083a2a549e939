"""Export a run dir: `merged` (LoRA folded into the LM, a plain self-contained run dir) or `llava-hf`
(a transformers LlavaForConditionalGeneration dir, when the open_clip tower is expressible as CLIPVisionModel).

open_clip's ViT and HF's CLIPVisionModel compute the same function when the tower has a class token, a
pre-norm (`ln_pre`), plain pre-LN residual blocks (no layer scale, no extra attention / MLP norms) and a GELU
or QuickGELU MLP; `convertible_reasons` lists what breaks that, and export refuses with those reasons.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger(__name__)
HF_WEIGHTS = "model.safetensors"


class NotConvertible(ValueError):
    pass


def export_merged(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Load (merging any LoRA adapter) and save a plain run dir with the whole LM inside."""
    from vlpost.model.vlm import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(run_dir)
    model.save_pretrained(out_dir, lineage={"stage": "export", "to": "merged", "run_dir": str(Path(run_dir).resolve())})
    return Path(out_dir)


# ---------------------------------------------------------------------------- LLaVA-HF


def gelu_name(act: nn.Module) -> str | None:
    """The HF `hidden_act` that computes the same function as an open_clip MLP activation, if any."""
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    return None


def convertible_reasons(model) -> list[str]:
    """Why this model cannot be written as LlavaForConditionalGeneration (empty list: it can)."""
    reasons = []
    visual = model.vision.visual
    if model.projector.kind != "mlp2x_gelu":
        reasons.append(f"projector '{model.projector.kind}': LLaVA-HF's projector is Linear-GELU-Linear (mlp2x_gelu)")
    elif model.projector.net[0].out_features != model.projector.net[2].out_features:
        reasons.append(f"projector hidden size {model.projector.net[0].out_features}: LLaVA-HF's projector hidden "
                       f"layer is as wide as the LM ({model.projector.net[2].out_features})")
    if getattr(visual, "class_embedding", None) is None:
        reasons.append("the tower has no class token (HF CLIP always prepends one)")
    if not isinstance(getattr(visual, "ln_pre", None), nn.LayerNorm):
        reasons.append("the tower has no pre-norm ln_pre (HF CLIP always applies pre_layrnorm)")
    size, patch = tuple(visual.image_size), tuple(visual.patch_size)
    if size[0] != size[1] or patch[0] != patch[1]:
        reasons.append(f"non-square image {size} or patch {patch}")
    for index, block in enumerate(visual.transformer.resblocks):
        extras = [n for n in ("ls_1", "ls_2", "ln_attn") if not isinstance(getattr(block, n, nn.Identity()), nn.Identity)]
        if not isinstance(getattr(block.mlp, "ln", nn.Identity()), nn.Identity):
            extras.append("mlp.ln")
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or extras:
            reasons.append(f"block {index} is not a plain pre-LN block (extra: {extras or ['custom attention']})")
            break
        if gelu_name(block.mlp.gelu) is None:
            reasons.append(f"block {index} MLP activation {type(block.mlp.gelu).__name__} has no HF equivalent")
            break
    return reasons


def clip_vision_config(visual) -> dict:
    block = visual.transformer.resblocks[0]
    return {"model_type": "clip_vision_model", "hidden_size": visual.transformer.width,
            "intermediate_size": block.mlp.c_fc.out_features, "num_hidden_layers": len(visual.transformer.resblocks),
            "num_attention_heads": block.attn.num_heads, "image_size": int(visual.image_size[0]),
            "patch_size": int(visual.patch_size[0]), "num_channels": 3, "hidden_act": gelu_name(block.mlp.gelu),
            "layer_norm_eps": block.ln_1.eps, "projection_dim": visual.transformer.width}


def clip_vision_state(visual, prefix: str = "model.vision_tower.") -> dict[str, torch.Tensor]:
    """open_clip VisionTransformer weights under HF CLIPVisionModel names (q/k/v split from in_proj)."""
    state = {"embeddings.class_embedding": visual.class_embedding,
             "embeddings.patch_embedding.weight": visual.conv1.weight,
             "embeddings.position_embedding.weight": visual.positional_embedding,
             "pre_layrnorm.weight": visual.ln_pre.weight, "pre_layrnorm.bias": visual.ln_pre.bias,
             "post_layernorm.weight": visual.ln_post.weight, "post_layernorm.bias": visual.ln_post.bias}
    for i, block in enumerate(visual.transformer.resblocks):
        layer = f"encoder.layers.{i}."
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), block.attn.in_proj_weight.chunk(3),
                                      block.attn.in_proj_bias.chunk(3)):
            state[f"{layer}self_attn.{name}.weight"], state[f"{layer}self_attn.{name}.bias"] = weight, bias
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in pairs.items():
            state[f"{layer}{name}.weight"], state[f"{layer}{name}.bias"] = module.weight, module.bias
    return {prefix + k: v.detach().contiguous().cpu() for k, v in state.items()}


def llava_state(model) -> dict[str, torch.Tensor]:
    """All weights under LlavaForConditionalGeneration names (transformers 5 layout)."""
    state = clip_vision_state(model.vision.visual)
    net = model.projector.net
    for name, module in (("linear_1", net[0]), ("linear_2", net[2])):
        state[f"model.multi_modal_projector.{name}.weight"] = module.weight.detach().cpu()
        state[f"model.multi_modal_projector.{name}.bias"] = module.bias.detach().cpu()
    for key, value in model.lm.state_dict().items():
        name = key if key.startswith("lm_head.") else "model.language_model." + key.removeprefix("model.")
        state[name] = value.detach().contiguous().cpu()
    if getattr(model.lm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.clone() for k, v in state.items()}  # no shared storage (safetensors refuses it)


def llava_config(model) -> dict:
    text = model.lm.config.to_dict()
    depth = len(model.vision.visual.transformer.resblocks)
    return {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": clip_vision_config(model.vision.visual), "text_config": text,
            "image_token_index": model.image_token_id, "projector_hidden_act": "gelu",
            "vision_feature_layer": model.vision.layer_index - depth,  # HF hidden_states[i + 1] = block i output
            "vision_feature_select_strategy": "default", "multimodal_projector_bias": True,
            "image_seq_length": model.tokens_per_image,
            "tie_word_embeddings": bool(text.get("tie_word_embeddings", False))}


def export_llava_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors + tokenizer + CLIP image processor for transformers' LLaVA."""
    from vlpost.model.vlm import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(run_dir)
    reasons = convertible_reasons(model)
    if reasons:
        raise NotConvertible(f"{run_dir} cannot be written as LlavaForConditionalGeneration: " + "; ".join(reasons)
                             + ". Use `vlpost export --to merged` instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(llava_config(model), indent=2))
    save_file(llava_state(model), str(out / HF_WEIGHTS), metadata={"format": "pt"})
    model.tokenizer.save_pretrained(out)
    _save_processor(model, out)
    log.info("wrote LlavaForConditionalGeneration dir %s", out)
    return out


def _save_processor(model, out: Path) -> None:
    """CLIPImageProcessor with the tower's resize / crop / normalisation, and a LlavaProcessor around it."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = int(model.vision.visual.image_size[0])
    normalize = next((t for t in getattr(model.image_transform, "transforms", []) if hasattr(t, "mean")), None)
    mean = list(normalize.mean) if normalize is not None else None
    std = list(normalize.std) if normalize is not None else None
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=mean, image_std=std, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=images, tokenizer=model.tokenizer,
                               patch_size=int(model.vision.visual.patch_size[0]),
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=getattr(model.tokenizer, "chat_template", None))
    processor.save_pretrained(out)
