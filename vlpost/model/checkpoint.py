"""Run dirs: LM save_pretrained dir + tokenizer, projector (+ tower) safetensors, and vlpost.json with lineage."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

from safetensors.torch import load_file, save_file

from vlpost.config import LMConfig, ProjectorConfig, VisionConfig
from vlpost.constants import LM_SUBDIR, LOCAL_DIR, OPEN_CLIP_CONFIG, PROJECTOR_FILE, RUN_META_FILE

VISION_FILE = "vision.safetensors"
VISION_CONFIG_DIR = "vision"  # a local-dir tower's open_clip_config.json, so the run loads without that folder
LORA_SUBDIR = "lm_adapter"
FORMAT_VERSION = 1


def _tower_needs_weights(vision: dict) -> bool:
    """A tower named by an open_clip tag or hub id reloads by name; anything else is saved beside the run."""
    if vision["name"].startswith("hf-hub:"):
        return False
    pretrained = vision.get("pretrained")
    return not pretrained or Path(pretrained).exists() or vision["name"].startswith(LOCAL_DIR)


def _state(module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_run(model, out_dir: str | Path, lineage: dict | None = None, projector_only: bool = False) -> Path:
    """Write a complete run dir atomically (temp dir + rename); `projector_only` references the base LM."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        spec = {k: v for k, v in model.spec.items() if k != "lineage"}
        spec["format_version"] = FORMAT_VERSION
        spec["tokens_per_image"] = model.tokens_per_image
        spec["lineage"] = list(model.spec.get("lineage", [])) + ([lineage] if lineage else [])
        spec.pop("lm_adapter", None)
        save_file(_state(model.projector), str(tmp / PROJECTOR_FILE))
        spec["vision_weights"] = spec["vision_config_dir"] = None
        if _tower_needs_weights(spec["vision"]):
            save_file(_state(model.vision.visual), str(tmp / VISION_FILE))
            spec["vision_weights"] = VISION_FILE
            if getattr(model.vision, "open_clip_config", None):
                (tmp / VISION_CONFIG_DIR).mkdir()
                (tmp / VISION_CONFIG_DIR / OPEN_CLIP_CONFIG).write_text(json.dumps(model.vision.open_clip_config,
                                                                                   indent=2))
                spec["vision_config_dir"] = VISION_CONFIG_DIR
        if projector_only:
            if not spec["lm"].get("path"):
                raise ValueError("projector-only save needs an LM loaded from a dir (lm.path), not a random init")
            spec["lm_dir"] = None
        elif hasattr(model.lm, "peft_config"):
            _save_lora(model, tmp, spec)
        else:
            model.lm.save_pretrained(tmp / LM_SUBDIR, safe_serialization=True)
            model.tokenizer.save_pretrained(tmp / LM_SUBDIR)
            spec["lm_dir"] = LM_SUBDIR
        (tmp / RUN_META_FILE).write_text(json.dumps(spec, indent=2))
        _move_into(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _save_lora(model, tmp: Path, spec: dict) -> None:
    """LoRA LM: the peft adapter in lm_adapter/ plus its base LM (by lm.path reference when the base is that
    unchanged dir, i.e. no earlier stage trained it; else the base weights in lm/). Loading merges them."""
    model.lm.save_pretrained(tmp / LORA_SUBDIR)  # adapter_config.json + adapter_model.safetensors
    spec["lm_adapter"] = LORA_SUBDIR
    if spec["lm"].get("path") and not model.spec.get("lineage"):
        spec["lm_dir"] = None
        return
    base = model.lm.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    base.save_pretrained(tmp / LM_SUBDIR, state_dict=state, safe_serialization=True)
    model.tokenizer.save_pretrained(tmp / LM_SUBDIR)
    spec["lm_dir"] = LM_SUBDIR


def _move_into(src: Path, dst: Path) -> None:
    """Move the finished temp dir's entries into `dst`, keeping other files there (logs, configs)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dst / item.name
        if target.is_dir() and not target.is_symlink():
            old = dst / f".{item.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(item, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(item, target)
    src.rmdir()


def read_spec(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a vlpost run dir (no {RUN_META_FILE})")
    return json.loads(path.read_text())


def _dataclass_from(cls, data: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def load_run(run_dir: str | Path):
    """Rebuild a VisionLanguageModel from a run dir (tower, projector, LM, tokenizer, lineage)."""
    from vlpost.model.lm import load_lm
    from vlpost.model.projector import Projector
    from vlpost.model.vision import VisionTower
    from vlpost.model.vlm import VisionLanguageModel

    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    vision_cfg = _dataclass_from(VisionConfig, spec["vision"])
    if spec.get("vision_config_dir"):  # the architecture from the run dir itself, the weights from vision_weights
        vision_cfg.name, vision_cfg.pretrained = f"{LOCAL_DIR}{run_dir / spec['vision_config_dir']}", None
    elif spec.get("vision_weights") and not vision_cfg.name.startswith(LOCAL_DIR):
        vision_cfg.pretrained = None  # random init, then the saved weights below
    vision = VisionTower(vision_cfg, load_weights=not spec.get("vision_weights"))
    if spec.get("vision_weights"):
        load_strict(vision.visual, run_dir / spec["vision_weights"])
    lm_cfg = _dataclass_from(LMConfig, spec["lm"])
    if spec.get("lm_dir"):
        lm_cfg.path = str(run_dir / spec["lm_dir"])
        lm_cfg.tokenizer = None
    lm, tokenizer, image_token_id = load_lm(lm_cfg)
    if spec.get("lm_adapter"):  # a LoRA run: merge its adapter into the base LM
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(run_dir / spec["lm_adapter"])).merge_and_unload()
    projector = Projector.from_config(_dataclass_from(ProjectorConfig, spec["projector"]), vision.hidden_size,
                                      lm.get_input_embeddings().embedding_dim, vision.grid)
    load_strict(projector, run_dir / PROJECTOR_FILE)
    model = VisionLanguageModel(vision, projector, lm, tokenizer, image_token_id, spec)
    if model.tokens_per_image != spec.get("tokens_per_image", model.tokens_per_image):
        raise ValueError(f"{run_dir}: tokens_per_image {model.tokens_per_image} != recorded {spec['tokens_per_image']}")
    return model


def load_strict(module, path: Path) -> None:
    """Load safetensors into `module`, with an error naming the file and the mismatched tensors."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    state = load_file(str(path))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{name}: {items[:5]}" for name, items in
            (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items
        )
        raise ValueError(f"checkpoint {path} does not fit the model ({detail})")
    module.load_state_dict(state)
