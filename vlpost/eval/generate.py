"""Answers from a model for evaluation: batched greedy generation on left-padded prompts, and VQAv2 inputs.

Prompts are sorted by length before batching (less padding), answers come back in input order, and the
text after the first end-of-turn token is dropped. ``blind=True`` swaps every image for a mid-grey one of
the same size: the blind baseline that shows how much of an accuracy comes from looking at the image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vlpost.data.chat import ChatEncoder
from vlpost.data.collate import left_pad
from vlpost.data.records import Record, Skip

logger = logging.getLogger("vlpost.eval")

Item = tuple[dict, Image.Image | None]  # (sample in the shard schema, its RGB image or None)
BLANK_RGB = (128, 128, 128)
# End-of-turn tokens of common chat templates; generation output is cut at the first one present.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>", "</s>", "<|end|>")


def prompt_messages(sample: dict) -> list[dict]:
    """The messages to answer: `prompt` for prompt/preference samples, else `messages` minus the final answers."""
    if isinstance(sample.get("prompt"), list):
        return sample["prompt"]
    messages = list(sample.get("messages") or [])
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()
    if not messages:
        raise ValueError(f"sample {sample_id(sample)!r} has neither 'prompt' nor a user turn in 'messages'")
    return messages


def sample_id(sample: dict, position: int | None = None) -> str:
    """meta.id, or '#<position>' for samples without one."""
    meta = sample.get("meta") or {}
    return str(meta["id"]) if meta.get("id") is not None else f"#{position}"


def blank_like(image: Image.Image) -> Image.Image:
    """A mid-grey RGB image of the same size: it carries no visual information."""
    return Image.new("RGB", image.size, BLANK_RGB)


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an answer: the tokenizer's eos plus known end-of-turn tokens in its vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in END_OF_TURN if token in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def decode_answer(tokenizer, new_tokens: Sequence[int], stop_ids: set[int]) -> str:
    """Text of the generated tokens up to the first end-of-turn token, without special tokens or markers."""
    kept = []
    for token in new_tokens:
        if token in stop_ids:
            break
        kept.append(token)
    text = tokenizer.decode(kept, skip_special_tokens=True)
    for marker in END_OF_TURN:  # templates whose end marker is plain text rather than a special token
        text = text.split(marker, 1)[0]
    return text.strip()


def answer_prompts(model, items: Sequence[Item], *, batch_size: int = 32, max_new_tokens: int = 16,
                   blind: bool = False, max_length: int = 2048, progress: bool = False) -> list[str]:
    """Greedy answers to prompt samples, in input order; batches of similar length, left-padded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = model.tokenizer
    encoder = ChatEncoder(tokenizer, model.tokens_per_image, max_length=max_length)
    prompts = [encoder.encode_prompt(prompt_messages(sample), sample_id=sample_id(sample, i),
                                     num_images=int(image is not None))
               for i, (sample, image) in enumerate(items)]
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))  # longest first: memory peaks early
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = end_of_turn_ids(tokenizer)
    answers = [""] * len(items)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(items), desc="generate", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                new_tokens = _generate_rows(model, [prompts[i] for i in rows], [items[i][1] for i in rows],
                                            pad_id, max_new_tokens, blind)
                for row, index in enumerate(rows):
                    answers[index] = decode_answer(tokenizer, new_tokens[row].tolist(), stop_ids)
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return answers


def _generate_rows(model, prompts: list[list[int]], images: list[Image.Image | None], pad_id: int,
                   max_new_tokens: int, blind: bool) -> torch.Tensor:
    """New tokens (B, T_new) for one batch; images in row order, rows without an image skipped."""
    input_ids, attention_mask = left_pad(prompts, pad_id)  # (B, T) each
    present = [image for image in images if image is not None]
    if blind:
        present = [blank_like(image) for image in present]
    device = model.device
    pixel_values = model.pixel_values(present).to(device) if present else None  # (N_img, 3, H, W)
    return model.generate(input_ids.to(device), attention_mask.to(device), pixel_values=pixel_values,
                          max_new_tokens=max_new_tokens)


def iter_vqav2(questions: str | Path, annotations: str | Path, images_dir: str | Path,
               skipped: list[Skip] | None = None) -> Iterator[Item]:
    """(prompt sample, image) per VQAv2 question, via the vqav2 converter (same COCO image naming).

    Questions whose image is missing or unreadable are appended to `skipped` (when given) and logged.
    """
    from vlpost.data.formats_vqa import convert_vqav2

    for record in convert_vqav2(Path(questions), Path(images_dir), annotations=Path(annotations), kind="prompt"):
        if isinstance(record, Record):
            yield record.sample, record.image
            continue
        if skipped is not None:
            skipped.append(record)
        logger.warning("VQAv2 question %s skipped: %s", record.id, record.reason)


def chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Lists of at most `size` items, so a large eval never holds every image in memory."""
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
