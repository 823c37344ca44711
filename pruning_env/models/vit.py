"""SimpleViT (lucidrains style, as copied into the AgentViT notebook) with a token keep-mask and the
per-patch state the AgentViT agent observes; its MACs are counted in :mod:`pruning_env.costs.vit`.

Spec: ../shared/spec/agentvit.md §1.1-1.2. Tokens are dropped right after the patch + positional embedding,
so every block, the pooling and the head see only the kept tokens (the authors' placement).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from pruning_env.models.registry import register_model


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos table (h*w, dim): [sin(x w), cos(x w), sin(y w), cos(y w)], row-major tokens.

    :param h: grid rows.
    :param w: grid columns.
    :param dim: embedding width, a multiple of 4 and at least 8.
    :param temperature: frequency base (10000 in the notebook).
    """
    if dim % 4 != 0 or dim < 8:
        raise ValueError(f"sin-cos positions need dim to be a multiple of 4 and >= 8, got dim={dim}")
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = torch.arange(dim // 4, dtype=torch.float64) / (dim // 4 - 1)
    omega = 1.0 / (temperature ** omega)
    y = y.flatten().double()[:, None] * omega[None, :]
    x = x.flatten().double()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


class Attention(nn.Module):
    """Pre-norm multi-head self-attention without biases (inner width heads*dim_head may exceed dim)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(self.norm(x)).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # explicit matmuls rather than scaled_dot_product_attention: FlopCounterMode does not count the fused
        # CPU kernel, and the analytic count (vit_macs) is checked against it
        attn = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """One transformer block: x + Attn(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int):
        super().__init__()
        self.attn = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ff(x)


class SimpleViT(nn.Module):
    """SimpleViT: patch embedding, fixed 2-D sin-cos positions, pre-norm blocks, mean pooling, no CLS token.

    ``forward(x, keep)`` drops tokens before block 1. ``keep`` is a boolean mask over the ``num_patches``
    patches (row-major), shared by the batch, an index tensor of kept patches, or a (B, num_patches) boolean
    mask with the same count in every row (one mask per image).
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32, patch_size: int = 4, channels: int = 3,
                 dim: int = 128, depth: int = 6, heads: int = 16, dim_head: int = 64, mlp_dim: int = 512):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.patch_dim = channels * patch_size * patch_size
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.mlp_dim = mlp_dim
        self.num_classes = num_classes
        self.to_patch_embedding = nn.Sequential(
            nn.LayerNorm(self.patch_dim), nn.Linear(self.patch_dim, dim), nn.LayerNorm(dim))
        # fixed table, not a parameter; non-persistent so checkpoints stay the notebook's state_dict
        self.register_buffer("pos_embedding", posemb_sincos_2d(self.grid, self.grid, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, mlp_dim) for _ in range(depth))
        self.linear_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images to (B, num_patches, patch_dim), each patch flattened (row, col, channel)."""
        if x.dim() != 4 or x.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (B, {self.channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        b, c, _, _ = x.shape
        p, g = self.patch_size, self.grid
        x = x.view(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, p1, p2, c
        return x.reshape(b, g * g, p * p * c)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + positional embedding of all patches: (B, num_patches, dim)."""
        return self.to_patch_embedding(self.patchify(x)) + self.pos_embedding.to(x.dtype)

    def select(self, tokens: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """Keep the tokens named by ``keep`` (see the class docstring); ``None`` keeps all of them."""
        if keep is None:
            return tokens
        keep = keep.to(tokens.device)
        b, n, d = tokens.shape
        if keep.dim() == 1:
            if keep.dtype == torch.bool:
                if keep.numel() != n:
                    raise ValueError(f"keep mask has {keep.numel()} entries, the model has {n} patches")
                if not bool(keep.any()):
                    raise ValueError("keep mask keeps no patch; at least one patch must be kept")
            elif keep.numel() == 0:
                raise ValueError("keep index tensor is empty; at least one patch must be kept")
            return tokens[:, keep]
        if keep.dim() == 2 and keep.dtype == torch.bool and keep.shape == (b, n):
            counts = keep.sum(1)
            if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
                raise ValueError(f"per-image keep masks must keep the same, non-zero number of patches in "
                                 f"every row, got counts {counts.tolist()}")
            return tokens[keep].view(b, int(counts[0]), d)
        raise ValueError(f"keep must be a bool mask ({n},), an index tensor, or a bool mask ({b}, {n}); "
                         f"got {keep.dtype} {tuple(keep.shape)}")

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class logits (B, num_classes), computed on the kept tokens only.

        :param x: images (B, C, H, W).
        :param keep: which patches to keep (None: all).
        """
        tokens = self.select(self.embed(x), keep)
        for block in self.blocks:
            tokens = block(tokens)
        return self.linear_head(tokens.mean(dim=1))

    @torch.no_grad()
    def patch_state(self, x: torch.Tensor) -> torch.Tensor:
        """AgentViT's per-patch state (B, num_patches): block 1's attention sub-layer (LayerNorm, attention,
        output projection; no residual, no MLP) on all patches, averaged over the embedding dimension.

        :param x: images (B, C, H, W).
        """
        return self.blocks[0].attn(self.embed(x)).mean(dim=-1)


def _round4(value: float) -> int:
    """Nearest multiple of 4, at least 8 (the sin-cos table splits the width in four)."""
    return max(8, 4 * int(round(value / 4)))


@register_model
def vit_tiny_patch4(num_classes: int = 10, width: float = 1.0, depth: int = 6, image_size: int = 32,
                    channels: int = 3, dim_head: int = 64, patch_size: int = 4) -> SimpleViT:
    """The notebook's CIFAR SimpleViT: 4x4 patches (64 tokens on 32x32), dim 128, 16 heads of 64, MLP 512.

    ``width`` scales dim (to a multiple of 4), the MLP width and the number of heads (width 0.25: dim 32,
    MLP 128, 4 heads); ``depth`` is the number of blocks. ``dim_head`` stays 64 unless given. The name says
    4x4 patches; ``patch_size`` is a knob for other image sizes.

    :param num_classes: classifier outputs.
    :param width: width multiplier (1.0 = the notebook's model, 3,947,242 parameters).
    :param depth: transformer blocks (6 in the notebook).
    :param image_size: input side in pixels (patch size stays 4).
    :param channels: input channels.
    :param dim_head: width of one attention head.
    :param patch_size: patch side in pixels.
    """
    return SimpleViT(num_classes=num_classes, image_size=image_size, patch_size=patch_size,
                     channels=channels, dim=_round4(128 * width), depth=depth,
                     heads=max(1, int(round(16 * width))), dim_head=dim_head,
                     mlp_dim=max(1, int(round(512 * width))))


__all__ = ["SimpleViT", "vit_tiny_patch4", "posemb_sincos_2d"]
