"""Stage 2 — multimodal SFT: projector + LM (full or LoRA) on conversations, loss on assistant tokens only.

    accelerate launch stages/sft.py --config configs/sft/tiny.yaml [--model.init_from runs/align] [--data.packing true]
"""

import sys

from vlpost.config import SFTConfig, parse_stage_args
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.feature_cache import cache_tower_features, feature_cache_summary
from vlpost.train.freeze import apply_freeze
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.stage import finish_run, sft_batches, start_run
from vlpost.train.trainer import Trainer


def main(argv: list[str] | None = None) -> dict:
    args = parse_stage_args(SFTConfig, argv, description=__doc__)
    run = start_run(args, stage="sft")
    cfg = run.cfg
    model = VisionLanguageModel.build(cfg.model)
    apply_freeze(model, cfg.freeze)
    batches = sft_batches(cfg.data, model, kind="sft", run=run, batch_size=cfg.train.batch_size)
    batches = cache_tower_features(batches, model, cfg.data.feature_cache, run.accelerator)  # off when None
    objective = SFTObjective(cfg.train.loss_reduction)
    trainer = Trainer(model, batches, objective, cfg.train, run.out, run.accelerator, stage="sft")
    trainer.fit()
    return finish_run(run, trainer, extra=feature_cache_summary(batches, trainer.global_sums))


if __name__ == "__main__":
    main(sys.argv[1:])
