"""The frozen open_clip vision tower: features from one transformer block, prefix/CLS tokens dropped."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torch import nn

from vlpost.config import VisionConfig

TINY_CONFIGS = Path(__file__).parent / "configs"  # vlpost-tiny-vit, vlpost-demo-vit (tests and demo)
_registered = False


def register_tiny_configs() -> None:
    """Make our tiny open_clip model configs known to open_clip (once per process)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(TINY_CONFIGS)
        _registered = True


def create_clip(cfg: VisionConfig):
    """A whole open_clip model + its eval transform, from a name and a tag / local file / local dir."""
    register_tiny_configs()
    pretrained = cfg.pretrained
    if pretrained and not cfg.name.startswith(("local-dir:", "hf-hub:")) and Path(pretrained).suffix:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"vision.pretrained checkpoint not found: {pretrained}")
    model, _, transform = open_clip.create_model_and_transforms(cfg.name, pretrained=pretrained, weights_only=True)
    return model, transform


class VisionTower(nn.Module):
    """open_clip ViT → (N_img, num_patches, width) features of block `feature_layer`; frozen by default."""

    def __init__(self, cfg: VisionConfig, frozen: bool = True):
        super().__init__()
        clip, self.transform = create_clip(cfg)
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
