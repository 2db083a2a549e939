"""Optional stage — a Bradley–Terry reward model: a scalar head on the VLM scores (image, prompt, completion).

    accelerate launch stages/reward.py --config configs/reward/tiny.yaml [--model.init_from runs/sft]

A seeded hash of each sample id holds out `reward.eval_fraction` of the pairs; the pairwise accuracy on them is
written to summary.json. Load the result with `vlpost.train.reward_model.load_reward_model(run_dir)`.
"""

import sys

from vlpost.config import parse_stage_args
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.dpo_config import RewardConfig
from vlpost.train.preference import HeldOutSplit, pair_stream
from vlpost.train.reward_model import BTObjective, evaluate_pairs, prepare_reward_model
from vlpost.train.stage import finish_run, sample_source, start_run
from vlpost.train.trainer import Trainer


def main(argv: list[str] | None = None) -> dict:
    args = parse_stage_args(RewardConfig, argv, description=__doc__)
    run = start_run(args, stage="reward")
    cfg, acc = run.cfg, run.accelerator
    model = prepare_reward_model(VisionLanguageModel.build(cfg.model), cfg.freeze)

    def pairs(held_out: bool, batch_size: int, loop: bool):
        source = sample_source(cfg.data, "preference", rank=acc.process_index, world_size=acc.num_processes,
                               seed=cfg.train.seed, loop=loop)
        split = HeldOutSplit(source, cfg.reward.eval_fraction, cfg.reward.eval_seed, held_out=held_out)
        return pair_stream(split, model.vlm, batch_size=batch_size, max_length=cfg.data.max_length)

    def held_out_batches():
        limit = max(1, cfg.reward.eval_max_pairs // cfg.reward.eval_batch_size)
        stream = iter(pairs(True, cfg.reward.eval_batch_size, loop=False))
        return [batch for _, batch in zip(range(limit), stream)]

    before = evaluate_pairs(model, held_out_batches())
    objective = BTObjective(cfg.reward.margin, pairs_per_step=cfg.train.batch_size * cfg.train.grad_accum)
    trainer = Trainer(model, pairs(False, cfg.train.batch_size, loop=True), objective, cfg.train, run.out, acc,
                      stage="reward")
    trainer.fit()
    after = evaluate_pairs(trainer.unwrapped_model(), held_out_batches())
    return finish_run(run, trainer, extra={"held_out_before": before, "held_out": after})


if __name__ == "__main__":
    main(sys.argv[1:])
