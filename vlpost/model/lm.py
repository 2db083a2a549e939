"""Any HF causal LM + its tokenizer, with the image token added and embeddings resized."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from vlpost.config import LMConfig
from vlpost.constants import IMAGE_TOKEN, PAD_TOKEN

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_INIT_ARCHS = ("llama", "qwen2")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer dir not found: {path} (set lm.tokenizer or lm.path to a local dir)")
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def random_lm_config(cfg: LMConfig, tokenizer: PreTrainedTokenizerBase):
    """A small Llama/Qwen2 config for tests and the demo's random-init path, with the tokenizer's special ids
    (else the config keeps the architecture's defaults, e.g. Llama's eos 2, and an exported model stops early)."""
    if cfg.arch not in RANDOM_INIT_ARCHS:
        raise ValueError(f"lm.arch={cfg.arch!r}: random init supports {RANDOM_INIT_ARCHS}; use lm.path for others")
    return AutoConfig.for_model(
        cfg.arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
    )


def load_lm(cfg: LMConfig, tokenizer: PreTrainedTokenizerBase | None = None):
    """(model, tokenizer, image_token_id) from a local dir, or random init from `cfg` + a tokenizer dir."""
    if tokenizer is None:
        tokenizer_path = cfg.tokenizer or cfg.path
        if tokenizer_path is None:
            raise ValueError("lm.tokenizer (or lm.path) must name a local tokenizer dir")
        tokenizer = load_tokenizer(tokenizer_path, cfg.trust_remote_code)
    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        if not Path(cfg.path).is_dir():
            raise FileNotFoundError(f"lm.path not found: {cfg.path} (a local save_pretrained dir)")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
            )
        except (RuntimeError, ValueError) as err:
            wrong = weight_shape_mismatches(Path(cfg.path), trust_remote_code=cfg.trust_remote_code)
            if wrong:
                raise ValueError(f"LM weights in {cfg.path} do not fit its config.json: {wrong[:5]}") from err
            raise
    else:
        config = random_lm_config(cfg, tokenizer)
        config._attn_implementation = cfg.attn_implementation
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    image_token_id = add_special_tokens(model, tokenizer)
    return model, tokenizer, image_token_id


def weight_shape_mismatches(path: Path, trust_remote_code: bool = False) -> list[str]:
    """'file: tensor (saved shape) != (config shape)' for every safetensors tensor that does not fit config.json."""
    from safetensors import safe_open

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    wrong = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shape = tuple(handle.get_slice(key).get_shape())
                if key in expected and shape != expected[key]:
                    wrong.append(f"{file.name}: {key} {shape} != {expected[key]}")
    return wrong


def add_special_tokens(model, tokenizer) -> int:
    """Ensure `<image>` and a pad token exist; grow the embeddings only when the vocab grew."""
    added = []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN if PAD_TOKEN in tokenizer.get_vocab() else None
        if tokenizer.pad_token is None:
            added.append(PAD_TOKEN)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
        if PAD_TOKEN in added:
            tokenizer.pad_token = PAD_TOKEN
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
