"""The Partial FC head: a sampled, model-parallel margin-softmax classifier.

    head = PartialFC(num_classes=C, embedding_size=512, sample_rate=0.1, margin=ArcFace(s=64.0, m=0.5))
    loss = head(embeddings, labels)     # scalar fp32, the same on every rank
    opt = head.make_optimizer("sgd", lr=0.1)

Forward, one step on rank ρ of W (W = 1: no process group, any device):

    gather    embeddings (with gradient) and labels of all ranks      -> (N, D), N = sum of batches
    sample    this rank's positives + uniform negatives, k classes   -> index (k,), target (N,)
    normalise embeddings and the k sampled centers (fp32 or fp64)
    cosine    (N, k), clamped to [-1, 1]
    margin    on each row's own target (only on the rank owning it), times s; per-row margins
              (AdaFace: the norms of the gathered embeddings; NPCFace: hard negatives of all ranks)
              get their row context first
    softmax   cross-entropy distributed over ranks (mean over all N rows)

Center updates (``update=``), see :mod:`pfclib.optim` for the details:

* ``"dense"`` (default; the reference implementation's semantics): every center moves every step,
  as ``torch.optim.SGD``/``AdamW`` move a ``(n_local, D)`` gradient that is zero on unsampled rows
  (momentum and weight decay act on all rows). With ``make_optimizer("sgd")`` that result is
  computed lazily in ``O(k·D)`` per step by :class:`pfclib.optim.LazySGD`: the gradient is
  row-sparse, the head applies the pending updates of the rows it samples before using them, and
  :meth:`PartialFC.sync` (called by ``state_dict``, ``full_state_dict`` and ``eval()``) applies all
  of them. ``make_optimizer("adamw")`` uses ``torch.optim.AdamW`` on a dense gradient (``O(C·D)``).
* ``"sparse"`` (the paper's "only a subset is selected and updated"): ``weight.grad`` is a sparse
  tensor of the ``k`` sampled rows and ``make_optimizer`` returns :class:`pfclib.optim.SparseSGD` /
  ``SparseAdamW``, which change only those rows and their state — ``O(k·D)`` per step; unsampled
  rows are frozen. Identical to dense at ``r = 1``.

Two options change what a class and a cosine are (both off by default; the default head runs exactly
the code it ran without them):

* **Sub-center ArcFace** (``sub_centers=K``; Deng, Guo, Liu, Zafeiriou, Kotsia, "Sub-center ArcFace:
  Boosting Face Recognition by Large-scale Noisy Web Faces", ECCV 2020; the paper's default is
  ``K = 3``): each class has ``K`` centers and a row's cosine to class ``j`` is
  ``max_k cos(x, w_{j,k})`` — the gradient reaches the arg-max sub-center only — then the margin and
  the softmax as usual. Layout: ``weight`` is ``(n_local·K, D)``, local class ``c``'s sub-centers are
  rows ``c·K … c·K + K - 1`` (the global ``(C·K, D)`` matrix holds class ``j`` at rows ``j·K …``),
  so sampling (``k`` classes → ``k·K`` rows), sharding (whole classes), the optimizers' per-row state
  and checkpoints move a class with its ``K`` rows. Counters (``track_updates``) stay per class.
* **Unicom feature-dimension sampling** (``dim_sample_rate=q``; An, Deng, Yang, Li, Feng, Guo, Yang,
  Liu, "Unicom: Universal and Compact Representation Learning for Image Retrieval", ICLR 2023, "we
  randomly select partial feature dimensions when calculating the similarities between embeddings
  and class-wise prototypes"): at every training-mode forward, after class sampling, a uniformly
  random subset of ``d = int(q·D)`` dimensions is kept — the same columns of the embeddings *and*
  of the sampled centers, one draw per forward, as in the authors' released ``PartialFC_V2``
  (``index_select`` on dimension 1 of both) — and both are normalised over those ``d`` dimensions
  only; cosine, margin and softmax follow as usual and the gradient reaches only the kept
  dimensions (weight decay and momentum still move whole rows). Per-row margins see the kept
  dimensions too (AdaFace: the norm of the kept part). The authors' fine-tuning script leaves the
  option off (``sample_num_feat=None``), so the default here is ``q = 1`` (off).
  The subset is drawn from a generator seeded by ``derive_seed(dim_seed, SEED_DIM_SAMPLE, t)``, ``t``
  the number of draws so far (``dim_step``), ``dim_seed`` the head's ``seed``: both are the same on
  every rank (the authors' code draws on each GPU without a shared seed) and saved with the head's
  state, so a resumed run draws what an uninterrupted one does. In ``eval()`` mode the head uses
  all ``D`` dimensions (evaluation uses the full embedding). Under gradient accumulation each
  micro-batch's forward draws its own subset.

Full state for checkpoints and re-sharding onto another number of ranks: :mod:`pfclib.head_state`.

Gradient scaling: with W ranks the gradient reaching rank r's embeddings is ``W · dL/d(emb_r)``
for the global mean loss L, so DDP's average over W gives the backbone the true gradient. Center
gradients are the exact ``dL/d(centers)`` (the head is never wrapped in DDP).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pfclib import distributed as pdist
from pfclib import head_state
from pfclib import margins as pmargins
from pfclib.fused import sampled_margin_cross_entropy
from pfclib.head_state import FULL_STATE_FORMAT  # noqa: F401  (re-exported)
from pfclib.optim import LazySGD, SparseAdamW, SparseSGD, Workspace
from pfclib.sampler import num_sampled, remap_labels, sample_classes
from pfclib.seeding import SEED_DIM_SAMPLE, SEED_INIT_CENTERS, SEED_SAMPLER, derive_seed

_INIT_BLOCK = 4096  # rows per independently seeded block of the initial centers


def init_centers(
    start: int, n_local: int, embedding_size: int, seed: int, dtype: torch.dtype, device=None
) -> Tensor:
    """Rows ``[start, start + n_local)`` of the initial ``(C, D)`` centers, N(0, 0.01²).

    Rows are generated in blocks of 4096 with a generator seeded by ``(seed, block)``, so a class's
    initial center does not depend on the number of ranks (two ranks start where one does), and
    never more than one block is materialised beyond the shard.
    """
    out = torch.empty((n_local, embedding_size), dtype=dtype, device=device)
    end = start + n_local
    gen = torch.Generator()
    for block in range(start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK + 1 if n_local else 0):
        b0 = block * _INIT_BLOCK
        gen.manual_seed(derive_seed(seed, SEED_INIT_CENTERS, block))
        rows = torch.empty((_INIT_BLOCK, embedding_size), dtype=dtype).normal_(0.0, 0.01, generator=gen)
        lo, hi = max(start, b0), min(end, b0 + _INIT_BLOCK)
        out[lo - start : hi - start] = rows[lo - b0 : hi - b0]
    return out


class PartialFC(nn.Module):
    """Partial FC margin-softmax head owning this rank's shard of the class centers.

    Args:
        num_classes: C, total number of classes over all ranks.
        embedding_size: D.
        sample_rate: r in (0, 1]; each rank samples ``k = int(r * n_local)`` classes per step
            (all local positives are always kept). ``1.0`` is pure model parallelism.
        margin: a :class:`pfclib.margins.Margin`, a name (``"arcface"``, ``"arcface_st"``,
            ``"cosface"``, ``"combined"``, ``"softmax"``, ``"adaface"``, ``"npcface"``) or a dict for
            :func:`pfclib.margins.create`. A margin with running state (AdaFace's moving averages of
            the norms) keeps it in buffers ``margin_<key>`` of this module (in ``state_dict()``).
        update: ``"dense"`` (default, reference semantics) or ``"sparse"`` (see module doc).
        chunk_size: if set, compute the softmax over chunks of this many sampled classes without
            holding the ``N x k`` logits (same result, about one extra matmul in backward).
        track_updates: keep per-class counters ``active_updates`` (steps where the class was a
            positive of the gathered batch) and ``passive_updates`` (steps where it was sampled as a
            negative only); ``O(k)`` per training step.
        seed: seeds the initial centers (per class, independent of W) and the sampler's generator
            (per rank: ``(seed, rank)``).
        sub_centers: K >= 1 centers per class (Sub-center ArcFace, see module doc; the paper uses
            K = 3). ``1`` (default) is the ordinary head, bit for bit and at the same cost.
        dim_sample_rate: q in (0, 1]; each training forward keeps ``int(q·D)`` random embedding
            dimensions, the same on every rank (Unicom, see module doc). ``1.0`` (default) keeps all.
        process_group: None -> the default group if torch.distributed is initialised with W > 1,
            else a single process.
        device, dtype: of the centers; dtype float32 (default) or float64. Logits are computed in
            ``promote(dtype, float32)`` whatever the embeddings' dtype.

    Attributes:
        weight: ``nn.Parameter`` ``(n_local·K, D)``, this rank's centers: class ``start + c`` at rows
            ``c·K … c·K + K - 1`` (K = ``sub_centers``; one row per class by default).
        sub_centers, dim_sample_rate, num_dims (``d = int(q·D)``), dim_step (draws so far) and
            dim_seed (their seed: ``seed`` of the head that started the run; both in the state).
        last_dims: the embedding dimensions kept at the last forward (None: all).
        start, n_local, rank, world_size, num_classes, embedding_size, sample_rate, margin, update.
        generator: the CPU ``torch.Generator`` of the sampler (saved in the state dict).
        last_index: local indices of the classes sampled at the last forward (None when r = 1).
        last_sample: ``(index, target)`` of the last forward (``target``: each gathered row's column
            in ``index``, -1 where another rank owns its class); read by :mod:`pfclib.quality`.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        sample_rate: float = 1.0,
        margin: pmargins.Margin | str | Mapping[str, Any] = "arcface",
        update: str = "dense",
        chunk_size: int | None = None,
        track_updates: bool = False,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        sub_centers: int = 1,
        dim_sample_rate: float = 1.0,
    ) -> None:
        super().__init__()
        if not _is_whole(num_classes) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not _is_whole(embedding_size) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
        if not _is_real(sample_rate):
            raise TypeError(
                f"sample_rate must be a number in (0, 1], got {type(sample_rate).__name__}: {sample_rate!r}"
            )
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if update not in ("dense", "sparse"):
            raise ValueError(f"update must be 'dense' or 'sparse', got {update!r}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype of the centers must be torch.float32 or torch.float64, got {dtype}")
        if not _is_whole(sub_centers) or sub_centers < 1:
            raise ValueError(f"sub_centers must be a positive integer, got {sub_centers!r}")
        if not _is_real(dim_sample_rate) or not 0.0 < dim_sample_rate <= 1.0:
            raise ValueError(f"dim_sample_rate must be a number in (0, 1], got {dim_sample_rate!r}")
        if int(dim_sample_rate * embedding_size) == 0:
            raise ValueError(
                f"dim_sample_rate={dim_sample_rate!r} keeps int({dim_sample_rate!r} * {embedding_size}) = 0 "
                f"of the {embedding_size} embedding dimensions; it must keep at least one"
            )
        self.sub_centers = int(sub_centers)
        self.dim_sample_rate = float(dim_sample_rate)
        self.num_dims = int(self.dim_sample_rate * embedding_size)
        self.dim_step = 0  # dimension draws so far (Unicom); the same on every rank
        self.dim_seed = int(seed)  # the draws' seed; saved and restored with dim_step
        self.last_dims: Tensor | None = None
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.sample_rate, self.update, self.seed = float(sample_rate), update, int(seed)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.margin = pmargins.create(margin)
        self.track_updates = bool(track_updates)
        self.group, self.rank, self.world_size = pdist.resolve_group(process_group)
        self.start, self.n_local = pdist.shard_range(self.num_classes, self.rank, self.world_size)
        self.num_sampled = num_sampled(self.sample_rate, self.n_local)
        k_sub = self.sub_centers  # rows of the global (C·K, D) matrix: class j at j·K ... j·K + K - 1
        self.weight = nn.Parameter(
            init_centers(
                self.start * k_sub, self.n_local * k_sub, self.embedding_size, self.seed, dtype, device
            )
        )
        self.generator = torch.Generator()
        self.generator.manual_seed(derive_seed(self.seed, SEED_SAMPLER, self.rank))
        if self.track_updates:
            self.register_buffer(
                "active_updates", torch.zeros(self.n_local, dtype=torch.int64, device=device)
            )
            self.register_buffer(
                "passive_updates", torch.zeros(self.n_local, dtype=torch.int64, device=device)
            )
        for key, value in self.margin.initial_state().items():  # e.g. AdaFace's moving averages
            self.register_buffer(f"margin_{key}", torch.tensor(float(value), dtype=dtype, device=device))
        self.last_index: Tensor | None = None
        self.last_sample: tuple[Tensor | None, Tensor] | None = None
        self._lazy: LazySGD | None = None  # set by make_optimizer("sgd") for update="dense"
        self._work = Workspace()  # chunk buffers of the fused cosine, reused every step
        self.register_state_dict_pre_hook(_sync_before_state_dict)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, shard=[{self.start}, "
            f"{self.start + self.n_local}) of rank {self.rank}/{self.world_size}, sample_rate={self.sample_rate}, "
            f"update={self.update!r}, chunk_size={self.chunk_size}, margin={self.margin}"
            + (f", sub_centers={self.sub_centers}" if self.sub_centers > 1 else "")
            + (f", dim_sample_rate={self.dim_sample_rate}" if self.num_dims < self.embedding_size else "")
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self, embeddings: Tensor, labels: Tensor, *, index: Tensor | None = None, dims: Tensor | None = None
    ) -> Tensor:
        """Mean margin-softmax cross-entropy of the global batch.

        Args:
            embeddings: ``(B, D)`` float (fp16/bf16/fp32/fp64), un-normalised; not modified.
            labels: ``(B,)`` integer class ids in ``[0, C)``.
            index: optional sorted distinct local class indices to use instead of sampling
                (must contain this rank's positives); for tests and analysis.
            dims: optional sorted distinct embedding dimensions to keep instead of drawing them
                (``dim_sample_rate < 1`` only; the draw count ``dim_step`` does not move); the same
                on every rank. For tests and analysis.

        Returns:
            scalar loss in the compute dtype (fp32, or fp64 for fp64 centers), equal on every rank.
            Batch sizes may differ between ranks.
        """
        sizes = self._check_inputs(embeddings, labels)
        dims = self._draw_dims(dims)
        compute_dtype = torch.promote_types(self.weight.dtype, torch.float32)

        # gather: (N, D) embeddings with gradient (scaled by W, see module doc) and (N,) labels
        emb = pdist.all_gather_with_grad(embeddings, sizes, self.group, grad_scale=self.world_size)
        lab = pdist.all_gather_no_grad(labels.to(torch.int64), sizes, self.group)
        local = lab - self.start
        local = torch.where((local >= 0) & (local < self.n_local), local, torch.full_like(local, -1))

        # sample: index (k,) of local classes (None = all), target column per row (-1 = not mine)
        index, target = self._sample(local, index)
        if dims is not None:  # Unicom: only the kept dimensions of the embeddings (and centers below)
            emb = emb.index_select(1, dims)

        # logits in fp32/fp64 even inside an autocast region of the backbone
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            # normalise: embeddings and only the sampled centers
            x = F.normalize(emb.to(compute_dtype), dim=1)
            ctx = self._norm_context(emb, compute_dtype) if self.margin.needs_norms else None
            k_sub = self.sub_centers
            if self._lazy is not None:  # pending dense-semantics updates of the sampled rows
                self._lazy.catch_up(self.weight, self._weight_rows(index))
            if self.chunk_size is None and self._row_sparse:
                # fused gather -> normalise -> cosine -> margin -> cross-entropy (pfclib.fused): no
                # (k, D) copy, one (N, k) buffer, row-sparse gradient
                rows = self._weight_rows(index)
                if k_sub == 1 and dims is None:
                    return sampled_margin_cross_entropy(
                        x, self.weight, rows, target, self.margin, self.group, self._work, ctx
                    )
                return sampled_margin_cross_entropy(
                    x, self.weight, rows, target, self.margin, self.group, self._work, ctx, k_sub, dims
                )
            w = self._centers(index).to(compute_dtype)
            if dims is not None:
                w = w.index_select(1, dims)
            w = F.normalize(w, dim=1)

            # cosine -> margin -> distributed softmax cross-entropy
            if self.chunk_size is not None:
                if k_sub == 1:
                    return pdist.chunked_margin_cross_entropy(
                        x, w, target, self.margin, self.chunk_size, self.group, ctx
                    )
                return pdist.chunked_margin_cross_entropy(
                    x, w, target, self.margin, self.chunk_size, self.group, ctx, sub_centers=k_sub
                )
            cos = x @ w.T
            if k_sub > 1:  # a class's cosine: its nearest sub-center (gradient to that one only)
                cos = cos.view(cos.shape[0], -1, k_sub).max(dim=2).values
            cos = cos.clamp(-1.0, 1.0)
            if self.margin.needs_negatives:  # hard negatives over every rank's (sampled) columns
                ctx = pdist.hard_negative_context(self.margin, cos.detach(), target, self.group)
            logits = self.margin(cos, target) if ctx is None else self.margin(cos, target, ctx)
            return pdist.margin_softmax_cross_entropy(logits, target, self.group)

    def _norm_context(self, emb: Tensor, dtype: torch.dtype) -> pmargins.RowContext:
        """The row context of a margin with ``needs_norms`` from the gathered embeddings' norms
        (detached; the same rows in the same order on every rank, so no collective); its running
        state (buffers ``margin_<key>``) moves in training mode only."""
        norms = torch.linalg.vector_norm(emb.detach().to(dtype), dim=1)
        state = {key: getattr(self, f"margin_{key}") for key in self.margin.initial_state()}
        return self.margin.norm_context(norms, state, update=self.training)

    @property
    def _row_sparse(self) -> bool:
        """Whether the centers' gradient is row-sparse: sparse updates, or the lazy dense optimizer."""
        return self.update == "sparse" or self._lazy is not None

    def sync(self) -> None:
        """Apply the pending updates of every center (``update="dense"`` with the optimizer of
        :meth:`make_optimizer("sgd") <make_optimizer>`, see :class:`pfclib.optim.LazySGD`).

        Call it before reading ``self.weight`` or the optimizer's state directly. ``state_dict()``,
        :meth:`full_state_dict`, ``eval()`` and the optimizer's ``state_dict()`` call it themselves;
        a no-op otherwise."""
        if self._lazy is not None:
            self._lazy.flush()

    @torch.no_grad()
    def centers(self, rows: Tensor | None = None) -> Tensor:
        """A copy of the current centers of ``weight`` rows ``rows`` (all if None; with sub-centers a
        class has K rows, see :meth:`class_centers`), with their pending lazy
        updates (cost ``O(len(rows)·D)``; the head's state is left as it is, so a run that is observed
        trains exactly like one that is not)."""
        if rows is None:
            rows = torch.arange(self.weight.shape[0], device=self.weight.device)
        else:
            rows = rows.to(self.weight.device, torch.int64)
        if self._lazy is not None:
            return self._lazy.current_rows(self.weight, rows)
        return self.weight.detach().index_select(0, rows)

    def train(self, mode: bool = True) -> PartialFC:
        if not mode:
            self.sync()
        return super().train(mode)

    def _index_or_all(self, index: Tensor | None) -> Tensor:
        return torch.arange(self.n_local, device=self.weight.device) if index is None else index

    def _weight_rows(self, index: Tensor | None) -> Tensor:
        """The rows of ``weight`` of the local classes ``index`` (all if None): the classes themselves
        for K = 1, else each class's K sub-center rows ``c·K … c·K + K - 1`` (sorted, distinct)."""
        if self.sub_centers == 1:
            return self._index_or_all(index)
        if index is None:
            return torch.arange(self.weight.shape[0], device=self.weight.device)
        offsets = torch.arange(self.sub_centers, device=index.device)
        return (index[:, None] * self.sub_centers + offsets).reshape(-1)

    def _centers(self, index: Tensor | None) -> Tensor:
        """The sampled centers ``(k·K, D)``: row-sparse gradient (sparse update or lazy optimizer), else dense."""
        if self._row_sparse:
            return F.embedding(self._weight_rows(index), self.weight, sparse=True)
        if index is None:
            return self.weight
        return self.weight.index_select(0, self._weight_rows(index))

    @torch.no_grad()
    def class_centers(self, classes: Tensor | None = None) -> Tensor:
        """The current centers of local classes ``classes`` (all if None) as ``(n, K, D)`` (a copy,
        pending lazy updates included; see :meth:`centers`)."""
        classes = self._index_or_all(None if classes is None else classes.to(self.weight.device, torch.int64))
        return self.centers(self._weight_rows(classes)).view(-1, self.sub_centers, self.embedding_size)

    @torch.no_grad()
    def dominant_centers(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Per local class, the index in ``[0, K)`` of its dominant sub-center: the one nearest (by
        cosine) to most of the given samples of the class (the paper's dominant sub-center, on the
        samples passed in; one pass over them, no state). ``labels`` are global class ids; samples of
        other ranks' classes are ignored; a class without samples gets -1. ``(n_local,)`` int64."""
        local = labels.to(self.weight.device, torch.int64) - self.start
        keep = (local >= 0) & (local < self.n_local)
        local = local[keep]
        out = torch.full((self.n_local,), -1, dtype=torch.int64, device=self.weight.device)
        if local.numel() == 0:
            return out
        x = F.normalize(embeddings[keep].to(self.weight.dtype), dim=1)
        w = F.normalize(self.class_centers(local), dim=2)  # (n, K, D)
        nearest = torch.einsum("nd,nkd->nk", x, w).argmax(dim=1)
        votes = torch.zeros((self.n_local, self.sub_centers), dtype=torch.int64, device=out.device)
        votes.index_put_((local, nearest), torch.ones_like(local), accumulate=True)
        seen = votes.sum(dim=1) > 0
        out[seen] = votes[seen].argmax(dim=1)
        return out

    def _draw_dims(self, dims: Tensor | None) -> Tensor | None:
        """The embedding dimensions this forward keeps (None: all): ``dims`` if given, else in training
        mode with ``dim_sample_rate < 1`` a fresh draw of ``d`` of the ``D`` (see module doc)."""
        if dims is not None:
            if self.num_dims == self.embedding_size:
                raise ValueError("dims= needs dim_sample_rate < 1 (this head keeps every dimension)")
            dims = dims.to(self.weight.device)
            if dims.dtype not in (torch.int32, torch.int64) or dims.dim() != 1 or dims.numel() == 0:
                raise ValueError(
                    f"dims must be a non-empty 1-D integer tensor, got {dims.dtype} {tuple(dims.shape)}"
                )
            dims = dims.to(torch.int64)
            if int(dims.min()) < 0 or int(dims.max()) >= self.embedding_size:
                raise ValueError(
                    f"dims must lie in [0, {self.embedding_size}), got [{int(dims.min())}, {int(dims.max())}]"
                )
            if dims.numel() > 1 and not bool((dims[1:] > dims[:-1]).all()):
                raise ValueError("dims must be sorted ascending without duplicates")
        elif self.num_dims < self.embedding_size and self.training:
            gen = torch.Generator().manual_seed(derive_seed(self.dim_seed, SEED_DIM_SAMPLE, self.dim_step))
            dims = torch.randperm(self.embedding_size, generator=gen)[: self.num_dims].sort().values
            dims = dims.to(self.weight.device)
            self.dim_step += 1
        self.last_dims = dims
        return dims

    def _sample(self, local: Tensor, index: Tensor | None) -> tuple[Tensor | None, Tensor]:
        positives = torch.unique(local[local >= 0])
        if index is not None:
            index = self._check_index(index)
        elif self.sample_rate < 1.0:
            index = sample_classes(positives.cpu(), self.n_local, self.num_sampled, self.generator)
            index = index.to(self.weight.device)
        self.last_index = index
        target = local if index is None else remap_labels(local, index)
        self.last_sample = (index, target)
        if self.track_updates and self.training:
            with torch.no_grad():
                if index is None:
                    self.passive_updates += 1
                else:
                    self.passive_updates.index_add_(0, index, torch.ones_like(index))
                self.passive_updates.index_add_(0, positives, torch.full_like(positives, -1))
                self.active_updates.index_add_(0, positives, torch.ones_like(positives))
        return index, target

    def _check_index(self, index: Tensor) -> Tensor:
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
            raise ValueError(
                f"index must be a 1-D integer tensor, got dtype {index.dtype} shape {tuple(index.shape)}"
            )
        index = index.to(self.weight.device, torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_local):
            raise ValueError(
                f"index values must lie in [0, {self.n_local}), got [{int(index.min())}, {int(index.max())}]"
            )
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise ValueError("index must be sorted ascending without duplicates")
        return index

    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> list[int]:
        """Validate the local inputs; in a process group every rank learns whether any rank failed
        (one small all-gather, which also carries the batch sizes), so all raise together."""
        error: Exception | None = None
        try:
            self._validate_local(embeddings, labels)
        except (TypeError, ValueError) as exc:
            error = exc
        batch = int(embeddings.shape[0]) if isinstance(embeddings, Tensor) and embeddings.dim() >= 1 else 0
        if self.group is None:
            if error is not None:
                raise error
            return [batch]
        sizes, oks = pdist.gather_batch_meta(batch, error is None, self.group, self.weight.device)
        if error is not None:
            raise type(error)(f"rank {self.rank}: {error}") from error
        bad = [r for r, ok in enumerate(oks) if not ok]
        if bad:
            raise ValueError(
                f"rank(s) {bad} rejected their inputs (see their error); rank {self.rank} stops too"
            )
        return sizes

    def _validate_local(self, embeddings: Tensor, labels: Tensor) -> None:
        if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(
                f"embeddings and labels must be tensors, got {type(embeddings).__name__}, {type(labels).__name__}"
            )
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be a floating-point tensor, got dtype {embeddings.dtype}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape (B, {self.embedding_size}), got {tuple(embeddings.shape)}"
            )
        if embeddings.shape[0] == 0:
            raise ValueError("empty batch: embeddings have 0 rows, expected at least 1")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"labels must have shape ({embeddings.shape[0]},) to match the embeddings, got {tuple(labels.shape)}"
            )
        if embeddings.device != self.weight.device:
            raise ValueError(
                f"embeddings are on {embeddings.device} but the head's centers are on {self.weight.device}"
            )
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique()[:10].tolist()
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got out-of-range values {bad}")
        finite = torch.isfinite(embeddings).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().squeeze(1)[:10].tolist()
            raise ValueError(f"embeddings contain non-finite values (NaN/inf) in rows {rows}")

    # ---------------------------------------------------------------- optimizer
    def make_optimizer(
        self,
        kind: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        nesterov: bool = False,
    ) -> torch.optim.Optimizer:
        """An optimizer over ``[self.weight]``; ``kind`` is ``"sgd"`` or ``"adamw"``.

        * ``update="dense"``, SGD: :class:`~pfclib.optim.LazySGD`, ``torch.optim.SGD``'s result at
          ``O(k·D)`` per step; the head then produces a row-sparse gradient and applies the pending
          updates of the rows it samples (see :meth:`sync`).
        * ``update="dense"``, AdamW: ``torch.optim.AdamW`` on the dense gradient (``O(C·D)`` per step;
          with ``eps > 0`` an idle row's AdamW motion is not a linear map, so no lazy form is exact).
        * ``update="sparse"``: :class:`~pfclib.optim.SparseSGD` / ``SparseAdamW`` (only sampled rows and
          their state change).

        A head drives one optimizer of its own: a new call replaces the previous one's lazy link. A
        ``torch.optim.SGD`` built by hand on ``head.weight`` works as well (dense gradient, dense cost)
        as long as ``make_optimizer("sgd")`` was not called on this head."""
        sparse = self.update == "sparse"
        if kind not in ("sgd", "adamw"):
            raise ValueError(f"unknown optimizer kind {kind!r}; expected 'sgd' or 'adamw'")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eps", eps)):
            if not (_is_real(value) or (isinstance(value, Tensor) and value.numel() == 1)):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
        self.sync()
        self._lazy = None
        if kind == "sgd":
            cls = SparseSGD if sparse else LazySGD
            # one set of chunk buffers for the head and its optimizer
            opt = cls(
                [self.weight],
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                nesterov=nesterov,
                work=self._work,
            )
            if not sparse:
                self._lazy = opt
            return opt
        cls = SparseAdamW if sparse else torch.optim.AdamW
        return cls([self.weight], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    # -------------------------------------------------------------- state dicts
    def get_extra_state(self) -> dict[str, Any]:
        state = {
            "generator": self.generator.get_state(),
            "num_classes": self.num_classes,
            "start": self.start,
            "n_local": self.n_local,
            "world_size": self.world_size,
        }
        if self.sub_centers > 1:
            state["sub_centers"] = self.sub_centers
        if self.num_dims < self.embedding_size:
            state["dim_step"] = self.dim_step
            state["dim_seed"] = self.dim_seed
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = (self.num_classes, self.start, self.n_local)
        theirs = (state["num_classes"], state["start"], state["n_local"])
        if mine != theirs:
            raise ValueError(
                f"state dict holds classes [{theirs[1]}, {theirs[1] + theirs[2]}) of {theirs[0]} but this rank owns "
                f"[{mine[1]}, {mine[1] + mine[2]}) of {mine[0]}; use full_state_dict()/load_full_state_dict() "
                "to change the number of ranks"
            )
        if state.get("sub_centers", 1) != self.sub_centers:
            raise ValueError(
                f"state dict has sub_centers={state.get('sub_centers', 1)} but this head has {self.sub_centers}"
            )
        self.generator.set_state(state["generator"])
        if "dim_step" in state:
            self.dim_step, self.dim_seed = int(state["dim_step"]), int(state["dim_seed"])

    def full_state_dict(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Collective (every rank calls it): the whole head (and ``optimizer``'s state for it) as one
        plain dict of CPU tensors, on every rank; see :mod:`pfclib.head_state` for its keys."""
        return head_state.full_state_dict(self, optimizer)

    def load_full_state_dict(
        self, full: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Load a :meth:`full_state_dict` saved with any number of ranks (this rank takes its rows);
        optimizer state moves between the optimizers of one family (see :mod:`pfclib.head_state`)."""
        head_state.load_full_state_dict(self, full, optimizer)


def _is_real(value: Any) -> bool:
    """A real number (int, float, numpy scalar), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    """A real number with an integral value (``10``, ``10.0``, ``np.int64(10)``), not a bool."""
    return _is_real(value) and math.isfinite(value) and int(value) == value


def _sync_before_state_dict(module: PartialFC, prefix: str, keep_vars: bool) -> None:
    module.sync()


def expected_passive_rate(sample_rate: float, n_local: int, num_positives: int) -> float:
    """Probability that a given non-positive class is sampled in a step (``(k - P) / (n_local - P)``),
    the passive-update rate the counters should show on average; ``math.nan`` if undefined."""
    k = num_sampled(sample_rate, n_local)
    if n_local <= num_positives:
        return math.nan
    return max(k - num_positives, 0) / (n_local - num_positives)
