"""Train a small byte-level BPE tokenizer locally (no hub) and give it a chat template."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlpost.constants import IMAGE_TOKEN, PAD_TOKEN

# ChatML with {% generation %} markers: HF returns the assistant mask straight from the template.
# The assistant span includes its end-of-turn token so the model learns to stop.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Llama-3 style, without generation markers: chat.py derives the assistant mask from template prefixes.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, {"eos_token": "<|im_end|>", "bos_token": None}),
    "llama3": (LLAMA3_TEMPLATE, {"eos_token": "<|eot_id|>", "bos_token": "<|begin_of_text|>"}),
}
SPECIAL_TOKENS = [
    "<|endoftext|>", PAD_TOKEN, IMAGE_TOKEN,
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, template: str = "chatml") -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, with the chat template `template` (chatml | llama3)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    chat_template, roles = TEMPLATES[template]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=roles["eos_token"],
        bos_token=roles["bos_token"],
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, roles["eos_token"])],
    )
    tokenizer.chat_template = chat_template
    return tokenizer
