"""Training-time augmentation. Datasets return un-augmented images; augment the batch here."""

from __future__ import annotations

import torch

__all__ = ["random_hflip"]


def random_hflip(batch: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image of ``batch`` ``(B, C, H, W)`` left-right with probability ``p``.

    One uniform draw per sample comes from ``generator`` (on the generator's device, so a CPU
    generator works for a GPU batch), so a seeded generator gives a reproducible flip pattern.
    Returns a new tensor with the dtype and device of ``batch``; ``batch`` is not modified.
    """
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"random_hflip expects a batch of shape (B, C, H, W), got {shape}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"random_hflip needs a torch.Generator, got {type(generator).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability p must be in [0, 1], got {p}")
    draws = torch.rand(batch.shape[0], generator=generator, device=generator.device)
    flip = (draws < p).to(batch.device).view(-1, 1, 1, 1)
    return torch.where(flip, batch.flip(-1), batch)
