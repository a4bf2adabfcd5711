"""Row-sparse optimizers for the center matrix (``PartialFC(update="sparse")``: only the sampled rows move).

With ``PartialFC(update="sparse")`` the centers' gradient is a sparse COO tensor holding only the
``k`` sampled rows (``torch.nn.functional.embedding(..., sparse=True)``): no dense ``C x D``
gradient buffer ever exists. The optimizers here read that gradient and update **only those
rows** of the parameter and of its optimizer state, at cost ``O(k·D)`` per step:

* :class:`SparseSGD` — SGD with momentum, Nesterov and L2 weight decay, row-wise identical to
  ``torch.optim.SGD`` (``dampening=0``) on the steps where a row is sampled;
* :class:`SparseAdamW` — AdamW with decoupled weight decay and a **per-row step count** for the
  bias corrections, so each row evolves exactly like ``torch.optim.AdamW`` run on the steps where
  that row was sampled.

Unsampled rows and their state are frozen: no momentum drift, no weight decay. That is the
difference from the *dense* semantics (``torch.optim.SGD``/``AdamW`` on a dense gradient that is
zero for unsampled rows), where momentum and decay keep moving every row every step at cost
``O(C·D)``. The two coincide when every row is sampled every step (``r = 1``), and for plain SGD
without momentum or weight decay at any ``r``.

Dense gradients are accepted too (every row is then updated). State tensors are allocated at the
first step (one ``C x D`` buffer for SGD with momentum, two for AdamW); ``state_dict`` and
``load_state_dict`` are those of ``torch.optim.Optimizer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def _rows_and_values(param: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, values)`` of a row-sparse gradient (duplicates summed); a dense one gives all rows."""
    if grad.is_sparse:
        grad = grad.coalesce()
        if grad.sparse_dim() != 1:
            raise ValueError(
                f"expected a row-sparse gradient (sparse_dim 1), got sparse_dim {grad.sparse_dim()}"
            )
        return grad.indices()[0], grad.values()
    return torch.arange(param.shape[0], device=param.device), grad


_ROW_CHUNK = 16384  # rows updated at a time: temporaries stay chunk-sized, not (k, D)


def _chunks(rows: Tensor, values: Tensor):
    """Yield ``(rows, values)`` slices of at most ``_ROW_CHUNK`` rows (row-wise updates are independent)."""
    for s in range(0, rows.numel(), _ROW_CHUNK):
        yield rows[s : s + _ROW_CHUNK], values[s : s + _ROW_CHUNK]


def _check_hyper(lr: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


class _RowSparseOptimizer(torch.optim.Optimizer):
    """Shared step loop: for each parameter with a gradient, create its state once, then update
    the gradient's rows ``_ROW_CHUNK`` at a time with the subclass's ``_update_rows``."""

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    def _update_rows(self, p: Tensor, state: dict, rows: Tensor, g: Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                all_rows, all_g = _rows_and_values(p, p.grad)
                state = self.state[p]
                self._init_state(p, state, group)
                for rows, g in _chunks(all_rows, all_g):
                    self._update_rows(p, state, rows, g.to(p.dtype), group)
        return loss


class SparseSGD(_RowSparseOptimizer):
    """SGD with momentum/Nesterov/L2 weight decay updating only the rows present in the gradient.

    For each gradient row ``g`` of parameter row ``p``: ``d = g + wd·p``; ``buf = μ·buf + d``;
    ``p -= lr · (d + μ·buf if nesterov else buf)`` — ``torch.optim.SGD`` with ``dampening=0``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        _check_hyper(lr, weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov}
        )

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        if group["momentum"] != 0.0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _update_rows(self, p: Tensor, state: dict, rows: Tensor, g: Tensor, group: dict) -> None:
        lr, mu, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        d = g
        if wd != 0.0:
            d = d + wd * p.index_select(0, rows)
        if mu != 0.0:
            buf = state["momentum_buffer"]
            b = buf.index_select(0, rows).mul_(mu).add_(d)
            buf.index_copy_(0, rows, b)
            d = d + mu * b if nesterov else b
        p.index_add_(0, rows, d, alpha=-lr)


class SparseAdamW(_RowSparseOptimizer):
    """AdamW updating only the rows present in the gradient, with a per-row step count.

    For each gradient row at its own step ``t``: ``p *= 1 - lr·wd``; ``m = β1·m + (1-β1)·g``;
    ``v = β2·v + (1-β2)·g²``; ``p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)``.
    State: ``exp_avg``, ``exp_avg_sq`` (like the parameter) and ``step`` (int64, one per row).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        _check_hyper(lr, weight_decay)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        if "step" not in state:
            state["step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _update_rows(self, p: Tensor, state: dict, rows: Tensor, g: Tensor, group: dict) -> None:
        """AdamW on the rows ``rows`` of ``p`` (gradient rows ``g``), each at its own step count."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        t = state["step"].index_select(0, rows) + 1
        state["step"].index_copy_(0, rows, t)
        shape = (-1,) + (1,) * (p.dim() - 1)
        t64 = t.to(torch.float64)
        bc1 = (1.0 - torch.pow(b1, t64)).to(p.dtype).view(shape)
        bc2_sqrt = (1.0 - torch.pow(b2, t64)).sqrt().to(p.dtype).view(shape)
        m = state["exp_avg"].index_select(0, rows).lerp_(g, 1.0 - b1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1.0 - b2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        p_rows = p.index_select(0, rows)
        if wd != 0.0:
            p_rows.mul_(1.0 - lr * wd)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p_rows.addcdiv_(m / bc1, denom, value=-lr)
        p.index_copy_(0, rows, p_rows)
