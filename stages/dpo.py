"""Stage 3a — DPO: the policy (LoRA or full) learns chosen over rejected answers against a fixed reference.

    accelerate launch stages/dpo.py --config configs/dpo/tiny.yaml [--model.init_from runs/sft] [--dpo.beta 0.1]

Each pair's image is encoded once for [chosen; rejected]; the reference is the adapter-disabled policy (LoRA)
or log-probs precomputed once and cached on disk (full fine-tuning); see vlpost/train/reference.py.
Under ZeRO-3 the passes outside training (cache, pair eval) run on whole weights (vlpost/train/zero.py).
"""

import sys

from vlpost.config import parse_stage_args
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.dpo_config import DPOConfig
from vlpost.train.freeze import apply_freeze
from vlpost.train.preference import DPOObjective, pair_stream, preference_eval
from vlpost.train.reference import build_reference, data_id
from vlpost.train.stage import finish_run, sample_source, start_run
from vlpost.train.trainer import Trainer
from vlpost.train.zero import whole_model

EVAL_PAIRS_BATCHES = 8  # batches of training pairs scored before and after training


def main(argv: list[str] | None = None) -> dict:
    args = parse_stage_args(DPOConfig, argv, description=__doc__)
    run = start_run(args, stage="dpo")
    cfg, acc = run.cfg, run.accelerator
    model = VisionLanguageModel.build(cfg.model)
    apply_freeze(model, cfg.freeze)

    def pairs(batch_size: int, loop: bool):
        source = sample_source(cfg.data, "preference", rank=acc.process_index, world_size=acc.num_processes,
                               seed=cfg.train.seed, loop=loop)
        return pair_stream(source, model, batch_size=batch_size, max_length=cfg.data.max_length,
                           shared_prompt=cfg.dpo.shared_prompt)

    def first_batches():
        stream = iter(pairs(cfg.train.batch_size, loop=False))
        return [batch for _, batch in zip(range(EVAL_PAIRS_BATCHES), stream)]

    reference, info = build_reference(cfg.dpo, cfg.freeze, model, data_name=data_id(cfg.data), accelerator=acc,
                                      precompute_batches=lambda: pairs(cfg.dpo.reference_batch_size, loop=False))
    with whole_model(model, acc):  # every rank; under ZeRO-3 the LM is partitioned from the start
        before = preference_eval(model, reference, first_batches())
    objective = DPOObjective(cfg.dpo, reference, pairs_per_step=cfg.train.batch_size * cfg.train.grad_accum)
    trainer = Trainer(model, pairs(cfg.train.batch_size, loop=True), objective, cfg.train, run.out, acc, stage="dpo")
    trainer.fit()
    with whole_model(trainer.model, acc):
        after = preference_eval(trainer.unwrapped_model(), reference, first_batches())
    return finish_run(run, trainer, extra={**info, "pairs_before": before, "pairs_after": after})


if __name__ == "__main__":
    main(sys.argv[1:])
