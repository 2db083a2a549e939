"""Rollouts for RL stages: G sampled completions per prompt, one vision-tower pass per prompt; their scores.

Generation is most of a GRPO step (57–90% in public reports), so the HF backend batches every completion
of a rollout into one KV-cache `generate` call on left-padded prompts, encodes each prompt's image once
and repeats its features for the G samples of the group, and returns the tower features so the loss pass
never runs the tower again. With `rollout.shared_prefill` (the default) each prompt is also prefilled once:
the LM runs over the N unique prompts but their last token, the KV cache is repeated G times, and
`generate` decodes the G samples per prompt from it (HF's sampling, suppression and stopping unchanged).

Adding a vLLM backend (GPU only, not required): write a class with the same `generate(prompts, images,
group_size, sampling) -> Rollout` and register it in `build_engine`. It would (1) serve the policy from
an exported LLaVA-HF dir (`vlpost export --to llava-hf`), (2) call `LLM.generate` with
`{"prompt_token_ids": ids_with_one_image_token, "multi_modal_data": {"image": pil}}` and
`SamplingParams(n=group_size, temperature, top_p, top_k=-1 if 0, max_tokens, stop=sampling.stop)` —
vLLM expands the image token itself, so pass the *unexpanded* ids or decode to text, (3) after every
optimizer step push the new weights (TRL's `load_weights` pattern), and (4) still fill
`image_features` by running our frozen tower once per prompt, because the loss pass needs them.
Old / reference log-probs are always recomputed by the training model, so engine numerics never enter
the importance ratio. The rest of the stage (rewards, advantages, loss) only sees the `Rollout` below.

Scoring the completions (rewards, metrics) and evaluating prompts live in vlpost/train/rollout_scoring.py.
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from vlpost.data.collate import left_pad
from vlpost.train.grpo_config import RolloutConfig


@dataclass
class Rollout:
    """N prompts × G completions; completion row i belongs to prompt i // G."""

    prompt_ids: list[list[int]]  # N prompts, unpadded, image spans expanded
    completion_ids: list[list[int]]  # N*G completions: real tokens through EOS / the stop string's last token
    texts: list[str]  # N*G decoded completions, cut before a stop string, special tokens skipped
    truncated: list[bool]  # N*G: ran into max_new_tokens without EOS or stop string
    group_size: int
    image_index: list[int | None]  # per prompt: row of image_features, or None (text-only)
    image_features: torch.Tensor | None  # (N_img, P_v, D_v) frozen-tower output, one row per image
    image_embeds: torch.Tensor | None  # (N_img, tokens_per_image, D) projected, as used for generation
    seconds: float = 0.0  # wall time of generate(), vision encode included

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.completion_ids]


class RolloutEngine(Protocol):
    """What the RL stage needs from a generator; the HF backend below, vLLM later (module docstring)."""

    def generate(self, prompts: list[list[int]], images: list[Image.Image | None], group_size: int,
                 sampling: RolloutConfig) -> Rollout: ...


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its generated text contains one of `stops` (checked on a short token tail)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.tail = max((len(s) for s in self.stops), default=0) + 2  # a token decodes to >= 1 char

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        # input_ids (B, T_new): with inputs_embeds, HF passes only the generated tokens
        tails = self.tokenizer.batch_decode(input_ids[:, -self.tail:], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def sampling_kwargs(sampling: RolloutConfig) -> dict:
    """HF generate kwargs; top_k=0 is passed explicitly because HF's default is 50."""
    if sampling.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k}


def _stop_end(tokens: list[int], tokenizer, stops: list[str]) -> int | None:
    """Smallest k with a stop string in decode(tokens[:k]), by bisection (prefix texts only grow)."""
    if not stops or not any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stops):
        return None
    low, high = 1, len(tokens)
    while low < high:
        mid = (low + high) // 2
        if any(s in tokenizer.decode(tokens[:mid], skip_special_tokens=True) for s in stops):
            high = mid
        else:
            low = mid + 1
    return low


def finish_completion(tokens: list[int], tokenizer, eos_ids: set[int], stops: list[str]) -> tuple[list[int], str, bool]:
    """Raw generated ids → (kept ids through EOS or the stop string's last token, text, truncated)."""
    end = next((i + 1 for i, tok in enumerate(tokens) if tok in eos_ids), None)
    kept = tokens if end is None else tokens[:end]
    stop_end = _stop_end(kept, tokenizer, stops)
    if stop_end is not None:
        kept = kept[:stop_end]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    if stop_end is not None:
        text = text[: min(text.find(s) for s in stops if s in text)]
    return kept, text, end is None and stop_end is None


class HFRolloutEngine:
    """transformers `generate` with KV cache on one VisionLanguageModel; the tower runs once per prompt image."""

    def __init__(self, model, autocast=None):
        self.model = model
        self.autocast = autocast  # e.g. accelerator.autocast, so generation runs in the training precision

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image | None]) -> tuple[list[int | None], torch.Tensor | None,
                                                                        torch.Tensor | None]:
        """Tower + projector once per image → (per-prompt image row, tower features, projected embeds)."""
        index, present = [], []
        for image in images:
            index.append(len(present) if image is not None else None)
            if image is not None:
                present.append(image)
        if not present:
            return index, None, None
        model = self.model
        pixel_values = model.pixel_values(present).to(model.device, model.vision.dtype)
        features = model.vision(pixel_values)  # (N_img, P_v, D_v)
        embeds = model.projector(features.to(next(model.projector.parameters()).dtype))  # (N_img, tpi, D)
        return index, features, embeds

    def generate(self, prompts: list[list[int]], images: list[Image.Image | None], group_size: int,
                 sampling: RolloutConfig) -> Rollout:
        started = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        try:
            image_index, features, embeds = self.encode_images(images)
            raw: list[list[int]] = []
            if sampling.shared_prefill and group_size > 1:
                # chunks of whole groups: generation_batch_size // G prompts (at least one) per generate call
                per_call = max(1, sampling.generation_batch_size // group_size) if sampling.generation_batch_size \
                    else len(prompts)
                for start in range(0, len(prompts), per_call):
                    chosen = [(p, image_index[p]) for p in range(start, min(start + per_call, len(prompts)))]
                    raw.extend(self._generate_groups(prompts, chosen, embeds, group_size, sampling))
            else:
                rows = [(p, image_index[p]) for p in range(len(prompts)) for _ in range(group_size)]
                chunk = sampling.generation_batch_size or len(rows)
                for start in range(0, len(rows), chunk):
                    raw.extend(self._generate_rows(prompts, rows[start:start + chunk], embeds, sampling))
        finally:
            model.train(was_training)
        tokenizer = model.tokenizer
        eos_ids = {tokenizer.eos_token_id} | _config_eos(model)
        finished = [finish_completion(tokens, tokenizer, eos_ids, sampling.stop) for tokens in raw]
        return Rollout(
            prompt_ids=[list(p) for p in prompts], completion_ids=[f[0] for f in finished],
            texts=[f[1] for f in finished], truncated=[f[2] for f in finished], group_size=group_size,
            image_index=image_index, image_features=features, image_embeds=embeds,
            seconds=time.perf_counter() - started,
        )

    @torch.no_grad()
    def _generate_rows(self, prompts: list[list[int]], rows: list[tuple[int, int | None]],
                       embeds: torch.Tensor | None, sampling: RolloutConfig) -> list[list[int]]:
        """One batched generate over (prompt index, image row) pairs → raw new ids per row."""
        model = self.model
        input_ids, attention_mask = left_pad([prompts[p] for p, _ in rows], model.tokenizer.pad_token_id)
        image_rows = [img for _, img in rows if img is not None]
        row_embeds = embeds[image_rows] if image_rows else None  # (rows with images, tpi, D): G views of one encode
        with self._context():
            new = model.generate(input_ids.to(model.device), attention_mask.to(model.device),
                                 image_embeds=row_embeds, max_new_tokens=sampling.max_new_tokens,
                                 **self._generate_kwargs(sampling))
        return new.tolist()

    @torch.no_grad()
    def _generate_groups(self, prompts: list[list[int]], chosen: list[tuple[int, int | None]],
                         embeds: torch.Tensor | None, group_size: int, sampling: RolloutConfig) -> list[list[int]]:
        """Shared prefill: the LM runs once over the chosen (prompt index, image row) pairs but their last
        token, the KV cache is repeated G times, and one `generate` samples G completions per prompt from it
        → raw new ids, G consecutive rows per prompt (the row order of `_generate_rows`)."""
        model, lm = self.model, self.model.lm
        input_ids, attention_mask = left_pad([prompts[p] for p, _ in chosen], model.tokenizer.pad_token_id)
        if input_ids.shape[1] < 2:  # nothing to prefill before the last token
            rows = [row for row in chosen for _ in range(group_size)]
            return self._generate_rows(prompts, rows, embeds, sampling)
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        image_rows = [img for _, img in chosen if img is not None]
        with self._context():
            prompt_embeds = model.embed(input_ids, image_embeds=embeds[image_rows] if image_rows else None)
            # generate's own position ids for left-padded prompts (GenerationMixin._prepare_position_ids_for_
            # generation): cumsum - 1, pads 0 (masked, so their value never reaches a real token)
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            cache = DynamicCache(config=lm.config)
            extra = {"logits_to_keep": 1} if _supports_logits_to_keep(lm) else {}
            lm(inputs_embeds=prompt_embeds[:, :-1], attention_mask=attention_mask[:, :-1],
               position_ids=position_ids[:, :-1], use_cache=True, **{_cache_kwarg(lm): cache}, **extra)
            cache.batch_repeat_interleave(group_size)  # (N, ...) → (N*G, ...), prompt-major like the rows
            # Full-length embeds and mask with a cache holding all but the last position: generate's prefill
            # forwards only inputs_embeds[:, cache length:] (the last token) and returns the new tokens only.
            new = lm.generate(
                inputs_embeds=prompt_embeds.repeat_interleave(group_size, dim=0),
                attention_mask=attention_mask.repeat_interleave(group_size, dim=0),
                max_new_tokens=sampling.max_new_tokens, pad_token_id=model.tokenizer.pad_token_id,
                eos_token_id=model.tokenizer.eos_token_id, **{_cache_kwarg(lm): cache},
                **self._generate_kwargs(sampling),
            )
        return new.tolist()

    def _generate_kwargs(self, sampling: RolloutConfig) -> dict:
        model = self.model
        kwargs = sampling_kwargs(sampling)
        kwargs["suppress_tokens"] = [model.image_token_id]  # a sampled <image> id would break the loss-pass splice
        # Generation is rank-local: under ZeRO-3 callers run it inside vlpost.train.zero.whole_model (whole weights,
        # no hooks), so HF's ZeRO-3 default (synced_gpus: every rank steps until all finish) would only wait on
        # ranks that may not be generating at all (evaluation runs on the main process only).
        kwargs["synced_gpus"] = False
        if sampling.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(model.tokenizer, sampling.stop)])
        return kwargs

    def _context(self):
        return self.autocast() if self.autocast else nullcontext()


def _base_lm(lm):
    """The transformers model under a peft wrapper (or the LM itself)."""
    from vlpost.train.freeze import is_peft

    return lm.get_base_model() if is_peft(lm) else lm


def _cache_kwarg(lm) -> str:
    """The KV-cache argument's name: `cache` in recent transformers 5.x, `past_key_values` before the rename."""
    return "cache" if "cache" in inspect.signature(type(_base_lm(lm)).forward).parameters else "past_key_values"


def _supports_logits_to_keep(lm) -> bool:
    """The LM head can skip all but the last position (the prefill needs no logits at all)."""
    return "logits_to_keep" in inspect.signature(type(_base_lm(lm)).forward).parameters


def _config_eos(model) -> set[int]:
    """EOS ids from the LM's generation config (an int or a list), besides the tokenizer's."""
    eos = getattr(getattr(model.lm, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {int(eos)}


def build_engine(backend: str, model, autocast=None) -> RolloutEngine:
    """The rollout backend named by `rollout.backend`."""
    if backend == "hf":
        return HFRolloutEngine(model, autocast=autocast)
    raise ValueError(f"rollout.backend {backend!r} unknown; available: hf (see vlpost/train/rollout.py for vLLM)")
