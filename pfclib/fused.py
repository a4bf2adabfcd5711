"""Fused kernels of the head's row-sparse path: sampled cosine and margin cross-entropy.

Two autograd functions that never hold the ``(k, D)`` sampled centers and give the centers a
row-sparse (COO) gradient of exactly the ``k`` sampled rows:

* :func:`sampled_cosine` -- ``x @ normalize(weight[index]).T``, ``(N, k)``;
* :func:`sampled_margin_cross_entropy` -- the same cosine, clamped to [-1, 1], through a
  :class:`pfclib.margins.Margin` and the softmax cross-entropy distributed over the ranks
  (:func:`pfclib.distributed.margin_softmax_cross_entropy`), in one ``(N, k)`` buffer: the logits
  are made in place, become the probabilities, and in backward the gradient of the logits, then of
  the cosines. The composition ``margin_softmax_cross_entropy(margin(sampled_cosine(...).clamp(-1,
  1)))`` allocates about eight ``(N, k)`` tensors per step instead (at N = 128, k = 100,000 each
  is 51 MB, freshly mapped and zero-filled by the kernel each time). Same operations in the same
  order, so the loss is the same to the last bit and the gradients to rounding.

The centers are processed ``_ROW_CHUNK`` at a time in buffers of a :class:`pfclib.optim.Workspace`
that the caller keeps from step to step. ``weight`` must not change between forward and backward
(autograd's version check enforces it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pfclib import distributed as pdist
from pfclib.margins import Margin
from pfclib.optim import Workspace

_ROW_CHUNK = 8192  # sampled centers processed at a time


def _gather_rows(weight: Tensor, rows: Tensor, work: Workspace, dtype: torch.dtype) -> Tensor:
    """``weight[rows]`` in ``dtype``, written into a reused buffer of ``work``."""
    if weight.dtype == dtype:
        return torch.index_select(weight, 0, rows, out=work.get("a", rows.numel(), weight))
    return weight.index_select(0, rows).to(dtype)


def _cosine_into(out: Tensor, x: Tensor, weight: Tensor, index: Tensor, work: Workspace) -> Tensor:
    """Write ``x @ normalize(weight[index]).T`` into ``out`` ``(N, k)``; return the centers' 1/norms."""
    inv_norm = x.new_empty(index.numel())
    for s in range(0, index.numel(), _ROW_CHUNK):
        unit = _gather_rows(weight, index[s : s + _ROW_CHUNK], work, x.dtype)
        inv = torch.linalg.vector_norm(unit, dim=1).clamp_min_(1e-12).reciprocal_()  # F.normalize's eps
        inv_norm[s : s + _ROW_CHUNK] = inv
        torch.mm(x, unit.mul_(inv[:, None]).T, out=out[:, s : s + _ROW_CHUNK])
    return inv_norm


def _cosine_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    inv_norm: Tensor,
    work: Workspace,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``x @ normalize(weight[index]).T`` for the upstream ``grad_out`` ``(N, k)``:
    ``grad_x`` ``(N, D)`` and a row-sparse ``(n, D)`` gradient of ``weight`` (None where not needed)."""
    grad_x = torch.zeros_like(x) if need_x else None
    values = work.take("values", (index.numel(), weight.shape[1]), weight) if need_w else None
    for s in range(0, index.numel(), _ROW_CHUNK):
        sl = slice(s, s + _ROW_CHUNK)
        inv = inv_norm[sl][:, None]
        unit = _gather_rows(weight, index[sl], work, x.dtype).mul_(inv)
        g = grad_out[:, sl]
        if grad_x is not None:
            grad_x.addmm_(g, unit)
        if values is not None:
            # d loss / d normalised center, then through the normalisation: (I - u u^T) / ||w||
            grad_unit = torch.mm(g.T, x, out=work.get("b", unit.shape[0], unit))
            grad_unit.addcmul_(unit, torch.linalg.vecdot(grad_unit, unit)[:, None], value=-1.0)
            if values.dtype == x.dtype:
                torch.mul(grad_unit, inv, out=values[sl])
            else:
                values[sl] = grad_unit.mul_(inv)
    grad_w = None
    if values is not None:
        grad_w = torch.sparse_coo_tensor(
            index[None], values, weight.shape, is_coalesced=True, check_invariants=False
        )  # index is sorted and distinct
    return grad_x, grad_w


class _SampledCosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, index: Tensor, work: Workspace) -> Tensor:
        out = x.new_empty((x.shape[0], index.numel()))
        inv_norm = _cosine_into(out, x, weight, index, work)
        ctx.save_for_backward(x, weight, index, inv_norm)
        ctx.work = work
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, index, inv_norm = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x, grad_w = _cosine_backward(grad_out, x, weight, index, inv_norm, ctx.work, need_x, need_w)
        return grad_x, grad_w, None, None


def sampled_cosine(x: Tensor, weight: Tensor, index: Tensor, work: Workspace | None = None) -> Tensor:
    """Cosine ``(N, k)`` between the (already normalised) rows of ``x`` ``(N, D)`` and the
    normalised centers ``weight[index]`` (``index`` sorted, distinct), with a row-sparse gradient
    for ``weight``. Pass the same ``work`` every step to reuse its buffers."""
    return _SampledCosine.apply(x, weight, index, Workspace() if work is None else work)


class _SampledMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, index, target, margin: Margin, group, work: Workspace):
        n, k = x.shape[0], index.numel()
        logits = work.take("logits", (n, k), x)
        inv_norm = _cosine_into(logits, x, weight, index, work)
        clamped = (logits < -1.0) | (logits > 1.0)  # clamp's gradient is zero there
        logits.clamp_(-1.0, 1.0)
        rows = (target >= 0).nonzero().squeeze(1)
        cols = target[rows]
        with torch.enable_grad():  # the margin's derivative at the target cosines (N values)
            cos_t = logits[rows, cols].detach().requires_grad_()
            value_t = margin.target_cosine(cos_t)
            (slope,) = torch.autograd.grad(value_t.sum(), cos_t) if rows.numel() else (cos_t.detach(),)
        noisy = None
        if margin.filter_threshold is not None:
            noisy = logits > margin.filter_threshold
            noisy[rows, cols] = False
        logits.mul_(margin.s)
        if noisy is not None:
            logits.masked_fill_(noisy, 0.0)
        logits[rows, cols] = value_t.detach() * margin.s
        loss, prob = pdist.softmax_cross_entropy_(logits, target, group)  # in place: logits -> probs
        ctx.save_for_backward(x, weight, index, inv_norm, prob, rows, cols, slope, clamped, noisy)
        ctx.s, ctx.work, ctx.used = margin.s, work, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.used:
            raise RuntimeError("the fused margin cross-entropy cannot be differentiated twice (retain_graph)")
        ctx.used = True  # its probabilities become the gradient in place
        x, weight, index, inv_norm, prob, rows, cols, slope, clamped, noisy = ctx.saved_tensors
        scale = grad_loss / prob.shape[0]
        grad = prob.mul_(scale)  # d loss / d logits = (P - onehot) / N
        grad[rows, cols] -= scale
        grad.mul_(ctx.s)  # d / d cosine: s, times the margin's slope on the targets, 0 where filtered
        grad[rows, cols] *= slope
        if noisy is not None:
            grad.masked_fill_(noisy, 0.0)
        grad.masked_fill_(clamped, 0.0)
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x, grad_w = _cosine_backward(grad, x, weight, index, inv_norm, ctx.work, need_x, need_w)
        return grad_x, grad_w, None, None, None, None, None


def sampled_margin_cross_entropy(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    target: Tensor,
    margin: Margin,
    group: dist.ProcessGroup | None = None,
    work: Workspace | None = None,
) -> Tensor:
    """Mean margin-softmax cross-entropy of the rows of ``x`` (normalised, ``(N, D)``) against the
    sampled centers ``weight[index]``, ``target`` ``(N,)`` their columns in ``index`` (-1: another
    rank's class); the loss of ``margin_softmax_cross_entropy(margin(sampled_cosine(x, weight,
    index).clamp(-1, 1), target), target, group)`` in one ``(N, k)`` buffer (see module doc)."""
    return _SampledMarginCE.apply(
        x, weight, index, target, margin, group, Workspace() if work is None else work
    )
