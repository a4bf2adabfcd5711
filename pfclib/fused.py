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

Two head options enter here (both absent by default, and then the code above runs unchanged):
sub-centers (``sub_centers=K``: ``index`` lists each sampled class's K rows, the ``(N, k·K)`` cosines
are reduced to ``(N, k)`` by a max over each class's K, whose arg-max alone gets the gradient) and
Unicom's kept dimensions (``dims``: ``x`` holds only those columns and each center is gathered,
normalised and differentiated over them; the other columns of its gradient are 0).

The centers are processed ``_ROW_CHUNK`` at a time in buffers of a :class:`pfclib.optim.Workspace`
that the caller keeps from step to step. ``weight`` must not change between forward and backward
(autograd's version check enforces it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pfclib import distributed as pdist
from pfclib.margins import Margin, RowContext, hard_negatives
from pfclib.optim import Workspace

_ROW_CHUNK = 8192  # sampled centers processed at a time


def _gather_rows(
    weight: Tensor, rows: Tensor, work: Workspace, dtype: torch.dtype, dims: Tensor | None = None
) -> Tensor:
    """``weight[rows]`` (only columns ``dims`` if given) in ``dtype``, written into a reused buffer of ``work``."""
    if dims is not None:
        picked = weight.index_select(0, rows)
        if picked.dtype == dtype:
            return torch.index_select(
                picked, 1, dims, out=work.get("d", rows.numel(), picked[:, : dims.numel()])
            )
        return picked.index_select(1, dims).to(dtype)
    if weight.dtype == dtype:
        return torch.index_select(weight, 0, rows, out=work.get("a", rows.numel(), weight))
    return weight.index_select(0, rows).to(dtype)


def _cosine_into(
    out: Tensor, x: Tensor, weight: Tensor, index: Tensor, work: Workspace, dims: Tensor | None = None
) -> Tensor:
    """Write ``x @ normalize(weight[index]).T`` into ``out`` ``(N, k)``; return the centers' 1/norms."""
    inv_norm = x.new_empty(index.numel())
    for s in range(0, index.numel(), _ROW_CHUNK):
        unit = _gather_rows(weight, index[s : s + _ROW_CHUNK], work, x.dtype, dims)
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
    dims: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``x @ normalize(weight[index]).T`` for the upstream ``grad_out`` ``(N, k)``:
    ``grad_x`` ``(N, D)`` and a row-sparse ``(n, D)`` gradient of ``weight`` (None where not needed)."""
    grad_x = torch.zeros_like(x) if need_x else None
    values = work.take("values", (index.numel(), weight.shape[1]), weight) if need_w else None
    for s in range(0, index.numel(), _ROW_CHUNK):
        sl = slice(s, s + _ROW_CHUNK)
        inv = inv_norm[sl][:, None]
        unit = _gather_rows(weight, index[sl], work, x.dtype, dims).mul_(inv)
        g = grad_out[:, sl]
        if grad_x is not None:
            grad_x.addmm_(g, unit)
        if values is not None:
            # d loss / d normalised center, then through the normalisation: (I - u u^T) / ||w||
            grad_unit = torch.mm(g.T, x, out=work.get("b", unit.shape[0], unit))
            # the row-wise dot through a reused buffer: vecdot would allocate (and page-fault in)
            # a chunk-sized temporary every chunk of every step
            dot = torch.mul(grad_unit, unit, out=work.get("c", unit.shape[0], unit)).sum(dim=1, keepdim=True)
            grad_unit.addcmul_(unit, dot, value=-1.0)
            if dims is not None:  # only the kept columns of these centers get a gradient
                values[sl].zero_().index_copy_(1, dims, grad_unit.mul_(inv).to(values.dtype))
            elif values.dtype == x.dtype:
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
    def forward(
        ctx,
        x,
        weight,
        index,
        target,
        margin: Margin,
        group,
        work: Workspace,
        row_ctx,
        sub_centers=1,
        dims=None,
    ):
        n, k = x.shape[0], index.numel() // sub_centers
        arg = None
        if sub_centers == 1 and dims is None:
            logits = work.take("logits", (n, k), x)
            inv_norm = _cosine_into(logits, x, weight, index, work)
        elif sub_centers == 1:
            logits = work.take("logits", (n, k), x)
            inv_norm = _cosine_into(logits, x, weight, index, work, dims)
        else:  # each class's cosine: the max over its K sub-centers; arg: which one (gets the gradient)
            sub = work.take("subcos", (n, k * sub_centers), x)
            inv_norm = _cosine_into(sub, x, weight, index, work, dims)
            logits = work.take("logits", (n, k), x)
            arg = torch.empty((n, k), dtype=torch.int64, device=x.device)
            torch.max(sub.view(n, k, sub_centers), dim=2, out=(logits, arg))
            del sub
        # clamp's gradient is zero where it clamps; rounding rarely takes a cosine past ±1, so one
        # min/max pass (no (N, k) temporary) decides whether the mask is needed at all
        low, high = torch.aminmax(logits)
        clamped = None
        if bool(low < -1.0) or bool(high > 1.0):
            clamped = (logits < -1.0) | (logits > 1.0)
            logits.clamp_(-1.0, 1.0)
        rows = (target >= 0).nonzero().squeeze(1)
        cols = target[rows]
        hard = None
        if margin.needs_negatives:  # hardness and per-row sums over every rank's columns
            row_ctx = pdist.hard_negative_context(margin, logits, target, group)
            hard = hard_negatives(logits, row_ctx.threshold, rows, cols)
        with torch.enable_grad():  # the margin's derivative at the target cosines (N values)
            cos_t = logits[rows, cols].detach().requires_grad_()
            value_t = margin.target_values(cos_t, row_ctx, rows)
            (slope,) = torch.autograd.grad(value_t.sum(), cos_t) if rows.numel() else (cos_t.detach(),)
        noisy = None
        if margin.filter_threshold is not None:
            noisy = logits > margin.filter_threshold
            noisy[rows, cols] = False
        if hard is not None:
            logits[hard] = margin.hard_negative_logit(logits[hard])
        logits.mul_(margin.s)
        if noisy is not None:
            logits.masked_fill_(noisy, 0.0)
        logits[rows, cols] = value_t.detach() * margin.s
        loss, prob = pdist.softmax_cross_entropy_(logits, target, group)  # in place: logits -> probs
        ctx.save_for_backward(
            x, weight, index, inv_norm, prob, rows, cols, slope, clamped, noisy, hard, arg, dims
        )
        ctx.s, ctx.work, ctx.used, ctx.sub_centers = margin.s, work, False, sub_centers
        ctx.hard_slope = margin.hard_negative_slope() if hard is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.used:
            raise RuntimeError("the fused margin cross-entropy cannot be differentiated twice (retain_graph)")
        ctx.used = True  # its probabilities become the gradient in place
        x, weight, index, inv_norm, prob, rows, cols, slope, clamped, noisy, hard, arg, dims = (
            ctx.saved_tensors
        )
        scale = grad_loss / prob.shape[0]
        grad = prob.mul_(scale)  # d loss / d logits = (P - onehot) / N
        grad[rows, cols] -= scale
        grad.mul_(ctx.s)  # d / d cosine: s, times the margin's slope on the targets, 0 where filtered
        grad[rows, cols] *= slope
        if hard is not None:  # hard negatives' logit is affine in the cosine (NPCFace: t·cos + α)
            grad[hard] *= ctx.hard_slope
        if noisy is not None:
            grad.masked_fill_(noisy, 0.0)
        if clamped is not None:
            grad.masked_fill_(clamped, 0.0)
        if arg is not None:  # to each class's arg-max sub-center
            n, k = grad.shape
            sub = grad.new_zeros((n, k * ctx.sub_centers))
            sub.view(n, k, ctx.sub_centers).scatter_(2, arg[:, :, None], grad[:, :, None])
            grad = sub
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x, grad_w = _cosine_backward(grad, x, weight, index, inv_norm, ctx.work, need_x, need_w, dims)
        return grad_x, grad_w, None, None, None, None, None, None, None, None


def sampled_margin_cross_entropy(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    target: Tensor,
    margin: Margin,
    group: dist.ProcessGroup | None = None,
    work: Workspace | None = None,
    ctx: RowContext | None = None,
    sub_centers: int = 1,
    dims: Tensor | None = None,
) -> Tensor:
    """Mean margin-softmax cross-entropy of the rows of ``x`` (normalised, ``(N, D)``) against the
    sampled centers ``weight[index]``, ``target`` ``(N,)`` their columns in ``index`` (-1: another
    rank's class); the loss of ``margin_softmax_cross_entropy(margin(sampled_cosine(x, weight,
    index).clamp(-1, 1), target, ctx), target, group)`` in one ``(N, k)`` buffer (see module doc).
    ``ctx``: the rows' :class:`~pfclib.margins.RowContext` for a margin with ``needs_norms``; for
    one with ``needs_negatives`` it is built here (:func:`pfclib.distributed.hard_negative_context`).
    ``sub_centers=K``: ``index`` holds each sampled class's K rows in a row (``k·K`` rows), a class's
    cosine is the max over them; ``dims``: ``x`` has only these columns of the embedding, and the
    centers are used over them only (see module doc)."""
    work = Workspace() if work is None else work
    if sub_centers == 1 and dims is None:
        return _SampledMarginCE.apply(x, weight, index, target, margin, group, work, ctx)
    return _SampledMarginCE.apply(x, weight, index, target, margin, group, work, ctx, sub_centers, dims)
