"""Stage 1 — feature alignment: the projector learns on image–caption pairs; tower and LM stay frozen.

    accelerate launch stages/align.py --config configs/align/tiny.yaml [--out runs/align] [--train.lr 1e-3 ...]
"""

import sys

from vlpost.config import AlignConfig, parse_stage_args
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train.feature_cache import cache_tower_features, feature_cache_summary
from vlpost.train.freeze import apply_freeze
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.stage import finish_run, sft_batches, start_run
from vlpost.train.trainer import Trainer


def main(argv: list[str] | None = None) -> dict:
    args = parse_stage_args(AlignConfig, argv, description=__doc__)
    run = start_run(args, stage="align")
    cfg = run.cfg
    model = VisionLanguageModel.build(cfg.model)
    apply_freeze(model, cfg.freeze)
    batches = sft_batches(cfg.data, model, kind="caption", run=run, batch_size=cfg.train.batch_size)
    batches = cache_tower_features(batches, model, cfg.data.feature_cache, run.accelerator)  # off when None
    objective = SFTObjective(cfg.train.loss_reduction)
    trainer = Trainer(model, batches, objective, cfg.train, run.out, run.accelerator, stage="align")
    trainer.fit()
    return finish_run(run, trainer, projector_only=cfg.freeze.lm == "frozen",
                      extra=feature_cache_summary(batches, trainer.global_sums))


if __name__ == "__main__":
    main(sys.argv[1:])
