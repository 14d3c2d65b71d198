"""The ViT's patch embedding as a matmul over flattened patches equals the stride-patch convolution."""
from types import SimpleNamespace

import pytest
import torch


def test_patch_matmul_equals_the_convolution():
    from megatron_bluelm.models.vision import VisionEncoder

    torch.manual_seed(0)
    grid, patch, hidden = 4, 14, 32
    conv = torch.nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
    enc = SimpleNamespace(patch_embedding=conv, grid=grid)  # the two attributes embed_patches reads
    px = torch.randn(3, 3, grid * patch, grid * patch)
    ref = conv(px).flatten(2).transpose(1, 2)  # [n, g*g, hidden], row-major patches
    ours = VisionEncoder.embed_patches(enc, px)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), (conv.weight, conv.bias))
    refs = torch.autograd.grad(ref.square().sum(), (conv.weight, conv.bias))
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="vision.image_size"):
        VisionEncoder.embed_patches(enc, torch.randn(1, 3, (grid + 1) * patch, grid * patch))
