"""The whole Partial FC head as one plain dict, saved from and loaded onto any number of ranks.

A :class:`pfclib.head.PartialFC` holds one shard of the ``(C, D)`` centers per rank. A *full state*
(format ``"pfclib-partialfc/1"``) gathers the shards into one set of CPU tensors, so that a
checkpoint written by W ranks loads onto W' ranks: each rank of the new job takes the rows
``[start, start + n_local)`` of its own shard.

Keys: ``format``, ``num_classes``, ``embedding_size``, ``sample_rate``, ``update``, ``margin``
(dict), ``weight`` ``(C, D)``, ``counters`` (``{"active", "passive"}`` of shape ``(C,)``, or None),
``generator_states`` (one per rank), ``optimizer`` (None, or ``{"class", "hyper", "state"}`` where
per-row state tensors are gathered to ``(C, ...)``).

Optimizer state moves within a family: ``torch.optim.SGD``, :class:`~pfclib.optim.LazySGD` and
:class:`~pfclib.optim.SparseSGD` share ``momentum_buffer``; ``torch.optim.AdamW`` and
:class:`~pfclib.optim.SparseAdamW` share ``exp_avg``/``exp_avg_sq``, the step count converted
between one scalar and one per row. ``PartialFC.full_state_dict`` / ``load_full_state_dict`` are
the entry points; the functions here do the work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from pfclib import distributed as pdist

if TYPE_CHECKING:
    from pfclib.head import PartialFC

FULL_STATE_FORMAT = "pfclib-partialfc/1"
_FAMILIES = ({"SGD", "SparseSGD", "LazySGD"}, {"AdamW", "SparseAdamW"})


def _row_sizes(head: PartialFC) -> list[int]:
    return [pdist.shard_range(head.num_classes, r, head.world_size)[1] for r in range(head.world_size)]


def full_state_dict(head: PartialFC, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Collective (every rank calls it): the head's full state on every rank (see module doc).
    Extra memory: the full matrix on the CPU, one shard on the device."""
    head.sync()
    sizes = _row_sizes(head)
    full: dict[str, Any] = {
        "format": FULL_STATE_FORMAT,
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "sample_rate": head.sample_rate,
        "update": head.update,
        "margin": head.margin.to_dict(),
        "weight": pdist.gather_rows_to_cpu(head.weight.detach(), sizes, head.group),
        "counters": None,
    }
    if head.track_updates:
        full["counters"] = {
            "active": pdist.gather_rows_to_cpu(head.active_updates, sizes, head.group),
            "passive": pdist.gather_rows_to_cpu(head.passive_updates, sizes, head.group),
        }
    gen_state = head.generator.get_state()
    if head.group is None:
        full["generator_states"] = [gen_state]
    else:
        states: list[Any] = [None] * head.world_size
        dist.all_gather_object(states, gen_state, group=head.group)
        full["generator_states"] = states
    full["optimizer"] = None if optimizer is None else _full_optimizer_state(head, optimizer, sizes)
    return full


def _weight_group(head: PartialFC, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    for group in optimizer.param_groups:
        if any(p is head.weight for p in group["params"]):
            return group
    raise ValueError("the optimizer does not hold this head's weight; build it with head.make_optimizer()")


def _full_optimizer_state(
    head: PartialFC, optimizer: torch.optim.Optimizer, sizes: list[int]
) -> dict[str, Any]:
    group = _weight_group(head, optimizer)
    local = optimizer.state.get(head.weight, {})
    keys = sorted(local)
    if head.group is not None:
        all_keys: list[Any] = [None] * head.world_size
        dist.all_gather_object(all_keys, keys, group=head.group)
        if any(k != keys for k in all_keys):
            raise RuntimeError(f"optimizer state keys differ between ranks: {all_keys}")
    state: dict[str, Any] = {}
    for key in keys:
        value = local[key]
        if isinstance(value, Tensor) and value.dim() >= 1:
            state[key] = pdist.gather_rows_to_cpu(value, sizes, head.group)
        else:
            state[key] = value.detach().cpu().clone() if isinstance(value, Tensor) else value
    hyper = {k: v for k, v in group.items() if k != "params"}
    return {"class": type(optimizer).__name__, "hyper": hyper, "state": state}


def load_full_state_dict(
    head: PartialFC, full: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load a full state (saved with any number of ranks): this rank takes its rows. The sampler's
    generator is restored only when the world size matches (otherwise it keeps its ``(seed, rank)``
    seeding)."""
    if full.get("format") != FULL_STATE_FORMAT:
        raise ValueError(
            f"expected a full state dict of format {FULL_STATE_FORMAT!r}, got {full.get('format')!r}"
        )
    if (full["num_classes"], full["embedding_size"]) != (head.num_classes, head.embedding_size):
        raise ValueError(
            f"full state dict is for C={full['num_classes']}, D={full['embedding_size']}; "
            f"this head has C={head.num_classes}, D={head.embedding_size}"
        )
    head.sync()  # a lazy optimizer's window restarts: every row loaded below is current
    rows = slice(head.start, head.start + head.n_local)
    with torch.no_grad():
        head.weight.copy_(full["weight"][rows])
        if head.track_updates and full.get("counters") is not None:
            head.active_updates.copy_(full["counters"]["active"][rows])
            head.passive_updates.copy_(full["counters"]["passive"][rows])
    states = full.get("generator_states") or []
    if len(states) == head.world_size:
        head.generator.set_state(states[head.rank])
    if optimizer is not None:
        if full.get("optimizer") is None:
            raise ValueError("the full state dict holds no optimizer state; pass optimizer=None")
        _load_full_optimizer_state(head, full["optimizer"], optimizer, rows)


def _load_full_optimizer_state(
    head: PartialFC, saved: Mapping[str, Any], optimizer: torch.optim.Optimizer, rows: slice
) -> None:
    mine, theirs = type(optimizer).__name__, saved["class"]
    if mine != theirs and not any({mine, theirs} <= fam for fam in _FAMILIES):
        raise ValueError(f"optimizer state was saved from {theirs}, cannot load it into {mine}")
    group = _weight_group(head, optimizer)
    for key, value in saved["hyper"].items():
        if key in group:
            group[key] = value
    device, dtype = head.weight.device, head.weight.dtype
    state: dict[str, Any] = {}
    for key, value in saved["state"].items():
        if isinstance(value, Tensor) and value.dim() >= 1:
            value = value[rows]
        if isinstance(value, Tensor):
            value = value.to(
                device, dtype if value.is_floating_point() and key != "step" else value.dtype
            ).clone()
        state[key] = value
    if "step" in state and isinstance(state["step"], Tensor):
        step = state["step"]
        if mine == "SparseAdamW" and step.dim() == 0:
            state["step"] = torch.full((head.n_local,), int(step), dtype=torch.int64, device=device)
        elif mine == "AdamW" and step.dim() == 1:
            distinct = step.unique()
            if distinct.numel() > 1:
                raise ValueError("per-row AdamW steps differ between rows; load into SparseAdamW instead")
            value = float(distinct[0]) if distinct.numel() else 0.0
            state["step"] = torch.tensor(value, dtype=torch.float32)
    optimizer.state[head.weight] = state
