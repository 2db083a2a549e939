"""The one place that turns a conversation into input_ids + labels (assistant tokens only).

It also decides how many ids an `<image>` placeholder expands to (`tokens_per_image`), and it never truncates
inside an image span: a sample whose images do not fit is dropped with a `SampleError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlpost.constants import IGNORE_INDEX, IMAGE_TOKEN, ROLES


class SampleError(ValueError):
    """A sample that cannot be encoded; `reason` is a short stable key used in skip counters."""

    def __init__(self, sample_id: str, reason: str, detail: str):
        super().__init__(f"sample {sample_id!r}: {detail}")
        self.sample_id, self.reason = sample_id, reason


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the trained assistant tokens
    num_images: int

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatEncoder:
    """Chat template → token ids with an assistant-only label mask and expanded image spans."""

    def __init__(self, tokenizer, tokens_per_image: int, max_length: int = 2048):
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template (see vlpost.model.tokenizer)")
        self.tokenizer = tokenizer
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token; build the model with vlpost.model.lm.load_lm")
        self.uses_generation_markers = "{% generation %}" in tokenizer.chat_template

    # ------------------------------------------------------------------ public

    def encode(self, messages: list[dict], *, sample_id: str, num_images: int, train_from: int = 0) -> Encoded:
        """Encode a whole conversation; assistant turns at index >= `train_from` get labels."""
        self._check_messages(messages, sample_id, num_images)
        ids, trained = self._trained_tokens(messages, train_from)
        if not any(trained):
            raise SampleError(sample_id, "empty assistant mask", "no assistant tokens to train on (empty assistant turn?)")
        labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, trained)]
        return self._finish(ids, labels, sample_id, num_images)

    def encode_prompt(self, messages: list[dict], *, sample_id: str, num_images: int) -> list[int]:
        """Encode prompt messages ending with the assistant header, for generation."""
        self._check_messages(messages, sample_id, num_images)
        text = self._render(messages, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        encoded = self._finish(ids, [IGNORE_INDEX] * len(ids), sample_id, num_images, need_labels=False)
        return encoded.input_ids

    def encode_pair(self, prompt: list[dict], completion: list[dict], *, sample_id: str, num_images: int) -> Encoded:
        """Prompt + one completion (preference / RL), labels on the completion's assistant turns only."""
        return self.encode(prompt + completion, sample_id=sample_id, num_images=num_images, train_from=len(prompt))

    # ------------------------------------------------------------------ internals

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _check_messages(self, messages: list[dict], sample_id: str, num_images: int) -> None:
        placeholders = 0
        for turn, message in enumerate(messages):
            if message.get("role") not in ROLES:
                raise SampleError(sample_id, "unknown role", f"turn {turn} has role {message.get('role')!r}; expected {ROLES}")
            if not isinstance(message.get("content"), str):
                raise SampleError(sample_id, "malformed record", f"turn {turn} content is not a string")
            if message["role"] == "assistant" and not message["content"].strip():
                raise SampleError(sample_id, "empty assistant turn", f"turn {turn} is an empty assistant message")
            placeholders += message["content"].count(IMAGE_TOKEN)
        if placeholders != num_images:
            raise SampleError(
                sample_id, "placeholder mismatch",
                f"has {placeholders} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s)",
            )

    def _trained_tokens(self, messages: list[dict], train_from: int) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation and which of them are trained assistant tokens."""
        text = self._render(messages, add_generation_prompt=False)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if self.uses_generation_markers:
            marked = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            if list(marked["input_ids"]) != list(ids):
                raise ValueError("chat template tokenization differs from plain tokenization of its rendered text")
            prompt_end = len(self._render(messages[:train_from], add_generation_prompt=True)) if train_from else 0
            trained = [bool(m) and a >= prompt_end for m, (a, _) in zip(marked["assistant_masks"], offsets)]
            return ids, trained
        spans = self._assistant_spans(messages, train_from)
        trained = [any(start <= a and b <= end and b > a for start, end in spans) for a, b in offsets]
        return ids, trained

    def _assistant_spans(self, messages: list[dict], train_from: int) -> list[tuple[int, int]]:
        """Character spans of trained assistant turns (content + end-of-turn), from template prefixes."""
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or index < train_from:
                continue
            before = self._render(messages[:index], add_generation_prompt=True) if index else ""
            through = self._render(messages[: index + 1], add_generation_prompt=False)
            if not through.startswith(before):
                raise ValueError(
                    "the chat template renders a conversation prefix differently from the whole conversation; "
                    "add {% generation %} markers to the template so assistant tokens can be found"
                )
            spans.append((len(before), len(through)))
        return spans

    def _finish(
        self, ids: list[int], labels: list[int], sample_id: str, num_images: int, need_labels: bool = True
    ) -> Encoded:
        """Expand each image id into `tokens_per_image` ids, then truncate on text only."""
        found = sum(1 for tok in ids if tok == self.image_token_id)
        if found != num_images:
            raise SampleError(sample_id, "placeholder mismatch", f"{found} image tokens after tokenization, {num_images} images")
        out_ids: list[int] = []
        out_labels: list[int] = []
        last_image_end = 0
        for tok, lab in zip(ids, labels):
            if tok == self.image_token_id:
                out_ids.extend([tok] * self.tokens_per_image)
                out_labels.extend([IGNORE_INDEX] * self.tokens_per_image)
                last_image_end = len(out_ids)
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        if len(out_ids) > self.max_length:
            if last_image_end > self.max_length:
                raise SampleError(
                    sample_id, "too long",
                    f"{len(out_ids)} tokens; its image span ends at {last_image_end} > max_length {self.max_length}",
                )
            out_ids, out_labels = out_ids[: self.max_length], out_labels[: self.max_length]
            if need_labels and all(lab == IGNORE_INDEX for lab in out_labels):
                raise SampleError(sample_id, "too long", f"no assistant tokens left within max_length {self.max_length}")
        return Encoded(out_ids, out_labels, num_images)
