"""The vision-language adapter: 2 x 2 token downsampling, then a 2-layer GELU MLP.

Pixel unshuffle: the ViT's g x g patch tokens of a tile become (g/2) x (g/2) tokens, each the
concatenation of a 2 x 2 block of neighbours in the order (top-left, top-right, bottom-left,
bottom-right), i.e. 4 x the ViT width. Four times fewer image tokens reach the decoder.

TP: the first linear is column parallel (its output, the MLP hidden, stays split), the second row
parallel (all-reduced into the full decoder width): one all-reduce, like the decoder's MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def pixel_unshuffle(x: torch.Tensor, grid: int) -> torch.Tensor:
    """[n, g*g, c] (row-major patches) -> [n, (g/2)^2, 4c]."""
    n, _, c = x.shape
    x = x.view(n, grid // 2, 2, grid // 2, 2, c).permute(0, 1, 3, 2, 4, 5)  # [n, gy, gx, dy, dx, c]
    return x.reshape(n, (grid // 2) ** 2, 4 * c)


def _init_normal(std: float):
    return lambda w: torch.nn.init.normal_(w, 0.0, std)  # replaced by models/init.py's layout-free init


class VisionAdapter(MegatronModule):
    """[tiles, g*g, vision hidden] -> [tiles, (g/2)^2, decoder hidden]."""

    def __init__(self, config: TransformerConfig, vision_hidden: int, grid: int, hidden: int | None = None):
        super().__init__(config=config)
        self.grid = grid
        hidden = hidden or config.hidden_size
        init = _init_normal(config.init_method_std)
        self.linear_in = ColumnParallelLinear(4 * vision_hidden, hidden, config=config, init_method=init,
                                              bias=True, gather_output=False, skip_bias_add=False)
        self.linear_out = RowParallelLinear(hidden, config.hidden_size, config=config, init_method=init,
                                            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_in(pixel_unshuffle(features, self.grid))
        x, _ = self.linear_out(F.gelu(x))
        return x
