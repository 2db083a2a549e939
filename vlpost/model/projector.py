"""Projectors from vision features to LM embeddings; each reports `tokens_per_image`."""

from __future__ import annotations

import torch
from torch import nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "pixel_shuffle")


class Projector(nn.Module):
    """linear | mlp2x_gelu | pixel_shuffle (2×2 patches merged, then a 2-layer GELU MLP)."""

    def __init__(self, kind: str, vision_dim: int, lm_dim: int, grid: tuple[int, int], hidden_size: int | None = None):
        super().__init__()
        self.kind, self.grid = kind, grid
        hidden = hidden_size or lm_dim  # LLaVA's mlp2x_gelu: as wide as the LM
        if kind == "linear":
            self.net = nn.Linear(vision_dim, lm_dim)
        elif kind == "mlp2x_gelu":
            self.net = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))
        elif kind == "pixel_shuffle":
            if grid[0] % 2 or grid[1] % 2:
                raise ValueError(f"pixel_shuffle needs an even patch grid, got {grid}")
            self.net = nn.Sequential(nn.Linear(4 * vision_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))
        else:
            raise ValueError(f"unknown projector type {kind!r}; expected one of {PROJECTOR_TYPES}")

    @property
    def tokens_per_image(self) -> int:
        return tokens_per_image(self.kind, self.grid)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features (N, P, Dv) → (N, tokens_per_image, Dlm)
        if self.kind == "pixel_shuffle":
            features = pixel_shuffle(features, self.grid)
        return self.net(features)


def tokens_per_image(kind: str, grid: tuple[int, int]) -> int:
    """LM positions one image takes: one per patch, a quarter of them after pixel_shuffle."""
    patches = grid[0] * grid[1]
    return patches // 4 if kind == "pixel_shuffle" else patches


def pixel_shuffle(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, h*w, D) → (N, h/2 * w/2, 4D): each 2×2 block of neighbouring patches becomes one token."""
    n, _, dim = features.shape
    h, w = grid
    x = features.reshape(n, h // 2, 2, w // 2, 2, dim)  # (N, h/2, 2, w/2, 2, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, h/2, w/2, 2, 2, D)
    return x.reshape(n, (h // 2) * (w // 2), 4 * dim)
