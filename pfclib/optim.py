"""Row-sparse optimizers for the center matrix: only the sampled rows are computed each step.

* :class:`LazySGD` (``PartialFC(update="dense")``, the default) — exactly ``torch.optim.SGD`` on the
  dense gradient, every row moving every step, at ``O(k·D)`` per step: the motion of rows without a
  gradient is applied lazily (see its docstring).
* :class:`SparseSGD`, :class:`SparseAdamW` (``PartialFC(update="sparse")``) — unsampled rows frozen.

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
from typing import Any

import torch
from torch import Tensor


def _rows_and_values(param: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, values)`` of a row-sparse gradient (duplicates summed); a dense one gives all rows."""
    if grad.is_sparse:
        if grad.sparse_dim() != 1:
            raise ValueError(
                f"expected a row-sparse gradient (sparse_dim 1), got sparse_dim {grad.sparse_dim()}"
            )
        if not grad.is_coalesced():
            # autograd re-wraps a sparse gradient without its "coalesced" flag; when the rows are
            # already sorted and distinct (the head's are) skip coalesce(), a copy of all values
            rows = grad._indices()[0]
            if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
                return rows, grad._values()
            grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    return torch.arange(param.shape[0], device=param.device), grad


# Rows updated at a time: temporaries stay chunk-sized, not (k, D). 1024 rows of D = 512 fp32 are
# 2 MiB per buffer, so a chunk's few element-wise passes (catch-up, momentum, weight decay) run in
# cache between the gather and the scatter; 8192-row chunks (16 MiB each) went to memory every pass
# and made the lazy catch-up and the row update ~1.5x slower (C = 1M, k = 100k, D = 512, 2 cores).
_ROW_CHUNK = 1024


class Workspace:
    """Scratch buffers of rows, kept from one step to the next.

    The row-wise loops of the head and of these optimizers need a few ``(chunk, D)`` temporaries
    per chunk. Allocated afresh, each is a new mapping of tens of MB that the kernel zero-fills
    page by page on first touch (at C = 1M, r = 0.1 that was more system time than compute), so
    they are allocated once per (name, device, dtype, width) and reused.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, name: str, rows: int, like: Tensor) -> Tensor:
        """A ``(rows, like.shape[1])`` scratch buffer (uninitialised) of ``like``'s dtype and device,
        valid until the next ``get`` of the same name. Names in use: ``"a"``, ``"b"``, ``"c"``."""
        key = (name, like.device, like.dtype, like.shape[1])
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty((rows, like.shape[1]), dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:rows]

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised ``shape`` tensor for a result that outlives the call (a gradient, saved
        logits): last time's buffer of that name when nothing else references it any more, else a
        new one (which becomes the kept buffer)."""
        numel = 1
        for n in shape:
            numel *= int(n)
        key = ("take:" + name, like.device, like.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or not _only_here(buf):
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


def _only_here(buf: Tensor) -> bool:
    """Whether ``buf``'s storage is referenced by ``buf`` alone (no view of it is alive elsewhere)."""
    try:
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2  # buf + this call's handle
    except AttributeError:  # a torch without the private counter: never reuse
        return False


def _chunks(rows: Tensor, values: Tensor):
    """Yield ``(rows, values)`` slices of at most ``_ROW_CHUNK`` rows (row-wise updates are independent)."""
    for s in range(0, rows.numel(), _ROW_CHUNK):
        yield rows[s : s + _ROW_CHUNK], values[s : s + _ROW_CHUNK]


def _check_hyper(lr: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def _call(closure: Callable[[], float] | None) -> float | None:
    """An optimizer's closure, called with gradients enabled (None if there is none)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _RowSparseOptimizer(torch.optim.Optimizer):
    """Shared step loop: for each parameter with a gradient, create its state once, then update
    the gradient's rows ``_ROW_CHUNK`` at a time with the subclass's ``_update_rows``."""

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    def _update_rows(self, p: Tensor, state: dict, rows: Tensor, g: Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _call(closure)
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


def _sgd_rows(work: Workspace, p, state, rows, g, lr, mu, damp, wd, nesterov) -> None:
    """``torch.optim.SGD``'s rule on rows ``rows`` of ``p`` with gradient rows ``g`` (``damp`` is the
    dampening applied this step), in reused buffers: ``d = g + wd·p``; ``buf = mu·buf + (1-damp)·d``;
    ``p -= lr·(d + mu·buf if nesterov else buf)``."""
    n = rows.numel()
    d = g
    if wd != 0.0:
        d = torch.index_select(p, 0, rows, out=work.get("a", n, p))
        d.mul_(wd).add_(g)
    if mu != 0.0:
        buf = state["momentum_buffer"]
        b = torch.index_select(buf, 0, rows, out=work.get("b", n, p))
        b.mul_(mu).add_(d, alpha=1.0 - damp)
        buf.index_copy_(0, rows, b)
        if nesterov:
            if d is g:
                d = work.get("a", n, p).copy_(g)
            d.add_(b, alpha=mu)
        else:
            d = b
    p.index_add_(0, rows, d, alpha=-lr)


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
        work: Workspace | None = None,
    ) -> None:
        _check_hyper(lr, weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov}
        )
        self._work = Workspace() if work is None else work  # scratch buffers, shareable with the head

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        if group["momentum"] != 0.0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _update_rows(self, p: Tensor, state: dict, rows: Tensor, g: Tensor, group: dict) -> None:
        _sgd_rows(
            self._work,
            p,
            state,
            rows,
            g,
            group["lr"],
            group["momentum"],
            0.0,
            group["weight_decay"],
            group["nesterov"],
        )


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


def _step_matrix(lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool):
    """The 2x2 map ``(p, buf) -> (p', buf')`` of one ``torch.optim.SGD`` step on a row whose gradient
    is zero (``dampening`` is the factor actually applied: 0 on the very first step)."""
    c = 1.0 - dampening
    buf_row = (c * weight_decay, momentum)  # buf' = mu buf + c wd p
    if nesterov:  # p' = p - lr (wd p + mu buf')
        p_row = (1.0 - lr * weight_decay - lr * momentum * c * weight_decay, -lr * momentum * momentum)
    else:  # p' = p - lr buf'
        p_row = (1.0 - lr * c * weight_decay, -lr * momentum)
    return (p_row, buf_row)


def _carried_weight(w: Tensor, b: Tensor | None, m: Tensor, out: Tensor | None = None) -> Tensor:
    """The weight part of ``(w, b)`` rows carried by their 2x2 maps ``m`` ``(n, 2, 2)``:
    ``m00·w + m01·b`` (``b`` None: no momentum, ``m00·w``)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    new_w = torch.mul(w, m[:, 0, 0].view(shape), out=out)
    return new_w if b is None else new_w.addcmul_(b, m[:, 0, 1].view(shape))


class LazySGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` on a dense gradient, computed in ``O(k·D)`` per step from a row-sparse one.

    The dense semantics (what ``torch.optim.SGD`` does with the zero-padded gradient of a Partial FC
    head) move every row every step: a row with no gradient still decays and follows its momentum.
    That motion is linear: with ``d = wd·p``, ``buf' = mu·buf + (1 - dampening)·d`` and
    ``p' = p - lr·buf'`` (Nesterov: ``p' = p - lr·(d + mu·buf')``), so ``(p, buf)`` of an idle row is
    multiplied by a 2x2 matrix ``M_t`` that depends only on the step's hyper-parameters. This
    optimizer updates only the rows present in the gradient (they follow ``torch.optim.SGD``'s rule
    exactly) and leaves the others *pending*: each row remembers the step at which it was last
    brought up to date, and the optimizer keeps, for every step ``s`` of the current window, the
    product ``M_t ... M_{s+1}`` that carries a row from step ``s`` to now. The window's products are
    built by left-multiplying the new ``M_t`` into each of them (float64, no matrix inverse, so a row
    idle for the whole window is as accurate as one idle for a step). When the window reaches
    ``horizon`` steps every row is brought up to date and the window restarts: ``O(C·D)`` once per
    ``horizon`` steps.

    Pending rows are applied (:meth:`catch_up`) before anything reads them: ``PartialFC`` calls it for
    the rows it samples before its forward, :meth:`flush` brings every row up to date and is called by
    ``state_dict()`` (here and on the head), ``PartialFC.full_state_dict()`` and ``PartialFC.eval()``.
    After a flush the parameter and ``state["momentum_buffer"]`` are what ``torch.optim.SGD`` holds at
    that step (to rounding: the products group the same operations differently), and the state dict
    has ``torch.optim.SGD``'s format, so checkpoints move freely between the two.

    Hyper-parameters are those of ``torch.optim.SGD`` (``dampening`` included, applied from the second
    step as torch does) and may change every step (read at each ``step()``, like a scheduler's lr).
    A parameter whose gradient is ``None`` is skipped (no decay, no momentum), as in torch. A dense
    gradient updates every row.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        horizon: int = 1024,
        work: Workspace | None = None,
    ) -> None:
        _check_hyper(lr, weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {dampening!r}")
        if nesterov and (momentum == 0.0 or dampening != 0.0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        if int(horizon) != horizon or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(params, defaults)
        self.horizon = int(horizon)
        self._work = Workspace() if work is None else work  # scratch buffers, shareable with the head
        self._pending: dict[Tensor, dict[str, Any]] = {}  # per parameter: window bookkeeping

    # ------------------------------------------------------------ bookkeeping
    def _book(self, p: Tensor) -> dict[str, Any]:
        """The window of ``p``: ``last`` (per row, the window step it is current at), ``now`` (steps in
        the window) and ``carry`` ``(horizon + 1, 2, 2)`` float64 (``carry[s]`` maps step s to now)."""
        book = self._pending.get(p)
        if book is None:
            carry = torch.zeros((self.horizon + 1, 2, 2), dtype=torch.float64)
            carry[0] = torch.eye(2, dtype=torch.float64)
            book = {
                "last": torch.zeros(p.shape[0], dtype=torch.int64, device=p.device),
                "now": 0,
                "carry": carry,
            }
            self._pending[p] = book
        return book

    @staticmethod
    def _maps(book: dict[str, Any], p: Tensor, last: Tensor) -> Tensor:
        """The 2x2 maps ``(n, 2, 2)`` carrying rows last current at window steps ``last`` to now, in
        ``p``'s dtype and device: the window's products (at most ``horizon + 1``) are converted once
        and gathered by ``index_select`` (advanced indexing of the 3-d float64 table was ~9 ms per
        100k rows)."""
        table = book["carry"][: book["now"] + 1].reshape(-1, 4).to(p.device, p.dtype)
        return torch.index_select(table, 0, last.to(p.device)).view(-1, 2, 2)

    def _apply_carry(self, p: Tensor, rows: Tensor, coef: Tensor) -> None:
        """Rows ``rows`` of ``p`` (and of its momentum) times their 2x2 matrices ``coef`` ``(n, 2, 2)``."""
        buf = self.state[p].get("momentum_buffer")
        shape = (-1,) + (1,) * (p.dim() - 1)
        coef = coef.to(p.device, p.dtype)
        for s in range(0, rows.numel(), _ROW_CHUNK):
            r, m = rows[s : s + _ROW_CHUNK], coef[s : s + _ROW_CHUNK]
            n = r.numel()
            w = torch.index_select(p, 0, r, out=self._work.get("a", n, p))
            if buf is None:  # no momentum yet (or none at all): the buffer part is zero
                p.index_copy_(0, r, w.mul_(m[:, 0, 0].view(shape)))
                continue
            b = torch.index_select(buf, 0, r, out=self._work.get("b", n, p))
            new_w = _carried_weight(w, b, m, out=self._work.get("c", n, p))
            b.mul_(m[:, 1, 1].view(shape)).addcmul_(w, m[:, 1, 0].view(shape))
            p.index_copy_(0, r, new_w)
            buf.index_copy_(0, r, b)

    @torch.no_grad()
    def catch_up(self, p: Tensor, rows: Tensor) -> None:
        """Bring rows ``rows`` (1-D int64 on ``p``'s device, distinct) of ``p`` and of its momentum up to date."""
        book = self._pending.get(p)
        if book is None or book["now"] == 0 or rows.numel() == 0:
            return
        last = book["last"].index_select(0, rows)
        stale = last != book["now"]
        if not bool(stale.any()):
            return
        rows, last = rows[stale], last[stale]
        self._apply_carry(p, rows, self._maps(book, p, last))
        book["last"].index_fill_(0, rows, book["now"])

    @torch.no_grad()
    def current_rows(self, p: Tensor, rows: Tensor) -> Tensor:
        """The up-to-date values of rows ``rows`` of ``p`` without applying them (nothing changes, so
        observing a run does not alter its rounding)."""
        out = p.index_select(0, rows)
        book = self._pending.get(p)
        if book is None or book["now"] == 0 or rows.numel() == 0:
            return out
        last = book["last"].index_select(0, rows)
        stale = (last != book["now"]).nonzero().squeeze(1)
        if stale.numel():
            m = self._maps(book, p, last[stale])
            buf = self.state[p].get("momentum_buffer")
            b = None if buf is None else buf.index_select(0, rows[stale])
            out.index_copy_(0, stale, _carried_weight(out.index_select(0, stale), b, m))
        return out

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row of every parameter up to date and start a new window."""
        for p, book in self._pending.items():
            if book["now"] > 0:
                last = book["last"]
                for s in range(0, p.shape[0], _ROW_CHUNK * 4):
                    rows = torch.arange(s, min(s + _ROW_CHUNK * 4, p.shape[0]), device=p.device)
                    seen = last[s : s + rows.numel()]
                    stale = seen != book["now"]
                    if bool(stale.any()):
                        self._apply_carry(p, rows[stale], self._maps(book, p, seen[stale]))
            book["last"].zero_()
            book["now"] = 0
            book["carry"][0] = torch.eye(2, dtype=torch.float64)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _call(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                book = self._book(p)
                state = self.state[p]
                first = mu != 0.0 and "momentum_buffer" not in state
                damp = 0.0 if first else group["dampening"]
                if first:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                all_rows, all_g = _rows_and_values(p, p.grad)
                self.catch_up(p, all_rows)
                for rows, g in _chunks(all_rows, all_g):
                    _sgd_rows(self._work, p, state, rows, g.to(p.dtype), lr, mu, damp, wd, group["nesterov"])
                # the idle rows' map of this step, composed into every pending product of the window
                m = torch.tensor(_step_matrix(lr, mu, damp, wd, group["nesterov"]), dtype=torch.float64)
                now = book["now"]
                carry = book["carry"]
                carry[: now + 1] = torch.matmul(m, carry[: now + 1])
                carry[now + 1] = torch.eye(2, dtype=torch.float64)
                book["now"] = now + 1
                book["last"].index_fill_(0, all_rows, now + 1)
                if book["now"] == self.horizon:
                    self.flush()
        return loss

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.SGD``'s state dict (every row brought up to date first, see :meth:`flush`)."""
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flush()
        super().load_state_dict(state_dict)
