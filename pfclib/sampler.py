"""Class sampling of Partial FC: which ``k`` classes of a rank enter a step's softmax.

On each rank, for a sample rate ``r < 1``: ``k = int(r * n_local)``; every local positive class
of the gathered batch is kept; the rest of the ``k`` slots are negatives drawn uniformly without
replacement from the other local classes; the index set is sorted ascending and positive labels
are remapped to their position in it. If the positives alone number more than ``k``, exactly the
positives are used.

The draw costs ``O(k log k)`` (never ``O(n_local)`` when ``k`` is small against ``n_local``), so a
step at a million classes costs what it costs at a hundred thousand with the same ``k``. All
randomness comes from the ``torch.Generator`` passed in (the head owns one per rank, on the CPU,
so a run samples the same classes on any device).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def num_sampled(sample_rate: float, n_local: int) -> int:
    """``k = int(sample_rate * n_local)``, the number of classes a rank samples per step (before
    the positives-exceed-k rule). ``sample_rate`` must be in (0, 1]."""
    if not isinstance(sample_rate, numbers.Real) or isinstance(sample_rate, bool):
        raise TypeError(
            f"sample_rate must be a number in (0, 1], got {type(sample_rate).__name__}: {sample_rate!r}"
        )
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return int(sample_rate * n_local)


def draw_without_replacement(population: int, count: int, generator: torch.Generator) -> Tensor:
    """A uniformly random ``count``-subset of ``range(population)`` (int64, CPU, unordered).

    For ``count <= population / 2`` it draws with replacement until ``count`` distinct values are
    seen, then keeps a uniform ``count``-subset of them: the set of distinct values is
    exchangeable (the stopping rule depends only on its size), so the result is exactly uniform,
    at cost ``O(count log count)``. Otherwise it uses a random permutation (``O(population)``,
    which is then ``O(count)``).
    """
    if not 0 <= count <= population:
        raise ValueError(f"cannot draw {count} distinct values from a population of {population}")
    if count == 0:
        return torch.empty(0, dtype=torch.int64)
    if 2 * count > population:
        return torch.randperm(population, generator=generator)[:count]
    seen = torch.empty(0, dtype=torch.int64)
    while seen.numel() < count:
        need = count - seen.numel()
        draws = torch.randint(population, (need + need // 4 + 16,), generator=generator)
        seen = torch.unique(torch.cat([seen, draws]))
    keep = torch.randperm(seen.numel(), generator=generator)[:count]
    return seen[keep]


def sample_classes(positives: Tensor, n_local: int, k: int, generator: torch.Generator) -> Tensor:
    """The sorted local class index set of one step.

    Args:
        positives: 1-D int64, the distinct local classes present in the gathered batch, sorted
            ascending, in ``[0, n_local)``.
        n_local: number of classes on this rank.
        k: target number of sampled classes (``num_sampled``).
        generator: CPU generator the negatives are drawn from.

    Returns:
        1-D int64 CPU tensor of ``max(k, len(positives))`` distinct sorted local classes that
        contains every positive; the negatives are uniform without replacement among the others.
    """
    positives = positives.to("cpu", torch.int64)
    if positives.dim() != 1:
        raise ValueError(f"positives must be 1-D, got shape {tuple(positives.shape)}")
    p = positives.numel()
    if p and (positives[0] < 0 or positives[-1] >= n_local):
        raise ValueError(f"positives must lie in [0, {n_local}), got range [{positives[0]}, {positives[-1]}]")
    if p > 1 and not bool((positives[1:] > positives[:-1]).all()):
        raise ValueError("positives must be sorted ascending and distinct")
    if not 0 <= k <= n_local:
        raise ValueError(f"k must be in [0, {n_local}], got {k}")
    if p >= k:
        return positives.clone()
    draws = draw_without_replacement(n_local - p, k - p, generator)
    # Map draw u in [0, n_local - p) to the u-th class that is not a positive: u is shifted by the
    # number of positives at or below its result, i.e. by #{j : positives[j] - j <= u}.
    shift = torch.searchsorted(positives - torch.arange(p), draws, right=True)
    negatives = draws + shift
    return torch.sort(torch.cat([positives, negatives])).values


def remap_labels(local_labels: Tensor, index: Tensor) -> Tensor:
    """Map local labels (-1 = another rank's class) to their column in the sorted ``index``.

    Returns int64 of the shape of ``local_labels``: the position of each label in ``index``, or -1
    for -1. Raises ValueError if a label ``>= 0`` is not in ``index``.
    """
    index = index.to(local_labels.device)
    mine = local_labels >= 0
    if index.numel() == 0:
        if bool(mine.any()):
            raise ValueError("the sampled index set is empty but the batch has local positives")
        return torch.full_like(local_labels, -1)
    pos = torch.searchsorted(index, local_labels.clamp(min=0)).clamp_(max=index.numel() - 1)
    found = index[pos] == local_labels
    if not bool((found | ~mine).all()):
        missing = local_labels[mine & ~found].unique()[:10].tolist()
        raise ValueError(f"local positive classes {missing} are missing from the sampled index set")
    return torch.where(mine, pos, torch.full_like(pos, -1))
