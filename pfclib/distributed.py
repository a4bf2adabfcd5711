"""Collectives of the model-parallel head and the distributed margin-softmax cross-entropy.

Everything here also works without a process group (``group=None`` means one process): the
collectives become identities, so the single-process head runs exactly the same code.

* :func:`shard_range` — the class partition: rank ρ owns a contiguous range of classes,
  the first ``C % W`` ranks one class more.
* :func:`gather_batch_meta` — one small all-gather of every rank's batch size and input check,
  so ranks may hold different batch sizes and a bad input on one rank raises on *every* rank
  (instead of leaving the others waiting in a collective).
* :func:`all_gather_with_grad` — all-gather along dim 0 (unequal sizes allowed) whose backward
  sums each slice's gradient onto its owner.
* :func:`margin_softmax_cross_entropy` — softmax cross-entropy over classes sharded across ranks:
  row max all-reduced with MAX, exp-sums and target logits with SUM; gradient ``(P - onehot)/N``.
* :func:`chunked_margin_cross_entropy` — the same loss computed over class chunks without ever
  holding the ``N x k`` logit matrix: the forward keeps each row's log-sum-exp, the backward
  recomputes each chunk's logits.
* :func:`hard_negative_context` — the per-row context of a margin that needs its rows' hard
  negatives on every rank (:class:`pfclib.margins.NPCFace`): the threshold is all-reduced from
  the rank owning the target, the per-row sum and count of hard negatives over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pfclib.margins import Margin, RowContext, hard_negatives

Group = dist.ProcessGroup | None


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return ``(start, n_local)``: rank ``rank`` owns classes ``[start, start + n_local)``.

    ``n_local = C // W + (rank < C % W)`` and ``start = (C // W) * rank + min(rank, C % W)``,
    so the first ``C % W`` ranks hold one extra class.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def resolve_group(process_group: Group) -> tuple[Group, int, int]:
    """Return ``(group, rank, world_size)``; ``group`` is None when running as one process.

    ``process_group=None`` selects the default group if torch.distributed is initialised with
    more than one rank, and a single process otherwise.
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None, 0, 1
        process_group = dist.group.WORLD
    world_size = dist.get_world_size(process_group)
    if world_size == 1:
        return None, 0, 1
    return process_group, dist.get_rank(process_group), world_size


def gather_batch_meta(
    batch_size: int, ok: bool, group: Group, device: torch.device
) -> tuple[list[int], list[bool]]:
    """All-gather each rank's local batch size and whether its inputs passed validation.

    Returns ``(sizes, oks)``, lists of length W in rank order. One collective of 2 integers.
    """
    if group is None:
        return [batch_size], [ok]
    world_size = dist.get_world_size(group)
    meta = torch.tensor([batch_size, int(ok)], dtype=torch.int64, device=device)
    out = [torch.empty_like(meta) for _ in range(world_size)]
    dist.all_gather(out, meta, group=group)
    rows = torch.stack(out).cpu().tolist()
    return [int(r[0]) for r in rows], [bool(r[1]) for r in rows]


def _gather_padded(tensor: Tensor, sizes: Sequence[int], group: Group) -> Tensor:
    """All-gather ``tensor`` (dim 0 = sizes[rank]) from every rank; returns the rank-ordered concatenation."""
    if group is None:
        return tensor
    longest = max(sizes)
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    else:
        padded = tensor.contiguous()
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(out, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: tuple[int, ...], group: Group, grad_scale: float) -> Tensor:
        ctx.sizes, ctx.group, ctx.grad_scale = sizes, group, grad_scale
        ctx.rank = dist.get_rank(group)
        return _gather_padded(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        offset = sum(ctx.sizes[: ctx.rank])
        mine = grad[offset : offset + ctx.sizes[ctx.rank]]
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine, None, None, None


def all_gather_with_grad(
    tensor: Tensor, sizes: Sequence[int], group: Group, grad_scale: float = 1.0
) -> Tensor:
    """All-gather ``tensor`` (shape ``(sizes[rank], ...)``) into ``(sum(sizes), ...)`` in rank order.

    Backward: every rank's gradient of the gathered tensor is summed (all-reduce) and each rank
    keeps its own slice, multiplied by ``grad_scale``. With ``group=None`` it is the identity.
    """
    if group is None:
        return tensor
    return _AllGatherWithGrad.apply(tensor, tuple(int(s) for s in sizes), group, float(grad_scale))


def all_gather_no_grad(tensor: Tensor, sizes: Sequence[int], group: Group) -> Tensor:
    """All-gather without gradient (labels); unequal sizes allowed."""
    return _gather_padded(tensor, sizes, group)


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: Group) -> Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _target_logits(logits: Tensor, target: Tensor) -> Tensor:
    """``logits[i, target[i]]`` where ``target[i] >= 0``, else 0; shape (N,)."""
    rows = (target >= 0).nonzero().squeeze(1)
    out = logits.new_zeros(logits.shape[0])
    out[rows] = logits[rows, target[rows]]
    return out


def _row_threshold(margin: Margin, cos_t: Tensor, rows: Tensor, n: int, group: Group) -> Tensor:
    """Each row's hard-negative threshold ``(N,)`` on every rank: computed by the rank owning the
    row's target (``cos_t``: the target cosines of ``rows``), 0 elsewhere, summed over ranks."""
    threshold = cos_t.new_zeros(n)
    if rows.numel() > 0:
        threshold[rows] = margin.hardness_threshold(cos_t)
    return _all_reduce(threshold, dist.ReduceOp.SUM, group)


def _hard_stats(cos: Tensor, threshold: Tensor, target: Tensor) -> Tensor:
    """``(N, 2)``: per row, the sum of the cosines of its hard negatives among these columns and
    their number (``target``: the rows' columns here, -1 if none)."""
    rows = (target >= 0).nonzero().squeeze(1)
    hard = hard_negatives(cos, threshold, rows, target[rows])
    return torch.stack([torch.where(hard, cos, 0.0).sum(dim=1), hard.sum(dim=1).to(cos.dtype)], dim=1)


@torch.no_grad()
def hard_negative_context(margin: Margin, cos: Tensor, target: Tensor, group: Group = None) -> RowContext:
    """The :class:`~pfclib.margins.RowContext` of a margin with ``needs_negatives`` from this rank's
    cosines ``(N, k)`` (clamped) and target columns ``(N,)``: two all-reduces of ``O(N)`` over
    ``group``, so hardness and the per-row sums span every rank's (sampled) columns."""
    rows = (target >= 0).nonzero().squeeze(1)
    threshold = _row_threshold(margin, cos[rows, target[rows]], rows, cos.shape[0], group)
    stats = _all_reduce(_hard_stats(cos, threshold, target), dist.ReduceOp.SUM, group)
    return margin.negative_context(threshold, stats[:, 0], stats[:, 1])


def softmax_cross_entropy_(logits: Tensor, target: Tensor, group: Group) -> tuple[Tensor, Tensor]:
    """In place: the mean softmax cross-entropy over classes sharded across ``group`` (see
    :func:`margin_softmax_cross_entropy` for the arguments), and ``logits`` overwritten with this
    rank's columns of the softmax probabilities (the gradient's main term). Returns ``(loss, probs)``."""
    n, k = logits.shape
    row_max = logits.amax(dim=1) if k > 0 else logits.new_full((n,), float("-inf"))
    _all_reduce(row_max, dist.ReduceOp.MAX, group)
    # The target *logit* is summed from its owner (others contribute 0): -log p_t is then
    # log-sum-exp minus the target logit, which stays finite when p_t underflows at s = 64.
    target_logit = _all_reduce(_target_logits(logits, target), dist.ReduceOp.SUM, group)
    prob = logits.sub_(row_max[:, None]).exp_()
    row_sum = _all_reduce(prob.sum(dim=1), dist.ReduceOp.SUM, group)
    loss = (row_max + row_sum.log() - target_logit).mean()
    return loss, prob.div_(row_sum[:, None])


class _MarginSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group: Group) -> Tensor:
        loss, prob = softmax_cross_entropy_(logits.clone(), target, group)
        ctx.save_for_backward(prob, target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        prob, target = ctx.saved_tensors
        scale = grad_loss / prob.shape[0]
        grad = prob * scale
        rows = (target >= 0).nonzero().squeeze(1)
        grad[rows, target[rows]] -= scale
        return grad, None, None


def margin_softmax_cross_entropy(logits: Tensor, target: Tensor, group: Group = None) -> Tensor:
    """Mean softmax cross-entropy over classes sharded across the ranks of ``group``.

    Args:
        logits: ``(N, k)`` float logits of the gathered batch against this rank's (sampled) classes.
        target: ``(N,)`` int64, the column of each row's class on this rank, or -1 where another
            rank owns it. Every row's class must be owned by exactly one rank.
        group: process group, or None for one process.

    Returns:
        the scalar loss ``mean_i(-log p_i[target_i])``, identical on every rank. Its gradient w.r.t.
        ``logits`` is ``(P - onehot) / N``.
    """
    return _MarginSoftmaxCE.apply(logits, target, group)


def _chunk_target(target: Tensor, begin: int, end: int) -> Tensor:
    inside = (target >= begin) & (target < end)
    return torch.where(inside, target - begin, torch.full_like(target, -1))


MarginFn = Callable[..., Tensor]


def _class_cosine(x: Tensor, w: Tensor, begin: int, end: int, sub_centers: int) -> Tensor:
    """The cosines ``(N, end - begin)`` of classes ``[begin, end)`` of ``w`` (unclamped): ``x @ w.T``
    on their rows, and with ``sub_centers = K > 1`` (class c at rows ``c·K … c·K + K - 1``) the max
    over each class's K sub-centers (the gradient goes to the arg-max)."""
    if sub_centers == 1:
        return x @ w[begin:end].T
    cos = x @ w[begin * sub_centers : end * sub_centers].T
    return cos.view(x.shape[0], end - begin, sub_centers).max(dim=2).values


@torch.no_grad()
def _chunked_negative_context(
    x: Tensor, w: Tensor, target: Tensor, margin: Margin, chunk_size: int, group: Group, sub_centers: int = 1
) -> RowContext:
    """:func:`hard_negative_context` computed chunk by chunk (one extra pass of matrix products)."""
    n, k = x.shape[0], w.shape[0] // sub_centers
    rows = (target >= 0).nonzero().squeeze(1)
    if sub_centers == 1:
        cos_t = torch.linalg.vecdot(x[rows], w[target[rows]]).clamp_(-1.0, 1.0)
    else:
        w_t = w.view(k, sub_centers, -1)[target[rows]]  # (n_rows, K, D)
        cos_t = torch.linalg.vecdot(x[rows, None, :], w_t).amax(dim=1).clamp_(-1.0, 1.0)
    threshold = _row_threshold(margin, cos_t, rows, n, group)
    stats = x.new_zeros((n, 2))
    for begin in range(0, k, chunk_size):
        end = min(begin + chunk_size, k)
        cos = _class_cosine(x, w, begin, end, sub_centers).clamp_(-1.0, 1.0)
        stats += _hard_stats(cos, threshold, _chunk_target(target, begin, end))
    stats = _all_reduce(stats, dist.ReduceOp.SUM, group)
    return margin.negative_context(threshold, stats[:, 0], stats[:, 1])


class _ChunkedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        w: Tensor,
        target: Tensor,
        margin: MarginFn,
        chunk_size: int,
        group: Group,
        row_ctx,
        sub_centers: int = 1,
    ):
        n, k = x.shape[0], w.shape[0] // sub_centers
        if getattr(margin, "needs_negatives", False):
            row_ctx = _chunked_negative_context(x, w, target, margin, chunk_size, group, sub_centers)  # type: ignore[arg-type]
        extra = () if row_ctx is None else (row_ctx,)
        run_max = x.new_full((n,), float("-inf"))
        run_sum = x.new_zeros(n)
        target_logit = x.new_zeros(n)
        for begin in range(0, k, chunk_size):
            end = min(begin + chunk_size, k)
            tgt = _chunk_target(target, begin, end)
            logits = margin(_class_cosine(x, w, begin, end, sub_centers).clamp_(-1.0, 1.0), tgt, *extra)
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            run_sum = run_sum * (run_max - new_max).exp() + (logits - new_max[:, None]).exp().sum(dim=1)
            run_max = new_max
            target_logit += _target_logits(logits, tgt)
        global_max = _all_reduce(run_max.clone(), dist.ReduceOp.MAX, group)
        total = _all_reduce(run_sum * (run_max - global_max).exp(), dist.ReduceOp.SUM, group)
        target_logit = _all_reduce(target_logit, dist.ReduceOp.SUM, group)
        lse = global_max + total.log()
        ctx.save_for_backward(x, w, target, lse)
        ctx.margin, ctx.chunk_size, ctx.extra, ctx.sub_centers = margin, chunk_size, extra, sub_centers
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        x, w, target, lse = ctx.saved_tensors
        k_sub = ctx.sub_centers
        n, k = x.shape[0], w.shape[0] // k_sub
        scale = grad_loss / n
        grad_x = torch.zeros_like(x)
        grad_w = torch.empty_like(w)
        x_leaf = x.detach().requires_grad_()
        for begin in range(0, k, ctx.chunk_size):
            end = min(begin + ctx.chunk_size, k)
            tgt = _chunk_target(target, begin, end)
            w_leaf = w[begin * k_sub : end * k_sub].detach().requires_grad_()
            with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                cos = _class_cosine(x_leaf, w_leaf, 0, end - begin, k_sub)
                logits = ctx.margin(cos.clamp(-1.0, 1.0), tgt, *ctx.extra)
            with torch.no_grad():
                grad_logits = (logits - lse[:, None]).exp_().mul_(scale)
                rows = (tgt >= 0).nonzero().squeeze(1)
                grad_logits[rows, tgt[rows]] -= scale
            gx, gw = torch.autograd.grad(logits, (x_leaf, w_leaf), grad_logits)
            grad_x += gx
            grad_w[begin * k_sub : end * k_sub] = gw
        return grad_x, grad_w, None, None, None, None, None, None


def chunked_margin_cross_entropy(
    x: Tensor,
    w: Tensor,
    target: Tensor,
    margin: MarginFn,
    chunk_size: int,
    group: Group = None,
    ctx: RowContext | None = None,
    sub_centers: int = 1,
) -> Tensor:
    """Margin-softmax cross-entropy computed ``chunk_size`` classes at a time.

    Equal (to float rounding) to ``margin_softmax_cross_entropy(margin(clamp(x @ w.T), target), target)``
    but peak extra memory is ``O(N * chunk_size)`` instead of ``O(N * k)``: the forward keeps only
    each row's running log-sum-exp; the backward recomputes each chunk's logits and back-propagates
    through them (about one extra forward matmul).

    Args:
        x: ``(N, D)`` L2-normalised embeddings (float32/float64).
        w: ``(k, D)`` L2-normalised centers of this rank's sampled classes.
        target: ``(N,)`` int64 column in ``w`` of each row's class, -1 if not on this rank.
        margin: callable ``(cos (N, c), target (N,)[, ctx]) -> logits (N, c)`` (a
            :class:`pfclib.margins.Margin`).
        chunk_size: classes per chunk, >= 1.
        group: process group, or None for one process.
        ctx: the rows' :class:`~pfclib.margins.RowContext` for a margin with ``needs_norms``. For a
            margin with ``needs_negatives`` it is built here, over all chunks and ranks, before the
            loss (one extra pass of matrix products over the chunks).
        sub_centers: K >= 1; ``w`` is then ``(k·K, D)``, class c's sub-centers at rows
            ``c·K … c·K + K - 1``, and a class's cosine is the max over them (Sub-center ArcFace).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if sub_centers == 1:
        return _ChunkedMarginCE.apply(x, w, target, margin, int(chunk_size), group, ctx)
    return _ChunkedMarginCE.apply(x, w, target, margin, int(chunk_size), group, ctx, int(sub_centers))


def gather_rows_to_cpu(tensor: Tensor, sizes: Sequence[int], group: Group) -> Tensor:
    """Collective: concatenate every rank's ``(sizes[rank], ...)`` tensor along dim 0, on the CPU of
    every rank. One shard at a time is broadcast, so the extra device memory is one shard."""
    if group is None:
        return tensor.detach().cpu().clone()
    rank = dist.get_rank(group)
    parts = []
    for src, n in enumerate(sizes):
        buf = tensor.detach().contiguous() if src == rank else tensor.new_empty((n, *tensor.shape[1:]))
        dist.broadcast(buf, src=dist.get_global_rank(group, src), group=group)
        parts.append(buf.cpu().clone())
    return torch.cat(parts)
