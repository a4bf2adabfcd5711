"""A small vision transformer for face embeddings (Dosovitskiy et al., 2021; as used in the Partial FC repo).

Layout::

    patch embedding   conv(p x p, stride p): (B, 3, S, S) -> (B, (S/p)^2, dim)   (+ cls token when pool="cls")
    + learned position embedding
    depth x block     x + MHSA(LN(x));  x + MLP(LN(x))      (pre-norm, GELU MLP of width mlp_ratio*dim)
    LN, pool          mean over patch tokens ("mean") or the cls token ("cls")
    head              Linear(dim -> D) - BN1d                                     (B, D)

``image_size`` must be a multiple of ``patch_size``; the position embedding has one row per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pfclib.models import check_positive_int, register

__all__ = ["Attention", "Block", "VisionTransformer"]


class Attention(nn.Module):
    """Multi-head self-attention over ``(B, N, dim)`` tokens."""

    def __init__(
        self, dim: int, num_heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.proj_dropout = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        # (B, N, 3*dim) -> 3 x (B, heads, N, head_dim)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(b, n, dim)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, proj_dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT backbone.

    Args:
        embedding_size: output dimension D.
        image_size: input side S in pixels, a multiple of ``patch_size``.
        patch_size: side p of the square patches.
        dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width / dim.
        pool: ``"mean"`` (average of patch tokens) or ``"cls"`` (a learned class token).
        dropout: dropout in the blocks and before the head.

    Input ``(B, 3, S, S)`` float, output ``(B, D)`` un-normalised.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        image_size: int = 112,
        patch_size: int = 8,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        pool: str = "mean",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for value, what in (
            (embedding_size, "embedding_size"),
            (image_size, "image_size"),
            (patch_size, "patch_size"),
            (dim, "dim"),
            (depth, "depth"),
            (num_heads, "num_heads"),
        ):
            check_positive_int(value, what)
        if image_size % patch_size != 0:
            raise ValueError(
                f"image_size={image_size} must be a multiple of patch_size={patch_size} "
                f"(e.g. {patch_size * max(1, round(image_size / patch_size))})"
            )
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.embedding_size = embedding_size
        self.image_size = image_size
        self.pool = pool
        self.num_patches = (image_size // patch_size) ** 2

        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        num_tokens = self.num_patches + (1 if pool == "cls" else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.pos_dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, num_patches, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(self.pos_dropout(x + self.pos_embed)))
        pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.bn(self.head(self.head_dropout(pooled)))


@register("vit_s")
def vit_s(embedding_size: int, image_size: int, **kwargs) -> VisionTransformer:
    """ViT-S: patch 8, width 384, 12 blocks, 6 heads (196 tokens at 112x112)."""
    for key, value in (("patch_size", 8), ("dim", 384), ("depth", 12), ("num_heads", 6)):
        kwargs.setdefault(key, value)
    return VisionTransformer(embedding_size=embedding_size, image_size=image_size, **kwargs)


@register("vit_tiny")
def vit_tiny(embedding_size: int, image_size: int, **kwargs) -> VisionTransformer:
    """CPU-sized ViT: patch 4, width 64, 2 blocks, 4 heads (64 tokens at 32x32)."""
    for key, value in (("patch_size", 4), ("dim", 64), ("depth", 2), ("num_heads", 4)):
        kwargs.setdefault(key, value)
    return VisionTransformer(embedding_size=embedding_size, image_size=image_size, **kwargs)
