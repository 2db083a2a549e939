"""vlpost vs TRL, side by side: the same random-initialised VLM, data, batch and sequence budget, one CPU run.

One tiny model is built once (open_clip ViT with a class token, mlp2x_gelu projector, random Llama LM, a BPE
tokenizer trained on the synthetic world) and exported with `vlpost export --to llava-hf`
(vlpost.model.export), so TRL trains a transformers `LlavaForConditionalGeneration` holding exactly the same
weights. Both sides get the same SyntheticWorld records, chat template, batch size, gradient accumulation,
max length, AdamW, constant LR, grad clipping 1.0, fp32, no gradient checkpointing.

Per stage it first checks the step-0 loss of each side on the same first batch (same samples, same order) and
calls the comparison void when the two differ by more than 1e-3; then it times optimizer steps (warm-up steps
excluded) through each side's own training loop, data path included, and reports the rate and the ratio:

  align  real (non-pad) tokens/s  projector only (tower + LM frozen)    vlpost: packing
  sft    real (non-pad) tokens/s  projector + LM (tower frozen)         vlpost: packing
  dpo    pairs/s                  LM (tower + projector frozen), full   vlpost: one image pass per pair, reference
                                  fine-tuning, sigmoid, beta 0.1        log-probs cached before training (its fill
                                                                        time is reported too)
  grpo   completions/s            LM, G completions per prompt,         vlpost: one tower pass and one LM prefill
                                  beta 0, one iteration, token-mean     per prompt (rollout.shared_prefill), one
                                                                        generate over the whole rollout

TRL runs its documented defaults for VLMs except where they would make the runs differ in what they compute
(bf16 and gradient checkpointing, on by default in TRL, are off on both sides; TRL's vision trainers refuse
packing / padding-free, so TRL pads). Speed is only ever compared inside one run, as ratios.

    python scripts/bench_vs_trl.py [--quick] [--json OUT] [--stages align,sft,dpo,grpo] [--size small|tiny]

Needs `pip install -e .[bench]` (TRL). Run it with OMP_NUM_THREADS=1 (the script also sets one torch thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

LOSS_TOLERANCE = 1e-3
TARGETS = {"align": 1.15, "sft": 1.4, "dpo": 1.6, "grpo": 1.5}
UNITS = {"align": "tokens/s", "sft": "tokens/s", "dpo": "pairs/s", "grpo": "completions/s"}
STAGES = ("align", "sft", "dpo", "grpo")
RECORD_KIND = {"align": "caption", "sft": "sft", "dpo": "preference", "grpo": "prompt"}

# ChatML with {% generation %} markers (vlpost's CHATML_TEMPLATE) that also renders structured content
# ([{"type": "image"}, {"type": "text", ...}], what TRL's VLM collators pass) and puts the turn separator before a
# turn instead of after it: then a completion ends at <|im_end|> for TRL's DPO (which trains everything after the
# prompt) exactly as for vlpost's assistant mask, so both sides score the same tokens.
_CONTENT = ("{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
            "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{{- '<image>' }}"
            "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}{%- endif %}")
BENCH_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}" + _CONTENT + "{{- '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}" + _CONTENT + "{{- '<|im_end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\n<|im_start|>assistant\n' }}{%- endif %}"
)

# name → (open_clip tower registered by vlpost, LM sizes)
SIZES = {
    "tiny": ("vlpost-tiny-vit", {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                 "intermediate_size": 128}),
    "small": ("vlpost-demo-vit", {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                                  "intermediate_size": 384}),
}


@dataclass
class Budget:
    """What both sides get."""

    batch_size: int = 8  # rows per micro-batch (vlpost packs samples into these rows; TRL pads one sample a row)
    grad_accum: int = 1
    max_length: int = 256
    lr: float = 1e-4
    warmup: int = 2  # optimizer steps not timed
    steps: int = 20  # timed optimizer steps
    dpo_beta: float = 0.1
    group_size: int = 4  # GRPO completions per prompt
    grpo_grad_accum: int = 2  # GRPO: batch_size * grpo_grad_accum completions per step
    max_new_tokens: int = 24
    grpo_shared_prompt: bool = True  # vlpost GRPO loss pass: each group's prompt once (grpo.shared_prompt)
    dpo_shared_prompt: bool = True  # vlpost DPO: each pair's prompt once (dpo.shared_prompt)
    buffer_size: int = 128  # vlpost packing buffer (samples planned at once)
    seed: int = 0


# ---------------------------------------------------------------------------- shared setup


@dataclass
class Setup:
    work: Path
    run_dir: Path  # vlpost run dir (initial weights)
    hf_dir: Path  # the same weights as LlavaForConditionalGeneration
    image_size: int
    tokens_per_image: int
    size: str


def build_setup(work: Path, size: str, seed: int) -> Setup:
    """Tokenizer → random VLM → vlpost run dir → `export --to llava-hf` (the step-0 loss checks compare them)."""
    from vlpost.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
    from vlpost.data.synthetic import SyntheticWorld
    from vlpost.model.export import export_llava_hf
    from vlpost.model.tokenizer import train_bpe_tokenizer
    from vlpost.model.vlm import VisionLanguageModel

    tower, lm_sizes = SIZES[size]
    tokenizer = train_bpe_tokenizer(SyntheticWorld(seed=seed).text_corpus(4000), vocab_size=1024)
    tokenizer.chat_template = BENCH_TEMPLATE
    tokenizer.save_pretrained(work / "tokenizer")
    torch.manual_seed(seed)
    cfg = ModelConfig(vision=VisionConfig(name=tower), projector=ProjectorConfig(type="mlp2x_gelu"),
                      lm=LMConfig(tokenizer=str(work / "tokenizer"), **lm_sizes))
    model = VisionLanguageModel.build(cfg)
    model.save_pretrained(work / "vlpost-init")
    export_llava_hf(work / "vlpost-init", work / "llava-hf")
    return Setup(work, work / "vlpost-init", work / "llava-hf", int(model.vision.visual.image_size[0]),
                 model.tokens_per_image, size)


def records(setup: Setup, kind: str, n: int, seed: int) -> list:
    """(sample, PIL image | None) pairs of the synthetic world, images at the tower's input size."""
    from vlpost.data.pipeline import records_to_items
    from vlpost.data.synthetic import SyntheticWorld

    return records_to_items(SyntheticWorld(seed=seed, image_size=setup.image_size).records(kind, n))


def structured(messages: list[dict]) -> list[dict]:
    """'text <image> text' strings → typed parts in the same order, as TRL's VLM collators expect."""
    out = []
    for message in messages:
        parts = []
        for index, piece in enumerate(message["content"].split("<image>")):
            if index:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": message["role"], "content": parts})
    return out


def trl_rows(stage: str, items: list) -> list[dict]:
    """The same samples as TRL dataset rows (conversational, `images` column)."""
    rows = []
    for index, (sample, image) in enumerate(items):
        images = [image] if image is not None else []
        if stage in ("align", "sft"):
            rows.append({"messages": structured(sample["messages"]), "images": images})
        elif stage == "dpo":
            rows.append({"prompt": structured(sample["prompt"]), "chosen": structured(sample["chosen"]),
                         "rejected": structured(sample["rejected"]), "images": images})
        else:
            rows.append({"prompt": structured(sample["prompt"]), "images": images, "sample_index": index})
    return rows


class Marks:
    """(time, units so far) at the end of every optimizer step; rate over steps warmup+1 .. warmup+steps."""

    def __init__(self):
        self.units, self.points = 0, []

    def mark(self) -> None:
        self.points.append((time.perf_counter(), self.units))

    def rate(self, warmup: int, steps: int) -> dict:
        if len(self.points) < warmup + steps:
            raise RuntimeError(f"only {len(self.points)} optimizer steps ran (wanted {warmup + steps})")
        (t0, u0), (t1, u1) = self.points[warmup - 1], self.points[warmup + steps - 1]
        return {"rate": (u1 - u0) / (t1 - t0), "seconds": t1 - t0, "units": u1 - u0, "steps": steps}


def real_tokens(batch: dict) -> int:
    if "real_tokens" in batch:  # packed batch: the attention mask is 4-D
        return int(batch["real_tokens"])
    return int(batch["attention_mask"].sum())


# ---------------------------------------------------------------------------- vlpost side


class CountingObjective:
    """Wraps a vlpost objective: counts the units (real tokens / pairs / completions) of every micro-batch."""

    def __init__(self, objective, marks: Marks, units):
        self.objective, self.marks, self.units = objective, marks, units

    def count(self, batch: dict) -> int:
        return self.objective.count(batch)

    def __call__(self, model, batch: dict):
        self.marks.units += self.units(batch)
        return self.objective(model, batch)


class StepMarker:
    def __init__(self, marks: Marks):
        self.marks = marks

    def on_step_end(self, trainer) -> None:
        self.marks.mark()


def vlpost_train_config(budget: Budget, grad_accum: int):
    from vlpost.config import TrainConfig

    return TrainConfig(steps=budget.warmup + budget.steps, batch_size=budget.batch_size, grad_accum=grad_accum,
                       lr=budget.lr, warmup_ratio=0.0, schedule="constant", max_grad_norm=1.0, seed=budget.seed,
                       log_every=10**6, mixed_precision="no", save_every=0, report_to="none")


def vlpost_fit(model, batches, objective, units, budget: Budget, out: Path, stage: str, grad_accum: int) -> dict:
    from vlpost.train.trainer import Trainer

    marks = Marks()
    trainer = Trainer(model, batches, CountingObjective(objective, marks, units), vlpost_train_config(budget, grad_accum),
                      out, stage=stage, callbacks=[StepMarker(marks)])
    trainer.fit()
    return marks.rate(budget.warmup, budget.steps)


def vlpost_sft_like(setup: Setup, stage: str, items: list, budget: Budget, check: list, tag: str) -> tuple[dict, dict]:
    """align / sft: step-0 loss (padded and packed) on `check`, then timed training with packing."""
    from vlpost.config import FreezeConfig
    from vlpost.data.chat import ChatEncoder
    from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource
    from vlpost.model.vlm import VisionLanguageModel
    from vlpost.train.freeze import apply_freeze
    from vlpost.train.sft_objective import SFTObjective

    torch.manual_seed(budget.seed)
    model = VisionLanguageModel.from_pretrained(setup.run_dir)
    apply_freeze(model, FreezeConfig(lm="frozen" if stage == "align" else "full", projector="train"))
    encode = ExampleEncoder(ChatEncoder(model.tokenizer, model.tokens_per_image, budget.max_length),
                            model.image_transform)
    pad_id = model.tokenizer.pad_token_id

    def stream(source_items, packing: bool, batch_size: int, loop: bool, shuffle: bool):
        source = ListSource(source_items, seed=budget.seed, shuffle=shuffle, loop=loop)
        return BatchStream(source, encode, batch_size=batch_size, pad_id=pad_id, packing=packing,
                           max_length=budget.max_length, buffer_size=budget.buffer_size, seed=budget.seed)

    objective = SFTObjective()
    losses = {}
    model.eval()
    with torch.no_grad():
        for name, packing, batch_size in (("padded", False, len(check)), ("packed", True, len(check))):
            batch = next(iter(stream(check, packing, batch_size, loop=False, shuffle=False)))
            loss_sum, _ = objective(model, batch)
            losses[name] = float(loss_sum) / objective.count(batch)
    rate = vlpost_fit(model, stream(items, True, budget.batch_size, loop=True, shuffle=True), objective, real_tokens,
                      budget, setup.work / f"vlpost-{stage}-{tag}", stage, budget.grad_accum)
    return {"loss": losses["padded"], "loss_packed": losses["packed"]}, rate


def vlpost_dpo(setup: Setup, items: list, budget: Budget, check: list, tag: str) -> tuple[dict, dict]:
    """Full fine-tuning DPO with the reference log-probs cached once before training (dpo.reference=cache)."""
    from vlpost.config import FreezeConfig
    from vlpost.data.pipeline import ListSource
    from vlpost.model.vlm import VisionLanguageModel
    from vlpost.train.dpo_config import DPOLossConfig
    from vlpost.train.freeze import apply_freeze
    from vlpost.train.preference import DPOObjective, pair_stream, policy_logps, vision_features
    from vlpost.train.reference import LiveReference, build_reference

    torch.manual_seed(budget.seed)
    model = VisionLanguageModel.from_pretrained(setup.run_dir)
    freeze = FreezeConfig(lm="full", projector="frozen")
    apply_freeze(model, freeze)
    cfg = DPOLossConfig(beta=budget.dpo_beta, loss_type="sigmoid", reference="cache",
                        cache_dir=str(setup.work / f"ref_cache-{tag}"), reference_batch_size=16)

    def pairs(source_items, batch_size: int, loop: bool, shuffle: bool):
        source = ListSource(source_items, seed=budget.seed, shuffle=shuffle, loop=loop)
        return pair_stream(source, model, batch_size=batch_size, max_length=budget.max_length,
                           shared_prompt=budget.dpo_shared_prompt)

    model.eval()
    with torch.no_grad():
        batch = next(iter(pairs(check, len(check), loop=False, shuffle=False)))
        features = vision_features(model, batch)
        sums, counts = policy_logps(model, batch, features)
        ref = LiveReference().logps(model, batch, features)
        loss_sum, _ = DPOObjective(cfg, None).loss(sums, counts, ref)
    started = time.perf_counter()
    reference, info = build_reference(cfg, freeze, model, data_name=f"bench-{len(items)}",
                                      precompute_batches=lambda: pairs(items, cfg.reference_batch_size, False, False))
    fill_seconds = time.perf_counter() - started
    objective = DPOObjective(cfg, reference, pairs_per_step=budget.batch_size * budget.grad_accum)
    rate = vlpost_fit(model, pairs(items, budget.batch_size, loop=True, shuffle=True), objective,
                      lambda b: int(b["pairs"]), budget, setup.work / f"vlpost-dpo-{tag}", "dpo", budget.grad_accum)
    rate.update(cache_fill_seconds=round(fill_seconds, 3), cache_pairs=int(info.get("computed", 0)))
    checked = {"loss": float(loss_sum) / int(batch["pairs"]), "logps": sums.tolist()}
    return checked, rate


def grpo_settings(budget: Budget):
    from vlpost.train.grpo import loss_settings
    from vlpost.train.grpo_config import GRPOLossConfig, RolloutConfig

    # TRL's default loss_type "dapo" is GRPO's clipped surrogate with a token mean over the step (no dynamic
    # sampling, no overlong shaping): vlpost's grpo preset with aggregation token_mean is the same objective.
    rollout = RolloutConfig(group_size=budget.group_size, max_new_tokens=budget.max_new_tokens, temperature=1.0,
                            top_p=1.0, top_k=0)
    loss = GRPOLossConfig(loss="grpo", aggregation="token_mean", beta=0.0, num_iterations=1, reference="none",
                          dynamic_sampling=False, overlong_cache=0, eval_prompts=0)
    return loss_settings(loss, rollout), rollout


def fixed_completions(sample: dict, group_size: int) -> list[str]:
    """G different completions for the GRPO loss check: the sample's accepted answers, a refusal, wrong answers."""
    answers = list(dict.fromkeys(sample["reward"].get("answers") or []))
    pool = answers[:2] + ["I can't tell that from the image.", "two", "a red circle on the left", "no"]
    return pool[:group_size]


def grpo_check_rollout(model, check: list, budget: Budget):
    """Prompt ids, completion ids, advantages (vlpost rewards) of the fixed check completions."""
    from vlpost.data.chat import ChatEncoder
    from vlpost.train.grpo import compute_advantages
    from vlpost.train.rollout_scoring import as_rewards, default_rewards, encode_prompt_sample

    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image, max_length=budget.max_length)
    G = budget.group_size
    prompts, completions, texts, samples = [], [], [], []
    end = model.tokenizer.eos_token
    for sample, image in check:
        prompts.append(encode_prompt_sample(encoder, sample, image))
        for text in fixed_completions(sample, G):
            texts.append(text)
            samples.append(sample)
            completions.append(model.tokenizer(text + end, add_special_tokens=False)["input_ids"])
    rewards = as_rewards(default_rewards(texts, samples), len(texts))
    return prompts, completions, compute_advantages(rewards, G, "std")


def vlpost_grpo(setup: Setup, items: list, budget: Budget, check: list, tag: str) -> tuple[dict, dict]:
    from vlpost.config import FreezeConfig
    from vlpost.data.pipeline import ListSource
    from vlpost.model.vlm import VisionLanguageModel
    from vlpost.train.freeze import apply_freeze
    from vlpost.train.grpo import GRPOObjective, Row, collate_rows, completion_logprobs
    from vlpost.train.grpo_batches import GRPOBatches
    from vlpost.train.rollout import build_engine

    torch.manual_seed(budget.seed)
    model = VisionLanguageModel.from_pretrained(setup.run_dir)
    apply_freeze(model, FreezeConfig(lm="full", projector="frozen"))
    settings, rollout = grpo_settings(budget)
    objective = GRPOObjective(settings)
    model.eval()
    with torch.no_grad():
        prompts, completions, advantages = grpo_check_rollout(model, check, budget)
        embeds = model.encode_images(model.pixel_values([image for _, image in check]))
        G = budget.group_size
        rows = [Row(prompts[i // G], completions[i], embeds[i // G], float(advantages[i]))
                for i in range(len(completions))]
        batch = collate_rows(rows, model.tokenizer.pad_token_id, "image_embeds")
        loss_sum, _ = objective(model, batch)
        loss = float(loss_sum) / objective.count(batch)
        logps, _ = completion_logprobs(model, batch, 1.0)
        mean_logp = float(logps.sum() / batch["completion_mask"].sum())
    model.train()
    engine = build_engine("hf", model)
    batches = GRPOBatches(model, ListSource(items, seed=budget.seed, shuffle=True, loop=True), engine, settings,
                          rollout, batch_size=budget.batch_size, grad_accum=budget.grpo_grad_accum, num_iterations=1,
                          reference=None, max_prompt_length=budget.max_length,
                          shared_prompt=budget.grpo_shared_prompt)
    rate = vlpost_fit(model, batches, objective, lambda b: int(b["keep"].sum()), budget,
                      setup.work / f"vlpost-grpo-{tag}", "grpo", budget.grpo_grad_accum)
    rate["generation_share"] = batches.generation_share()
    return {"loss": loss, "mean_completion_logp": mean_logp, "prompt_ids": prompts, "completions": completions,
            "advantages": advantages}, rate


# ---------------------------------------------------------------------------- TRL side


def trl_common(budget: Budget, out: Path, grad_accum: int) -> dict:
    """TrainingArguments both sides share (the rest stays at TRL's defaults)."""
    return dict(output_dir=str(out), per_device_train_batch_size=budget.batch_size, gradient_accumulation_steps=grad_accum,
                max_steps=budget.warmup + budget.steps, learning_rate=budget.lr, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False,
                gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                logging_steps=budget.warmup + budget.steps, disable_tqdm=True, dataloader_num_workers=0,
                dataloader_pin_memory=False, seed=budget.seed)


def trl_model(setup: Setup, stage: str):
    """The exported LLaVA with the same parameters frozen as on the vlpost side."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(setup.hf_dir, dtype=torch.float32)
    inner = model.model
    inner.vision_tower.requires_grad_(False)
    inner.multi_modal_projector.requires_grad_(stage in ("align", "sft"))
    lm_trains = stage != "align"
    inner.language_model.requires_grad_(lm_trains)
    model.lm_head.requires_grad_(lm_trains)
    return model


def trl_processor(setup: Setup):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(setup.hf_dir)
    processor.chat_template = BENCH_TEMPLATE  # export copies the tokenizer's; set it explicitly anyway
    return processor


def trl_dataset(stage: str, items: list):
    from datasets import Dataset

    return Dataset.from_list(trl_rows(stage, items))


def trl_timer(marks: Marks):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.mark()

    return Timer()


def quiet(trainer):
    """No log lines on stdout (disable_tqdm swaps the progress bar for a printer)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def trl_sft_like(setup: Setup, stage: str, items: list, budget: Budget, check: list, tag: str) -> tuple[dict, dict]:
    from trl import SFTConfig, SFTTrainer

    marks = Marks()

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                marks.units += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    args = SFTConfig(**trl_common(budget, setup.work / f"trl-{stage}-{tag}", budget.grad_accum),
                     max_length=budget.max_length, assistant_only_loss=True)
    trainer = CountingSFTTrainer(model=trl_model(setup, stage), args=args, train_dataset=trl_dataset(stage, items),
                                 processing_class=trl_processor(setup), callbacks=[trl_timer(marks)])
    quiet(trainer)
    loss = trl_first_loss(trainer, [trainer.train_dataset[i] for i in range(len(check))])
    trainer.train()
    return {"loss": loss}, marks.rate(budget.warmup, budget.steps)


def trl_first_loss(trainer, rows: list[dict]) -> float:
    """The trainer's own collator and compute_loss on the check rows, at the initial weights."""
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    trainer.model.train()
    return float(loss)


def trl_dpo(setup: Setup, items: list, budget: Budget, check: list, tag: str) -> tuple[dict, dict]:
    from trl import DPOConfig, DPOTrainer

    marks = Marks()

    class CountingDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                marks.units += int(inputs["input_ids"].shape[0]) // 2
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    args = DPOConfig(**trl_common(budget, setup.work / f"trl-dpo-{tag}", budget.grad_accum), max_length=budget.max_length,
                     beta=budget.dpo_beta, loss_type=["sigmoid"])
    # ref_model=None: TRL loads a frozen second copy of the model for full fine-tuning (its default);
    # precompute_ref_log_probs is refused for vision datasets in TRL 1.x.
    trainer = CountingDPOTrainer(model=trl_model(setup, "dpo"), args=args, train_dataset=trl_dataset("dpo", items),
                                 processing_class=trl_processor(setup), callbacks=[trl_timer(marks)])
    quiet(trainer)
    rows = [trainer.train_dataset[i] for i in range(len(check))]  # the check pairs, as TRL's loader reads them
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    trainer.model.eval()
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)  # the policy's, with model=policy
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        loss = trainer.compute_loss(trainer.model, batch)
    trainer.model.train()
    trainer.train()
    checked = {"loss": float(loss), "logps": torch.cat([chosen, rejected]).tolist(),
               "ref_logps": torch.cat([ref_chosen, ref_rejected]).tolist()}
    return checked, marks.rate(budget.warmup, budget.steps)


def trl_grpo(setup: Setup, items: list, budget: Budget, check: list, tag: str, rollout: dict) -> tuple[dict, dict]:
    from trl import GRPOConfig, GRPOTrainer

    from vlpost.train.rollout_scoring import as_rewards, default_rewards

    samples = [sample for sample, _ in items]

    def vlpost_rewards(prompts, completions, sample_index, **kwargs):
        """vlpost's own reward functions (VQA accuracy, refusal), so both sides optimise the same signal."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return as_rewards(default_rewards(texts, [samples[i] for i in sample_index]), len(texts)).tolist()

    marks = Marks()

    class CountingGRPOTrainer(GRPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                marks.units += int(inputs["completion_ids"].shape[0])
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    args = GRPOConfig(**trl_common(budget, setup.work / f"trl-grpo-{tag}", budget.grpo_grad_accum),
                      num_generations=budget.group_size, max_completion_length=budget.max_new_tokens,
                      temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, loss_type="dapo")
    processor = trl_processor(setup)
    trainer = CountingGRPOTrainer(model=trl_model(setup, "grpo"), reward_funcs=[vlpost_rewards], args=args,
                                  train_dataset=trl_dataset("grpo", items), processing_class=processor,
                                  callbacks=[trl_timer(marks)])
    quiet(trainer)
    checked = trl_grpo_check(trainer, processor, check, budget, rollout)
    trainer.train()
    return checked, marks.rate(budget.warmup, budget.steps)


def trl_grpo_check(trainer, processor, check: list, budget: Budget, rollout: dict) -> dict:
    """TRL's _compute_loss (and its log-probs) on the same fixed rollout as vlpost's check (eval mode, no grad):
    the prompts are encoded by TRL's processor, the completions and advantages are vlpost's check rollout."""
    import numpy as np
    from trl.data_utils import prepare_multimodal_messages
    from trl.trainer.utils import pad

    completions, advantages = rollout["completions"], rollout["advantages"]
    G = budget.group_size
    conversations = [prepare_multimodal_messages(structured(sample["prompt"]), images=[image])
                     for sample, image in check]
    encoded = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)  # as GRPOTrainer._tokenize_prompts calls it
    prompt_ids = [list(ids) for ids in encoded["input_ids"]]
    same_prompts = prompt_ids == [list(p) for p in rollout["prompt_ids"]]
    pixel_values = encoded["pixel_values"]
    pixel_values = pixel_values if torch.is_tensor(pixel_values) else torch.tensor(np.array(pixel_values))
    prompt_rows = [torch.tensor(prompt_ids[i // G]) for i in range(len(completions))]
    completion_rows = [torch.tensor(c) for c in completions]
    pad_id = processor.tokenizer.pad_token_id
    completion_mask = pad([torch.ones_like(c) for c in completion_rows], padding_value=0, padding_side="right")
    inputs = {
        "prompt_ids": pad(prompt_rows, padding_value=pad_id, padding_side="left"),
        "prompt_mask": pad([torch.ones_like(p) for p in prompt_rows], padding_value=0, padding_side="left"),
        "completion_ids": pad(completion_rows, padding_value=pad_id, padding_side="right"),
        "completion_mask": completion_mask,
        "advantages": advantages,
        "pixel_values": pixel_values.repeat_interleave(G, dim=0),
        "num_images": [1] * len(completions),
        "num_items_in_batch": completion_mask.sum(),
    }
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, completion_mask.shape[1], pixel_values=inputs["pixel_values"],
            num_images=inputs["num_images"])
    trainer.model.train()
    return {"loss": float(loss), "mean_completion_logp": float((logps * completion_mask).sum() / completion_mask.sum()),
            "same_prompt_ids": same_prompts}


# ---------------------------------------------------------------------------- one stage


def loss_check(stage: str, ours: dict, theirs: dict) -> dict:
    """Step-0 losses of both sides on the same first batch; `agree` is what makes the speed comparison valid."""
    diff = abs(ours["loss"] - theirs["loss"])
    out = {"vlpost": ours["loss"], "trl": theirs["loss"], "abs_diff": diff}
    worst = diff
    if stage in ("align", "sft"):
        out["vlpost_packed"] = ours["loss_packed"]  # vlpost's packed path on the same samples (exact packing)
        out["packed_abs_diff"] = abs(ours["loss_packed"] - theirs["loss"])
        worst = max(worst, out["packed_abs_diff"])
    if stage == "dpo":
        # At step 0 the policy is the reference, so both losses are log 2 whatever the inputs: compare the
        # summed completion log-probs of every chosen / rejected row too (and the reference's).
        logp_diff = max(abs(a - b) for a, b in zip(ours["logps"], theirs["logps"]))
        ref_diff = max(abs(a - b) for a, b in zip(ours["logps"], theirs["ref_logps"]))
        out.update(max_abs_logp_diff=logp_diff, max_abs_ref_logp_diff=ref_diff)
        worst = max(worst, logp_diff, ref_diff)
    if stage == "grpo":
        out.update(vlpost_mean_logp=ours["mean_completion_logp"], trl_mean_logp=theirs["mean_completion_logp"],
                   mean_logp_abs_diff=abs(ours["mean_completion_logp"] - theirs["mean_completion_logp"]),
                   same_prompt_ids=theirs["same_prompt_ids"])
        worst = max(worst, out["mean_logp_abs_diff"])
        if not theirs["same_prompt_ids"]:
            worst = float("inf")
    out["agree"] = bool(worst <= LOSS_TOLERANCE)
    return out


def run_side(stage: str, side: str, setup: Setup, items: list, budget: Budget, check: list, tag: str,
             vlpost_check: dict | None) -> tuple[dict, dict]:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)  # each trainer builds its own accelerator
    PartialState._reset_state()
    GradientState._reset_state()
    torch.manual_seed(budget.seed)
    if side == "vlpost":
        if stage == "dpo":
            return vlpost_dpo(setup, items, budget, check, tag)
        if stage == "grpo":
            return vlpost_grpo(setup, items, budget, check, tag)
        return vlpost_sft_like(setup, stage, items, budget, check, tag)
    if stage == "dpo":
        return trl_dpo(setup, items, budget, check, tag)
    if stage == "grpo":
        return trl_grpo(setup, items, budget, check, tag, vlpost_check)
    return trl_sft_like(setup, stage, items, budget, check, tag)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run_stage(stage: str, setup: Setup, budget: Budget, n_items: int, n_check: int, repeats: int) -> dict:
    """Both sides `repeats` times, alternating which goes first; the median rate of each side."""
    items = records(setup, RECORD_KIND[stage], n_items, budget.seed)
    check = items[:n_check]
    checks: dict = {}
    runs: dict = {"vlpost": [], "trl": []}
    trl_error = None
    for repeat in range(repeats):
        # vlpost first in the first round: TRL's GRPO check scores vlpost's check rollout
        for side in (("vlpost", "trl") if repeat % 2 == 0 else ("trl", "vlpost")):
            if side == "trl" and trl_error:
                continue
            started = time.perf_counter()
            try:
                checked, rate = run_side(stage, side, setup, items, budget, check, str(repeat), checks.get("vlpost"))
            except Exception as err:  # a TRL version that cannot train this VLM stage: say so, do not fake it
                if side == "vlpost":
                    raise
                import trl

                trl_error = f"TRL {trl.__version__} could not run this stage: {type(err).__name__}: {err}"
                print(f"  {stage}/trl: {trl_error}", file=sys.stderr, flush=True)
                continue
            checks.setdefault(side, checked)
            runs[side].append(rate)
            print(f"  {stage}/{side} #{repeat + 1}: {rate['rate']:.1f} {UNITS[stage]} "
                  f"({time.perf_counter() - started:.0f} s with setup)", file=sys.stderr, flush=True)
    ours = median([r["rate"] for r in runs["vlpost"]])
    if trl_error:
        check_row = {"vlpost": checks["vlpost"]["loss"], "trl": None, "abs_diff": None, "agree": False}
        return {"row": {"vlpost": ours, "trl": None, "ratio": None, "unit": UNITS[stage], "target": TARGETS[stage],
                        "valid": False, "runs": runs, "note": trl_error}, "loss_check": check_row}
    check_row = loss_check(stage, checks["vlpost"], checks["trl"])
    theirs = median([r["rate"] for r in runs["trl"]])
    row = {"vlpost": ours, "trl": theirs, "ratio": ours / theirs, "unit": UNITS[stage], "target": TARGETS[stage],
           "valid": check_row["agree"], "runs": runs}
    if stage == "dpo":
        # The cache is filled once per (reference weights, data) and reused by later runs and epochs; one epoch
        # pays it in full. Per pair: training time + fill time.
        fill_per_pair = median([r["cache_fill_seconds"] / max(r["cache_pairs"], 1) for r in runs["vlpost"]])
        row["vlpost_incl_cache_fill_1_epoch"] = 1.0 / (1.0 / ours + fill_per_pair)
        row["ratio_incl_cache_fill_1_epoch"] = row["vlpost_incl_cache_fill_1_epoch"] / theirs
    if not check_row["agree"]:
        row["note"] = "step-0 losses differ by more than 1e-3: the comparison is void"
    return {"row": row, "loss_check": check_row}


# ---------------------------------------------------------------------------- main


def print_table(report: dict) -> None:
    print(f"\n{'stage':<6} {'unit':<14} {'vlpost':>10} {'trl':>10} {'ratio':>7} {'target':>7}  "
          f"{'step-0 loss vlpost / trl (|diff|)':<40}")
    for stage in STAGES:
        if stage not in report:
            continue
        row, check = report[stage], report["loss_check"][stage]
        trl = "n/a" if row["trl"] is None else f"{row['trl']:.1f}"
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        verdict = "" if row["valid"] else "  VOID"
        if check["trl"] is None:
            losses = f"{check['vlpost']:.6f} / n/a"
        else:
            losses = f"{check['vlpost']:.6f} / {check['trl']:.6f} ({check['abs_diff']:.1e})"
        print(f"{stage:<6} {row['unit']:<14} {row['vlpost']:>10.1f} {trl:>10} {ratio:>7} {row['target']:>6.2f}x  "
              f"{losses}{verdict}")
    for stage in STAGES:
        if stage not in report:
            continue
        check, row = report["loss_check"][stage], report[stage]
        extra = {k: v for k, v in check.items() if k not in ("vlpost", "trl", "abs_diff", "agree")}
        if extra:
            print(f"  {stage} check: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in extra.items()))
        if "ratio_incl_cache_fill_1_epoch" in row:
            print(f"  {stage}: vlpost incl. the one-time reference-cache fill over one epoch: "
                  f"{row['vlpost_incl_cache_fill_1_epoch']:.1f} {row['unit']} "
                  f"({row['ratio_incl_cache_fill_1_epoch']:.2f}x)")
        if row.get("note"):
            print(f"  {stage}: {row['note']}")


def versions() -> dict:
    import importlib.metadata as md

    names = ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "open_clip_torch")
    return {"python": platform.python_version(), **{n: md.version(n) for n in names}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of align,sft,dpo,grpo")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: 64 px ViT (64 tokens/image) + 4-layer 128-wide Llama; tiny: for tests")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per stage and side")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps before them")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per stage and side, alternating which side goes first; the median counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="fewer steps: the whole run in about 5 minutes")
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    parser.add_argument("--dpo-padded", action="store_true",
                        help="vlpost DPO with padded [chosen; rejected] rows (dpo.shared_prompt: false)")
    parser.add_argument("--grpo-row-layout", action="store_true",
                        help="vlpost GRPO loss pass with a prompt copy per completion (grpo.shared_prompt: false)")
    parser.add_argument("--work-dir", default=None, help="keep models and run dirs here (default: a temp dir)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {STAGES}")
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not installed: pip install -e .[bench]", file=sys.stderr)
        return 2

    budget = Budget(steps=15 if args.quick else 40, warmup=3)
    budget = replace(budget, **{k: v for k, v in (("steps", args.steps), ("warmup", args.warmup),
                                                    ("batch_size", args.batch_size),
                                                    ("max_length", args.max_length)) if v is not None},
                     grpo_shared_prompt=not args.grpo_row_layout, dpo_shared_prompt=not args.dpo_padded)
    if budget.warmup < 1 or budget.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1")
    from transformers.utils import logging as hf_logging

    threads, verbosity, disabled = torch.get_num_threads(), hf_logging.get_verbosity(), logging.root.manager.disable
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    logging.disable(logging.WARNING)  # trainers' warnings about TRL/transformers defaults; restored below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report, stages_run = run(args, stages, budget, argv)
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        logging.disable(disabled)
    print_table(report)
    print(f"({report['config']['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if all(report[s]["valid"] for s in stages_run) else 1


def run(args, stages: list[str], budget: Budget, argv: list[str] | None) -> tuple[dict, list[str]]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        setup = build_setup(work, args.size, budget.seed)
        report: dict = {"loss_check": {}}
        for stage in stages:
            total = budget.warmup + budget.steps
            if stage == "grpo":
                n_items = total * budget.batch_size * budget.grpo_grad_accum // budget.group_size
            elif stage == "dpo":
                n_items = total * budget.batch_size * budget.grad_accum  # one epoch: the cache covers it once
            else:
                n_items = max(512, 4 * total * budget.batch_size * budget.grad_accum)
            result = run_stage(stage, setup, budget, n_items, n_check=4 if stage == "grpo" else budget.batch_size,
                               repeats=args.repeats)
            report[stage], report["loss_check"][stage] = result["row"], result["loss_check"]
    report["config"] = {"budget": asdict(budget), "size": args.size, "tower": SIZES[args.size][0],
                        "lm": SIZES[args.size][1], "tokens_per_image": setup.tokens_per_image, "threads": args.threads,
                        "repeats": args.repeats,
                        "versions": versions(), "seconds": round(time.perf_counter() - started, 1),
                        "command": " ".join(["python", "scripts/bench_vs_trl.py", *(argv if argv is not None
                                                                                     else sys.argv[1:])])}
    return report, stages


if __name__ == "__main__":
    sys.exit(main())
