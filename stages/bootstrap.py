"""Stage 0 (demo only) — make what cannot be downloaded: a BPE tokenizer, a tiny CLIP and a tiny LM.

    python stages/bootstrap.py --config configs/bootstrap/demo.yaml --out runs/demo/bootstrap

Outputs: <out>/tokenizer, <out>/clip (open_clip folder: use `vision.name: local-dir:<out>/clip`), <out>/lm (HF dir).
"""

import json
import sys
import time
from pathlib import Path

from vlpost.config import parse_stage_args
from vlpost.data.synthetic import SyntheticWorld
from vlpost.model.tokenizer import train_bpe_tokenizer
from vlpost.train.bootstrap import BootstrapConfig, pretrain_tiny_lm, train_tiny_clip
from vlpost.train.rundir import prepare_run_dir, record_run


def main(argv: list[str] | None = None) -> dict:
    args = parse_stage_args(BootstrapConfig, argv, description=__doc__)
    cfg = args.cfg
    out = prepare_run_dir(cfg.out, resume=args.resume, overwrite=args.overwrite)
    record_run(out, cfg)
    started = time.perf_counter()
    world = SyntheticWorld(seed=cfg.seed, image_size=cfg.image_size)
    texts = list(world.text_corpus(max(cfg.tokenizer.texts, cfg.lm.texts)))
    tokenizer = train_bpe_tokenizer(texts[: cfg.tokenizer.texts], vocab_size=cfg.tokenizer.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    summary = {"stage": "bootstrap", "tokenizer_vocab": len(tokenizer)}
    summary |= train_tiny_clip(cfg.clip, list(world.caption_pairs(cfg.clip.pairs)), out / "clip", cfg.image_size,
                               seed=cfg.seed)
    summary |= pretrain_tiny_lm(cfg.lm, tokenizer, texts[: cfg.lm.texts], out / "lm", seed=cfg.seed)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["final_loss"] = summary["lm_loss"]
    summary["steps"] = cfg.lm.steps
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "lm_config"}, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
