"""The library's one seeding rule: every random stream is named by a tuple of non-negative integers.

``derive_seed(seed, PURPOSE, *indices)`` feeds the tuple to ``numpy.random.SeedSequence`` and
returns a 63-bit seed for a ``torch.Generator``. Distinct tuples give independent streams, unlike
``seed + rank`` arithmetic where ``(seed=1, rank=0)`` and ``(seed=0, rank=1)`` coincide. The
purpose constants below keep the streams of different jobs apart; each is used in one place:

========================  ==========================================================================
``SEED_FLIP``             horizontal flips of a micro-batch: ``(seed, FLIP, rank, step, micro)``
``SEED_HEAD_RESHARD``     the class sampler after a resume on another world size: ``(seed, ., step, rank)``
``SEED_TORCH_RESHARD``    torch's global generator after such a resume: ``(seed, ., step, rank)``
``SEED_DATA``             the order of epoch ``e``: ``(seed, DATA, e)``; a DataLoader's own: ``(seed, DATA, rank, step)``
``SEED_TORCH``            torch's global generator (dropout, ...) of a rank: ``(seed, TORCH, rank)``
``SEED_INIT_CENTERS``     block ``b`` of 4,096 initial class centers: ``(seed, INIT_CENTERS, b)``
``SEED_SAMPLER``          the class sampler of a head shard: ``(seed, SAMPLER, rank)``
``SEED_QUALITY``          the initial weights of the quality branch (pfclib.quality): ``(seed, QUALITY)``
``SEED_DIM_SAMPLE``       the head's embedding dimensions kept at its ``t``-th training forward (Unicom,
                          the same on every rank): ``(seed, DIM_SAMPLE, t)``
========================  ==========================================================================
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SEED_DATA",
    "SEED_DIM_SAMPLE",
    "SEED_FLIP",
    "SEED_HEAD_RESHARD",
    "SEED_INIT_CENTERS",
    "SEED_QUALITY",
    "SEED_SAMPLER",
    "SEED_TORCH",
    "SEED_TORCH_RESHARD",
    "derive_seed",
]

SEED_FLIP, SEED_HEAD_RESHARD, SEED_TORCH_RESHARD, SEED_DATA, SEED_TORCH = 1, 2, 3, 4, 5
SEED_INIT_CENTERS, SEED_SAMPLER, SEED_QUALITY = 6, 7, 8
SEED_DIM_SAMPLE = 9


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from non-negative integers (``numpy.random.SeedSequence``): distinct
    tuples give independent streams."""
    if any(isinstance(p, bool) or int(p) < 0 for p in parts):
        raise ValueError(f"seed parts must be non-negative integers, got {parts}")
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)
