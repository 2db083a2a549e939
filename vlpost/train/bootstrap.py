"""Stage 0 (demo only): make the weights we cannot download — a tokenizer, a tiny CLIP and a tiny LM.

The tiny CLIP is trained with open_clip's own model code and ClipLoss and saved in open_clip's folder format
(`open_clip_config.json` + `open_clip_model.safetensors`), so `vision.name: local-dir:<dir>` loads it exactly the way a
real pretrained tower is loaded from the hub. The LM is a transformers model saved with `save_pretrained`.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlpost.config import LMConfig

log = logging.getLogger(__name__)


@dataclass
class TokenizerSpec:
    vocab_size: int = 2048
    texts: int = 20000  # synthetic sentences to train on


@dataclass
class ClipSpec:
    model: str = "vlpost-demo-vit"  # an open_clip config name (vlpost/model/configs)
    pairs: int = 4000
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3


@dataclass
class LMSpec:
    model: LMConfig = field(default_factory=lambda: LMConfig(hidden_size=128, num_layers=4, num_heads=4,
                                                             num_kv_heads=2, intermediate_size=384))
    texts: int = 20000
    steps: int = 300
    batch_size: int = 32
    seq_len: int = 64
    lr: float = 2e-3


@dataclass
class BootstrapConfig:
    out: str = "runs/bootstrap"
    seed: int = 0
    image_size: int = 64
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    clip: ClipSpec = field(default_factory=ClipSpec)
    lm: LMSpec = field(default_factory=LMSpec)


def cosine_lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_tiny_clip(spec: ClipSpec, pairs, out_dir: Path, image_size: int, seed: int = 0) -> dict:
    """Contrastive training of a tiny open_clip model; returns the final loss and the zero-shot accuracy on the data.

    `seed` fixes the weight init (open_clip draws it from torch's global generator) and the batch order, so the same
    config gives the same checkpoint bit for bit.
    """
    import open_clip
    from open_clip.loss import ClipLoss

    from vlpost.model.vision import register_tiny_configs

    register_tiny_configs()
    torch.manual_seed(seed)
    model, _, transform = open_clip.create_model_and_transforms(spec.model, pretrained=None,
                                                                force_image_size=image_size)
    tokenizer = open_clip.get_tokenizer(spec.model)
    images, texts = zip(*pairs)
    pixels = torch.stack([transform(img) for img in images])  # (N, 3, H, W)
    tokens = tokenizer(list(texts))  # (N, context_length)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for step in (bar := tqdm(range(spec.steps), desc="bootstrap clip")):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, spec.steps, spec.lr)
        idx = torch.randint(0, len(pixels), (spec.batch_size,), generator=generator)
        image_features, text_features, logit_scale = model(pixels[idx], tokens[idx])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model_cfg = open_clip.get_model_config(spec.model)
    model_cfg["vision_cfg"]["image_size"] = image_size
    save_open_clip_dir(model, model_cfg, out_dir)
    return {"clip_loss": loss.item(), "clip_retrieval_acc": clip_retrieval_accuracy(model, pixels[:256], tokens[:256])}


def save_open_clip_dir(model, model_cfg: dict, out_dir: Path) -> None:
    """open_clip's folder format (what `hf-hub:` repos hold; `vision.name: local-dir:<out_dir>` loads it)."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    # its SimpleTokenizer needs no files
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / HF_SAFE_WEIGHTS_NAME))
    save_config_for_hf(model, out_dir / HF_CONFIG_NAME, model_config=model_cfg)


@torch.no_grad()
def clip_retrieval_accuracy(model, pixels: torch.Tensor, tokens: torch.Tensor) -> float:
    """Share of images whose own caption is the nearest text (duplicates captions count as correct)."""
    image = F.normalize(model.encode_image(pixels), dim=-1)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    best = (image @ text.T).argmax(dim=1)
    same = (tokens[best] == tokens).all(dim=1)
    return float(same.float().mean())


def pretrain_tiny_lm(spec: LMSpec, tokenizer, texts: list[str], out_dir: Path, seed: int = 0) -> dict:
    """Causal-LM pre-training of a small Llama/Qwen2 on synthetic sentences, saved with save_pretrained.

    `seed` fixes the weight init and the batch order (same config, same weights).
    """
    from transformers import AutoModelForCausalLM

    from vlpost.model.lm import add_special_tokens, random_lm_config

    config = random_lm_config(spec.model, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    add_special_tokens(model, tokenizer)
    eos = tokenizer.eos_token_id
    stream = list(itertools.chain.from_iterable(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
                                                for t in texts))
    rows = torch.tensor(stream[: len(stream) // spec.seq_len * spec.seq_len]).view(-1, spec.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(0.0)
    for step in (bar := tqdm(range(spec.steps), desc="bootstrap lm")):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, spec.steps, spec.lr)
        batch = rows[torch.randint(0, len(rows), (spec.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"lm_loss": loss.item(), "lm_tokens": int(rows.numel()), "lm_config": asdict(spec.model)}
