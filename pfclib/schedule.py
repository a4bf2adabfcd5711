"""Learning-rate schedule: linear warm-up, then polynomial decay (the insightface recipe, power 2).

The multiplier applied to the peak learning rate at optimizer step ``t`` (0-based: the ``t``-th
call to ``optimizer.step()`` uses it) is, with ``w = warmup_steps`` and ``T = total_steps``::

    (t + 1) / w                                         for t < w   (reaches 1 at t = w - 1)
    m + (1 - m) * (1 - (t - w) / (T - w)) ** power      for w <= t < T
    m                                                   for t >= T

where ``m = min_lr_ratio``. The decay starts at exactly 1 and approaches ``m`` at the end.

The backbone and the head use the same schedule: :func:`make_schedulers` builds one
``LambdaLR`` per optimizer around the same :class:`WarmupPolyDecay`. ``WarmupPolyDecay`` is a
plain object (not a lambda), so ``LambdaLR.state_dict()`` records its parameters and the state
round-trips through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["WarmupPolyDecay", "make_schedulers", "set_step"]


class WarmupPolyDecay:
    """Callable ``step -> multiplier`` for ``torch.optim.lr_scheduler.LambdaLR`` (see module doc)."""

    def __init__(
        self, total_steps: int, warmup_steps: int = 0, power: float = 2.0, min_lr_ratio: float = 0.0
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.power = float(power)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr_ratio
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * (1.0 - progress) ** self.power

    def __repr__(self) -> str:
        return (
            f"WarmupPolyDecay(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
            f"power={self.power}, min_lr_ratio={self.min_lr_ratio})"
        )


def make_schedulers(
    optimizers: Sequence[torch.optim.Optimizer], schedule: WarmupPolyDecay
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One ``LambdaLR`` per optimizer, all following ``schedule``. Step them together, once per
    optimizer step. Each optimizer's ``param_groups[i]["lr"]`` at creation is its peak rate."""
    return [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule) for opt in optimizers]


def set_step(schedulers: Sequence[torch.optim.lr_scheduler.LambdaLR], step: int) -> None:
    """Put every scheduler (and its optimizer's learning rates) at ``step`` completed steps, with
    the same arithmetic ``LambdaLR`` uses (``base_lr * lambda(step)``), so a resumed run's learning
    rates are bitwise those of an uninterrupted one."""
    for sched in schedulers:
        sched.last_epoch = step
        lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = list(lrs)
