"""The whole Partial FC head as one plain dict, saved from and loaded onto any number of ranks.

A :class:`pfclib.head.PartialFC` holds one shard of the ``(C, D)`` centers per rank. A *full state*
(format ``"pfclib-partialfc/1"``) gathers the shards into one set of CPU tensors, so that a
checkpoint written by W ranks loads onto W' ranks: each rank of the new job takes the rows
``[start, start + n_local)`` of its own shard.

Keys: ``format``, ``num_classes``, ``embedding_size``, ``sample_rate``, ``update``, ``margin``
(dict), ``margin_state`` (the margin's running scalars, e.g. AdaFace's moving averages of the
embedding norms; ``{}`` for margins without state), ``weight`` ``(C, D)``, ``counters`` (``{"active", "passive"}`` of shape ``(C,)``, or None),
``generator_states`` (one per rank), ``optimizer`` (None, or ``{"class", "hyper", "state"}`` where
per-row state tensors are gathered to ``(C, ...)``).

Heads with sub-centers (``sub_centers=K > 1``) add the key ``sub_centers``; their ``weight`` and
per-row optimizer state are ``(C·K, ...)``, class ``j`` at rows ``j·K … j·K + K - 1``, so a rank
takes rows ``[start·K, (start + n_local)·K)`` (its classes with all their sub-centers); the counters
stay ``(C,)``. Heads with Unicom dimension sampling (``dim_sample_rate < 1``) add
``dim_sample_rate``, ``dim_step`` and ``dim_seed`` (the draws so far and their seed, the same on
every rank, restored on any number of ranks). A state without these keys is that of a head with ``K = 1`` and ``q = 1``.

Optimizer state moves within a family: ``torch.optim.SGD``, :class:`~pfclib.optim.LazySGD` and
:class:`~pfclib.optim.SparseSGD` share ``momentum_buffer``; ``torch.optim.AdamW`` and
:class:`~pfclib.optim.SparseAdamW` share ``exp_avg``/``exp_avg_sq``, the step count converted
between one scalar and one per row. ``PartialFC.full_state_dict`` / ``load_full_state_dict`` are
the entry points; the functions here do the work.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
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
    """Classes per rank."""
    return [pdist.shard_range(head.num_classes, r, head.world_size)[1] for r in range(head.world_size)]


def _weight_sizes(head: PartialFC, sizes: list[int]) -> list[int]:
    """Rows of ``weight`` per rank (K per class)."""
    return sizes if head.sub_centers == 1 else [n * head.sub_centers for n in sizes]


def _option_keys(head: PartialFC) -> dict[str, Any]:
    """The keys of the optional head features (none for the default head)."""
    keys: dict[str, Any] = {}
    if head.sub_centers > 1:
        keys["sub_centers"] = head.sub_centers
    if head.num_dims < head.embedding_size:
        keys["dim_sample_rate"] = head.dim_sample_rate
        keys["dim_step"] = head.dim_step
        keys["dim_seed"] = head.dim_seed
    return keys


def _load_options(head: PartialFC, state: Mapping[str, Any]) -> None:
    if "dim_step" in state:
        head.dim_step, head.dim_seed = int(state["dim_step"]), int(state["dim_seed"])


def full_state_dict(head: PartialFC, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Collective (every rank calls it): the head's full state on every rank (see module doc).
    Extra memory: the full matrix on the CPU, one shard on the device."""
    head.sync()
    sizes = _row_sizes(head)
    wsizes = _weight_sizes(head, sizes)
    full: dict[str, Any] = {
        "format": FULL_STATE_FORMAT,
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "sample_rate": head.sample_rate,
        "update": head.update,
        "margin": head.margin.to_dict(),
        "margin_state": margin_state(head),
        "weight": pdist.gather_rows_to_cpu(head.weight.detach(), wsizes, head.group),
        "counters": None,
        **_option_keys(head),
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
    full["optimizer"] = None if optimizer is None else _full_optimizer_state(head, optimizer, wsizes)
    return full


def margin_state(head: PartialFC) -> dict[str, float]:
    """The margin's running scalars (buffers ``margin_<key>``), the same on every rank."""
    return {key: getattr(head, f"margin_{key}").item() for key in head.margin.initial_state()}


def _load_margin_state(head: PartialFC, saved: Mapping[str, float] | None, what: str) -> None:
    expected = head.margin.initial_state()
    saved = dict(saved or {})
    if set(saved) != set(expected):
        raise ValueError(
            f"{what} holds margin state {sorted(saved)}; margin {head.margin.name!r} keeps {sorted(expected)}"
        )
    with torch.no_grad():
        for key, value in saved.items():
            getattr(head, f"margin_{key}").fill_(value)


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


def _check_fits(head: PartialFC, state: Mapping[str, Any], fmt: str, what: str) -> None:
    if state.get("format") != fmt:
        raise ValueError(f"expected a {what} of format {fmt!r}, got {state.get('format')!r}")
    if (state["num_classes"], state["embedding_size"]) != (head.num_classes, head.embedding_size):
        raise ValueError(
            f"{what} is for C={state['num_classes']}, D={state['embedding_size']}; "
            f"this head has C={head.num_classes}, D={head.embedding_size}"
        )
    if state.get("sub_centers", 1) != head.sub_centers:
        raise ValueError(
            f"{what} has sub_centers={state.get('sub_centers', 1)}; this head has sub_centers={head.sub_centers}"
        )


def load_full_state_dict(
    head: PartialFC, full: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load a full state (saved with any number of ranks): this rank takes its rows. The sampler's
    generator is restored only when the world size matches (otherwise it keeps its ``(seed, rank)``
    seeding)."""
    _check_fits(head, full, FULL_STATE_FORMAT, "full state dict")
    head.sync()  # a lazy optimizer's window restarts: every row loaded below is current
    _load_margin_state(head, full.get("margin_state"), "full state dict")
    rows = slice(head.start, head.start + head.n_local)
    k_sub = head.sub_centers
    wrows = slice(head.start * k_sub, (head.start + head.n_local) * k_sub)  # the classes' K rows each
    _load_options(head, full)
    with torch.no_grad():
        head.weight.copy_(full["weight"][wrows])
        if head.track_updates and full.get("counters") is not None:
            head.active_updates.copy_(full["counters"]["active"][rows])
            head.passive_updates.copy_(full["counters"]["passive"][rows])
    states = full.get("generator_states") or []
    if len(states) == head.world_size:
        head.generator.set_state(states[head.rank])
    if optimizer is not None:
        if full.get("optimizer") is None:
            raise ValueError("the full state dict holds no optimizer state; pass optimizer=None")
        _load_full_optimizer_state(head, full["optimizer"], optimizer, wrows)


def _load_full_optimizer_state(
    head: PartialFC, saved: Mapping[str, Any], optimizer: torch.optim.Optimizer, rows: slice
) -> None:
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
    _install_optimizer_state(head, saved["class"], saved["hyper"], state, optimizer)


def _install_optimizer_state(
    head: PartialFC,
    theirs: str,
    hyper: Mapping[str, Any],
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
) -> None:
    """Make ``state`` (this rank's rows, on the head's device) the optimizer state of the head's
    weight, converting within an optimizer family (see the module doc)."""
    mine = type(optimizer).__name__
    if mine != theirs and not any({mine, theirs} <= fam for fam in _FAMILIES):
        raise ValueError(f"optimizer state was saved from {theirs}, cannot load it into {mine}")
    group = _weight_group(head, optimizer)
    for key, value in hyper.items():
        if key in group:
            group[key] = value
    device = head.weight.device
    if "step" in state and isinstance(state["step"], Tensor):
        step = state["step"]
        if mine == "SparseAdamW" and step.dim() == 0:
            state["step"] = torch.full((head.weight.shape[0],), int(step), dtype=torch.int64, device=device)
        elif mine == "AdamW" and step.dim() == 1:
            distinct = step.unique()
            if distinct.numel() > 1:
                raise ValueError("per-row AdamW steps differ between rows; load into SparseAdamW instead")
            value = float(distinct[0]) if distinct.numel() else 0.0
            state["step"] = torch.tensor(value, dtype=torch.float32)
    optimizer.state[head.weight] = state


# ------------------------------------------------------------------------------ sharded state
SHARD_FORMAT = "pfclib-partialfc-shard/1"
SHARDED_FORMAT = "pfclib-partialfc-sharded/1"
_COPY_ROWS = 65536  # rows per copy when loading shards: bounds the staging memory of a device copy


def shard_state_dict(head: PartialFC, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """This rank's rows of the head and of ``optimizer``'s state, as plain tensors (no collective).

    Keys: ``format`` (``"pfclib-partialfc-shard/1"``), ``num_classes``, ``embedding_size``,
    ``start``/``end`` (the rows held), ``weight`` ``(end - start, D)``, ``counters`` and
    ``optimizer`` (``{"class", "hyper", "state"}``, per-row state of this rank's rows). On a CPU
    head the tensors share the head's memory: saving a shard costs no extra copy.
    """
    head.sync()

    def host(t: Tensor) -> Tensor:
        t = t.detach()
        return t if t.device.type == "cpu" else t.cpu()

    shard: dict[str, Any] = {
        "format": SHARD_FORMAT,
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "start": head.start,
        "end": head.start + head.n_local,
        "weight": host(head.weight),
        "counters": None,
        "optimizer": None,
    }
    if head.sub_centers > 1:  # start/end count classes; weight and per-row state hold K rows each
        shard["sub_centers"] = head.sub_centers
    if head.track_updates:
        shard["counters"] = {"active": host(head.active_updates), "passive": host(head.passive_updates)}
    if optimizer is not None:
        group = _weight_group(head, optimizer)
        local = optimizer.state.get(head.weight, {})
        shard["optimizer"] = {
            "class": type(optimizer).__name__,
            "hyper": {k: v for k, v in group.items() if k != "params"},
            "state": {k: host(v) if isinstance(v, Tensor) else v for k, v in local.items()},
        }
    return shard


def sharded_manifest(head: PartialFC, shards: list[dict[str, Any]], folder: str) -> dict[str, Any]:
    """Collective: the description of a sharded head state, stored in the checkpoint in place of
    the full state. ``shards`` lists ``{"file", "start", "end", "bytes"}`` per rank (files relative
    to ``folder``, itself relative to the checkpoint file's folder)."""
    gen_state = head.generator.get_state()
    if head.group is None:
        states = [gen_state]
    else:
        states = [None] * head.world_size
        dist.all_gather_object(states, gen_state, group=head.group)
    return {
        "format": SHARDED_FORMAT,
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "sample_rate": head.sample_rate,
        "update": head.update,
        "margin": head.margin.to_dict(),
        "margin_state": margin_state(head),
        "world_size": head.world_size,
        "folder": folder,
        "shards": shards,
        "generator_states": states,
        **_option_keys(head),
    }


def _open_shard(folder: Path, entry: Mapping[str, Any]) -> dict[str, Any]:
    path = folder / entry["file"]
    shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if shard.get("format") != SHARD_FORMAT or (shard["start"], shard["end"]) != (
        entry["start"],
        entry["end"],
    ):
        raise ValueError(
            f"head shard {str(path)!r} does not hold rows [{entry['start']}, {entry['end']}) of format {SHARD_FORMAT!r}"
        )
    return shard


def load_sharded_state(
    head: PartialFC,
    manifest: Mapping[str, Any],
    folder: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load a sharded head state (written by any number of ranks) onto this rank: only the shards
    overlapping this rank's rows are opened, memory-mapped, and their rows copied straight into the
    head and its optimizer state, ``_COPY_ROWS`` rows at a time. Extra host memory: the mapped pages
    of the rows read (file cache) and one chunk. The sampler's generator is restored when the world
    size matches."""
    _check_fits(head, manifest, SHARDED_FORMAT, "sharded head state")
    _load_margin_state(head, manifest.get("margin_state"), "sharded head state")
    _load_options(head, manifest)
    k_sub = head.sub_centers  # weight and per-row optimizer state: K rows per class
    folder = Path(folder)
    head.sync()
    a, b = head.start, head.start + head.n_local
    device, dtype = head.weight.device, head.weight.dtype
    state: dict[str, Any] = {}
    saved_opt = None
    for entry in manifest["shards"]:
        lo, hi = max(a, entry["start"]), min(b, entry["end"])
        if lo >= hi:
            continue
        shard = _open_shard(folder, entry)
        s0 = entry["start"]
        pairs = [(head.weight, shard["weight"], k_sub)]  # (destination, source, rows per class)
        if head.track_updates and shard.get("counters") is not None:
            pairs += [
                (head.active_updates, shard["counters"]["active"], 1),
                (head.passive_updates, shard["counters"]["passive"], 1),
            ]
        if optimizer is not None:
            if shard.get("optimizer") is None:
                raise ValueError(
                    f"head shard {entry['file']!r} holds no optimizer state; pass optimizer=None"
                )
            saved_opt = shard["optimizer"]
            for key, value in saved_opt["state"].items():
                if isinstance(value, Tensor) and value.dim() >= 1:
                    if key not in state:
                        keep = dtype if value.is_floating_point() and key != "step" else value.dtype
                        state[key] = torch.empty(
                            (head.weight.shape[0], *value.shape[1:]), dtype=keep, device=device
                        )
                    pairs.append((state[key], value, k_sub))
                elif key not in state:  # a scalar (e.g. AdamW's step): the same on every rank
                    state[key] = value.to(device).clone() if isinstance(value, Tensor) else value
        with torch.no_grad():
            for dst, src, per in pairs:
                for r in range(lo * per, hi * per, _COPY_ROWS):
                    r1 = min(hi * per, r + _COPY_ROWS)
                    dst[r - a * per : r1 - a * per].copy_(src[r - s0 * per : r1 - s0 * per])
        del shard, pairs
    states = manifest.get("generator_states") or []
    if len(states) == head.world_size:
        head.generator.set_state(states[head.rank])
    if optimizer is not None and saved_opt is not None:
        _install_optimizer_state(head, saved_opt["class"], saved_opt["hyper"], state, optimizer)


def read_sharded_state(manifest: Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """The full state (the format of :func:`full_state_dict`) assembled from a sharded one, on the
    CPU: for analysis and for tools that want the whole ``(C, D)`` matrix (this does hold it all)."""
    folder = Path(folder)
    shards = [_open_shard(folder, e) for e in manifest["shards"]]
    full: dict[str, Any] = {
        "format": FULL_STATE_FORMAT,
        **{k: manifest[k] for k in ("num_classes", "embedding_size", "sample_rate", "update", "margin")},
        "margin_state": dict(manifest.get("margin_state") or {}),
        "weight": torch.cat([s["weight"] for s in shards]),
        "counters": None,
        "generator_states": list(manifest.get("generator_states") or []),
        "optimizer": None,
        **{
            k: manifest[k]
            for k in ("sub_centers", "dim_sample_rate", "dim_step", "dim_seed")
            if k in manifest
        },
    }
    if all(s.get("counters") is not None for s in shards):
        full["counters"] = {k: torch.cat([s["counters"][k] for s in shards]) for k in ("active", "passive")}
    if all(s.get("optimizer") is not None for s in shards):
        first = shards[0]["optimizer"]
        state = {}
        for key, value in first["state"].items():
            if isinstance(value, Tensor) and value.dim() >= 1:
                state[key] = torch.cat([s["optimizer"]["state"][key] for s in shards])
            else:
                state[key] = value.clone() if isinstance(value, Tensor) else value
        full["optimizer"] = {"class": first["class"], "hyper": dict(first["hyper"]), "state": state}
    return full
