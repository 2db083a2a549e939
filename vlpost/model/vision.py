"""The frozen open_clip vision tower: features from one transformer block, prefix/CLS tokens dropped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import torch
from torch import nn

from vlpost.config import VisionConfig
from vlpost.constants import LOCAL_DIR, OPEN_CLIP_CONFIG

TINY_CONFIGS = Path(__file__).parent / "configs"  # vlpost-tiny-vit, vlpost-demo-vit (tests and demo)
_registered = False


def register_tiny_configs() -> None:
    """Make our tiny open_clip model configs known to open_clip (once per process)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(TINY_CONFIGS)
        _registered = True


def local_dir_config(name: str) -> dict | None:
    """The open_clip_config.json of a `local-dir:` tower (None for other names), with a clear error if missing."""
    if not name.startswith(LOCAL_DIR):
        return None
    path = Path(name[len(LOCAL_DIR):]) / OPEN_CLIP_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"vision.name={name!r}: {path} not found (a local-dir tower is a folder holding "
                                f"{OPEN_CLIP_CONFIG} and its weights, as stages/bootstrap.py writes)")
    return json.loads(path.read_text())


def create_clip(cfg: VisionConfig, load_weights: bool = True):
    """A whole open_clip model + its eval transform, from a name and a tag / local file / local dir.
    `load_weights=False` builds the architecture only (a run dir then loads its saved tower weights)."""
    register_tiny_configs()
    pretrained = cfg.pretrained if load_weights else None
    if pretrained and not cfg.name.startswith((LOCAL_DIR, "hf-hub:")) and Path(pretrained).suffix:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"vision.pretrained checkpoint not found: {pretrained}")
    previous = logging.root.manager.disable
    if not load_weights:  # open_clip warns that a config-only local dir holds no weights: expected here
        logging.disable(logging.WARNING)
    try:
        model, _, transform = open_clip.create_model_and_transforms(cfg.name, pretrained=pretrained,
                                                                    load_weights=load_weights, weights_only=True)
    finally:
        logging.disable(previous)
    return model, transform


class VisionTower(nn.Module):
    """open_clip ViT → (N_img, num_patches, width) features of block `feature_layer`; frozen by default."""

    def __init__(self, cfg: VisionConfig, frozen: bool = True, load_weights: bool = True):
        super().__init__()
        # a local-dir tower's architecture travels with every run dir built on it (see checkpoint.save_run)
        self.open_clip_config = local_dir_config(cfg.name)
        clip, self.transform = create_clip(cfg, load_weights=load_weights)
        self.visual = clip.visual
        if not hasattr(self.visual, "transformer"):
            raise ValueError(f"vision tower {cfg.name!r} is not an open_clip VisionTransformer (ViT towers only)")
        self.cfg = cfg
        depth = len(self.visual.transformer.resblocks)
        if not -depth <= cfg.feature_layer < depth:
            raise ValueError(f"vision.feature_layer={cfg.feature_layer} outside a {depth}-block tower")
        self.layer_index = cfg.feature_layer % depth
        self.hidden_size = self.visual.transformer.width
        grid = self.visual.grid_size
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_patches = self.grid[0] * self.grid[1]
        self.frozen = frozen
        if frozen:
            self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True):
        """A frozen tower stays in eval mode (no dropout, fixed norms) whatever the parent does."""
        super().train(mode)
        if self.frozen:
            self.visual.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values (N, 3, H, W) → (N, num_patches, width)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.visual.forward_intermediates(
                pixel_values, indices=[self.layer_index], stop_early=True,
                intermediates_only=True, output_fmt="NLC",
            )
        return out["image_intermediates"][0]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype
