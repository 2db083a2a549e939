"""Projectors from vision features to LM embeddings; each reports `tokens_per_image`."""

from __future__ import annotations

import torch
from torch import nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "pixel_shuffle")


class Projector(nn.Module):
    """linear | mlp2x_gelu | pixel_shuffle (merge×merge patches merged into one token, then a 2-layer GELU MLP)."""

    def __init__(self, kind: str, vision_dim: int, lm_dim: int, grid: tuple[int, int], hidden_size: int | None = None,
                 merge: int = 2):
        super().__init__()
        self.kind, self.grid, self.merge = kind, grid, merge
        hidden = hidden_size or lm_dim  # LLaVA's mlp2x_gelu: as wide as the LM
        if kind == "linear":
            self.net = nn.Linear(vision_dim, lm_dim)
        elif kind == "mlp2x_gelu":
            self.net = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))
        elif kind == "pixel_shuffle":
            if merge < 1 or grid[0] % merge or grid[1] % merge:
                raise ValueError(f"pixel_shuffle merge={merge} must divide the patch grid {grid}")
            self.net = nn.Sequential(nn.Linear(merge * merge * vision_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))
        else:
            raise ValueError(f"unknown projector type {kind!r}; expected one of {PROJECTOR_TYPES}")
        if merge != 2 and kind != "pixel_shuffle":
            raise ValueError(f"projector merge={merge} applies to pixel_shuffle only, not {kind!r}")

    @classmethod
    def from_config(cls, cfg, vision_dim: int, lm_dim: int, grid: tuple[int, int]) -> Projector:
        """From a ProjectorConfig (model.projector), for a tower of width `vision_dim` and patch `grid`."""
        return cls(cfg.type, vision_dim, lm_dim, grid, hidden_size=cfg.hidden_size, merge=cfg.merge)

    @property
    def tokens_per_image(self) -> int:
        return tokens_per_image(self.kind, self.grid, self.merge)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features (N, P, Dv) → (N, tokens_per_image, Dlm)
        if self.kind == "pixel_shuffle":
            features = pixel_shuffle(features, self.grid, self.merge)
        return self.net(features)


def tokens_per_image(kind: str, grid: tuple[int, int], merge: int = 2) -> int:
    """LM positions one image takes: one per patch, one per merge×merge block after pixel_shuffle."""
    patches = grid[0] * grid[1]
    return patches // (merge * merge) if kind == "pixel_shuffle" else patches


def pixel_shuffle(features: torch.Tensor, grid: tuple[int, int], merge: int = 2) -> torch.Tensor:
    """(N, h*w, D) → (N, h/m * w/m, m*m*D): each m×m block of neighbouring patches becomes one token (raster order)."""
    n, _, dim = features.shape
    h, w, m = grid[0], grid[1], merge
    x = features.reshape(n, h // m, m, w // m, m, dim)  # (N, h/m, m, w/m, m, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, h/m, w/m, m, m, D)
    return x.reshape(n, (h // m) * (w // m), m * m * dim)
