"""Stage 3b — GRPO family (grpo | dr_grpo | dapo | gspo | rloo) on prompts with verifiable / refusal rewards.

    accelerate launch stages/grpo.py --config configs/grpo/tiny.yaml [--model.init_from runs/dpo] [--grpo.loss dapo]

Each step generates G completions per prompt with the current policy (one KV-cache batch, one tower pass per
prompt; see vlpost/train/rollout.py), scores them by the sample's reward type, and takes a clipped policy-gradient
step on group advantages (vlpost/train/grpo.py). Each rank generates and normalises its own prompts' groups;
under ZeRO-3 rollouts and evaluation run on whole weights, rank-local (vlpost/train/zero.py).
"""

import sys

from vlpost.config import parse_stage_args
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.freeze import apply_freeze
from vlpost.train.grpo import GRPOObjective, build_reference, loss_settings
from vlpost.train.grpo_batches import GRPOBatches
from vlpost.train.grpo_config import GRPOConfig, check_grpo_config
from vlpost.train.metrics import plot_metrics
from vlpost.train.rollout import build_engine
from vlpost.train.rollout_scoring import eval_items, evaluate_prompts
from vlpost.train.stage import finish_run, sample_source, start_run
from vlpost.train.trainer import Trainer
from vlpost.train.zero import whole_model

PLOTS = ("reward/mean", "accuracy/vqa", "refusal/rate", "refusal/over_rate", "kl", "entropy",
         "completion/length_mean", "time/generation_share")


def main(argv: list[str] | None = None) -> dict:
    args = parse_stage_args(GRPOConfig, argv, description=__doc__)
    check_grpo_config(args.cfg)
    run = start_run(args, stage="grpo")
    cfg, acc = run.cfg, run.accelerator
    model = VisionLanguageModel.build(cfg.model)
    apply_freeze(model, cfg.freeze)
    settings = loss_settings(cfg.grpo, cfg.rollout)
    engine = build_engine(cfg.rollout.backend, model, autocast=acc.autocast)
    held_out, eval_source = eval_items(cfg.data, cfg.grpo.eval_prompts, cfg.grpo.eval_shards) if run.is_main \
        else ([], "none")

    def evaluate() -> dict:
        model.to(acc.device)
        with whole_model(model, acc):  # every rank enters (ZeRO-3 gathers); only the main process has prompts
            return evaluate_prompts(engine, model, held_out, cfg.rollout, max_prompt_length=cfg.data.max_length,
                                    samples=cfg.grpo.eval_samples)

    before = evaluate()
    source = sample_source(cfg.data, "prompt", rank=acc.process_index, world_size=acc.num_processes,
                           seed=cfg.train.seed)
    with whole_model(model, acc):  # a copy reference copies whole weights
        reference = build_reference(model, cfg.grpo)
    batches = GRPOBatches(model, source, engine, settings, cfg.rollout, batch_size=cfg.train.batch_size,
                          grad_accum=cfg.train.grad_accum, num_iterations=cfg.grpo.num_iterations,
                          max_refill=cfg.grpo.max_refill, reference=reference,
                          max_prompt_length=cfg.data.max_length, autocast=acc.autocast,
                          gather=lambda: whole_model(model, acc), shared_prompt=cfg.grpo.shared_prompt)
    trainer = Trainer(model, batches, GRPOObjective(settings), cfg.train, run.out, acc, stage="grpo")
    trainer.fit()
    after = evaluate()
    if run.is_main:
        plot_metrics(run.out, keys=PLOTS, out_name="rollouts.png")
    return finish_run(run, trainer, extra={
        "loss_type": cfg.grpo.loss, "prompts_drawn": batches.prompts_drawn,
        "generation_share": batches.generation_share(), "eval_before": before, "eval_after": after,
        "eval_source": eval_source,
    })


if __name__ == "__main__":
    main(sys.argv[1:])
